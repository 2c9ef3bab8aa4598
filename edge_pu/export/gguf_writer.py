"""Write a GGUF model file from a merged (dense) HF model dir, in Python, with gguf-py.

    from edge_pu.export import write_gguf
    write_gguf("runs/x/merged", "runs/x/export/model-q8_0.gguf", quant="q8_0")

Input: an HF dir with config.json, *.safetensors (any float dtype), tokenizer.json and
tokenizer_config.json (plus chat_template.jinja when the model has one). Output: one GGUF with
llama.cpp's architecture metadata, tensor names (gguf-py's TensorNameMap), the Llama q/k row
permutation, the tokenizer and chat template. Types are chosen by `gguf_types.tensor_qtype`;
K-quants go through an f32 temporary file and llama.cpp's quantizer. No llama.cpp checkout,
no network, no compile step. Architectures outside `archs.ARCHS` raise UnsupportedArchitecture.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tqdm.auto import tqdm

from edge_pu.export import archs
from edge_pu.export.errors import ExportError
from edge_pu.export.gguf_types import (
    DIRECT,
    KQUANTS,
    check_quant,
    encode,
    file_type,
    kquantize,
    tensor_qtype,
)
from edge_pu.export.gguf_vocab import add_vocab, read_vocab
from edge_pu.gguf_header import read_header

log = logging.getLogger(__name__)

# Buffers some checkpoints carry that are recomputed at load time, never model weights.
_SKIP_SUFFIXES = ("rotary_emb.inv_freq",)


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """config.json of an HF dir as a dict; for a .gguf file, the config transformers reads."""
    if Path(model_dir).suffix == ".gguf" and Path(model_dir).is_file():
        from transformers import AutoConfig

        gguf_path = Path(model_dir)
        return AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).to_dict()
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise ExportError(f"{path} not found: expected a merged HF model dir.")
    return json.loads(path.read_text())


def iter_safetensors(model_dir: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) for every tensor in the dir's safetensors files, in name order."""
    import torch  # only to read bf16 shards, which numpy cannot represent
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir}: no *.safetensors files (merge the adapter first).")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in sorted(f.keys()):
                yield name, f.get_tensor(name).to(torch.float32).numpy()


def gguf_tensor_name(name_map: Any, hf_name: str, where: str) -> str:
    gname = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if gname is None:
        raise ExportError(
            f"{where}: tensor {hf_name!r} has no GGUF name for this architecture; refusing to "
            "write a file llama.cpp would reject or misread."
        )
    return gname


def arch_enum(name: str) -> gguf.MODEL_ARCH:
    return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == name)


def add_hparams(writer: gguf.GGUFWriter, hp: archs.HParams) -> None:
    writer.add_context_length(hp.context_length)
    writer.add_embedding_length(hp.hidden)
    writer.add_block_count(hp.n_layers)
    writer.add_feed_forward_length(hp.ffn)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_key_length(hp.head_dim)
    writer.add_value_length(hp.head_dim)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_vocab_size(hp.vocab_size)


def _write_direct(model_dir: Path, out_path: Path, quant: str, name: str) -> None:
    config = read_config(model_dir)
    spec = archs.arch_for(config)
    hp = archs.hparams(config, spec)
    vocab = read_vocab(model_dir, hp.vocab_size)
    name_map = gguf.get_tensor_name_map(arch_enum(spec.gguf_arch), hp.n_layers)

    writer = gguf.GGUFWriter(str(out_path), spec.gguf_arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(int(file_type(quant)))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hparams(writer, hp)
    add_vocab(writer, vocab)

    # One float32 tensor in memory at a time; the writer keeps only the encoded copies.
    tensors = iter_safetensors(model_dir)
    for hf_name, array in tqdm(tensors, desc=f"gguf {quant}", unit="tensor", disable=None):
        if hf_name.endswith(_SKIP_SUFFIXES):
            continue
        if hf_name == "lm_head.weight" and hp.tied_embeddings:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gname = gguf_tensor_name(name_map, hf_name, str(model_dir))
        heads = archs.qk_heads(hf_name, hp) if spec.permute_qk else None
        if heads is not None:
            array = archs.permute_qk(array, heads)
        qtype = tensor_qtype(gname, array.shape, quant)
        writer.add_tensor(gname, encode(array, qtype), raw_dtype=qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf(
    model_dir: str | Path,
    out_path: str | Path,
    quant: str = "f16",
    *,
    name: str | None = None,
    nthread: int | None = None,
) -> Path:
    """Write `model_dir` (merged HF dir) as a GGUF of type `quant`; returns the file's path."""
    model_dir, out_path = Path(model_dir), Path(out_path)
    quant = check_quant(quant)
    name = name or model_dir.name
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if quant in DIRECT:
        log.info("writing %s (%s)", out_path, quant)
        _write_direct(model_dir, out_path, quant, name)
        return out_path
    assert quant in KQUANTS
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        f32 = Path(tmp) / "model-f32.gguf"
        log.info("writing f32 intermediate for %s", quant)
        _write_direct(model_dir, f32, "f32", name)
        log.info("quantizing to %s with llama.cpp -> %s", quant, out_path)
        kquantize(f32, out_path, quant, nthread)
    return out_path


def gguf_tensor_types(path: str | Path) -> dict[str, str]:
    """{tensor name: type name} of a GGUF file, e.g. for checking the type rules."""
    return {t.name: t.type_name for t in read_header(path).tensors.values()}
