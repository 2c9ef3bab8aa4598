"""The built-in checkable task suite: generate, check, split, look up oracle answers, (de)serialise.

- `generate_tasks(n, seed=, families=)` draws n tasks round-robin over the families. Each family
  draws from its own `random.Random` seeded by (seed, family name), so a family's k-th task does
  not depend on n or on which other families were asked for, and `generate_tasks(100)` is a prefix
  (per family) of `generate_tasks(400)`. Prompts are distinct within a suite.
- `check(task, response)` scores a response in [0, 1] through the family's checker;
  `passed` is `check >= 1 - 1e-9` (only a fully correct answer passes; partial credit is for
  ranking and mean quality, never for pass rates).
- `split(tasks, heldout_fraction=, seed=)` is deterministic and stratified by family.
- `OracleIndex` / `oracle_answer` map prompt text back to the oracle's answer (an "oracle teacher").
- `to_jsonl_rows` / `from_jsonl_row` write and read a prompts file: one JSON object per line with
  "id", "prompt", "family", "answer" and "spec".
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from edge_pu.tasks.families import TEXT_FAMILIES, Family, Task
from edge_pu.tasks.structured import STRUCTURED_FAMILIES
from edge_pu.tasks.workload import WORKLOAD_FAMILIES

# The built-in suite (the default of generate_tasks); KNOWN adds the instruction-following
# workload (edge_pu.tasks.workload), asked for by name: generate_tasks(n, families=WORKLOAD).
FAMILIES: dict[str, Family] = {f.name: f for f in (*TEXT_FAMILIES, *STRUCTURED_FAMILIES)}
KNOWN: dict[str, Family] = {**FAMILIES, **{f.name: f for f in WORKLOAD_FAMILIES}}
PASS_THRESHOLD = 1.0 - 1e-9
_MAX_REDRAWS = 200  # redraws of a duplicate prompt before a family counts as exhausted


def _family_tasks(family: Family, count: int, seed: int) -> list[Task]:
    rng = random.Random(f"edge_pu.tasks/{seed}/{family.name}")  # str seeds are hash-seed proof
    seen: set[str] = set()
    tasks: list[Task] = []
    while len(tasks) < count:
        for _ in range(_MAX_REDRAWS):
            task = family.make(rng, len(tasks))
            if task.prompt not in seen:
                break
        else:
            raise ValueError(
                f"task family {family.name!r} ran out of distinct prompts after {len(tasks)}; "
                "ask for fewer tasks or more families"
            )
        seen.add(task.prompt)
        tasks.append(task)
    return tasks


def generate_tasks(n: int, *, seed: int = 0, families: Sequence[str] | None = None) -> list[Task]:
    """n tasks, round-robin over `families` (default: all, in FAMILIES order); same seed, same
    tasks. Task i belongs to family i % len(families)."""
    names = list(FAMILIES) if families is None else list(families)
    unknown = [name for name in names if name not in KNOWN]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(
            f"families={names!r}: give distinct names from {sorted(KNOWN)}"
            + (f" (unknown: {unknown})" if unknown else "")
        )
    if n < 0:
        raise ValueError(f"n={n}: the number of tasks must be >= 0")
    per_family = [
        _family_tasks(KNOWN[name], n // len(names) + (i < n % len(names)), seed)
        for i, name in enumerate(names)
    ]
    return [per_family[i % len(names)][i // len(names)] for i in range(n)]


def check(task: Task, response: str) -> float:
    """Quality of `response` for `task` in [0, 1], from the family's checker."""
    family = KNOWN.get(task.family)
    if family is None:
        known = sorted(KNOWN)
        raise KeyError(f"task {task.id!r}: unknown family {task.family!r}; known: {known}")
    quality = float(family.check(task.spec, response))
    if not 0.0 <= quality <= 1.0:
        raise RuntimeError(f"checker of family {task.family!r} returned {quality} for {task.id!r}")
    return quality


def passed(task: Task, response: str) -> bool:
    """Whether the response is fully correct (quality >= 1 - 1e-9)."""
    return check(task, response) >= PASS_THRESHOLD


def split(
    tasks: Iterable[Task], *, heldout_fraction: float, seed: int
) -> tuple[list[Task], list[Task]]:
    """(train, held-out). Per family, round(len * heldout_fraction) tasks (halves round up) go
    to held-out, chosen by a seeded shuffle of the family's ids; both lists keep input order.
    The result depends on the set of tasks, not on their order."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction}: must be in [0, 1)")
    tasks = list(tasks)
    by_family: dict[str, list[str]] = defaultdict(list)
    for task in tasks:
        by_family[task.family].append(task.id)
    if sum(map(len, by_family.values())) != len({t.id for t in tasks}):
        raise ValueError("split: task ids must be unique")
    heldout_ids: set[str] = set()
    for family, ids in by_family.items():
        ids = sorted(ids)
        random.Random(f"edge_pu.tasks.split/{seed}/{family}").shuffle(ids)
        heldout_ids.update(ids[: int(len(ids) * heldout_fraction + 0.5)])
    train = [t for t in tasks if t.id not in heldout_ids]
    return train, [t for t in tasks if t.id in heldout_ids]


def _prompt_key(prompt: str) -> str:
    return " ".join(prompt.split())  # whitespace-insensitive: templates may re-wrap lines


class OracleIndex(Mapping[str, str]):
    """Prompt text -> the oracle's answer, for an oracle teacher. Lookup ignores whitespace."""

    def __init__(self, tasks: Iterable[Task]) -> None:
        self._answers: dict[str, str] = {}
        for task in tasks:
            key = _prompt_key(task.prompt)
            if self._answers.setdefault(key, task.answer) != task.answer:
                raise ValueError(f"task {task.id!r}: its prompt is indexed with another answer")

    def __getitem__(self, prompt: str) -> str:
        try:
            return self._answers[_prompt_key(prompt)]
        except KeyError:
            raise KeyError(
                f"no oracle answer for prompt {prompt[:80]!r} ({len(self)} prompts indexed): "
                "was it generated by the same suite (seed, families, n)?"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._answers)

    def __len__(self) -> int:
        return len(self._answers)


def oracle_answer(prompt: str, tasks: Iterable[Task]) -> str:
    """The oracle's answer to `prompt` among `tasks`; KeyError if none. Build an `OracleIndex`
    once instead when looking up many prompts."""
    return OracleIndex(tasks)[prompt]


def to_jsonl_rows(tasks: Iterable[Task]) -> list[dict[str, Any]]:
    """One dict per task, ready for `json.dumps` (a prompts file line)."""
    return [
        {"id": t.id, "prompt": t.prompt, "family": t.family, "answer": t.answer,
         "spec": json.loads(json.dumps(dict(t.spec)))}  # a deep copy that proves it serialises
        for t in tasks
    ]


def from_jsonl_row(row: Mapping[str, Any]) -> Task:
    """A Task from a prompts-file row; ValueError naming the field at fault."""
    for name in ("id", "prompt", "family", "answer"):
        if not isinstance(row.get(name), str):
            raise ValueError(f"prompts row {row.get('id', '?')!r}: field {name!r} must be a string")
    if row["family"] not in KNOWN:
        raise ValueError(f"prompts row {row['id']!r}: unknown family {row['family']!r}; "
                         f"known: {sorted(KNOWN)}")
    if not isinstance(row.get("spec"), Mapping):
        raise ValueError(f"prompts row {row['id']!r}: field 'spec' must be an object")
    return Task(row["id"], row["family"], row["prompt"], row["answer"], dict(row["spec"]))
