"""Resolve `student.path` to a transformers model dir and the quant format it came in.

An HF dir is used as is. A `.gguf` file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf) is dequantized
once through transformers' GGUF loader and saved as safetensors in the cache
($EDGE_PU_CACHE, else ~/.cache/edge_pu); later runs load the cached dir in seconds. Training
then sees exactly the dequantized weights that the GGUF holds.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import EdgePuError
from ..gguf_header import file_type as gguf_file_type_id
from .cache import cache_root, publish_model

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def gguf_file_type(path: Path) -> str:
    from gguf import LlamaFileType

    value = gguf_file_type_id(path)
    if value is None:
        return "gguf:unknown"
    name = LlamaFileType(value).name.removeprefix("MOSTLY_").lower()
    return f"gguf:{name}"


def resolve_student(path_str: str, import_as: str = "") -> tuple[Path, str]:
    """Return (HF model dir, source quant format). With `import_as` (student.import_as, e.g.
    q8_0) the dir holds the dequantized weights of the student re-quantized to that GGUF type
    (edge_pu.quant.imported), and the format is that type."""
    if import_as:
        from .imported import check_import_format, import_student

        fmt = check_import_format(import_as)
        return import_student(resolve_student(path_str)[0], fmt)[1], f"gguf:{fmt}"
    if not path_str:
        raise EdgePuError("config: student.path is not set; give an HF model folder or a .gguf.")
    path = Path(path_str).expanduser()
    if not path.exists():
        raise EdgePuError(f"student.path {path}: no such file or folder.")
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path), gguf_file_type(path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise EdgePuError(f"student.path {path}: not a model folder (no config.json).")
        if not any((path / f).exists() for f in WEIGHT_FILES):
            raise EdgePuError(f"student.path {path}: no safetensors weights (edge_pu reads "
                              "only safetensors or GGUF, never pickled .bin files).")
        return path, "none"
    raise EdgePuError(f"student.path {path}: expected an HF model folder or a .gguf file.")


def _from_gguf(path: Path) -> Path:
    stat = path.stat()
    tag = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    out = cache_root() / "students" / f"{path.stem}-{tag.hexdigest()[:12]}"
    if (out / "edge_pu_source.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[student] dequantizing {path.name} once into {out} ...", flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unsupported GGUFs
        raise EdgePuError(f"student.path {path}: transformers could not read this GGUF "
                          f"({type(exc).__name__}: {exc}).") from None
    # A model loaded from GGUF is flagged as quantized and refuses save_pretrained; its weights
    # are already dequantized, so copy them into a fresh dense model of the same config.
    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    # Built on the meta device and handed the loaded tensors themselves (assign), so the
    # weights are held once, not twice: the 1.5B's first load peaked at 14.1 GB with a copy.
    with torch.device("meta"):
        dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    dense.load_state_dict(model.state_dict(), assign=True)
    dense.tie_weights()
    dense.generation_config = model.generation_config  # saved with it
    return publish_model(out, dense, tok, "edge_pu_source.json",
                         {"gguf": str(path.resolve()), "quant": gguf_file_type(path)})
