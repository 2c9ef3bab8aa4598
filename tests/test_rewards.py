"""User reward functions as a ranker (edge_pu.rewards, ranker mode `reward`): TRL's calling
convention, hand-derived scores, the tiebreak, the anchor gate, and bad functions failing with
the function named and nothing already written lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_pu.config import RankerConfig, RunConfig, load_config
from edge_pu.data import Prompt, load_prompts
from edge_pu.errors import EdgePuError
from edge_pu.jsonl import read_jsonl
from edge_pu.pipeline import rank_round
from edge_pu.rank import RANKERS, RankItem, anchor_gate
from edge_pu.rewards import call_rewards, tiebreak

REWARDS = '''
import math

CALLS = []

def length(prompts, completions, completion_ids, **kw):
    CALLS.append({"prompts": list(prompts), "kw": sorted(kw)})
    return [float(len(c)) for c in completions]

def has_x(prompts, completions, target=None, **kw):
    # None where the record has no target: TRL's "does not apply"
    return [None if t is None else float(t in c) for c, t in zip(completions, target)]

def boom(prompts, completions, **kw):
    if any(c == "bad" for c in completions):
        raise ValueError("cannot score 'bad'")
    return [1.0] * len(completions)

def nan(prompts, completions, **kw):
    return [math.nan] * len(completions)

def short(prompts, completions, **kw):
    return [1.0]

def text(prompts, completions, **kw):
    return ["high"] * len(completions)
'''


@pytest.fixture()
def rewards_file(tmp_path: Path) -> str:
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS)
    return str(path)


def _item(pid: str, texts: list[str], anchor: str = "ref", **columns) -> RankItem:
    return RankItem(pid, Prompt(pid, f"say {pid}", columns=columns), anchor,
                    [[ord(c) for c in t] for t in texts], texts)


def test_weighted_sum_of_functions_in_trl_convention(rewards_file: str) -> None:
    """Two functions, weights 2 and 1; has_x gives None (does not apply) where target is None.

    p1 (target "x"): "ax" -> 2*2 + 1*1 = 5; "bbb" -> 2*3 + 0 = 6
    p2 (no target):  "x"  -> 2*1 (has_x None, left out)    = 2
    """
    cfg = RankerConfig(mode="reward", reward_funcs=(f"{rewards_file}:length",
                                                    f"{rewards_file}:has_x"),
                       reward_weights=("2", "1"))
    items = [_item("p1", ["ax", "bbb"], target="x"), _item("p2", ["x"], target=None)]
    assert RANKERS["reward"](None, items, cfg) == [[5.0, 6.0], [2.0]]
    from edge_pu.rewards import load_reward

    mod_calls = load_reward(f"{rewards_file}:length").__globals__["CALLS"]
    # One call for all three completions: prompts as strings (one user turn), and the
    # records' columns as keyword arguments, one value per completion.
    assert mod_calls[-1] == {"prompts": ["say p1", "say p1", "say p2"], "kw": ["target"]}


def test_tiebreak_orders_equal_rewards_without_reordering_different_ones() -> None:
    """rewards [1, 1, 0.5], self scores [0.2, 0.9, 5.0]: gap between distinct rewards 0.5.
    Reward 1 holds candidates 0 (self 0.2, rank 0) and 1 (self 0.9, rank 1), m = 2:
    1 + 0.5*0.5*0/1 = 1.0 and 1 + 0.5*0.5*1/1 = 1.25; candidate 2 is alone at 0.5 (+0),
    so its high self score cannot lift it over the better rewards.
    All equal [2, 2, 2], self [3, 1, 2]: gap 1.0, ranks 2, 0, 1 of m - 1 = 2:
    2 + 0.5*2/2 = 2.5, 2 + 0 = 2.0, 2 + 0.5*1/2 = 2.25."""
    assert tiebreak([1.0, 1.0, 0.5], [0.2, 0.9, 5.0]) == [1.0, 1.25, 0.5]
    assert tiebreak([2.0, 2.0, 2.0], [3.0, 1.0, 2.0]) == [2.5, 2.0, 2.25]


@pytest.mark.parametrize("fn, message", [
    ("boom", "raised ValueError: cannot score 'bad'"),
    ("nan", "returned nan for completion 0 of prompt p1"),
    ("short", "returned 1 values for 2 completions"),
    ("text", "returned 'high' for completion 0 of prompt p1; return a float or None"),
])
def test_bad_reward_functions_name_themselves(rewards_file: str, fn: str, message: str) -> None:
    spec = f"{rewards_file}:{fn}"
    with pytest.raises(EdgePuError) as e:
        call_rewards([spec], [], [Prompt("p1", "q")] * 2, ["bad", "ok"], [[1], [2]],
                     ["p1", "p1"])
    assert spec in str(e.value) and message in str(e.value)


def test_every_function_none_is_refused(rewards_file: str) -> None:
    with pytest.raises(EdgePuError, match="every reward function returned None for "
                                          "completion 0 of prompt p1"):
        call_rewards([f"{rewards_file}:has_x"], [], [Prompt("p1", "q", columns={"target": None})],
                     ["a"], [[1]], ["p1"])


def test_config_refuses_reward_mode_without_functions_and_unknown_ones(tmp_path: Path) -> None:
    with pytest.raises(EdgePuError, match="ranker.mode: reward needs ranker.reward_funcs"):
        load_config(None, ["ranker.mode=reward"])
    with pytest.raises(EdgePuError, match="2 values for 1 ranker.reward_funcs"):
        load_config(None, ["ranker.reward_funcs=[a:b]", "ranker.reward_weights=[1, 2]"])
    from edge_pu.rewards import check_config

    with pytest.raises(EdgePuError, match="cannot import 'no_such_module_xyz'"):
        check_config(["no_such_module_xyz:f"], [])
    with pytest.raises(EdgePuError, match="has no function 'nope'"):
        check_config(["edge_pu.tasks.constraints:nope"], [])


def test_a_failing_function_keeps_the_scores_already_written(tmp_path: Path,
                                                             rewards_file: str) -> None:
    """rank_round writes each batch as it goes: a function that fails on the third prompt
    leaves the first two prompts' scores in scores.jsonl, and the rerun (function fixed)
    scores only the third."""
    cfg = load_config(None, ["ranker.mode=reward", f"ranker.reward_funcs=[{rewards_file}:boom]",
                             "ranker.batch_size=2", "sampling.k=2"])
    prompts = {p: Prompt(p, f"q {p}") for p in ("a", "b", "c")}
    cands = {p: [{"token_ids": [1], "text": "bad" if p == "c" else "fine"},
                 {"token_ids": [2], "text": "ok"}] for p in prompts}
    anchors = dict.fromkeys(prompts, "ref")
    with pytest.raises(EdgePuError, match="boom raised ValueError"):
        rank_round(None, cfg, prompts, anchors, cands, tmp_path, 1)
    kept = read_jsonl(tmp_path / "scores.jsonl")
    assert [r["prompt_id"] for r in kept] == ["a", "b"]
    cands["c"][0]["text"] = "fixed"
    scores = rank_round(None, cfg, prompts, anchors, cands, tmp_path, 1)
    assert scores == {"a": [1.0, 1.0], "b": [1.0, 1.0], "c": [1.0, 1.0]}
    assert len(read_jsonl(tmp_path / "scores.jsonl")) == 3


def test_anchor_gate_drops_an_anchor_that_scores_below_the_best_candidate() -> None:
    """Workload reward (share of constraints kept); constraint: no commas.
    p1: anchor "a, b" breaks it (0.0) while candidate "ab" keeps it (1.0): gated out.
    p2: anchor "ab" keeps it (1.0) = best candidate: joins. With train.anchor_check: none, or
    no reward functions, both join."""
    cons = [{"kind": "no_commas"}]
    items = [_item("p1", ["ab", "a,b"], anchor="a, b", constraints=cons),
             _item("p2", ["ab", "a,b"], anchor="ab", constraints=cons)]
    cfg = RankerConfig(mode="recall", reward_funcs=("edge_pu.tasks.constraints:reward",))
    assert anchor_gate(cfg, "reward", items, {}) == {"p2"}
    assert anchor_gate(cfg, "none", items, {}) == {"p1", "p2"}
    assert anchor_gate(RankerConfig(), "reward", items, {}) == {"p1", "p2"}


def test_prompt_file_columns_reach_the_reward_function(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "q1", "prompt": "Say hi. No commas.",
                                "constraints": [{"kind": "no_commas"}], "note": 3}) + "\n")
    [p] = load_prompts(path)
    assert p.columns == {"constraints": [{"kind": "no_commas"}], "note": 3}
    item = RankItem("q1", p, "hi", [[1], [2]], ["hi there", "hi, there"])
    cfg = RankerConfig(mode="reward", reward_funcs=("edge_pu.tasks.constraints:reward",))
    assert RANKERS["reward"](None, [item], cfg) == [[1.0, 0.0]]
    assert RunConfig().train.anchor_check == "reward"


def test_groups_with_and_without_their_anchor_train_in_separate_micro_batches() -> None:
    """A group whose anchor was checked out has K = 2 rows, the others K + 1 = 3: a GRPO
    micro-batch is one [G, K] tensor, so one step of 4 units (micro_batch 2) with sizes
    3, 2, 3, 3 runs as [2] and then [3, 3], [3] (sizes in ascending order), weights 1/4, 2/4
    and 1/4 of the step."""
    from edge_pu.config import TrainConfig
    from edge_pu.train import Unit, train

    class Recorder:
        def __init__(self) -> None:
            self.steps: list[list[tuple[list[int], float]]] = []

        def train_step(self, batches, loss_fn, lcfg):
            self.steps.append([([len(g) for g in b.groups], b.weight) for b in batches])
            return {"loss": 0.0}

    units = [Unit(f"p{i}", [1], [[2]] * n, target=[1 / n] * n, ref=[[0.0]] * n,
                  old=[[0.0]] * n) for i, n in enumerate((3, 2, 3, 3))]
    rec = Recorder()
    cfg = TrainConfig(steps=1, batch_size=4, micro_batch=2)
    train(rec, units, cfg, round_idx=1)
    [step] = rec.steps
    assert sorted(step) == sorted([([2], 0.25), ([3, 3], 0.5), ([3], 0.25)])
    assert step[0] == ([2], 0.25)
