"""`edge-pu eval`: does PU self-ranking improve the student, against baselines, on checkable tasks?

    edge-pu eval [CONFIG.yaml] [--student PATH] [--methods pu-dpo,sft,...] [--seeds N]
                 [--out DIR] [--set section.key=value ...] [--quick] [--threads N]

On the built-in task suite (edge_pu.tasks: training, validation and held-out prompts, three
disjoint sets), with the oracle teacher unless the config names another:
1. anchors: one teacher call per training prompt, into DIR/anchors/ (every method's run dir
   imports them, so no method calls the teacher again);
2. per seed, one SFT trajectory on the anchors, checkpointed (DIR/seed-S/sft-path/,
   edge_pu.eval.sft_path): `sft` is its N-step point, `sft-best` the checkpoint the validation
   split picks, and every two-stage method starts from its N - pu_steps point;
3. K candidates per training prompt from that SFT checkpoint (DIR/seed-S/shared-sft/; single-
   stage methods: from the untrained student, DIR/seed-S/shared/), scored by every ranker;
   Kendall tau against the checker's quality per prompt, with a bootstrap interval;
4. methods (edge_pu.eval.methods) at one budget of optimizer steps, scored greedily on the
   held-out prompts; pipeline methods are ordinary `edge-pu run` dirs (DIR/seed-S/<method>/)
   with candidates, scores and (two-stage) the SFT stage pre-filled; every lift is a paired
   difference over the held-out prompts with a bootstrap 95% interval (edge_pu.eval.stats);
5. `--benchmark ifeval`: IFEval (edge_pu.eval.ifeval) for the untrained student, sft, sft-best
   and the default, prompt- and instruction-level accuracy, strict and loose;
6. teacher calls per prompt, counted from every teacher_ledger.jsonl under DIR;
7. wall time and peak memory of every stage (edge_pu.measure).
Writes DIR/results.json, DIR/results.md and DIR/plots/*.png (edge_pu.eval.report).

Rerunning the same command resumes: anchors, candidates, scores and finished methods
(seed-S/<method>/eval.json) are reused. Methods' resume points (state/) are deleted once the
method is scored, to save disk; each keeps its adapter/.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..anchors import AnchorStore
from ..config import RunConfig, config_to_dict, load_config, merge_dicts
from ..data import Prompt, load_prompts
from ..data import prompt_ids as chat_prompt_ids
from ..errors import EdgePuError
from ..jsonl import read_jsonl, write_atomic, write_jsonl_atomic
from ..measure import Stages
from ..tasks import FAMILIES, check, generate_tasks, split, to_jsonl_rows
from ..tasks.workload import WORKLOAD
from ..teachers import make_teacher
from ..train import plan_steps
from .methods import DEFAULT_METHODS, QUICK_METHODS, method_named, reset_adapter
from .ranking import NEEDS_REWARDS, RANK_SPECS, summarize
from .runners import (
    Benchmark,
    MethodContext,
    cached_eval,
    candidates_and_scores,
    method_config,
    run_method,
    strip,
    teacher_eval,
)

__all__ = ["EvalOptions", "method_config", "run_eval", "teacher_calls"]

# Sizes and the budget only: the method's hyperparameters are the library defaults
# (edge_pu.config), the ones `edge-pu run` and the demo use. Budget: N = train.steps optimizer
# steps for every method; two-stage methods spend N - pu_steps of them on SFT.
EVAL_DEFAULTS: dict[str, Any] = {
    "teacher": {"kind": "oracle"},
    "sampling": {"k": 8, "max_new_tokens": 40, "prompt_batch": 12},
    "ranker": {"batch_size": 16},
    "train": {"steps": 24, "batch_size": 4, "micro_batch": 4},
    "sft": {"batch_size": 8, "micro_batch": 8},
    "backend": "cpu",
}
QUICK_DEFAULTS: dict[str, Any] = {"sampling": {"max_new_tokens": 8, "k": 4},
                                  "train": {"steps": 2, "batch_size": 2, "micro_batch": 2},
                                  "sft": {"batch_size": 2, "micro_batch": 2}}
SIZES = {"full": {"train_per_family": 6, "validation_per_family": 5, "heldout_per_family": 20,
                  "eval_max_new_tokens": 40, "eval_batch": 30, "pu_steps": 8},
         "quick": {"train_per_family": 1, "validation_per_family": 1, "heldout_per_family": 1,
                   "eval_max_new_tokens": 8, "eval_batch": 9, "pu_steps": 1}}
# --suite workload: the instruction-following workload (edge_pu.tasks.workload, 8 genres):
# longer answers, a real teacher, and its constraint checker as the built-in reward function.
WORKLOAD_SIZES = {"train_per_family": 20, "validation_per_family": 4, "heldout_per_family": 8,
                  "eval_max_new_tokens": 200, "eval_batch": 16, "pu_steps": 8}
WORKLOAD_REWARD = "edge_pu.tasks.constraints:reward"
IFEVAL_METHODS = ("none", "sft", "sft-best", "sft+pu-grpo-adv", "sft+verifier",
                  "sft+verifier+recall", "sft+pu:anchor-check", "sft+pu-dpo", "teacher")


@dataclass(frozen=True)
class EvalOptions:
    config: str | None = None
    student: str = ""
    methods: tuple[str, ...] = ()  # () = every method (quick: QUICK_METHODS)
    rankers: tuple[str, ...] = ()  # () = every RANK_SPECS entry
    seeds: int = 1
    out: str = "runs/eval"
    overrides: tuple[str, ...] = ()
    quick: bool = False
    train_per_family: int = 0  # 0 = the mode's default (SIZES)
    heldout_per_family: int = 0
    eval_max_new_tokens: int = 0
    threads: int = 0  # torch threads; 0 = cores minus the current load average, at least 1
    task_seed: int = 0
    validation_per_family: int = 0
    pu_steps: int = 0  # 0 = the mode's default (SIZES)
    benchmark: str = ""  # "ifeval": also score IFEval_METHODS on IFEval
    ifeval_prompts: int = 60
    ifeval_max_new_tokens: int = 160
    tune: bool = False  # score methods on the validation split (for choosing settings)
    suite: str = "tasks"  # tasks (built-in checkable tasks) | workload (edge_pu.tasks.workload)


def set_threads(n: int) -> int:
    """torch threads; n = 0 picks cores minus the 1-minute load (oversubscribed OpenMP threads
    spin-wait for each other and can make small-batch decoding several times slower)."""
    import torch

    if n <= 0:
        cores = os.cpu_count() or 1
        n = max(1, min(cores, round(cores - os.getloadavg()[0])))
    torch.set_num_threads(n)
    return torch.get_num_threads()


def _sizes(opts: EvalOptions) -> dict[str, int]:
    sizes = dict(SIZES["quick"] if opts.quick else WORKLOAD_SIZES if opts.suite == "workload"
                 else SIZES["full"])
    if opts.tune:
        sizes["tune"] = 1  # a different scored set: its cached results must not mix
    for key in ("train_per_family", "heldout_per_family", "eval_max_new_tokens",
                "validation_per_family", "pu_steps"):
        if getattr(opts, key) > 0:
            sizes[key] = getattr(opts, key)
    return sizes


def resolve_config(opts: EvalOptions, out: Path) -> RunConfig:
    base = merge_dicts(EVAL_DEFAULTS, QUICK_DEFAULTS if opts.quick else {})
    base["teacher"]["path"] = str(out / "tasks.jsonl")
    if opts.suite == "workload":  # its checker is the verifier methods' reward function
        base["ranker"]["reward_funcs"] = [WORKLOAD_REWARD]
    overrides = list(opts.overrides)
    if opts.student:
        overrides.append(f"student.path={opts.student}")
    cfg = load_config(opts.config, overrides, base=base)
    if opts.suite == "workload" and cfg.teacher.kind == "oracle":
        raise EdgePuError("eval --suite workload: its prompts have no oracle answer; name a "
                          "real teacher (teacher.kind: openai, gguf, hf or file).")
    if not cfg.student.path:
        from ..demo import find_demo_student

        cfg = replace(cfg, student=replace(cfg.student, path=str(find_demo_student())))
    train = cfg.train
    if train.steps <= 0:  # one budget for every method: the epochs' worth of DPO-sized steps
        n = sum(1 for _ in read_jsonl(out / "train_prompts.jsonl"))
        train = replace(train, steps=plan_steps(train, n))
    return replace(cfg, train=train, data=replace(cfg.data, prompts=str(
        out / "train_prompts.jsonl"), limit=0), run_dir=str(out))


def _names(names: tuple[str, ...], default: tuple[str, ...]) -> list[str]:
    """Space- or comma-separated names, first occurrence kept; `default` when none given."""
    return list(dict.fromkeys(n for name in names for n in name.split(",") if n)) or list(
        default)


def _pick(names: tuple[str, ...], known: dict[str, Any], default: tuple[str, ...], what: str
          ) -> list[str]:
    picked = _names(names, default)
    bad = [n for n in picked if n not in known]
    if bad:
        raise EdgePuError(f"eval: unknown {what} {', '.join(bad)}; choose from "
                          f"{', '.join(known)}.")
    return picked


def run_eval(opts: EvalOptions) -> dict[str, Any]:
    """Run the evaluation described in the module docstring; returns results.json's content."""
    import torch

    before_threads = torch.get_num_threads()
    try:
        return _run_eval(opts, set_threads(opts.threads))
    finally:
        torch.set_num_threads(before_threads)


def _run_eval(opts: EvalOptions, threads: int) -> dict[str, Any]:
    t0 = time.time()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = _sizes(opts)
    tr, va, ho = (sizes["train_per_family"], sizes["validation_per_family"],
                  sizes["heldout_per_family"])
    if opts.suite not in ("tasks", "workload"):
        raise EdgePuError(f"eval: --suite {opts.suite!r} is not tasks or workload.")
    families = WORKLOAD if opts.suite == "workload" else tuple(FAMILIES)
    tasks = generate_tasks(len(families) * (tr + va + ho), seed=opts.task_seed,
                           families=families)
    # Held-out first, then validation from the rest: three disjoint sets of distinct prompts.
    rest, heldout = split(tasks, heldout_fraction=ho / (tr + va + ho), seed=opts.task_seed)
    train_tasks, validation = split(rest, heldout_fraction=va / (tr + va),
                                    seed=opts.task_seed + 1)
    if opts.tune:  # choosing settings: score on the validation split, never the held-out set
        heldout = validation
    write_jsonl_atomic(out / "tasks.jsonl", to_jsonl_rows(tasks))
    write_jsonl_atomic(out / "train_prompts.jsonl", [  # the workload's reward reads the column
        {"id": t.id, "prompt": t.prompt, **({"constraints": t.spec["constraints"]}
                                            if "constraints" in t.spec else {})}
        for t in train_tasks])
    cfg = resolve_config(opts, out)
    _check_fingerprint(out, cfg, sizes, opts.task_seed)
    methods = [method_named(n) for n in _names(opts.methods, QUICK_METHODS if opts.quick
                                                else DEFAULT_METHODS)]
    n_total = cfg.train.steps
    n_pu = min(sizes["pu_steps"], n_total - 1) if n_total > 1 else 1
    n_sft = max(1, n_total - n_pu)
    best_steps = sorted({max(1, n_total // 2), n_total, n_total * 3 // 2, 2 * n_total})
    two = [m for m in methods if m.kind == "two"]
    single = [m for m in methods if m.kind in ("pipeline", "spin")]
    rankers = _pick(opts.rankers, RANK_SPECS, tuple(r for r in RANK_SPECS if r not in
                                                    NEEDS_REWARDS or cfg.ranker.reward_funcs),
                    "ranker")
    for m in two + single:  # a method trains on its ranker's scores, so that ranker must run
        if m.ranker and m.ranker_spec(cfg.ranker.mode) not in rankers:
            rankers.append(m.ranker_spec(cfg.ranker.mode))
    print(f"[eval] {len(train_tasks)} training, {len(validation)} validation and "
          f"{len(heldout)} held-out prompts; budget {n_total} steps (two-stage: {n_sft} SFT + "
          f"{n_pu} PU); methods {', '.join(m.name for m in methods)}; rankers "
          f"{', '.join(rankers)}; {opts.seeds} seed(s), {threads} torch thread(s), out {out}",
          flush=True)

    from ..backends import make_backend

    stages = Stages()
    backend: Any = make_backend(cfg.backend)
    with stages.stage("load"):
        backend.load(cfg)
    from ..pipeline import make_engine

    # sampling.engine: llama-cpp: one llama.cpp model samples, answers greedily and (ranker.
    # engine) scores for every method and seed, on the weights each call asks for.
    engine = make_engine(backend, cfg, out / "engine")
    try:
        greedy = engine if engine is not None else backend
        prompts = load_prompts(cfg.data.prompts)
        with stages.stage("anchors"):
            anchors = _anchors(cfg, prompts, out / "anchors")
        bench = Benchmark(opts, out, stages, IFEVAL_METHODS)
        with stages.stage("eval:before") as info:
            before = cached_eval(out / "before.json", greedy, heldout, sizes, adapter=False,
                                 info=info, desc="before")
        bench.run(greedy, "none", None, adapter=False)
        task_of = {t.id: t for t in tasks}
        prompt_ids = {p.id: chat_prompt_ids(backend, p) for p in prompts if p.id in anchors}
        ranker_runs: dict[str, list[dict[str, Any]]] = {r: [] for r in rankers}
        method_runs: dict[str, list[dict[str, Any]]] = {m.name: [] for m in methods}
        for seed in range(opts.seeds):
            scfg = replace(cfg, sampling=replace(cfg.sampling, seed=seed),
                           train=replace(cfg.train, seed=seed))
            seed_dir = out / f"seed-{seed}"
            path_root = seed_dir / "sft-path"
            if any(m.kind in ("sft", "sft-best", "sft-stage1", "two") for m in methods):
                from .sft_path import sft_path

                reset_adapter(backend, scfg, seed)
                # Only the checkpoints some method needs (sft-best's run to 2N steps is the costly
                # part of the path).
                steps = [n_sft, n_total, *(best_steps if any(m.kind == "sft-best" for m in methods)
                                           else [])]
                with stages.stage("sft-path", seed=seed) as info:
                    info["cached"] = all((path_root / f"step-{s}" / "COMPLETE").exists()
                                         for s in steps)
                    sft_path(backend, scfg, prompt_ids, anchors, path_root, steps)
            sets: dict[str, tuple[Path, dict[str, list[dict]], dict[str, dict[str, list[float]]]]]
            sets = {}
            for name, wanted in (("untrained", single), ("sft", two)):
                if not wanted:
                    continue
                shared = seed_dir / ("shared" if name == "untrained" else "shared-sft")
                reset_adapter(backend, scfg, seed)
                if name == "sft":  # candidates, ranking and judge all come from the SFT policy
                    from .sft_path import load_checkpoint

                    load_checkpoint(backend, path_root, n_sft)
                    backend.set_reference()
                cands, scores = candidates_and_scores(backend, scfg, seed, shared, prompts,
                                                      anchors, rankers, task_of, stages, name,
                                                      engine)
                sets[name] = (shared, cands, scores)
            primary = "sft" if "sft" in sets else "untrained"
            if primary in sets:
                _, cands, scores = sets[primary]
                quality = {pid: [check(task_of[pid], c["text"].strip()) for c in cs]
                           for pid, cs in cands.items()}
                pids = list(cands)
                for spec in rankers:
                    ranker_runs[spec].append({"seed": seed, "candidates_from": primary,
                                              **summarize([scores[spec][p] for p in pids],
                                                          [quality[p] for p in pids])})
            for m in methods:
                if m.kind == "none":
                    method_runs[m.name].append({"seed": seed, **strip(before)})
                    continue
                if m.kind == "teacher":  # its answers do not depend on the seed
                    method_runs[m.name].append({"seed": seed, **strip(teacher_eval(
                        cfg, heldout, sizes, out, bench, stages))})
                    continue
                ctx = MethodContext(backend, scfg, seed, out, sets, anchors, prompts, heldout,
                                     validation, sizes, stages, path_root, n_sft, n_pu, n_total,
                                     best_steps, bench, engine)
                method_runs[m.name].append(run_method(m, ctx))
        from .report import write_outputs
        from .results import build_results

        results = build_results(
            opts=asdict(opts), sizes=sizes, cfg=config_to_dict(cfg), threads=threads,
            suite={"name": opts.suite, "families": sorted(families),
                   "anchors": anchor_quality(train_tasks, anchors),
                   "train_prompts": len(train_tasks),
                   "validation_prompts": len(validation), "heldout_prompts": len(heldout),
                   "task_seed": opts.task_seed,
                   "budget": {"steps": n_total, "sft_steps": n_sft, "pu_steps": n_pu,
                              "sft_best_candidates": best_steps}},
            before=strip(before), methods=method_runs, rankers=ranker_runs,
            teacher=teacher_calls(out, [p.id for p in prompts]), stages=stages.as_list(),
            curves=_curves(out, [m.name for m in methods], opts.seeds), seconds=time.time() - t0,
            benchmark=bench.results())
        write_outputs(results, out)
        return results
    finally:
        if engine is not None:
            engine.close()


# Teacher keys that say how to reach the teacher, not what it answers.
REACH = ("base_url", "api_key_env", "api_key_file", "timeout_s", "retries", "backoff_s",
         "max_calls", "token_budget")


def _check_fingerprint(out: Path, cfg: RunConfig, sizes: dict[str, int], task_seed: int) -> None:
    """Refuse to mix cached candidates, scores and results made under another config. How the
    teacher is reached (its endpoint, key, timeouts, budgets) is not part of it: the anchors are
    keyed by what answers them (edge_pu.teachers: `openai:<model>`), so a served teacher on a
    new port, or a resumed eval with more budget, reuses them."""
    conf = config_to_dict(cfg)
    conf["teacher"] = {k: v for k, v in conf["teacher"].items() if k not in REACH}
    now = {"config": {k: v for k, v in conf.items() if k != "run_dir"},
           "sizes": sizes, "task_seed": task_seed}
    path = out / "eval_config.json"
    if path.exists():
        old = json.loads(path.read_text())
        # Keys added to edge_pu since the folder was made count as their defaults.
        default = json.loads(json.dumps(config_to_dict(RunConfig())))
        old["config"] = {k: {**default[k], **v} if isinstance(v, dict) and
                         isinstance(default.get(k), dict) else v
                         for k, v in old.get("config", {}).items()}
        old["config"]["teacher"] = {k: v for k, v in old["config"].get("teacher", {}).items()
                                    if k not in REACH}
        if old != json.loads(json.dumps(now)):
            changed = sorted(k for k in set(old["config"]) | set(now["config"])
                             if old["config"].get(k) != now["config"].get(k))
            changed += [k for k in ("sizes", "task_seed") if old.get(k) != now[k]]
            raise EdgePuError(f"{out}: this eval folder was made with a different config "
                              f"({', '.join(changed)} changed), so its cached candidates, scores"
                              " and results would not match. Use another --out.")
    write_atomic(path, json.dumps(now, indent=1))


def _anchors(cfg: RunConfig, prompts: list[Prompt], run_dir: Path) -> dict[str, str]:
    from ..pipeline import run_anchors

    run_dir.mkdir(parents=True, exist_ok=True)
    run_anchors(cfg, prompts, run_dir)
    identity = make_teacher(cfg.teacher).identity
    anchors = AnchorStore(run_dir).anchors_for(prompts, identity, cfg.teacher)
    if not anchors:
        raise EdgePuError(f"{run_dir}: no training prompt got an anchor; see "
                          f"{run_dir / 'teacher_failures.jsonl'}.")
    return anchors


def anchor_quality(tasks: list[Any], anchors: dict[str, str]) -> dict[str, Any]:
    """How often the teacher's anchor passes its own prompt's checker (all constraints kept)."""
    got = [check(t, anchors[t.id].strip()) for t in tasks if t.id in anchors]
    ok = sum(q >= 1 - 1e-9 for q in got)
    return {"anchored": len(got), "passed": ok, "share": ok / max(1, len(got)),
            "mean_quality": sum(got) / max(1, len(got))}


def teacher_calls(out: Path, prompt_ids: list[str]) -> dict[str, Any]:
    """Teacher requests per training prompt, summed over every teacher_ledger.jsonl in `out`."""
    from collections import Counter

    counts: Counter[str] = Counter()
    from .runners import TEACHER_ROW  # the teacher row's answers are not anchors

    ledgers = sorted(p for p in out.rglob("teacher_ledger.jsonl") if TEACHER_ROW not in p.parts)
    for ledger in ledgers:
        counts.update(str(r.get("id")) for r in read_jsonl(ledger))
    per = [counts.get(pid, 0) for pid in prompt_ids]
    total = sum(counts.values())
    return {"prompts": len(per), "requests": total, "ledgers": len(ledgers),
            "per_prompt_min": min(per, default=0), "per_prompt_max": max(per, default=0),
            "per_prompt_mean": total / max(1, len(per)),
            "exactly_one": bool(per) and all(c == 1 for c in per) and total == len(per)}


def _curves(out: Path, methods: list[str], seeds: int) -> dict[str, dict[str, list[float]]]:
    """Training loss per optimizer step, per method and seed, from each run's metrics.jsonl."""
    curves: dict[str, dict[str, list[float]]] = {}
    for m in methods:
        for s in range(seeds):
            rows = [r for r in read_jsonl(out / f"seed-{s}" / m / "metrics.jsonl")
                    if "loss" in r and "step" in r]
            if rows:
                curves.setdefault(m, {})[str(s)] = [r["loss"] for r in rows]
    return curves
