"""The evaluation suite behind `edge-pu eval` (see edge_pu.eval.suite for the command).

- `suite`: the orchestration (anchors, shared candidates, rankers, methods, held-out scores);
- `methods`: the compared methods and the adapter reset between them;
- `baselines`: the SFT loss and the SFT / SPIN-style training loops;
- `ranking`: Kendall tau of each ranker against the checker, per prompt;
- `results` (the numbers), `report`, `plots`: results.json, results.md and PNGs.
Importing this package imports torch (through edge_pu.train), never matplotlib: the plots
module is imported when plots are written.
"""

from .suite import EvalOptions, run_eval

__all__ = ["EvalOptions", "run_eval"]
