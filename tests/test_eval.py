"""The evaluation suite: per-prompt Kendall tau, the SFT loss, teacher-call counting, the
equal-budget method configs, the adapter reset, and `edge-pu eval --quick` end to end on a tiny
Llama (results.json keys, exactly one teacher call per prompt, resume without new calls)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from edge_pu.eval.ranking import prompt_taus, summarize


def test_prompt_taus_hand_picked() -> None:
    """Three prompts, K = 3 or 4 candidates each.

    1. scores (3, 1, 2), qualities (1, 0, .5): the same order -> tau = 1.
    2. scores (1, 2, 3, 4), qualities (0, 0, 1, 1): n0 = 6 pairs; qualities tie in 2 of
       them, scores in none; the 4 untied pairs are all concordant, so
       tau_b = (4 - 0) / sqrt((6 - 0) (6 - 2)) = 4 / sqrt(24) = 0.8165.
    3. qualities all .5: no order to agree with -> None (left out of the mean, counted).
    4. scores (1, 2, 3), qualities (1, .5, 0): reversed -> tau = -1.
    """
    scores = [[3, 1, 2], [1, 2, 3, 4], [0, 0, 0], [1, 2, 3]]
    quality = [[1.0, 0.0, 0.5], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5], [1.0, 0.5, 0.0]]
    taus = prompt_taus(scores, quality)
    assert taus[0] == pytest.approx(1.0)
    assert taus[1] == pytest.approx(4 / math.sqrt(24))
    assert taus[2] is None
    assert taus[3] == pytest.approx(-1.0)


def test_summarize_hand_picked() -> None:
    """mean tau over the 2 prompts with varying quality: (1 + 0.8165) / 2 = 0.9082; top-1
    quality: prompt 1 picks candidate 0 (q 1), prompt 2 candidate 3 (q 1), prompt 3 ties on
    every score and takes the first (q .5): (1 + 1 + .5) / 3 = 0.8333; mean quality
    (.5 + .5 + .5) / 3 = .5; best (1 + 1 + .5) / 3 = 0.8333."""
    s = summarize([[3, 1, 2], [1, 2, 3, 4], [0, 0, 0]],
                  [[1.0, 0.0, 0.5], [0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5]])
    assert s["mean_tau"] == pytest.approx((1 + 4 / math.sqrt(24)) / 2)
    assert (s["prompts_used"], s["prompts_total"]) == (2, 3)
    assert s["top1_quality"] == pytest.approx(2.5 / 3)
    assert s["mean_quality"] == pytest.approx(0.5)
    assert s["best_quality"] == pytest.approx(2.5 / 3)
    assert summarize([[1, 2]], [[0.3, 0.3]])["mean_tau"] is None


def test_sft_loss_hand_picked() -> None:
    """Rows: anchor 1 has tokens with log-probs (-1, -2) and one padding slot; anchor 2 has one
    token (-0.5) and two padding slots (set to -inf: they must not leak). Token-mean NLL:
    L = (1 + 2 + 0.5) / 3 = 7/6 = 1.1667. dL/dlogp = -1/3 on each of the 3 real tokens and 0
    on padding."""
    import torch

    from edge_pu.algo.losses import LossConfig, LossInputs
    from edge_pu.sft import sft_loss

    inf = float("-inf")
    logp = torch.tensor([[-1.0, -2.0, inf], [-0.5, inf, inf]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    out = sft_loss(LossInputs(token_logp=logp, ref_token_logp=torch.zeros(2, 3), mask=mask),
                   LossConfig())
    assert out.loss.item() == pytest.approx(7 / 6)
    assert out.metrics["loss"] == pytest.approx(7 / 6)
    out.loss.backward()
    expected = torch.tensor([[-1 / 3, -1 / 3, 0.0], [-1 / 3, 0.0, 0.0]])
    assert torch.allclose(logp.grad, expected)


def _ledger(path: Path, ids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for i in ids:
            f.write(json.dumps({"req": f"r-{i}", "id": i, "attempt": 0}) + "\n")


def test_teacher_calls_per_prompt(tmp_path: Path) -> None:
    from edge_pu.eval.suite import teacher_calls

    _ledger(tmp_path / "anchors" / "teacher_ledger.jsonl", ["p0", "p1", "p2"])
    (tmp_path / "seed-0" / "pu-dpo").mkdir(parents=True)  # a method dir with no ledger
    calls = teacher_calls(tmp_path, ["p0", "p1", "p2"])
    assert calls["exactly_one"] and calls["requests"] == 3 and calls["per_prompt_max"] == 1
    _ledger(tmp_path / "seed-0" / "pu-dpo" / "teacher_ledger.jsonl", ["p1"])  # a second call
    calls = teacher_calls(tmp_path, ["p0", "p1", "p2"])
    assert not calls["exactly_one"]
    assert (calls["requests"], calls["ledgers"], calls["per_prompt_max"]) == (4, 2, 2)
    assert teacher_calls(tmp_path / "anchors", ["p0", "p1", "p2", "p3"])["per_prompt_min"] == 0


def test_every_method_gets_the_same_rows_per_step() -> None:
    """DPO: batch_size pairs = 8 rows; GRPO with K = 4: 8 // 4 = 2 groups = 8 rows (plus the
    anchor row per group when it is the labelled positive). SFT methods use the SFT path."""
    from edge_pu.config import load_config
    from edge_pu.eval.methods import METHODS
    from edge_pu.eval.suite import method_config

    cfg = load_config(None, base={"sampling": {"k": 4}, "train": {"batch_size": 4,
                                                                   "micro_batch": 2}})
    for name, m in METHODS.items():
        if m.kind in ("none", "sft", "sft-best"):
            continue
        mcfg = method_config(cfg, m, Path("x"), n_sft=3, n_pu=2)
        t = mcfg.train
        assert mcfg.sft.enabled == (m.kind == "two"), name
        if m.kind == "two":
            assert (mcfg.sft.steps, t.steps) == (3, 2)
        rows = t.batch_size * (cfg.sampling.k if t.algorithm == "grpo" else 2)
        assert rows == 8, name
        assert t.micro_batch <= t.batch_size
    assert method_config(cfg, METHODS["similarity"], Path("x")).ranker.mode == "similarity"
    assert method_config(cfg, METHODS["self-noanchor"], Path("x")).ranker.mode == "recall"
    assert method_config(cfg, METHODS["sft+pu:zscore"], Path("x")).train.calibration == "zscore"


def test_a_method_variant_sets_train_keys_for_that_method_only() -> None:
    """`sft+oracle@lr=5e-4@tau=1` is sft+oracle with train.lr 5e-4 and train.tau 1 (an int
    parsed as a number); unknown keys and non-PU bases are refused naming the culprit."""
    from edge_pu.config import load_config
    from edge_pu.errors import EdgePuError
    from edge_pu.eval.methods import METHODS, method_named
    from edge_pu.eval.suite import method_config

    m = method_named("sft+oracle@lr=5e-4@tau=1")
    assert (m.name, m.kind, m.ranker) == ("sft+oracle@lr=5e-4@tau=1", "two", "oracle")
    t = method_config(load_config(None), m, Path("x"), n_sft=3, n_pu=2).train
    assert (t.lr, t.tau, t.steps) == (5e-4, 1, 2)
    assert method_named("sft") is METHODS["sft"]
    with pytest.raises(EdgePuError, match="lrr"):
        method_named("sft+oracle@lrr=1")
    with pytest.raises(EdgePuError, match="only PU methods"):
        method_named("sft@lr=1e-3")
    with pytest.raises(EdgePuError, match="unknown method nope"):
        method_named("nope@lr=1")


def test_reset_adapter_restores_the_untrained_policy(tiny_llama_dir: Path) -> None:
    """After an SFT step the policy differs from the reference; after reset_adapter the policy
    (adapter on) equals the reference (adapter off) again, and the optimizer is rebuilt."""
    from edge_pu.algo.losses import LossConfig
    from edge_pu.backends import make_backend
    from edge_pu.config import load_config
    from edge_pu.eval.methods import reset_adapter
    from edge_pu.sft import sft_batches, sft_loss

    cfg = load_config(None, base={"student": {"path": str(tiny_llama_dir)}, "backend": "cpu",
                                  "train": {"lr": 0.05}})
    backend = make_backend("cpu")
    backend.load(cfg)
    prompt = backend.chat_ids([{"role": "user", "content": "what is two plus three?"}])
    answer = backend.token_ids("five")
    backend.train_step(sft_batches([prompt], [answer], 1), sft_loss, LossConfig())
    pol = backend.logprobs([prompt], [answer], adapter=True)[0]
    ref = backend.logprobs([prompt], [answer], adapter=False)[0]
    assert max(abs(a - b) for a, b in zip(pol, ref, strict=True)) > 1e-4
    reset_adapter(backend, cfg, seed=1)
    assert backend.optimizer is None
    pol = backend.logprobs([prompt], [answer], adapter=True)[0]
    assert pol == pytest.approx(ref, abs=1e-6)


def test_quick_eval_end_to_end(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from edge_pu.cli import main

    out = tmp_path / "eval"
    argv = ["eval", "--quick", "--student", str(tiny_llama_dir), "--out", str(out),
            "--threads", "1"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert {"suite", "sizes", "config", "environment", "before", "methods", "rankers",
            "teacher_calls", "stages", "curves", "seconds"} <= set(res)
    assert set(res["methods"]) == {"sft+pu-grpo-adv", "sft"}
    for m in res["methods"].values():
        assert {"pass_rate_mean", "pass_rate_sd", "quality_mean", "lift_points_mean",
                "by_family", "train_seconds_mean", "seeds", "lift_vs"} <= set(m)
        assert m["lift_vs"]["none"]["prompts"] == res["suite"]["heldout_prompts"]
        lift = m["lift_vs"]["none"]
        assert lift["lo"] <= lift["points"] <= lift["hi"]
        assert len(m["by_family"]) == 9
    assert "sft" in res["methods"]["sft+pu-grpo-adv"]["lift_vs"]
    assert set(res["rankers"]) == {"likelihood", "likelihood-noanchor", "recall",
                                   "recall-noanchor", "judge", "judge-noanchor", "similarity",
                                   "bleu", "random", "oracle"}
    assert res["rankers"]["oracle"]["mean_tau"] in (None, 1.0)  # the checker agrees with itself
    for r in res["rankers"].values():
        assert r["candidates_from"] == "sft"
        assert r["prompts_total"] == res["suite"]["train_prompts"] == 9
        assert r["mean_tau"] is None or -1.0 <= r["mean_tau"] <= 1.0
    calls = res["teacher_calls"]
    assert calls["exactly_one"] and calls["requests"] == 9 == calls["prompts"]
    names = {s["name"] for s in res["stages"]}
    # Every trained method is also scored on the validation split (settings are chosen there).
    for m in res["methods"].values():
        assert 0.0 <= m["validation_pass_rate_mean"] <= 1.0
    assert {"load", "anchors", "sft-path", "sample:sft", "rank:recall:sft",
            "train:sft+pu-grpo-adv", "eval:sft"} <= names
    assert all(s["seconds"] >= 0 and s["peak_rss_mb"] > 0 for s in res["stages"])
    assert "sft+pu-grpo-adv" in res["curves"]
    assert "## Ranker quality" in (out / "results.md").read_text()
    page = (out / "report.html").read_text()  # edge_pu.report, written at the end
    assert "sft+pu-grpo-adv" in page and "Stages of each method run" in page

    # A rerun resumes from the files: no new teacher call, no method trained again.
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["teacher_calls"]["requests"] == 9 and again["teacher_calls"]["exactly_one"]
    assert not any(s["name"].startswith("train:") and not s.get("resumed")
                   for s in again["stages"])
    assert again["methods"]["sft+pu-grpo-adv"]["pass_rate_mean"] == res["methods"][
        "sft+pu-grpo-adv"]["pass_rate_mean"]

    # The cached candidates and results belong to this config: another one is refused; how the
    # teacher is reached (a served teacher's new port, its timeout) is not what it answers.
    assert main(argv + ["--set", "train.lr=0.1"]) != 0
    assert main(argv + ["--set", "teacher.base_url=http://127.0.0.1:9/v1",
                        "--set", "teacher.timeout_s=5"]) == 0


def test_eval_folder_from_an_older_edge_pu_is_reused(tmp_path: Path) -> None:
    """A key added to the config since an eval folder was made (e.g. sampling.engine) counts
    as its default; a changed value is still refused."""
    from edge_pu.config import RunConfig, config_to_dict, load_config
    from edge_pu.errors import EdgePuError
    from edge_pu.eval.suite import _check_fingerprint

    cfg = RunConfig()
    _check_fingerprint(tmp_path, cfg, {"n": 1}, 0)
    saved = json.loads((tmp_path / "eval_config.json").read_text())
    del saved["config"]["sampling"]["engine"]  # as written before the key existed
    (tmp_path / "eval_config.json").write_text(json.dumps(saved))
    _check_fingerprint(tmp_path, cfg, {"n": 1}, 0)
    changed = config_to_dict(cfg)
    changed["sampling"]["k"] = 8
    with pytest.raises(EdgePuError, match="sampling"):
        _check_fingerprint(tmp_path, load_config(None, base=changed), {"n": 1}, 0)


def test_eval_through_llama_cpp_answers_as_torch_does(tiny_llama_dir: Path,
                                                      tmp_path: Path) -> None:
    """sampling.engine + ranker.engine llama-cpp: one llama.cpp model samples, scores and answers
    greedily for the whole eval, each call on the weights it asks for. On the tiny student's
    exact f32 GGUF the untrained student's greedy answers are torch's, word for word, and the
    trained methods' answers are not all the untrained ones (the adapters reach llama.cpp)."""
    pytest.importorskip("llama_cpp")
    from edge_pu.backends import make_backend
    from edge_pu.cli import main
    from edge_pu.config import load_config
    from edge_pu.evaluate import greedy_answers
    from edge_pu.jsonl import read_jsonl, write_jsonl_atomic
    from edge_pu.tasks import from_jsonl_row

    out = tmp_path / "eval"
    argv = ["eval", "--quick", "--student", str(tiny_llama_dir), "--out", str(out),
            "--threads", "1", "--rankers", "recall", "judge", "oracle", "--set",
            "sampling.engine=llama-cpp", "--set", "ranker.engine=llama-cpp",
            "--set", "sft.lr=0.05",  # 1 step that visibly moves the tiny student's answers
            "--methods", "sft", "sft+pu-grpo-adv"]
    assert main(argv) == 0
    before = json.loads((out / "before.json").read_text())
    tasks = {t.id: t for t in map(from_jsonl_row, read_jsonl(out / "tasks.jsonl"))}
    heldout = [tasks[a["id"]] for a in before["answers"]]
    backend = make_backend("cpu")
    backend.load(load_config(None, base={"student": {"path": str(tiny_llama_dir)},
                                         "backend": "cpu"}))
    torch_answers = greedy_answers(backend, heldout, adapter=False, max_new_tokens=8, batch=9)
    assert [a["answer"] for a in before["answers"]] == torch_answers
    # The trained adapter (SFT, then GRPO) answers in llama.cpp as it does in torch, and not as
    # the untrained student does: the adapter reached llama.cpp.
    method = out / "seed-0" / "sft+pu-grpo-adv"
    trained = [a["answer"] for a in json.loads((method / "eval.json").read_text())["answers"]]
    backend.load_adapter(method / "adapter")
    assert trained == greedy_answers(backend, heldout, adapter=True, max_new_tokens=8, batch=9)
    assert trained != torch_answers
    res = json.loads((out / "results.json").read_text())
    assert res["rankers"]["recall"]["prompts_total"] == 9
    # A PU round with nothing to train on (here: the oracle's scores made all equal, so every
    # prompt ties) does not stop the eval: the method is scored as its SFT stage left it, and
    # the report says so.
    oracle_scores = out / "seed-0" / "shared-sft" / "scores-oracle.jsonl"
    write_jsonl_atomic(oracle_scores, [{**r, "scores": [0.5] * len(r["scores"])}
                                       for r in read_jsonl(oracle_scores)])
    assert main(argv + ["sft+oracle"]) == 0
    oracle = json.loads((out / "seed-0" / "sft+oracle" / "eval.json").read_text())
    assert "nothing to train on" in oracle["train_diag"]["nothing_to_train"]
    backend.load_adapter(out / "seed-0" / "sft-path" / "step-1" / "adapter")
    assert [a["answer"] for a in oracle["answers"]] == greedy_answers(
        backend, heldout, adapter=True, max_new_tokens=8, batch=9)
    assert "sft+oracle: in 1 of 1 seed(s) the PU round had nothing to train on" in (
        out / "results.md").read_text()
    # Each new set of weights replaced the last one's files: no pile of LoRA copies.
    assert len(list((out / "engine" / "sampler").glob("lora-v*.gguf"))) <= 1
    # ranker.engine alone has no llama.cpp model to score on: refused before any work.
    assert main(["eval", "--quick", "--student", str(tiny_llama_dir), "--out",
                 str(tmp_path / "x"), "--set", "ranker.engine=llama-cpp"]) != 0
    assert not (tmp_path / "x" / "before.json").exists()

