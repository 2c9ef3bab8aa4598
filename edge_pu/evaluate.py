"""Held-out evaluation on checkable tasks: greedy answers, quality and pass rate per family.

Used by `edge-pu demo` and `edge-pu eval`. `adapter=False` evaluates the untrained student (the
same weights with the adapter disabled), so before/after needs only one loaded model.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from .config import SamplingConfig
from .data import prompt_ids
from .tasks import Task, check, passed


def greedy_answers(backend: Any, tasks: Sequence[Task], *, adapter: bool, max_new_tokens: int,
                   desc: str = "eval", batch: int = 12) -> list[str]:
    cfg = SamplingConfig(k=1, max_new_tokens=max_new_tokens, temperature=0.0,
                         prompt_batch=batch)
    out: list[str] = []
    with tqdm(total=len(tasks), desc=desc, unit="prompt") as bar:
        for s in range(0, len(tasks), batch):
            chunk = tasks[s: s + batch]
            ids = [prompt_ids(backend, t.prompt) for t in chunk]
            for [sample] in backend.sample(ids, 1, cfg, [0] * len(chunk), adapter=adapter):
                out.append(sample.text.strip())
            bar.update(len(chunk))
    return out


def score(tasks: Sequence[Task], answers: Sequence[str]) -> dict[str, Any]:
    """{"pass_rate", "quality", "n", "by_family": {family: {"pass_rate", "quality", "n"}}}."""
    fam: dict[str, list[tuple[float, bool]]] = defaultdict(list)
    for t, a in zip(tasks, answers, strict=True):
        fam[t.family].append((check(t, a), passed(t, a)))
    every = [x for rows in fam.values() for x in rows]

    def agg(rows: list[tuple[float, bool]]) -> dict[str, float]:
        return {"pass_rate": sum(p for _, p in rows) / len(rows),
                "quality": statistics.fmean(q for q, _ in rows), "n": len(rows)}

    return {**agg(every), "by_family": {f: agg(rows) for f, rows in sorted(fam.items())}}


def table(before: dict[str, Any], after: dict[str, Any], *more: dict[str, Any],
          names: Sequence[str] = ("before", "after")) -> str:
    """Markdown table of pass rate and mean quality per family and overall, one column pair
    per evaluation (`names` labels them: e.g. before, after SFT, after PU)."""
    cols = [before, after, *more]
    names = list(names) + [f"#{i}" for i in range(len(names), len(cols))]
    head = ["family", "n"] + [f"pass {n}" for n in names] + [f"quality {n}" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [(f, [c["by_family"][f] for c in cols]) for f in before["by_family"]]
    rows.append(("**all**", cols))
    for name, cs in rows:
        lines.append(f"| {name} | {cs[0]['n']} | " + " | ".join(f"{c['pass_rate']:.0%}"
                                                            for c in cs) + " | "
                     + " | ".join(f"{c['quality']:.3f}" for c in cs) + " |")
    return "\n".join(lines)
