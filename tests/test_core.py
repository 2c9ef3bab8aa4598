"""Layering, config precedence, durable JSONL, and the torch backend's log-prob path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_pu.config import load_config
from edge_pu.errors import EdgePuError
from edge_pu.jsonl import append_jsonl, read_jsonl


def test_core_imports_no_heavy_framework() -> None:
    """`import edge_pu`, the algorithm's pure parts, config and backend detection must not
    import torch, mlx or bitsandbytes (users without them can still plan, anchor, export)."""
    code = ("import sys, edge_pu, edge_pu.config, edge_pu.anchors, edge_pu.algo.preferences, "
            "edge_pu.algo.rank_metrics, edge_pu.teachers.openai, edge_pu.tasks\n"
            "from edge_pu.backends import detect, available; detect(); available()\n"
            "bad = [m for m in ('torch', 'mlx', 'bitsandbytes', 'transformers') "
            "if m in sys.modules]\nprint(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_algo_losses_do_not_import_mlx_or_bitsandbytes() -> None:
    code = ("import sys, edge_pu.algo.losses\n"
            "print([m for m in ('mlx', 'bitsandbytes', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_config_precedence_defaults_file_set(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train: {lr: 0.001, beta: 0.2}\nsampling: {k: 6}\n")
    cfg = load_config(path, ["train.lr=0.002", "backend=cpu"],
                      base={"train": {"lr": 0.5, "epochs": 3}})
    assert cfg.train.lr == 0.002  # --set beats the file
    assert cfg.train.beta == 0.2  # the file beats defaults
    assert cfg.train.epochs == 3  # the base layer beats dataclass defaults
    assert cfg.sampling.k == 6 and cfg.backend == "cpu"
    assert cfg.sampling.max_new_tokens == 64  # untouched default


def test_unknown_key_suggests_nearest(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train: {learning_rate: 0.1, lrr: 1}\n")
    with pytest.raises(EdgePuError, match=r"unknown config key 'train.learning_rate'"):
        load_config(path)
    path.write_text("trian: {lr: 1}\n")
    with pytest.raises(EdgePuError, match=r"Did you mean 'train'"):
        load_config(path)


def test_torn_last_line_is_dropped_and_repaired(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    append_jsonl(path, [{"a": 1}, {"a": 2}])
    with open(path, "a") as fh:
        fh.write('{"a": 3, "b"')  # a crash mid-write
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    append_jsonl(path, [{"a": 4}])  # the torn tail is cut before appending
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 4}]
    assert path.read_text().count("\n") == 3


def test_bad_middle_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(EdgePuError, match=r"x.jsonl:2: invalid JSON"):
        read_jsonl(path)


def test_chunked_logprobs_match_full_log_softmax(tiny_llama_dir: Path, monkeypatch) -> None:
    """The chunked, completion-only log-prob path equals log_softmax over full logits, for
    rows whose prompt is their own (run together as whole padded rows) and rows that share one
    (the prompt once, its KV cache gathered), mixed in one call."""
    import torch

    from edge_pu.backends import torch_backend, torch_logprobs

    cfg = load_config(None, base={"student": {"path": str(tiny_llama_dir)}, "backend": "cpu"})
    backend = torch_backend.CPUBackend()
    backend.load(cfg)
    # A chunk of 3 rows forces several chunks even for these short completions.
    monkeypatch.setattr(torch_logprobs, "LOGIT_CHUNK_BYTES", 3 * 4 * backend.tok.vocab_size)
    prompts = [[5, 6, 7], [8, 9], [1, 2, 3, 4], [1, 2, 3, 4]]
    comps = [[10, 11, 12, 13], [14], [15, 16], [17]]
    got = backend.logprobs(prompts, comps)
    model = backend.model
    for p, c, lp in zip(prompts, comps, got, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c])).logits[0].float()
        full = torch.log_softmax(logits, -1)
        want = [full[len(p) - 1 + j, t].item() for j, t in enumerate(c)]
        assert lp == pytest.approx(want, abs=1e-4)


def test_training_runs_each_prompt_once_with_the_same_logprobs_and_gradients(
        tiny_llama_dir: Path) -> None:
    """A micro-batch's rows share their prompts (a DPO pair, a GRPO group): the prompt is run
    once and its KV cache gathered per row. Log-probs and LoRA gradients must equal running
    every row whole (prompts of unequal length, so left padding is exercised)."""
    import torch

    from edge_pu.backends import torch_backend

    cfg = load_config(None, base={"student": {"path": str(tiny_llama_dir)}, "backend": "cpu",
                                  "lora": {"r": 4}})
    backend = torch_backend.CPUBackend()
    backend.load(cfg)
    torch.manual_seed(0)
    for name, param in backend.model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.1)  # a non-identity adapter, so its gradients are general
    prompts = [[5, 6, 7, 8, 9, 10, 11]] * 3 + [[12, 13, 14]] * 2
    comps = [[20, 21, 22, 23], [24], [25, 26], [27, 28, 29, 30, 31, 32], [33, 34]]
    backend.model.train()

    def run(path):
        backend.model.zero_grad()
        lp, mask = path(prompts, comps)
        weights = torch.arange(1.0, lp.shape[1] + 1)  # every position its own weight
        (lp * mask * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in backend.model.named_parameters()
                 if p.grad is not None}
        return lp * mask, mask, grads

    whole, mask_w, grads_w = run(backend._whole_rows_logp)
    shared, mask_s, grads_s = run(backend._shared_prefix_logp)
    assert torch.equal(mask_w, mask_s)
    assert mask_s.sum() == sum(map(len, comps))
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=0)
    assert grads_w.keys() == grads_s.keys() and len(grads_s) > 0
    for name, g in grads_w.items():
        torch.testing.assert_close(grads_s[name], g, atol=1e-5 * float(g.abs().max()), rtol=1e-4)
    lp, _ = backend._token_logp(prompts, comps)  # no checkpointing: the shared path
    torch.testing.assert_close(lp.detach() * mask_s, shared.detach())


def test_torch_draw_keeps_the_top_p_head_and_inverts_its_cdf_by_hand() -> None:
    """probs .05 .5 .15 .3 (token order), top-p .8: ranked .5 .3 .15 .05, cumulative mass
    before each 0 .5 .8 .95, so tokens 1 and 3 are kept (mass .8). The CDF runs in token
    order over the kept ones: token 1 up to .5, token 3 up to .8; u scales to u x .8."""
    import torch

    from edge_pu.backends.torch_sampling import _draw

    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]] * 4))
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    us = [float(torch.rand(1, generator=torch.Generator().manual_seed(s))) for s in range(4)]
    want = [1 if u * 0.8 <= 0.5 else 3 for u in us]
    assert _draw(logits, 1.0, 0.8, gens, 1).tolist() == want
    assert set(want) == {1, 3}  # these seeds reach both kept tokens
    # top-p 1: all four, CDF .05 .55 .70 1.0
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    cdf = [0.05, 0.55, 0.70, 1.0]
    assert _draw(logits, 1.0, 1.0, gens, 1).tolist() == \
        [next(i for i, c in enumerate(cdf) if u <= c) for u in us]
    # A head wider than the first topk (64): p_i proportional to 400 - i over 200 tokens; the
    # mass reaches .5 only after n tokens, n from the partial sums (n > 64, so it widens).
    weights = [400 - i for i in range(200)]
    n = next(j + 1 for j in range(200) if sum(weights[: j + 1]) >= 0.5 * sum(weights))
    assert n > 64
    logits = torch.log(torch.tensor([weights], dtype=torch.float32))
    picks = {int(_draw(logits, 1.0, 0.5, [torch.Generator().manual_seed(s)], 1))
             for s in range(400)}
    assert max(picks) < n and max(picks) >= 64  # past the first head, never past the set


def test_sampling_is_reproducible_and_batch_independent(tiny_llama_dir: Path) -> None:
    from edge_pu.backends import make_backend
    from edge_pu.config import SamplingConfig

    cfg = load_config(None, base={"student": {"path": str(tiny_llama_dir)}, "backend": "cpu"})
    backend = make_backend("cpu")
    backend.load(cfg)
    scfg = SamplingConfig(k=3, max_new_tokens=6, temperature=1.0, prompt_batch=2)
    a = backend.chat_ids([{"role": "user", "content": "what is two plus three?"}])
    b = backend.chat_ids([{"role": "user", "content": "list"}])
    together = backend.sample([a, b], 3, scfg, [11, 22])
    alone = backend.sample([a], 3, scfg, [11])
    assert together == backend.sample([a, b], 3, scfg, [11, 22])
    assert [s.token_ids for s in together[0]] == [s.token_ids for s in alone[0]]
    assert len({tuple(s.token_ids) for s in together[0]}) > 1  # K distinct samples
    json.dumps([s.token_ids for s in together[1]])


def test_shared_prompt_scoring_equals_the_padded_batch_path(tiny_llama_dir: Path) -> None:
    """Rows that share a prompt are scored from one prefill; the result must equal the
    right-padded batch path that training uses."""
    import torch

    from edge_pu.backends.torch_backend import CPUBackend

    cfg = load_config(None, base={"student": {"path": str(tiny_llama_dir)}, "backend": "cpu"})
    backend = CPUBackend()
    backend.load(cfg)
    prompt = [5, 6, 7, 8]
    comps = [[10, 11, 12], [13], [14, 15, 16, 17, 18]]
    shared = backend.logprobs([prompt] * 3, comps)
    with torch.no_grad():
        lp, mask = backend._token_logp([prompt] * 3, comps)
    for row, c, want in zip(shared, comps, lp.tolist(), strict=True):
        assert row == pytest.approx(want[: len(c)], abs=1e-5)


def test_pu_subset_is_seeded_fresh_each_round_and_all_by_default() -> None:
    """train.sample_prompts: 0 or >= the prompts keeps all; n keeps the n ids with the smallest
    sha256("seed|round|id"), so it is fixed by (seed, round), not by the set's order."""
    import hashlib

    from edge_pu.train import pu_subset

    ids = {f"p{i}" for i in range(10)}
    assert pu_subset(ids, 0, 0, 1) == ids and pu_subset(ids, 10, 0, 1) == ids
    want = set(sorted(ids, key=lambda p: hashlib.sha256(f"0|1|{p}".encode()).hexdigest())[:3])
    assert pu_subset(ids, 3, 0, 1) == want and len(want) == 3
    assert pu_subset(set(sorted(ids, reverse=True)), 3, 0, 1) == want
    assert pu_subset(ids, 3, 0, 2) != want  # round 2 draws other prompts


def test_early_stopping_holds_back_a_share_of_anchors_by_id() -> None:
    """sft.val_fraction 0.25 of 8 anchors: round(2.0) = 2 held back, the two ids with the
    smallest sha256; never none (0.01 -> 1) and never all (0.99 of 2 -> 1)."""
    import hashlib

    from edge_pu.sft import held_back

    ids = [f"a{i}" for i in range(8)]
    want = set(sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())[:2])
    assert held_back(ids, 0.25) == want == held_back(list(reversed(ids)), 0.25)
    assert len(held_back(ids, 0.01)) == 1 and len(held_back(["x", "y"], 0.99)) == 1
