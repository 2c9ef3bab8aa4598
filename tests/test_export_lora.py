"""Merging a LoRA adapter, and the adapter alone as a GGUF LoRA applied by llama.cpp.

The adapters are random (B ~ N(0, 0.2), not PEFT's zero init) so that they change the model:
every check below would pass trivially for a zero adapter, so one test asserts they do not.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edge_pu.export import ExportError, GateFailed, archs, export, merge_adapter, write_gguf

pytest.importorskip("peft")
pytest.importorskip("gguf")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base: Path, out: Path, **lora: object) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **lora)  # type: ignore[arg-type]
    peft_model = get_peft_model(model, config)
    torch.manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.2)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(
    tiny_llama_dir: Path, tiny_qwen2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "llama": (tiny_llama_dir, make_adapter(tiny_llama_dir, root / "llama")),
        "qwen2": (tiny_qwen2_dir, make_adapter(tiny_qwen2_dir, root / "qwen2")),
    }


def test_merged_hf_dir_matches_the_unmerged_peft_model(
    adapters: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    """hf format: the merged dir, reloaded, against base + adapter as training ran it."""
    import torch
    from transformers import AutoModelForCausalLM

    base, adapter = adapters["llama"]
    report = export((base, adapter), "hf", tmp_path)
    assert report["passed"] and report["checks"]["logits_max_abs"]["value"] < 1e-3
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"):
        assert (tmp_path / name).exists(), name
    # The adapter is not a no-op: merged logits differ from the base's by whole units.
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(base)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits
    assert (a - b).abs().max() > 0.5


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_lora_gguf_in_llama_cpp_matches_torch_base_plus_adapter(
    arch: str, adapters: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    pytest.importorskip("llama_cpp")
    report = export(adapters[arch], "lora-gguf", tmp_path, quant="f32")
    assert report["passed"], report["checks"]
    assert report["checks"]["logits_max_abs"]["value"] < 1e-3
    assert report["artifacts"] == [
        str(tmp_path / "adapter-lora.gguf"),
        str(tmp_path / "base-f32.gguf"),
    ]
    import gguf

    fields = gguf.GGUFReader(str(tmp_path / "adapter-lora.gguf")).fields
    assert fields["general.type"].contents() == "adapter"
    assert fields["adapter.type"].contents() == "lora"
    assert fields["adapter.lora.alpha"].contents() == 8.0


def test_base_gguf_without_the_lora_fails_the_gate(
    adapters: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    """The same gate with the LoRA left out must fail: the adapter is really being applied."""
    pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_pu.export.runtimes import LlamaCppRunner, TorchRunner
    from edge_pu.export.verify import build_reference, run_gate

    base, adapter = adapters["llama"]
    merged = merge_adapter(base, adapter, tmp_path / "merged")
    ref = build_reference(
        TorchRunner(AutoModelForCausalLM.from_pretrained(merged)),
        AutoTokenizer.from_pretrained(merged),
    )
    base_gguf = write_gguf(base, tmp_path / "base.gguf", "f32")
    with pytest.raises(GateFailed, match="logits_max_abs"):
        run_gate(
            LlamaCppRunner(base_gguf, kv_f32=True), ref, fmt="gguf", quant="f32", artifact=base_gguf
        )


def test_lora_b_without_the_qk_permutation_fails_the_gate(
    adapters: dict[str, tuple[Path, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Base written correctly, lora_b of q/k left in HF row order: llama.cpp adds the delta
    to the wrong rope dimensions, and the gate sees it."""
    pytest.importorskip("llama_cpp")
    from edge_pu.export import lora_gguf

    real = lora_gguf.write_lora_gguf

    def unpermuted(*args: object, **kwargs: object) -> Path:
        with monkeypatch.context() as m:
            m.setattr(archs, "permute_qk", lambda w, n_head: w)
            return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(lora_gguf, "write_lora_gguf", unpermuted)
    with pytest.raises(GateFailed, match="logits_max_abs"):
        export(adapters["llama"], "lora-gguf", tmp_path, quant="f32")


def test_lora_gguf_runs_on_the_gguf_base_training_saw(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Training on a quantized GGUF base: q8_0 file -> dequantized dense dir (what training
    saw) -> adapter trained on it. lora-gguf keeps the q8_0 file byte for byte as the base and
    the gate compares llama.cpp (file + LoRA) with torch (dense + adapter, merged)."""
    pytest.importorskip("llama_cpp")
    from edge_pu.export import dequantize_gguf

    base_gguf = write_gguf(tiny_llama_dir, tmp_path / "base" / "tiny-q8_0.gguf", "q8_0")
    dense = dequantize_gguf(base_gguf, tmp_path / "dense")  # also: transformers reads our GGUF
    adapter = make_adapter(dense, tmp_path / "adapter")
    report = export((base_gguf, adapter), "lora-gguf", tmp_path / "out")
    assert report["passed"], report["checks"]
    assert report["threshold_row"] == "q8_0" and report["quant"] == "q8_0"
    assert (tmp_path / "out" / "tiny-q8_0.gguf").read_bytes() == base_gguf.read_bytes()


def test_quantized_base_is_refused_for_merging(
    adapters: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    base, adapter = adapters["llama"]
    quantized = shutil.copytree(base, tmp_path / "base")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="quantized.*bitsandbytes.*round the adapter away"):
        merge_adapter(quantized, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize(
    ("edit", "match"),
    [({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save")],
)
def test_adapters_a_gguf_lora_cannot_express_are_refused(
    adapters: dict[str, tuple[Path, Path]], tmp_path: Path, edit: dict, match: str
) -> None:
    from edge_pu.export import write_lora_gguf

    base, adapter = adapters["llama"]
    edited = shutil.copytree(adapter, tmp_path / "adapter")
    config = json.loads((edited / "adapter_config.json").read_text())
    (edited / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ExportError, match=match):
        write_lora_gguf(edited, base, tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()
