"""`student.import_as`: re-quantize the student once into a GGUF type with fast batched kernels.

    gguf_path, model_dir = import_student(source_dir, "q8_0")

llama.cpp has no batched kernel for Q4_1 on AVX2, so a Q4_1 student decodes at about the same
rate per row whether 4 or 32 rows share a batch; q8_0 has one (bench/README.md). The rule that
sampling, scoring and training see the same weights then holds for a *different* set of
weights, the way QLoRA trains on dequantize(NF4(W)):

  1. `source_dir` is the student as training would otherwise see it (a GGUF student's
     dequantized cache dir, or an HF folder);
  2. it is written once as a GGUF of type `fmt` with the export's writer (same tensor names,
     q/k permutation and per-tensor type rules as `edge-pu export`);
  3. that file's tensors are read back and dequantized with gguf-py (the numbers llama.cpp
     loads), un-permuted, and saved as a safetensors dir beside the source's config and
     tokenizer: the training base.

So torch trains on dequantize(q8_0(dequantize(Q4_1))) and `sampling.engine: llama-cpp`
samples from the q8_0 file itself (`import_marker` names it; `student_gguf` picks it up).
Both are cached by the source weights' tag and the format; a killed process leaves no dir that
looks complete. The import's own error on SmolLM2 is stated in bench/README.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ..errors import EdgePuError

IMPORT_MARKER = "edge_pu_import.json"
# Types llama.cpp decodes with batched AVX2 kernels and gguf-py writes directly; the others
# (q4_1, the K-quants) are what a student already comes in, not something to import into.
IMPORT_FORMATS = ("q8_0", "q4_0", "f16")
_VERSION = 1  # bump when the import's recipe changes, so cached imports are rebuilt


def check_import_format(fmt: str) -> str:
    name = fmt.lower().removeprefix("gguf:")
    if name not in IMPORT_FORMATS:
        raise EdgePuError(f"config: student.import_as {fmt!r}: use one of "
                          f"{', '.join(IMPORT_FORMATS)}, or leave it empty to keep the "
                          "student's own format.")
    return name


def imported_gguf(model_dir: Path) -> Path | None:
    """The GGUF an imported training dir was dequantized from, or None for any other dir."""
    marker = Path(model_dir) / IMPORT_MARKER
    if not marker.exists():
        return None
    return Path(json.loads(marker.read_text())["gguf"])


def import_student(source_dir: Path, fmt: str) -> tuple[Path, Path]:
    """(GGUF of type `fmt`, HF dir of exactly its dequantized weights), built once, cached."""
    from ..export.gguf_writer import write_gguf
    from .cache import cache_root, weights_tag

    fmt = check_import_format(fmt)
    name = f"{source_dir.name}-{weights_tag(source_dir)}-v{_VERSION}-{fmt}"
    out = cache_root() / "students" / name
    gguf_path = cache_root() / "gguf" / f"{name}.gguf"
    if (out / IMPORT_MARKER).exists() and gguf_path.exists():
        return gguf_path, out
    print(f"[student] importing {source_dir.name} as {fmt} once: {gguf_path}", flush=True)
    if not gguf_path.exists():
        tmp_gguf = gguf_path.with_name(gguf_path.name + ".tmp")
        write_gguf(source_dir, tmp_gguf, fmt)
        tmp_gguf.replace(gguf_path)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in source_dir.iterdir():  # config, tokenizer, chat template, generation config
        if f.is_file() and not f.name.startswith(("model.safetensors", "edge_pu_")):
            shutil.copy2(f, tmp / f.name)
    _save_dequantized(source_dir, gguf_path, tmp / "model.safetensors")
    (tmp / IMPORT_MARKER).write_text(json.dumps(
        {"gguf": str(gguf_path), "format": fmt, "source": str(source_dir.resolve())}))
    if not out.exists():
        tmp.replace(out)
    return gguf_path, out


def dequantized_tensors(source_dir: Path, gguf_path: Path) -> dict[str, np.ndarray]:
    """{HF name: float32 array} of the GGUF's tensors, for every tensor of `source_dir`, in
    HF layout (q/k rows un-permuted; a tied lm_head is left out, as the writer leaves it)."""
    import gguf

    from ..export import archs
    from ..export.gguf_writer import (
        _SKIP_SUFFIXES,
        arch_enum,
        gguf_tensor_name,
        iter_safetensors,
        read_config,
    )

    config = read_config(source_dir)
    spec = archs.arch_for(config)
    hp = archs.hparams(config, spec)
    name_map = gguf.get_tensor_name_map(arch_enum(spec.gguf_arch), hp.n_layers)
    reader = gguf.GGUFReader(str(gguf_path))
    by_name = {t.name: t for t in reader.tensors}
    out: dict[str, np.ndarray] = {}
    for hf_name, array in iter_safetensors(source_dir):
        if hf_name.endswith(_SKIP_SUFFIXES):
            continue
        if hf_name == "lm_head.weight" and hp.tied_embeddings:
            continue  # not in the GGUF either; transformers ties it to the embedding on load
        t = by_name[gguf_tensor_name(name_map, hf_name, str(source_dir))]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape(array.shape)
        heads = archs.qk_heads(hf_name, hp) if spec.permute_qk else None
        if heads is not None:
            w = unpermute_qk(w, heads)
        out[hf_name] = w
    return out


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `archs.permute_qk`: llama.cpp's RoPE row order back to HF's."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def _save_dequantized(source_dir: Path, gguf_path: Path, out_file: Path) -> None:
    import torch
    from safetensors.torch import save_file

    state = {name: torch.from_numpy(np.ascontiguousarray(w))
             for name, w in dequantized_tensors(source_dir, gguf_path).items()}
    save_file(state, str(out_file), metadata={"format": "pt"})
