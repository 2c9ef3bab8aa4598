"""Export a merged HF model dir to an ONNX decoder with a KV cache, plus a genai-style sidecar.

    from edge_pu.export import export_onnx
    export_onnx("runs/x/merged", "runs/x/export/onnx")

Output dir: model.onnx (fp32; weights in model.onnx.data past 1 GiB), genai_config.json
(onnxruntime-genai's layout: input/output names, head counts, eos/pad ids, search defaults),
the tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja, as transformers
loads it) and generation_config.json.

Graph inputs: input_ids [batch, seq], attention_mask [batch, past+seq], position_ids
[batch, seq], past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim] (past may be
0 for the first call). Outputs: logits [batch, seq, vocab], present.{i}.key / .value
[batch, kv_heads, past+seq, head_dim]. A small wrapper module turns the flat past tensors into
a transformers DynamicCache, so torch.export sees plain tensors in and out; optimum-onnx is not
used (it pins transformers < 4.58).
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

from edge_pu.export import archs
from edge_pu.export.gguf_vocab import load_tokenizer
from edge_pu.export.gguf_writer import read_config

log = logging.getLogger(__name__)

SIDE_FILES = ("generation_config.json",)
_EXTERNAL_DATA_BYTES = 1 << 30


def _wrapper(model: Any, n_layers: int) -> Any:
    from torch import nn
    from transformers import DynamicCache

    from edge_pu.export.runtimes import cache_kwarg

    key = cache_kwarg(model)

    class KVDecoder(nn.Module):
        """logits, *presents = KVDecoder(input_ids, attention_mask, position_ids, pasts)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, pasts):
            cache = DynamicCache(config=self.model.config)
            for i in range(n_layers):
                cache.update(pasts[2 * i], pasts[2 * i + 1], i)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **{key: cache},
            )
            presents = []
            for layer in cache.layers[:n_layers]:
                presents += [layer.keys, layer.values]
            return (out.logits, *presents)

    return KVDecoder().eval()


def genai_config(config: dict[str, Any], spec: archs.ArchSpec, hp: archs.HParams) -> dict:
    """onnxruntime-genai's genai_config.json for the exported decoder."""
    return {
        "model": {
            "type": spec.genai_type,
            "bos_token_id": config.get("bos_token_id"),
            "eos_token_id": config.get("eos_token_id"),
            "pad_token_id": config.get("pad_token_id"),
            "context_length": hp.context_length,
            "vocab_size": hp.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": hp.head_dim,
                "hidden_size": hp.hidden,
                "num_attention_heads": hp.n_head,
                "num_key_value_heads": hp.n_head_kv,
                "num_hidden_layers": hp.n_layers,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "max_length": hp.context_length,
            "past_present_share_buffer": False,  # the graph concatenates past and new keys
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def export_onnx(model_dir: str | Path, out_dir: str | Path, *, opset: int = 18) -> Path:
    """Export `model_dir` (merged HF dir) to `out_dir`/model.onnx + sidecar; returns out_dir."""
    import torch
    from transformers import AutoModelForCausalLM

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = read_config(model_dir)
    spec = archs.arch_for(config)
    hp = archs.hparams(config, spec)
    out_dir.mkdir(parents=True, exist_ok=True)

    # eager attention: a plain matmul/softmax graph, with no SDPA kernel choice baked in.
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    wrapper = _wrapper(model, hp.n_layers)
    batch, seq, past = 2, 4, 3  # sizes > 1 so torch.export keeps every axis symbolic
    pasts = [torch.zeros(batch, hp.n_head_kv, past, hp.head_dim) for _ in range(2 * hp.n_layers)]
    args = (
        torch.zeros(batch, seq, dtype=torch.long),
        torch.ones(batch, past + seq, dtype=torch.long),
        torch.arange(past, past + seq).repeat(batch, 1),
        pasts,
    )
    b, s, p = (torch.export.Dim(n) for n in ("batch", "sequence_length", "past_sequence_length"))
    dynamic = {
        "input_ids": {0: b, 1: s},
        "attention_mask": {0: b, 1: torch.export.Dim.AUTO},
        "position_ids": {0: b, 1: s},
        "pasts": [{0: b, 2: p} for _ in pasts],
    }
    kv = [f"{i}.{k}" for i in range(hp.n_layers) for k in ("key", "value")]
    n_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    log.info("exporting ONNX decoder (%d layers) -> %s", hp.n_layers, out_dir / "model.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            args,
            str(out_dir / "model.onnx"),
            dynamo=True,
            dynamic_shapes=dynamic,
            input_names=["input_ids", "attention_mask", "position_ids"]
            + [f"past_key_values.{n}" for n in kv],
            output_names=["logits"] + [f"present.{n}" for n in kv],
            opset_version=opset,
            external_data=n_bytes > _EXTERNAL_DATA_BYTES,
            verbose=False,
        )
    (out_dir / "genai_config.json").write_text(json.dumps(genai_config(config, spec, hp), indent=2))
    # The tokenizer as transformers loads it (it may rebuild tokenizer.json's pipeline for the
    # model type), so runtimes reading tokenizer.json split text as training did.
    load_tokenizer(model_dir).save_pretrained(out_dir)
    for name in SIDE_FILES:
        if (model_dir / name).exists():
            shutil.copy2(model_dir / name, out_dir / name)
    return out_dir
