"""Memory planner: its terms derived by hand for a small model, checked against peft and
autograd, its choices under tight budgets, `check_fits` and `edge-pu plan`, and its predicted
peak against the measured peak RSS of real training steps (bench/planner_accuracy.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from edge_pu.config import build_config
from edge_pu.errors import EdgePuError
from edge_pu.model_shape import ModelShape, read_model_shape
from edge_pu.planner import (
    NF4_BYTES,
    Settings,
    check_fits,
    lora_params,
    plan,
    saved_per_token_layer,
    shared_prefix_activations,
    stages,
    weight_bytes,
)

ROOT = Path(__file__).resolve().parents[1]
# tests/tiny.py's Llama: vocab 512, hidden 64, intermediate 128, 2 layers, 4 heads of 16, 2 KV
TINY = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "tie_word_embeddings": True}
QWEN05 = {"model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
          "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
          "num_key_value_heads": 2, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}


def cfg_of(**sections: dict) -> object:
    return build_config([("test", sections)])


def test_terms_by_hand_for_the_tiny_llama() -> None:
    """q: 64->64, k, v: 64->32 (2 KV heads x 16), o: 64->64, gate, up: 64->128, down: 128->64.
    LoRA r=8 on q, v: 8*(64+64) + 8*(64+32) = 1792 per layer, 3584 for 2 layers.
    Params: embedding 512*64 = 32768 (tied, once); per layer 4096+2048+2048+4096+3*8192 =
    36864 linear + 2*64 norms; + final norm 64 -> 32768 + 2*36992 + 64 = 106816.
    nf4: 73728 linear params * (0.5 + 1/64 + 4/16384) = 36864 + 1152 + 18 = 38034 bytes, plus
    the 32768 + 5*64 = 33088 others at 4 bytes = 132352 -> 170386.
    Saved per token per layer, fp32, T=10, padded: 8*64 (norm inputs) + 4*(64+64+64+64)
    (q, repeated k and v, attention output) + 4*4 (log-sum-exp) + 10*4 (mask) + 3*128*4 (MLP)
    + 4*64 (the LoRA input shared by q and v) + 2*4*8 (A outputs) = 3448 bytes."""
    s = ModelShape.from_config(TINY)
    assert lora_params(s, ("q_proj", "v_proj"), 8) == 3584
    assert s.param_count() == 106816
    assert weight_bytes(s, "float32", "none") == 4 * 106816
    assert weight_bytes(s, "bfloat16", "none") == 2 * 106816
    assert weight_bytes(s, "float32", "nf4") == int(73728 * NF4_BYTES) + 132352 == 170386
    assert saved_per_token_layer(s, ("q_proj", "v_proj"), 8, 4, T=10) == 3448


def test_counts_match_the_real_model_and_peft(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, get_peft_model
    from tiny import tiny_config
    from transformers import AutoModelForCausalLM

    for arch in ("llama", "qwen2"):  # tied without biases; untied with q/k/v biases
        model = AutoModelForCausalLM.from_config(tiny_config(arch, 512), dtype=torch.float32)
        s = ModelShape.from_config(model.config.to_dict())
        assert s.param_count() == sum(p.numel() for p in model.parameters()), arch
        peft = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj",
                                                                     "down_proj"]))
        trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
        assert lora_params(s, ("q_proj", "v_proj", "down_proj"), 8) == trainable, arch


@pytest.mark.parametrize("prompts, units", [
    ([[5] * 30, [5] * 30], 1),  # a DPO pair: one prompt, run once, two completions
    ([[5] * 30, [6] * 30], 2),  # two prompts
])
def test_saved_activations_match_autograd(tmp_path: Path, prompts: list, units: int) -> None:
    """Bytes autograd keeps for backward in one policy forward (prompt run once per unit, the
    completions on its gathered cache, one row padded) against `shared_prefix_activations`."""
    torch = pytest.importorskip("torch")
    from tiny import save_tiny_model

    from edge_pu.backends.torch_backend import CPUBackend

    path = save_tiny_model(tmp_path / "m", "llama")
    cfg = cfg_of(student={"path": str(path)}, lora={"target_modules": ["q_proj", "v_proj"]})
    backend = CPUBackend()
    backend.load(cfg)
    comps = [[7] * 34, [8] * 33]  # T = 64, one row padded
    params = {p.untyped_storage().data_ptr() for p in backend.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    backend.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        backend._token_logp(prompts, comps)
    s = read_model_shape(path)
    predicted = shared_prefix_activations(s, ("q_proj", "v_proj"), 8, 4, units=units, rows=2,
                                          P=30, C=34)
    assert sum(seen.values()) == pytest.approx(predicted, rel=0.10)


def test_plan_turns_knobs_to_fit_and_says_when_it_cannot() -> None:
    s = ModelShape.from_config(QWEN05)
    cfg = cfg_of(student={"max_length": 1024}, sampling={"k": 4, "max_new_tokens": 256},
                 train={"micro_batch": 4, "batch_size": 8}, ranker={"batch_size": 8})
    roomy = plan(cfg, s, budget_bytes=64 * 2**30, backend="cpu")
    assert roomy.given_fits and roomy.fits and roomy.changes == {}
    tight = plan(cfg, s, budget_bytes=4 * 2**30, backend="cpu")
    assert not tight.given_fits and tight.fits and tight.peak_bytes <= 4 * 2**30
    assert tight.changes.get("train.gradient_checkpointing") is True
    assert all(f"{k}={str(v).lower()}" in tight.overrides() for k, v in tight.changes.items()
               if isinstance(v, bool))
    hopeless = plan(cfg, s, budget_bytes=1 * 2**30, backend="cpu")
    assert not hopeless.fits and any("weights alone" in n for n in hopeless.notes)
    # a transformers-style config object works the same as its dict
    cfg_obj = type("Cfg", (), {"to_dict": lambda self: dict(QWEN05)})()
    assert plan(cfg, cfg_obj, budget_bytes=4 * 2**30, backend="cpu").changes == tight.changes


def test_stage_terms_kv_cache_and_dtype_conversion() -> None:
    """KV cache of K=8 rows x T=1024: 2 * 24 layers * 8 * 1024 * 128 (2 KV heads x 64) * 2 B =
    96 MiB in bf16. Loading the bf16 file as float32 maps the whole file: 494.03M * 2 bytes."""
    s = ModelShape.from_config(QWEN05)
    cfg = cfg_of(student={"max_length": 1024, "dtype": "bfloat16"}, sampling={"k": 8})
    by = {x.name: dict(x.parts) for x in stages(cfg, s, Settings(1024, 2, False, 8, 8))}
    assert by["sample"]["KV cache 8 rows x 1024"] == 96 * 2**20
    assert by["load"]["load transient"] == 0
    cfg32 = cfg_of(student={"max_length": 1024, "dtype": "float32"})
    load = {x.name: dict(x.parts) for x in stages(cfg32, s, Settings(1024, 2, False, 8, 8))}
    assert load["load"]["load transient"] == s.param_count() * 2


def test_logit_chunk_matches_the_backend() -> None:
    pytest.importorskip("torch")
    from edge_pu.backends import torch_backend
    from edge_pu.planner import LOGIT_CHUNK_BYTES

    assert LOGIT_CHUNK_BYTES == torch_backend.LOGIT_CHUNK_BYTES


def test_llama_cpp_sampler_is_planned_from_sampling_on_by_hand() -> None:
    """Qwen2.5-0.5B shape as an HF folder: llama.cpp samples an f32 copy (param_count x 4 bytes)
    with an f32 KV cache. K = 4, prompt_batch 8: 32 rows, one unified cache of
    n_ctx = 8 x (160 + 3 x 40) = 2240 cells: KV 2240 x 24 layers x 2 x 128 x 4 B = 55,050,240;
    buffers (min(512, 2240) + 32 sequences) x 4 x 151,936 = 330,612,736; LoRA r 16 on all seven
    modules 8,798,208 params x 4 B = 35,192,832. K = 8: 64 rows > 32, so 64 streams of 256 cells
    = 16,384 cells: KV 402,653,184; buffers (512 + 64) x 4 x 151,936 = 350,060,544."""
    from edge_pu.backends import llamacpp_sampler as ls
    from edge_pu.planner import (
        LLAMA_MAX_SEQUENCES,
        LLAMA_STREAM_CELLS,
        LLAMA_UNIFIED_MAX_ROWS,
        llamacpp_bytes,
    )

    assert (LLAMA_MAX_SEQUENCES, LLAMA_UNIFIED_MAX_ROWS, LLAMA_STREAM_CELLS) == (
        ls.MAX_SEQUENCES, ls.UNIFIED_MAX_ROWS, ls.STREAM_CELLS)
    s = ModelShape.from_config(QWEN05)
    weights = s.param_count() * 4
    cfg = cfg_of(student={"max_length": 160}, sampling={"k": 4, "max_new_tokens": 40,
                                                         "engine": "llama-cpp"})
    assert llamacpp_bytes(cfg, s, 160, 40) == weights + 55_050_240 + 330_612_736 + 35_192_832
    cfg8 = cfg_of(student={"max_length": 160}, sampling={"k": 8, "max_new_tokens": 40,
                                                          "engine": "llama-cpp"})
    assert llamacpp_bytes(cfg8, s, 160, 40) == weights + 402_653_184 + 350_060_544 + 35_192_832
    part = "llama.cpp sampler (GGUF, LoRA, KV)"
    by = {x.name: dict(x.parts) for x in stages(cfg, s, Settings(160, 2, False, 8, 4))}
    assert all(by[n][part] == llamacpp_bytes(cfg, s, 160, 40)
               for n in ("sample", "rank", "reference", "train"))
    assert part not in by["sft"] and part not in by["load"]
    assert not any(name.startswith("KV cache") for name in by["sample"])  # torch samples nothing
    torch_only = {x.name: dict(x.parts) for x in stages(cfg_of(student={"max_length": 160}), s,
                                                       Settings(160, 2, False, 8, 4))}
    assert all(part not in parts for parts in torch_only.values())


def test_rank_stage_follows_the_ranker_engine_by_hand() -> None:
    """Qwen2.5-0.5B shape as an HF folder, float32, T = 160, C = 40, K = 4, recall, scoring batch
    8, both engines llama.cpp. The rank stage is what torch holds (weights 494,032,768 x 4 B =
    1,976,131,072; LoRA 8,798,208 x 16 B = 140,771,328) plus the sampler (its f32 copy
    1,976,131,072 + KV 55,050,240 + buffers 330,612,736 + LoRA 35,192,832 = 2,396,986,880), in
    whose model the scoring runs: nothing of torch's scoring. With ranker.engine: backend torch
    scores, adding its final hidden states 8 x 160 x 896 x 4 = 4,587,520 and max(one layer
    8 x 160 x ((3 x 896 + 3 x 4864) x 4 + 160 x 4) = 89,292,800, a logits chunk of
    min(8 x 65, 64 MiB / (4 x 151,936)) = 110 rows x 151,936 x 8 = 133,703,680). The reference
    pass is torch's under either engine (training's log-probs must be what the loss
    recomputes)."""
    s = ModelShape.from_config(QWEN05)
    st = Settings(160, 2, False, 8, 4)

    def by_name(engine: str) -> dict[str, dict[str, int]]:
        cfg = cfg_of(student={"max_length": 160}, ranker={"engine": engine},
                     sampling={"k": 4, "max_new_tokens": 40, "engine": "llama-cpp"})
        return {x.name: dict(x.parts) for x in stages(cfg, s, st)}

    cpp, torch_scores = by_name("llama-cpp"), by_name("backend")
    fixed = {"weights": 1_976_131_072, "LoRA params+grads+AdamW": 140_771_328,
             "llama.cpp sampler (GGUF, LoRA, KV)": 2_396_986_880}
    assert cpp["rank"] == fixed
    assert torch_scores["rank"] == {**fixed, "final hidden states": 4_587_520,
                                    "max(layer, logits chunk)": 133_703_680}
    assert cpp["reference"] == torch_scores["reference"] == torch_scores["rank"]


def test_check_fits_reads_only_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(QWEN05))  # no weights at all
    cfg = cfg_of(device="laptop-cpu-8gb", student={"path": str(tmp_path), "max_length": 1024},
                 train={"micro_batch": 2, "gradient_checkpointing": False})
    with pytest.raises(EdgePuError) as err:
        check_fits(cfg, tmp_path / "config.json")
    msg = str(err.value)
    assert "GiB" in msg and "laptop-cpu-8gb" in msg and "train.gradient_checkpointing=true" in msg
    check_fits(cfg_of(device="laptop-cpu-16gb", student={"path": str(tmp_path)}), tmp_path)


def test_gguf_header_gives_the_shape(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "toy.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_context_length(512)
    w.add_token_list([f"t{i}" for i in range(300)])
    w.add_tensor("token_embd.weight", np.zeros((300, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    s = read_model_shape(path)
    assert (s.vocab, s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads, s.head_dim) == \
        (300, 64, 128, 2, 4, 2, 16)
    assert s.tied and s.gguf and s.file_bytes == path.stat().st_size
    # Its first load dequantizes it: the file mapped plus transformers' float32 copy of the
    # largest tensor, the 300 x 64 embedding: file + 4 * 300 * 64 bytes beside the weights.
    from edge_pu.config import load_config
    from edge_pu.planner import _load_transient

    cfg = load_config(None, base={"student": {"path": str(path)}})
    assert _load_transient(cfg, s) == path.stat().st_size + 4 * 300 * 64


def test_plan_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edge_pu.cli import main

    (tmp_path / "config.json").write_text(json.dumps(QWEN05))
    conf = tmp_path / "run.yaml"
    conf.write_text(f"student: {{path: {tmp_path}, max_length: 512}}\n")
    assert main(["plan", str(conf), "--device", "laptop-cpu-16gb"]) == 0
    assert "fits: peak" in capsys.readouterr().out
    assert main(["plan", str(conf), "--device", "laptop-cpu-8gb", "--set",
                 "student.max_length=1024", "--set", "train.gradient_checkpointing=false"]) == 1
    assert "--set train.gradient_checkpointing=true" in capsys.readouterr().out


@pytest.mark.slow
def test_predicted_peak_within_15_percent_of_measured_rss() -> None:
    """Three CPU cases (weights-, activation- and logits-dominated), each measured in its own
    forked process; see bench/planner_accuracy.py for what is measured and why. Marked slow:
    ~20 s of CPU (one fresh interpreter importing torch, four small models, four steps)."""
    pytest.importorskip("peft")
    if not sys.platform.startswith("linux"):
        pytest.skip("ru_maxrss units and the allocator setting are Linux's")
    sys.path.insert(0, str(ROOT / "bench"))
    import planner_accuracy as bench

    cases = [c for c in bench.CASES if c["name"] in bench.FAST_CASES]
    rows = bench.compare(cases, fast=True, threads=1)
    report = {r["case"]: round(r["ratio"], 3) for r in rows}
    assert all(0.85 <= r["ratio"] <= 1.15 for r in rows), report


def test_allocator_is_fast_only_with_headroom(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The 4 MiB mmap threshold (faster, up to 1.38x more RSS) only where the predicted peak
    fits the budget 1.5 times over; otherwise the tight 128 KiB the predictions assume."""
    from edge_pu.planner import (
        FAST_MMAP_THRESHOLD,
        TIGHT_MMAP_THRESHOLD,
        budget_for,
        cpu_allocator_threshold,
        plan,
    )

    monkeypatch.delenv("EDGE_PU_MMAP_THRESHOLD", raising=False)
    (tmp_path / "config.json").write_text(json.dumps(QWEN05))
    for device, length in (("laptop-cpu-8gb", 1024), ("laptop-cpu-16gb", 256)):
        cfg = cfg_of(device=device, student={"path": str(tmp_path), "max_length": length},
                     train={"micro_batch": 2, "gradient_checkpointing": True})
        budget = budget_for(cfg, "cpu")[0]
        peak = plan(cfg, QWEN05, budget_bytes=budget, backend="cpu").given_peak
        want = FAST_MMAP_THRESHOLD if 1.5 * peak <= budget else TIGHT_MMAP_THRESHOLD
        assert cpu_allocator_threshold(cfg) == want
    assert cpu_allocator_threshold(cfg) == FAST_MMAP_THRESHOLD  # 16 GB, short sequences
    tight = cfg_of(device="laptop-cpu-8gb", student={"path": str(tmp_path), "max_length": 2048})
    assert cpu_allocator_threshold(tight) == TIGHT_MMAP_THRESHOLD
    monkeypatch.setenv("EDGE_PU_MMAP_THRESHOLD", "0")
    assert cpu_allocator_threshold(tight) == 0
    missing = cfg_of(student={"path": str(tmp_path / "nowhere")})
    monkeypatch.delenv("EDGE_PU_MMAP_THRESHOLD")
    assert cpu_allocator_threshold(missing) == TIGHT_MMAP_THRESHOLD


def test_sft_stage_and_the_anchor_row_are_planned() -> None:
    """The two-stage default adds an `sft` step (sft.micro_batch anchors of up to
    teacher.max_tokens + EOS); it grows with that micro-batch and vanishes with
    sft.enabled: false. GRPO with the anchor as positive trains K + 1 rows a group, so its
    step needs more than the same config without the anchor."""
    from edge_pu.planner import Settings, _model_shape, stages

    shape = _model_shape(QWEN05)
    st = Settings(512, 1, False, 8, 4)

    def by_name(**sections: dict) -> dict[str, int]:
        sections.setdefault("train", {"algorithm": "grpo"})
        cfg = cfg_of(sampling={"k": 4}, **sections)
        return {s.name: s.total for s in stages(cfg, shape, st)}

    two = by_name(sft={"micro_batch": 2})
    assert "sft" in two and "sft" not in by_name(sft={"enabled": False})
    assert by_name(sft={"micro_batch": 4})["sft"] > two["sft"]
    assert two["train"] > by_name(train={"algorithm": "grpo", "anchor": "none"})["train"]
