"""The hardware-agnostic algorithm: preference construction, listwise targets, losses, metrics.

Nothing here knows about devices, models or tokenizers. Backends hand the losses per-token
log-probabilities as tensors and get back a scalar loss plus plain-float metrics.

- `preferences`: scores -> (winner, loser) pairs for DPO, or a label distribution for GRPO
  (pure Python).
- `losses`: DPO and the two LDL-GRPO variants, selected by name from `losses.LOSSES` (torch).
- `rank_metrics`: Kendall tau-b and chrF, for the evaluation and the `similarity` baseline
  ranker (pure Python).

The package imports nothing at package level, so `import edge_pu.algo.preferences` works
without torch; only `losses` needs it. It must never import transformers, peft, mlx or
bitsandbytes.
"""
