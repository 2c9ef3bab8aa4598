"""Built-in checkable tasks: short prompts with a ground-truth checker and an oracle answer.

Pure stdlib (no torch, no numpy). Used by `edge-pu demo` (a few dozen prompts the SmolLM2-135M
student sometimes gets right) and by the evaluation suite (hundreds of prompts, split into train
and held-out). Example:

    from edge_pu.tasks import generate_tasks, split, check
    tasks = generate_tasks(450, seed=0)
    train, heldout = split(tasks, heldout_fraction=0.2, seed=0)
    quality = check(heldout[0], "42")   # in [0, 1]; passed() means quality == 1
"""

from edge_pu.tasks.families import Family, Task
from edge_pu.tasks.suite import (
    FAMILIES,
    KNOWN,
    PASS_THRESHOLD,
    OracleIndex,
    check,
    from_jsonl_row,
    generate_tasks,
    oracle_answer,
    passed,
    split,
    to_jsonl_rows,
)

__all__ = [
    "FAMILIES",
    "KNOWN",
    "PASS_THRESHOLD",
    "Family",
    "OracleIndex",
    "Task",
    "check",
    "from_jsonl_row",
    "generate_tasks",
    "oracle_answer",
    "passed",
    "split",
    "to_jsonl_rows",
]
