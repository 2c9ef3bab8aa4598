"""User reward functions (verifiers) as a ranker, in TRL's calling convention.

    ranker: {mode: reward, reward_weights: [1.0, 2.0],
             reward_funcs: ["mypkg.checks:format_reward", "edge_pu.tasks.constraints:reward"]}

A reward function is named `module:function` (importable: installed, or on PYTHONPATH, or a
`path/to/file.py:function`) and is called the way TRL's GRPOTrainer calls one:

    func(prompts=[...], completions=[...], completion_ids=[...], **columns) -> list[float | None]

`prompts[i]` is the prompt string (or, for a conversation, its list of messages), `completions[i]`
the candidate's text, `completion_ids[i]` its token ids, and every other field of the prompts
file's records comes as a keyword argument holding one value per completion (TRL passes dataset
columns the same way). It returns one float per completion, or None where it does not apply
(TRL's rule); the candidate's score is the weighted sum over the functions that apply. A
function that raises, returns the wrong number of values, a non-number, NaN or infinity, or
None for every function on one completion, stops the stage with an error naming the function
and the prompt; the scores already written stay in scores.jsonl, so a rerun after the fix goes
on from there.

`ranker.reward_tiebreak: recall` (any self-ranking mode) orders candidates of equal reward by
the student's own anchor-conditioned ranking (`tiebreak`: an offset under half the smallest
gap between two distinct rewards, so it never reorders two different rewards).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import EdgePuError

RewardFn = Callable[..., Sequence[Any]]
_LOADED: dict[str, RewardFn] = {}


def load_reward(spec: str, where: str = "ranker.reward_funcs") -> RewardFn:
    """The function `spec` names (`module:function` or `file.py:function`); EdgePuError if it
    cannot be imported or is not callable."""
    if spec in _LOADED:
        return _LOADED[spec]
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise EdgePuError(f"{where}: {spec!r} is not module:function (e.g. "
                          "edge_pu.tasks.constraints:reward).")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise EdgePuError(f"{where}: {spec!r}: file {path} not found.")
            name = f"edge_pu_reward_{abs(hash(str(path.resolve())))}"
            loader = importlib.util.spec_from_file_location(name, path)
            assert loader is not None and loader.loader is not None
            module = importlib.util.module_from_spec(loader)
            sys.modules[name] = module
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except EdgePuError:
        raise
    except Exception as e:  # an import error in the user's module is theirs to see
        raise EdgePuError(f"{where}: cannot import {mod_name!r} for {spec!r} "
                          f"({type(e).__name__}: {e}).") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise EdgePuError(f"{where}: {mod_name} has no function {fn_name!r} ({spec!r}).")
    _LOADED[spec] = fn
    return fn


def weights(funcs: Sequence[str], raw: Sequence[str]) -> list[float]:
    """ranker.reward_weights as floats, one per function (default all 1.0)."""
    if not raw:
        return [1.0] * len(funcs)
    if len(raw) != len(funcs):
        raise EdgePuError(f"config: ranker.reward_weights has {len(raw)} values for "
                          f"{len(funcs)} ranker.reward_funcs; give one weight per function.")
    out = []
    for i, w in enumerate(raw):
        try:
            out.append(float(w))
        except ValueError:
            raise EdgePuError(f"config: ranker.reward_weights[{i}] = {w!r} is not a "
                              "number.") from None
        if not math.isfinite(out[-1]):
            raise EdgePuError(f"config: ranker.reward_weights[{i}] must be finite.")
    return out


def check_config(funcs: Sequence[str], raw_weights: Sequence[str]) -> None:
    """Import every reward function and read the weights: a bad name fails before any work."""
    for spec in funcs:
        load_reward(spec)
    weights(funcs, raw_weights)


def _prompt_arg(prompt: Any) -> Any:
    """What TRL would pass: the prompt string for one user turn, else the message list."""
    turns = getattr(prompt, "turns", None)
    if turns is None:
        return prompt
    if len(turns) == 1 and turns[0][0] == "user":
        return turns[0][1]
    return [{"role": r, "content": c} for r, c in turns]


def call_rewards(funcs: Sequence[str], raw_weights: Sequence[str], prompts: Sequence[Any],
                 completions: Sequence[str], completion_ids: Sequence[Sequence[int]],
                 names: Sequence[str]) -> list[float]:
    """The weighted reward of each completion. `prompts[i]` is completion i's Prompt (its
    `columns` become keyword arguments); `names[i]` its prompt id, for error messages."""
    n = len(completions)
    ws = weights(funcs, raw_weights)
    columns: dict[str, list[Any]] = {}
    for i, p in enumerate(prompts):
        for key, value in (getattr(p, "columns", None) or {}).items():
            columns.setdefault(key, [None] * n)[i] = value
    totals: list[float | None] = [None] * n
    span = f"prompts {names[0]}..{names[-1]}" if n and names[0] != names[-1] else (
        f"prompt {names[0]}" if n else "no prompts")
    for spec, w in zip(funcs, ws, strict=True):
        fn = load_reward(spec)
        try:
            got = fn(prompts=[_prompt_arg(p) for p in prompts], completions=list(completions),
                     completion_ids=[list(c) for c in completion_ids], **columns)
        except Exception as e:
            raise EdgePuError(f"reward function {spec} raised {type(e).__name__}: {e} (on "
                              f"{span}); scores written so far are kept, fix it and rerun.") from e
        try:
            values = list(got)
        except TypeError:
            raise EdgePuError(f"reward function {spec} returned {type(got).__name__}, not a "
                              f"list of {n} floats (on {span}).") from None
        if len(values) != n:
            raise EdgePuError(f"reward function {spec} returned {len(values)} values for {n} "
                              f"completions (on {span}); return one per completion.")
        for i, v in enumerate(values):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(
                    v, "__float__"):
                raise EdgePuError(f"reward function {spec} returned {v!r} for completion {i} "
                                  f"of prompt {names[i]}; return a float or None.")
            x = float(v)
            if not math.isfinite(x):
                raise EdgePuError(f"reward function {spec} returned {x} for completion {i} of "
                                  f"prompt {names[i]}; return a finite float or None.")
            totals[i] = (totals[i] or 0.0) + w * x
    missing = [i for i, t in enumerate(totals) if t is None]
    if missing:
        i = missing[0]
        raise EdgePuError(f"every reward function returned None for completion {i} of prompt "
                          f"{names[i]}: no function applies to it, so it has no score.")
    return [float(t) for t in totals]  # type: ignore[arg-type]


def tiebreak(rewards: Sequence[float], self_scores: Sequence[float]) -> list[float]:
    """Order equal rewards by the self-ranking without reordering different rewards: among
    the m candidates of one reward value, the one ranked r-th (from 0, ascending self score)
    gains 0.5 x gap x r / (m - 1), gap being the smallest difference between two distinct
    rewards of the group (1.0 when all are equal)."""
    distinct = sorted(set(rewards))
    gap = min((b - a for a, b in zip(distinct, distinct[1:], strict=False)), default=1.0)
    out = list(map(float, rewards))
    for value in distinct:
        tied = sorted((i for i, r in enumerate(rewards) if r == value),
                      key=lambda i: (self_scores[i], -i))
        for r, i in enumerate(tied):
            out[i] += 0.5 * gap * r / max(1, len(tied) - 1)
    return out
