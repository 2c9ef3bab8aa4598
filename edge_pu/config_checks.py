"""The rules a resolved `RunConfig` must keep: allowed choices, positive sizes, combinations that
cannot work together, and a teacher config that never carries a secret. Every message names the
key (`config: train.micro_batch must not exceed train.batch_size.`).

`validate(cfg)` runs on every config `edge_pu.config.build_config` builds; it only reads the
dataclasses, so this module imports nothing of edge_pu's config at run time.
"""

from __future__ import annotations

import re
import typing
import urllib.parse
from typing import Any

from .errors import EdgePuError

if typing.TYPE_CHECKING:
    from .config import RunConfig, TeacherConfig

EXPORT_FORMATS = ("hf", "gguf", "lora-gguf", "onnx")
CHOICES: dict[str, tuple[str, ...]] = {
    "teacher.kind": ("openai", "hf", "gguf", "file", "oracle"),
    "ranker.mode": ("likelihood", "recall", "judge", "similarity", "bleu", "random", "reward"),
    "ranker.reward_tiebreak": ("", "likelihood", "recall", "judge", "similarity", "bleu"),
    "train.anchor_check": ("reward", "none"),
    "ranker.judge": ("initial", "current"),
    "ranker.judge_style": ("yesno", "rating"),
    "train.algorithm": ("dpo", "grpo"),
    "train.grpo_variant": ("advantage", "distribution"),
    "sampling.engine": ("backend", "llama-cpp"),
    "ranker.engine": ("backend", "llama-cpp"),
    "data.format": ("auto", "jsonl", "json", "csv", "parquet", "datasets"),
    "train.pair_strategy": ("best-worst", "all"),
    "train.length_norm": ("sequence", "token"),
    "train.calibration": ("pooled", "zscore", "rank", "none"),
    "train.unfinished": ("below", "drop", "keep"),
    "train.anchor": ("positive", "none"),
    "train.advantage_norm": ("pooled", "group"),
    "train.select": ("all", "spread"),
    "student.dtype": ("float32", "bfloat16"),
    "student.quant": ("none", "nf4", "mlx-affine-4"),
    "student.import_as": ("auto", "", "q8_0", "q4_0", "f16"),
    "backend": ("auto", "cpu", "cuda", "mlx"),
}
POSITIVE = ("sampling.k", "sampling.max_new_tokens", "sampling.prompt_batch", "train.batch_size",
            "train.micro_batch", "train.rounds", "lora.r", "student.max_length",
            "ranker.batch_size", "sft.batch_size", "sft.micro_batch", "sft.eval_every",
            "sft.patience")


def _get(cfg: RunConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: RunConfig) -> None:
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            names = ", ".join(a if a else '"" (off)' for a in allowed)
            raise EdgePuError(f"config: {key} = {value!r} is not one of {names}.")
    for key in POSITIVE:
        if _get(cfg, key) <= 0:
            raise EdgePuError(f"config: {key} must be > 0, got {_get(cfg, key)}.")
    if cfg.sampling.k < 2:
        raise EdgePuError("config: sampling.k must be at least 2 to rank candidates.")
    if cfg.ranker.engine == "llama-cpp" and cfg.sampling.engine != "llama-cpp":
        raise EdgePuError("config: ranker.engine: llama-cpp scores through the llama.cpp model "
                          "that sampling.engine: llama-cpp opens; set that too.")
    if cfg.ranker.mode == "reward" and not cfg.ranker.reward_funcs:
        raise EdgePuError("config: ranker.mode: reward needs ranker.reward_funcs (e.g. "
                          "[edge_pu.tasks.constraints:reward]).")
    if cfg.ranker.reward_funcs:
        from .rewards import weights

        weights(cfg.ranker.reward_funcs, cfg.ranker.reward_weights)
    if cfg.train.micro_batch > cfg.train.batch_size:
        raise EdgePuError("config: train.micro_batch must not exceed train.batch_size.")
    bad = [f for f in cfg.export.formats if f not in EXPORT_FORMATS]
    if bad:
        raise EdgePuError(f"config: export.formats {bad} are not among "
                          f"{', '.join(EXPORT_FORMATS)}.")
    if cfg.train.tau <= 0:
        raise EdgePuError("config: train.tau must be > 0.")
    if cfg.sft.micro_batch > cfg.sft.batch_size:
        raise EdgePuError("config: sft.micro_batch must not exceed sft.batch_size.")
    if cfg.sft.early_stop and not 0 < cfg.sft.val_fraction < 1:
        raise EdgePuError("config: sft.val_fraction must be between 0 and 1 (the share of "
                          f"anchors held back), got {cfg.sft.val_fraction}.")
    for key in ("train.dist_beta", "sft.lr", "train.lr"):
        if _get(cfg, key) <= 0:
            raise EdgePuError(f"config: {key} must be > 0, got {_get(cfg, key)}.")
    if cfg.train.anchor_margin < 0:
        raise EdgePuError("config: train.anchor_margin must be >= 0.")
    if cfg.train.unfinished == "drop" and cfg.train.algorithm == "grpo":
        raise EdgePuError("config: train.unfinished: drop would give GRPO groups of unequal "
                          "size; use below (unfinished candidates get the lowest scores) or "
                          "train.algorithm: dpo.")
    if cfg.student.import_as not in ("", "auto") and cfg.student.quant != "none":
        raise EdgePuError(f"config: student.import_as {cfg.student.import_as} and student.quant "
                          f"{cfg.student.quant} both choose the weights training sees; use "
                          "one of them.")
    _validate_teacher(cfg.teacher)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SECRET_PARAM = re.compile(r"key|token|secret|password|auth", re.IGNORECASE)


def _validate_teacher(t: TeacherConfig) -> None:
    for key in ("max_tokens", "timeout_s"):
        if getattr(t, key) <= 0:
            raise EdgePuError(f"config: teacher.{key} must be > 0, got {getattr(t, key)}.")
    for key in ("retries", "backoff_s", "max_calls", "token_budget", "temperature"):
        if getattr(t, key) < 0:
            raise EdgePuError(f"config: teacher.{key} must be >= 0, got {getattr(t, key)}.")
    # The value is never echoed here: if it is not a variable name it is probably the key.
    if t.api_key_env and not _ENV_NAME.fullmatch(t.api_key_env):
        raise EdgePuError("config: teacher.api_key_env must be the NAME of an environment "
                          "variable (like OPENAI_API_KEY), not the key itself; the value given "
                          "is not a variable name (not shown). Put the key in the environment "
                          "or in teacher.api_key_file.")
    if t.api_key_env and t.api_key_file:
        raise EdgePuError("config: set only one of teacher.api_key_env and teacher.api_key_file.")
    url = urllib.parse.urlsplit(t.base_url)
    if url.username or url.password or any(_SECRET_PARAM.search(name) for name, _ in
                                           urllib.parse.parse_qsl(url.query)):
        raise EdgePuError("config: teacher.base_url carries a credential (user:password@ or a "
                          "key in the query string; not shown). It would be printed and saved "
                          "with the run; put the key in teacher.api_key_env instead.")
    if t.kind == "openai" and url.scheme not in ("http", "https"):
        raise EdgePuError(f"config: teacher.base_url must start with http:// or https://, got "
                          f"{t.base_url!r}.")
