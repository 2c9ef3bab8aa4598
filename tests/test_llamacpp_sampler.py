"""The CPU sampler that draws candidates through llama.cpp from the student's GGUF + a GGUF LoRA.

Checked against the torch backend (the reference) on a tiny Llama carrying a random, non-zero
adapter: greedy continuations agree token for token, and the adapter visibly changes them (so
the agreement is not the base model agreeing with itself). The inverse-CDF draw is checked on
numbers worked by hand, and a 2-round run shows round 2 sampling through the refreshed LoRA.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from edge_pu.backends.llamacpp_sampler import draw
from edge_pu.config import SamplingConfig

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

PROMPTS = ["what is two plus three?", "write the word apple in capital letters",
           "list three red fruits", "sort one two three", "name a capital city"]


def test_draw_inverse_cdf_by_hand() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    assert draw(logits, 0.0, 1.0, 0.99) == 0  # greedy ignores u
    # Full distribution, cdf [.5, .8, 1]: u=.49 -> 0, u=.51 -> 1, u=.81 -> 2.
    assert [draw(logits, 1.0, 1.0, u) for u in (0.49, 0.51, 0.81)] == [0, 1, 2]
    # top_p .7 keeps {.5, .3} (the .3 is needed to reach .7); cdf [.5, .8] scaled by u * .8:
    # u=.6 -> .48 -> 0, u=.7 -> .56 -> 1, u=.99 -> .792 -> 1 (token 2 is never drawn).
    assert [draw(logits, 1.0, 0.7, u) for u in (0.6, 0.7, 0.99)] == [0, 1, 1]
    # Temperature 2 flattens p to sqrt(.5, .3, .2) / 1.7020 = (.4155, .3218, .2628).
    p = np.sqrt([0.5, 0.3, 0.2])
    p /= p.sum()
    assert draw(logits, 2.0, 1.0, p[0] - 1e-6) == 0 and draw(logits, 2.0, 1.0, p[0] + 1e-6) == 1
    assert math.isclose(p[0], 0.4155, abs_tol=1e-4)


@pytest.fixture(scope="module")
def pair(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(torch backend with a random non-zero adapter, llama.cpp sampler with it as a LoRA)."""
    from tiny import random_lora_pair

    root = tmp_path_factory.mktemp("llamacpp")
    backend, sampler = random_lora_pair({"path": str(tiny_llama_dir)}, root)
    yield backend, sampler, root
    sampler.close()


def test_greedy_with_lora_matches_torch_with_adapter(pair) -> None:
    backend, sampler, root = pair
    ids = [backend.chat_ids([{"role": "user", "content": p}]) for p in PROMPTS]
    greedy = SamplingConfig(k=1, max_new_tokens=16, temperature=0.0)
    seeds = list(range(len(ids)))
    sampler.refresh(None, "base")
    base = [s[0].token_ids for s in sampler.sample(ids, 1, greedy, seeds)]
    sampler.refresh(root / "adapter", "test")
    assert sampler.lora is not None and sampler.lora.exists()
    ours = [s[0].token_ids for s in sampler.sample(ids, 1, greedy, seeds)]
    ref = [s[0].token_ids for s in backend.sample(ids, 1, greedy, seeds)]
    assert ours == ref
    # K = 3 greedy candidates decode as 3 sequences of one batch over the shared prompt cells:
    # each must still be the torch continuation.
    assert [[c.token_ids for c in s] for s in sampler.sample(ids, 3, greedy, seeds)] == \
        [[r] * 3 for r in ref]
    assert sum(len(r) for r in ref) >= 3 * len(PROMPTS)  # real continuations, not empty
    assert base != ours  # the LoRA is applied: the base alone decodes differently


def test_sampling_is_reproducible_and_per_prompt(pair) -> None:
    backend, sampler, root = pair
    sampler.refresh(root / "adapter", "test")
    ids = [backend.chat_ids([{"role": "user", "content": p}]) for p in PROMPTS]
    cfg = SamplingConfig(k=3, max_new_tokens=8, temperature=1.0, top_p=0.95)
    a = sampler.sample(ids, 3, cfg, [11, 12, 13, 14, 15])
    b = sampler.sample(ids[2:], 3, cfg, [13, 14, 15])  # other company, same seeds
    assert a[2:] == b
    texts = [x.token_ids for x in a[0]]
    assert len({tuple(t) for t in texts}) > 1  # K candidates differ from one another
    c = sampler.sample(ids[:1], 3, cfg, [99])
    assert c[0] != a[0]


def test_two_rounds_sample_round_two_through_the_refreshed_lora(tmp_path: Path,
                                                                 tiny_llama_dir: Path) -> None:
    import gc

    from llama_cpp import Llama
    from test_pipeline import tiny_cfg

    from edge_pu.jsonl import read_jsonl
    from edge_pu.pipeline import run

    cfg = tiny_cfg(tmp_path, tiny_llama_dir, sampling={"engine": "llama-cpp"},
                   train={"rounds": 2, "steps": 4})
    gc.disable()  # the sampler sits in a reference cycle: only gc would ever free it
    try:
        before = {id(o) for o in gc.get_objects() if isinstance(o, Llama)}  # other tests'
        run(cfg)
        # The run closed its llama.cpp model: an eval runs many methods in one process, and
        # each left one open (~1.5 GB each on the 0.5B student) until it did.
        made = [o for o in gc.get_objects() if isinstance(o, Llama) and id(o) not in before]
        assert all(o._ctx.ctx is None for o in made)  # closed, or freed outright
    finally:
        gc.enable()
    d = Path(cfg.run_dir)
    assert (d / "sampler" / "lora-r1.gguf").exists()
    cands = read_jsonl(d / "candidates.jsonl")
    assert {c["round"] for c in cands} == {1, 2}
    assert len(cands) == 2 * 6 * cfg.sampling.k
    # f32 GGUF written once from the HF-folder student, into the cache.
    assert len(read_jsonl(d / "teacher_ledger.jsonl")) == 6


def test_past_32_rows_each_sequence_has_its_own_stream(pair) -> None:
    """5 prompts x K=8 = 40 rows: non-unified KV (one stream per sequence, the prompt's stream
    copied to its K-1 siblings). Greedy still equals torch; seeded samples still repeat and do
    not depend on the other prompts of the group."""
    backend, sampler, root = pair
    sampler.refresh(root / "adapter", "test")
    ids = [backend.chat_ids([{"role": "user", "content": p}]) for p in PROMPTS]
    greedy = SamplingConfig(k=8, max_new_tokens=12, temperature=0.0, prompt_batch=5)
    seeds = list(range(len(ids)))
    ref = [s[0].token_ids for s in backend.sample(ids, 1, greedy, seeds)]
    ours = sampler.sample(ids, 8, greedy, seeds)
    assert not sampler.kv_unified
    assert [[c.token_ids for c in s] for s in ours] == [[r] * 8 for r in ref]
    cfg = SamplingConfig(k=8, max_new_tokens=8, temperature=1.0, top_p=0.95, prompt_batch=5)
    a = sampler.sample(ids, 8, cfg, [11, 12, 13, 14, 15])
    assert sampler.sample(ids[2:], 8, cfg, [13, 14, 15]) == a[2:]
    assert len({tuple(x.token_ids) for x in a[0]}) > 1


def test_candidate_logprobs_and_next_token_logprobs_match_torch(pair) -> None:
    """The scoring passes (Backend.logprobs / next_token_logprobs, what the rankers call) on the
    f32 GGUF + LoRA equal torch's with the adapter to 1e-4 per token, for rows that share a
    prompt (one decoded prefix, its cells shared), rows whose prompts share only a head (a
    ranker's drafts), and a row alone; and the adapter visibly moves them."""
    backend, sampler, root = pair
    sampler.refresh(root / "adapter", "test")
    chat = [backend.chat_ids([{"role": "user", "content": p}]) for p in PROMPTS]
    drafts = [backend.chat_ids([{"role": "user", "content": f"{PROMPTS[0]}\n\ndraft: {d}"}])
              for d in ("five", "it is 5", "two plus three is five")]
    comps = [backend.token_ids(t) for t in (" five", " 5 is the answer", " ok")]
    prompts = [chat[0]] * 3 + drafts + [chat[3]]
    completions = comps + comps + [backend.token_ids(" one two three")]
    ref = backend.logprobs(prompts, completions, adapter=True)
    ours = sampler.logprobs(prompts, completions)
    assert [len(r) for r in ours] == [len(c) for c in completions]
    assert _gap(ref, ours) < 1e-4, _gap(ref, ours)
    # Against the base alone the same rows differ: the LoRA is applied in scoring too.
    base = backend.logprobs(prompts, completions, adapter=False)
    assert _gap(base, ours) > 1e-2
    words = [backend.token_ids(w)[0] for w in ("Yes", "No")]
    nref = backend.next_token_logprobs(chat, words, adapter=True)
    nours = sampler.next_token_logprobs(chat, words)
    assert _gap(nref, nours) < 1e-4
    # Scoring left the sampler able to sample: greedy still equals torch after it.
    greedy = SamplingConfig(k=2, max_new_tokens=8, temperature=0.0)
    assert [[c.token_ids for c in s] for s in sampler.sample(chat, 2, greedy, [0] * 5)] == \
        [[s[0].token_ids] * 2 for s in backend.sample(chat, 1, greedy, [0] * 5)]


def _gap(a: list[list[float]], b: list[list[float]]) -> float:
    """The largest |difference| between two ragged tables of the same shape."""
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True)
               for x, y in zip(ra, rb, strict=True))


def test_prefix_runs_share_what_consecutive_prompts_share() -> None:
    from edge_pu.backends.llamacpp_sampler import _prefix_runs

    # Rows 0-2 share [1, 2, 3, 4] (capped one short of the shortest prompt: 4 of 5 tokens);
    # row 3 shares only [1] with them, under half of what rows 0 and 1 share: a new run, which
    # row 4 joins ([1, 9, 9] in common, capped at 2). Row 5 alone shares nothing.
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6, 7], [1, 2, 3, 4, 5, 8], [1, 9, 9, 9],
               [1, 9, 9], [7, 7]]
    assert _prefix_runs(prompts) == [(0, 3, 4), (3, 5, 2), (5, 6, 0)]
