"""Settings that fit a budget: `plan(cfg, model_config, budget_bytes=...)` -> `Plan`.

`plan` reads only the student's shape (config.json, or GGUF metadata through
`read_model_shape`), never its weights, and imports no framework. It adds the framework's
baseline (`RUNTIME_BYTES`) to every stage of edge_pu.planner.stage_bytes and turns the knobs of
`Settings` until every stage fits.

CPU: the prediction is the absolute peak RSS of the process, so `RUNTIME_BYTES["cpu"]` (peak RSS
of a fresh process that imported torch, transformers and peft and trained a 64-wide model one
step: `bench/planner_accuracy.py`) is added to every stage. This holds with glibc's mmap
threshold pinned (edge_pu.planner.allocator). CUDA: meant as `torch.cuda.max_memory_allocated()`
plus a CUDA-context allowance, MLX likewise; FIXME: both reuse the torch CPU formulas and are not
measured (no such device here).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..model_shape import ModelShape, read_model_shape
from .stage_bytes import Settings, Stage, stages
from .torch_terms import MIB, weight_bytes

# CPU: peak RSS of a fresh python that imported torch 2.13.0+cpu, transformers 5.24 and peft
# 0.21.2 and trained a 64-wide model one step (427 MiB, Linux x86-64; 397 MiB after the imports
# alone): `python bench/planner_accuracy.py --case none` prints it as the baseline row.
# CUDA and MLX: FIXME not measured here (no such device); a CUDA context is ~0.5 GiB.
RUNTIME_BYTES = {"cpu": 426 * MIB, "cuda": 600 * MIB, "mlx": 300 * MIB}


@dataclass(frozen=True)
class Plan:
    backend: str
    budget_bytes: int
    runtime_bytes: int
    settings: Settings
    stages: tuple[Stage, ...]
    fits: bool  # the chosen settings fit the budget
    given_fits: bool  # the config exactly as given fits
    given_peak: int
    changes: dict[str, Any]  # dotted config key -> value the planner chose
    notes: tuple[str, ...] = ()

    @property
    def peak_stage(self) -> Stage:
        return max(self.stages, key=lambda st: st.total)

    @property
    def peak_bytes(self) -> int:
        return self.runtime_bytes + self.peak_stage.total

    def overrides(self) -> list[str]:
        return [f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                for k, v in self.changes.items()]

    def table(self) -> str:
        lines = [f"{'stage':<10} {'part':<34} {'MiB':>10}"]
        for stage in self.stages:
            for j, (name, b) in enumerate(stage.parts):
                lines.append(f"{stage.name if j == 0 else '':<10} {name:<34} {b / MIB:>10.1f}")
            lines.append(f"{'':<10} {'= ' + stage.name + ' (+ runtime)':<34} "
                         f"{(stage.total + self.runtime_bytes) / MIB:>10.1f}")
        lines.append(f"runtime    {self.backend + ' framework baseline':<34} "
                     f"{self.runtime_bytes / MIB:>10.1f}")
        lines.append(f"peak       {self.peak_stage.name:<34} {self.peak_bytes / MIB:>10.1f}")
        lines.append(f"budget     {'':<34} {self.budget_bytes / MIB:>10.1f}")
        return "\n".join(lines)


def model_shape(model_config: Any) -> ModelShape:
    if isinstance(model_config, ModelShape):
        return model_config
    if isinstance(model_config, (str, Path)):
        return read_model_shape(model_config)
    if not isinstance(model_config, Mapping):
        model_config = model_config.to_dict()  # a transformers PretrainedConfig
    return ModelShape.from_config(dict(model_config))


def plan(cfg: RunConfig, model_config: Any, *, budget_bytes: int,
         backend: str | None = None) -> Plan:
    """Predict each stage's peak and pick settings that fit `budget_bytes`.

    Tried in order until everything fits: the config as given; smaller ranker.batch_size;
    smaller train.micro_batch (checkpointing left as given); checkpointing on with the largest
    micro_batch that fits; K candidates sampled in chunks (only where the config has
    sampling.k_chunk); max_length halved, down to max_new_tokens + 16.
    """
    s = model_shape(model_config)
    backend = backend or backend_name(cfg)
    runtime = RUNTIME_BYTES.get(backend, RUNTIME_BYTES["cpu"])
    room = budget_bytes - runtime
    k_chunk = getattr(cfg.sampling, "k_chunk", 0) or cfg.sampling.k
    given = Settings(cfg.student.max_length, cfg.train.micro_batch,
                     cfg.train.gradient_checkpointing, cfg.ranker.batch_size, k_chunk)
    given_peak = max(x.total for x in stages(cfg, s, given))

    def fits(*names: str) -> Callable[[Settings], bool]:
        return lambda x: all(y.total <= room for y in stages(cfg, s, x) if y.name in names)

    floor = min(given.max_length, cfg.sampling.max_new_tokens + 16)
    T = given.max_length
    while True:
        chosen = _shrink(replace(given, max_length=T), "rank_batch", fits("rank", "reference"))
        chosen = _fit_train(chosen, fits("train"))
        if hasattr(cfg.sampling, "k_chunk"):
            chosen = _shrink(chosen, "k_chunk", fits("sample"))
        if fits(*(x.name for x in stages(cfg, s, chosen)))(chosen) or T <= floor:
            break
        T = max(floor, T // 2)
    final = tuple(stages(cfg, s, chosen))
    all_fit = max(x.total for x in final) <= room
    keys = {"max_length": "student.max_length", "micro_batch": "train.micro_batch",
            "gradient_checkpointing": "train.gradient_checkpointing",
            "rank_batch": "ranker.batch_size", "k_chunk": "sampling.k_chunk"}
    changes = {keys[k]: getattr(chosen, k) for k in keys
               if getattr(chosen, k) != getattr(given, k)}
    notes = []
    if not hasattr(cfg.sampling, "k_chunk") and not fits("sample")(chosen):
        notes.append("sampling holds all K candidates' KV cache at once; this edge_pu has no "
                     "sampling.k_chunk to split it: lower sampling.k or max_new_tokens")
    if weight_bytes(s, cfg.student.dtype, cfg.student.quant) > room:
        notes.append("the weights alone exceed the budget: use a smaller student, bfloat16, "
                     "or a 4-bit quant format")
    return Plan(backend, budget_bytes, runtime, chosen, final, all_fit,
                given_peak <= room, given_peak + runtime, changes, tuple(notes))


def _shrink(st: Settings, knob: str, ok: Callable[[Settings], bool]) -> Settings:
    """Halve `knob` until `ok` (or 1)."""
    while getattr(st, knob) > 1 and not ok(st):
        st = replace(st, **{knob: getattr(st, knob) // 2})
    return st


def _fit_train(st: Settings, ok: Callable[[Settings], bool]) -> Settings:
    """The user's checkpointing with the largest micro_batch that fits, else checkpointing on."""
    for gc in (st.gradient_checkpointing, True):
        for mb in range(st.micro_batch, 0, -1):
            cand = replace(st, micro_batch=mb, gradient_checkpointing=gc)
            if ok(cand):
                return cand
    return replace(st, micro_batch=1, gradient_checkpointing=True)


def backend_name(cfg: RunConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    from ..hardware import detect

    return detect()
