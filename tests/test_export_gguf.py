"""GGUF export of tiny Llama, Qwen2 and Qwen3 models, judged by llama.cpp against torch.

Every export goes through `edge_pu.export.export`, which writes the file, loads it in
llama-cpp-python and compares it with the torch model (verify.py); these tests check that the
gate passes on good files and fails, naming the check, on broken ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edge_pu.export import (
    GateFailed,
    UnsupportedArchitecture,
    archs,
    check_chat_template,
    export,
    write_gguf,
)

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp", reason="llama-cpp-python is the GGUF runtime the gate loads")


@pytest.fixture(scope="module")
def tiny_qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen3 (q/k RMS norms, head_dim 32 != hidden/heads 16), built from a config here."""
    import torch
    from tiny import tiny_tokenizer
    from transformers import AutoModelForCausalLM, Qwen3Config

    tok = tiny_tokenizer()
    cfg = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        initializer_range=0.2,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "qwen3"
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dirs(tiny_llama_dir: Path, tiny_qwen2_dir: Path, tiny_qwen3_dir: Path) -> dict[str, Path]:
    return {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir, "qwen3": tiny_qwen3_dir}


CASES = [
    ("llama", "f32"),
    ("llama", "f16"),
    ("llama", "bf16"),
    ("llama", "q8_0"),
    ("llama", "q4_0"),
    ("llama", "q4_k_m"),
    ("qwen2", "f32"),
    ("qwen2", "q8_0"),
    ("qwen2", "f16"),
    ("qwen3", "f32"),
    ("qwen3", "q8_0"),
]


@pytest.mark.parametrize(("arch", "quant"), CASES)
def test_gguf_export_passes_the_gate(
    arch: str, quant: str, dirs: dict[str, Path], tmp_path: Path
) -> None:
    report = export(dirs[arch], "gguf", tmp_path, quant=quant)
    assert report["passed"], report["checks"]
    on_disk = json.loads((tmp_path / "export_report.json").read_text())
    assert on_disk["passed"] and on_disk["checks"] == report["checks"]
    assert set(report["checks"]) == {
        "tokenization",
        "logits_max_abs",
        "top1_agreement",
        "greedy_match",
        "chat_template",
    }
    assert (tmp_path / f"model-{quant}.gguf").exists() and (tmp_path / "Modelfile").exists()
    if quant == "f32":  # with an f32 KV cache llama.cpp reproduces torch to float rounding
        assert report["checks"]["logits_max_abs"]["value"] < 1e-3
        assert report["checks"]["greedy_match"]["value"] == 1.0


def test_type_rules_keep_norms_f32_and_fall_back_to_f16(tmp_path: Path) -> None:
    """hidden 48: rows of length 48 are not a multiple of q4_0's 32-block -> f16; the
    down projection's rows are 96 long -> q4_0; token_embd -> q8_0; norms -> f32."""
    from tiny import save_tiny_model

    from edge_pu.export.gguf_writer import gguf_tensor_types

    model = save_tiny_model(tmp_path / "h48", "llama", hidden_size=48, intermediate_size=96)
    types = gguf_tensor_types(write_gguf(model, tmp_path / "m.gguf", "q4_0"))
    assert types["blk.0.attn_norm.weight"] == "f32" and types["output_norm.weight"] == "f32"
    assert types["blk.0.attn_q.weight"] == "f16"  # row length 48
    assert types["blk.0.ffn_down.weight"] == "q4_0"  # row length 96
    assert types["token_embd.weight"] == "f16"  # q8_0 by rule, but rows of 48 -> f16
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_direct_quants_are_byte_identical_to_llama_cpp_quantizer(
    quant: str, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """gguf-py's q8_0/q4_0 plus our per-tensor type rules reproduce llama-quantize run on our
    own f32 file: same type for every tensor and the same bytes."""
    import ctypes

    import gguf
    import llama_cpp

    f32 = write_gguf(tiny_llama_dir, tmp_path / "f32.gguf", "f32")
    ours = write_gguf(tiny_llama_dir, tmp_path / "ours.gguf", quant)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(getattr(gguf.LlamaFileType, f"MOSTLY_{quant.upper()}"))
    theirs = tmp_path / "theirs.gguf"
    assert (
        llama_cpp.llama_model_quantize(
            str(f32).encode(), str(theirs).encode(), ctypes.byref(params)
        )
        == 0
    )
    mine = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    ref = {t.name: t for t in gguf.GGUFReader(str(theirs)).tensors}
    assert mine.keys() == ref.keys()
    for name, tensor in ref.items():
        assert mine[name].tensor_type == tensor.tensor_type, name
        assert mine[name].data.tobytes() == tensor.data.tobytes(), name


def test_corrupted_tensor_in_the_file_fails_the_gate(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Scale one row of blk.1.ffn_down in a written f16 file: the gate must reject it."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_pu.export.runtimes import LlamaCppRunner, TorchRunner
    from edge_pu.export.verify import build_reference, run_gate

    path = write_gguf(tiny_llama_dir, tmp_path / "m.gguf", "f16")
    reader = gguf.GGUFReader(str(path), "r+")
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    tensor.data[:4] *= 8  # four output rows of the last MLP, in place in the memmap
    reader.data.flush()
    del reader

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ref = build_reference(TorchRunner(model), AutoTokenizer.from_pretrained(tiny_llama_dir))
    with pytest.raises(GateFailed, match="logits_max_abs") as info:
        run_gate(LlamaCppRunner(path), ref, fmt="gguf", quant="f16", artifact=path)
    assert not info.value.report["passed"]
    assert not info.value.report["checks"]["logits_max_abs"]["pass"]


def test_missing_qk_permutation_fails_the_gate(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Write Llama's q/k rows in HF order: llama.cpp then rotates the wrong dimension pairs."""
    monkeypatch.setattr(archs, "permute_qk", lambda w, n_head: w)
    with pytest.raises(GateFailed, match="top1_agreement") as info:
        export(tiny_llama_dir, "gguf", tmp_path, quant="q8_0")
    report = json.loads((tmp_path / "export_report.json").read_text())
    assert report["passed"] is False and report == info.value.report
    assert report["checks"]["top1_agreement"]["value"] < 0.3


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"model_type": "gpt_neox"}, "'gpt_neox'.*llama, qwen2, qwen3"),
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope_type='llama3'"),
    ],
)
def test_unsupported_architecture_is_refused_and_nothing_written(
    tiny_llama_dir: Path, tmp_path: Path, edit: dict, match: str
) -> None:
    model = shutil.copytree(tiny_llama_dir, tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(UnsupportedArchitecture, match=match):
        write_gguf(model, tmp_path / "out" / "m.gguf", "f16")
    assert not (tmp_path / "out" / "m.gguf").exists()


def test_chat_template_check_and_modelfile(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    """The stored template renders like HF's; a GGUF carrying another template does not."""
    from transformers import AutoTokenizer

    from edge_pu.export import write_modelfile

    tok = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    good = write_gguf(tiny_qwen2_dir, tmp_path / "good.gguf", "f16")
    assert check_chat_template(good, tok) == {
        "value": 1.0,
        "threshold": 1.0,
        "op": ">=",
        "pass": True,
    }
    text = write_modelfile(good).read_text()
    assert text.startswith("FROM ./good.gguf\nTEMPLATE")
    assert 'PARAMETER stop "<|im_end|>"' in text and "SYSTEM" not in text

    other = shutil.copytree(tiny_qwen2_dir, tmp_path / "other")
    (other / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    )
    bad = write_gguf(other, tmp_path / "bad.gguf", "f16")
    assert check_chat_template(bad, tok)["pass"] is False
    assert "TEMPLATE" not in write_modelfile(bad, tmp_path / "Modelfile.bad").read_text()


def test_smollm2_style_default_system_prompt_becomes_modelfile_system() -> None:
    from edge_pu.export.modelfile import chatml_system

    smol = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    assert chatml_system(smol) == (True, "You are a helpful AI assistant")
    assert chatml_system("{{ messages[0]['content'] }}") == (False, None)
