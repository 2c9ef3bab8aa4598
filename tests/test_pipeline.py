"""The vertical slice on a tiny Llama: anchors -> sample -> rank -> DPO -> PEFT adapter.

One module-scoped run (file teacher, CPU backend) is inspected by several tests; a rerun of the
same config must make zero teacher calls; a 2-round GRPO run and a DPO run each move
probability mass toward the top-ranked candidates.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from edge_pu.config import load_config
from edge_pu.jsonl import read_jsonl
from edge_pu.pipeline import run

PROMPTS = ["what is two plus three?", "write the word apple in capital letters",
           "list three red fruits", "sort one two three", "name a capital city",
           "what is ten minus one?"]


def write_inputs(root: Path) -> tuple[Path, Path]:
    prompts, anchors = root / "prompts.jsonl", root / "anchors_in.jsonl"
    with open(prompts, "w") as f, open(anchors, "w") as g:
        for i, p in enumerate(PROMPTS):
            f.write(json.dumps({"id": f"p{i}", "prompt": p}) + "\n")
            g.write(json.dumps({"prompt": p, "anchor": f"the answer is {i} {p}"}) + "\n")
    return prompts, anchors


def tiny_cfg(root: Path, student: Path, **sections: dict) -> object:
    prompts, anchors = write_inputs(root)
    base = {
        "student": {"path": str(student)},
        "teacher": {"kind": "file", "path": str(anchors)},
        "data": {"prompts": str(prompts)},
        "sampling": {"k": 4, "max_new_tokens": 10, "temperature": 1.0},
        "train": {"algorithm": "dpo", "steps": 8, "lr": 0.01, "batch_size": 2, "micro_batch": 1,
                  "beta": 0.1},
        "sft": {"steps": 2, "batch_size": 4, "micro_batch": 4},
        "backend": "cpu",
        "run_dir": str(root / "run"),
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return load_config(None, base=base)


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path):
    root = tmp_path_factory.mktemp("dpo")
    cfg = tiny_cfg(root, tiny_llama_dir)
    return cfg, run(cfg)


def test_run_dir_holds_every_stage(dpo_run) -> None:
    cfg, result = dpo_run
    d = Path(cfg.run_dir)
    for name in ("config.resolved.yaml", "anchors.jsonl", "candidates.jsonl", "scores.jsonl",
                 "pairs.jsonl", "metrics.jsonl", "summary.json", "adapter"):
        assert (d / name).exists(), name
    anchors = read_jsonl(d / "anchors.jsonl")
    assert sorted(a["id"] for a in anchors) == [f"p{i}" for i in range(len(PROMPTS))]
    cands = read_jsonl(d / "candidates.jsonl")
    assert len(cands) == len(PROMPTS) * cfg.sampling.k
    assert all(len(c["token_ids"]) <= cfg.sampling.max_new_tokens for c in cands)
    scores = read_jsonl(d / "scores.jsonl")
    assert {s["prompt_id"] for s in scores} == {a["id"] for a in anchors}
    assert all(len(s["scores"]) == cfg.sampling.k for s in scores)
    metrics = read_jsonl(d / "metrics.jsonl")
    sft = [m for m in metrics if m.get("stage") == "sft" and "step" in m]
    assert [m["step"] for m in sft] == [1, 2]  # stage 1 logged before the PU steps
    assert (d / "state" / "sft" / "COMPLETE").exists()
    steps = [m for m in metrics if "step" in m and m.get("stage") != "sft"]
    assert [m["step"] for m in steps] == list(range(1, cfg.train.steps + 1))
    assert {"loss", "reward_margin", "reward_accuracy"} <= set(steps[0])
    # Each stage's wall time and peak RSS (reset per stage: exact on Linux), beside the
    # planner's prediction for the same stage name.
    summary = json.loads((d / "summary.json").read_text())
    stages = {st["name"]: st for st in summary["stages"]}
    assert list(stages) == ["load", "sft", "sample", "rank", "reference", "train"]
    for st in stages.values():
        assert st["peak_rss_mb"] >= st["rss_start_mb"] > 0 and st["seconds"] >= 0
        assert st["peak_exact"] is sys.platform.startswith("linux")
    assert all(stages[n]["round"] == 1 for n in ("sample", "rank", "reference", "train"))
    assert set(summary["memory_plan"]) >= set(stages)
    assert all(v > 0 for v in summary["memory_plan"].values())


def test_adapter_loads_with_peft_and_changes_outputs(dpo_run, tiny_llama_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, _ = dpo_run
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    before = base(ids).logits
    model = PeftModel.from_pretrained(base, Path(cfg.run_dir) / "adapter")
    after = model(ids).logits
    assert not torch.allclose(before, after, atol=1e-5)


def test_training_beats_reference_on_training_pairs(dpo_run) -> None:
    _, result = dpo_run
    diag = result.rounds[-1]
    # The reference's implicit rewards are all exactly 0, so its strict accuracy is 0.
    assert diag["reward_accuracy_reference"] == 0.0
    assert diag["reward_accuracy"] > 0.5
    assert diag["preference_accuracy"] >= diag["preference_accuracy_reference"]
    assert diag["preference_accuracy"] > 0.5


def test_rerun_makes_zero_teacher_calls(dpo_run) -> None:
    cfg, _ = dpo_run
    ledger = Path(cfg.run_dir) / "teacher_ledger.jsonl"
    calls_before = len(read_jsonl(ledger))
    assert calls_before == len(PROMPTS)
    again = run(cfg)
    assert again.anchors is not None and again.anchors.requests == 0
    assert again.anchors.cached == len(PROMPTS)
    assert len(read_jsonl(ledger)) == calls_before
    # Resumed rounds are not retrained: the metrics keep one line per step.
    steps = [m for m in read_jsonl(Path(cfg.run_dir) / "metrics.jsonl") if "step" in m]
    assert len(steps) == cfg.train.steps + cfg.sft.steps


def _margin_top_vs_bottom(backend, cfg, run_dir: Path, round_idx: int) -> float:
    """Mean over the prompts the round trained on (pairs.jsonl: train.select may leave some
    out) of [log-ratio(top) - log-ratio(bottom)], mean-token, top and bottom as the training
    signal ordered them (DPO: the candidate pair; GRPO: the largest and smallest target share
    among the sampled rows, the anchor row left out)."""
    from edge_pu.train import ANCHOR

    cands = {}
    for c in read_jsonl(run_dir / "candidates.jsonl"):
        if c["round"] == round_idx:
            cands.setdefault(c["prompt_id"], {})[c["k"]] = c["token_ids"]
    prompts = {f"p{i}": p for i, p in enumerate(PROMPTS)}
    gaps = []
    for rec in read_jsonl(run_dir / "pairs.jsonl"):
        if rec["round"] != round_idx:
            continue
        if "chosen" in rec:
            if ANCHOR in (rec["chosen"], rec["rejected"]):
                continue
            top, bot = rec["chosen"], rec["rejected"]
        else:
            rows = [(t, j) for j, t in zip(rec["rows"], rec["target"], strict=True)
                    if j != ANCHOR]
            if max(rows)[0] == min(rows)[0]:
                continue
            top, bot = max(rows)[1], min(rows)[1]
        ids = backend.chat_ids([{"role": "user", "content": prompts[rec["prompt_id"]]}])
        comps = [cands[rec["prompt_id"]][top], cands[rec["prompt_id"]][bot]]
        pol = backend.logprobs([ids, ids], comps, adapter=True)
        ref = backend.logprobs([ids, ids], comps, adapter=False)
        ratio = [(sum(p) - sum(r)) / max(1, len(p)) for p, r in zip(pol, ref, strict=True)]
        gaps.append(ratio[0] - ratio[1])
    return sum(gaps) / len(gaps)


@pytest.mark.parametrize("algorithm,variant", [("dpo", "distribution"),
                                               ("grpo", "distribution"),
                                               ("grpo", "advantage")])
def test_two_rounds_move_mass_to_top_ranked(tmp_path: Path, tiny_llama_dir: Path,
                                            algorithm: str, variant: str) -> None:
    from edge_pu.backends import make_backend

    cfg = tiny_cfg(tmp_path, tiny_llama_dir,
                   train={"algorithm": algorithm, "grpo_variant": variant, "rounds": 2,
                          "steps": 6, "beta": 1.0 if algorithm == "grpo" else 0.1})
    backend = make_backend("cpu")
    backend.load(cfg)
    result = run(cfg, backend=backend)
    run_dir = Path(cfg.run_dir)
    assert [r["round"] for r in result.rounds] == [1, 2]
    assert len(read_jsonl(run_dir / "teacher_ledger.jsonl")) == len(PROMPTS)
    rounds = {c["round"] for c in read_jsonl(run_dir / "candidates.jsonl")}
    assert rounds == {1, 2}
    # Before training the policy is the reference, so every log-ratio is 0 and the gap is 0;
    # after training the top-ranked candidates of round 2 gained on the bottom-ranked ones.
    assert _margin_top_vs_bottom(backend, cfg, run_dir, 2) > 0.0


def test_policy_logprobs_are_copied_only_while_the_adapter_is_the_identity(
        tiny_llama_dir: Path) -> None:
    """A fresh adapter (B = 0) leaves the policy equal to the reference, so attach_logprobs
    copies the reference log-probs instead of a second pass; once B moves it computes them."""
    import torch

    from edge_pu.backends import make_backend
    from edge_pu.train import Unit, attach_logprobs

    cfg = load_config(None, base={"student": {"path": str(tiny_llama_dir)}, "backend": "cpu"})
    backend = make_backend("cpu")
    backend.load(cfg)
    prompt = backend.chat_ids([{"role": "user", "content": PROMPTS[0]}])
    comps = [backend.token_ids(t) for t in ("the answer is five", "two plus three")]
    fresh = Unit("p0", prompt, comps)
    assert backend.policy_is_reference()
    attach_logprobs(backend, [fresh], need_old=True)
    assert fresh.old == fresh.ref
    assert fresh.ref == backend.logprobs([prompt, prompt], comps, adapter=True)  # exact
    with torch.no_grad():
        next(p for n, p in backend.model.named_parameters() if "lora_B" in n).fill_(0.5)
    assert not backend.policy_is_reference()
    moved = Unit("p0", prompt, comps)
    attach_logprobs(backend, [moved], need_old=True)
    assert moved.ref == fresh.ref and moved.old != moved.ref


def test_two_stage_adapter_is_one_lora_on_the_original_base(dpo_run, tiny_llama_dir: Path
                                                            ) -> None:
    """The final adapter/ is the SFT adapter trained on by the PU stage: one LoRA that
    PeftModel.from_pretrained puts on the untouched student, giving the trained policy's
    log-probs; state/sft/adapter on the same base gives the reference the PU stage used."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edge_pu.backends import make_backend

    cfg, _ = dpo_run
    d = Path(cfg.run_dir)
    backend = make_backend("cpu")
    backend.load(cfg)
    backend.load_adapter(d / "state" / "sft" / "adapter")
    backend.set_reference()
    assert backend.policy_is_reference()
    backend.load_adapter(d / "adapter")
    assert not backend.policy_is_reference()
    prompt = backend.chat_ids([{"role": "user", "content": PROMPTS[1]}])
    comp = backend.token_ids("the answer is apple")
    policy = backend.logprobs([prompt], [comp], adapter=True)[0]
    reference = backend.logprobs([prompt], [comp], adapter=False)[0]
    for adapter_dir, want in ((d / "adapter", policy), (d / "state" / "sft" / "adapter",
                                                         reference)):
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        ids = torch.tensor([prompt + comp])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        got = [float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(comp)]
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-4
    assert max(abs(a - b) for a, b in zip(policy, reference, strict=True)) > 1e-3


def test_a_resumed_stage_is_marked_and_left_out_of_the_plan_comparison(
        dpo_run, tmp_path: Path) -> None:
    """A run killed during round 1's training: its rerun reads the SFT state, the candidates
    and the scores back from disk. Those stages say `resumed: true` and have no plan-vs-measured
    ratio; reference and train ran again and keep theirs. The first run resumed nothing."""
    import dataclasses
    import shutil

    cfg = dataclasses.replace(dpo_run[0], run_dir=str(tmp_path / "fresh"))
    run(cfg)
    first = json.loads((Path(cfg.run_dir) / "summary.json").read_text())
    assert not any(st.get("resumed") for st in first["stages"])
    assert {"sft", "sample r1", "rank r1", "train r1"} <= set(first["plan_vs_measured"])
    # The same run dir as it stood before round 1 finished training.
    killed = tmp_path / "killed"
    shutil.copytree(cfg.run_dir, killed)
    shutil.rmtree(killed / "state" / "round-1")
    metrics = [m for m in read_jsonl(killed / "metrics.jsonl")
               if m.get("round") != 1 and m.get("event") != "round_end"]
    (killed / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (killed / "summary.json").unlink()
    run(dataclasses.replace(cfg, run_dir=str(killed)))
    summary = json.loads((killed / "summary.json").read_text())
    resumed = {st["name"]: st.get("resumed") for st in summary["stages"]}
    assert resumed == {"load": None, "sft": True, "sample": True, "rank": True,
                       "reference": None, "train": None}
    assert set(summary["plan_vs_measured"]) == {"load", "reference r1", "train r1"}
