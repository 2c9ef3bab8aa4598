"""`edge-pu eval`: does PU self-ranking improve the student, against baselines, on checkable tasks?

    edge-pu eval [CONFIG.yaml] [--student PATH] [--methods pu-dpo,sft,...] [--seeds N]
                 [--out DIR] [--set section.key=value ...] [--quick] [--threads N]

On the built-in task suite (edge_pu.tasks, split train / held-out by family), with the oracle
teacher unless the config names another:
1. anchors: one teacher call per training prompt, into DIR/anchors/ (every method's run dir
   imports them, so no method calls the teacher again);
2. per seed: the untrained student samples K candidates per training prompt once
   (DIR/seed-S/shared/candidates.jsonl); all methods train from these same candidates;
3. ranker quality: every ranker scores them (DIR/seed-S/shared/scores-<ranker>.jsonl); Kendall
   tau against the checker's quality per prompt (edge_pu.eval.ranking);
4. methods (edge_pu.eval.methods): each starts from a re-initialised adapter, trains the same
   number of steps on the same rows per step, and is scored greedily on the held-out prompts;
   pipeline methods are ordinary `edge-pu run` dirs (DIR/seed-S/<method>/) whose candidates
   and scores are pre-filled;
5. teacher calls per prompt, counted from every teacher_ledger.jsonl under DIR;
6. wall time and peak memory of every stage (edge_pu.eval.measure).
Writes DIR/results.json, DIR/results.md and DIR/plots/*.png (edge_pu.eval.report).

Rerunning the same command resumes: anchors, candidates, scores and finished methods
(seed-S/<method>/eval.json) are reused. Methods' resume points (state/) are deleted once the
method is scored, to save disk; each keeps its adapter/.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..anchors import AnchorStore
from ..config import RunConfig, config_to_dict, load_config
from ..data import Prompt, load_prompts
from ..errors import EdgePuError
from ..evaluate import greedy_answers, score
from ..jsonl import read_jsonl, write_atomic, write_jsonl_atomic
from ..rank import RankItem
from ..tasks import FAMILIES, Task, check, generate_tasks, split, to_jsonl_rows
from ..teachers import make_teacher
from ..train import plan_steps
from .baselines import anchor_completion, spin_units, train_sft, train_spin
from .measure import Stages
from .methods import METHODS, QUICK_METHODS, Method, reset_adapter
from .ranking import RANK_SPECS, score_items, summarize

# The demo's student settings, with a fixed step budget shared by every method.
EVAL_DEFAULTS: dict[str, Any] = {
    "teacher": {"kind": "oracle"},
    "sampling": {"k": 4, "max_new_tokens": 40, "temperature": 1.0, "top_p": 0.95,
                 "prompt_batch": 12},
    "ranker": {"mode": "likelihood", "batch_size": 16},
    "train": {"algorithm": "dpo", "steps": 12, "batch_size": 4, "micro_batch": 4,
              "lr": 5e-4, "beta": 0.1, "tau": 0.5},
    "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                      "gate_proj", "up_proj", "down_proj"]},
    "backend": "cpu",
}
QUICK_DEFAULTS: dict[str, Any] = {"sampling": {"max_new_tokens": 8},
                                  "train": {"steps": 2, "batch_size": 2, "micro_batch": 2}}
# Sized so that every method on SmolLM2-135M with one seed takes ~20-30 min on 2 idle cores.
SIZES = {"full": {"train_per_family": 4, "heldout_per_family": 6, "eval_max_new_tokens": 40,
                  "eval_batch": 27},
         "quick": {"train_per_family": 1, "heldout_per_family": 1, "eval_max_new_tokens": 8,
                   "eval_batch": 9}}


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
    sizes = dict(SIZES["quick" if opts.quick else "full"])
    for key in ("train_per_family", "heldout_per_family", "eval_max_new_tokens"):
        if getattr(opts, key) > 0:
            sizes[key] = getattr(opts, key)
    return sizes


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(a))
    for key, value in b.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def resolve_config(opts: EvalOptions, out: Path) -> RunConfig:
    base = _merge(EVAL_DEFAULTS, QUICK_DEFAULTS) if opts.quick else _merge(EVAL_DEFAULTS, {})
    base["teacher"]["path"] = str(out / "tasks.jsonl")
    overrides = list(opts.overrides)
    if opts.student:
        overrides.append(f"student.path={opts.student}")
    cfg = load_config(opts.config, overrides, base=base)
    if not cfg.student.path:
        from ..demo import find_demo_student

        cfg = replace(cfg, student=replace(cfg.student, path=str(find_demo_student())))
    train = cfg.train
    if train.steps <= 0:  # one budget for every method: the epochs' worth of DPO-sized steps
        n = sum(1 for _ in read_jsonl(out / "train_prompts.jsonl"))
        train = replace(train, steps=plan_steps(train, n))
    return replace(cfg, train=train, data=replace(cfg.data, prompts=str(
        out / "train_prompts.jsonl"), limit=0), run_dir=str(out))


def method_config(cfg: RunConfig, m: Method, run_dir: Path) -> RunConfig:
    """The method's run config: same steps and completion rows per step as every method."""
    t, k = cfg.train, cfg.sampling.k
    bs, mb = t.batch_size, t.micro_batch
    if m.algorithm == "grpo" and m.kind == "pipeline":  # K rows per group vs 2 per pair
        bs = max(1, 2 * t.batch_size // k)
        mb = max(1, min(bs, 2 * t.micro_batch // k))
    ranker = cfg.ranker
    if m.ranker:
        ranker = replace(ranker, mode=RANK_SPECS[m.ranker_spec(cfg.ranker.mode)][0])
    return replace(cfg, run_dir=str(run_dir), ranker=ranker, train=replace(
        t, algorithm=m.algorithm, grpo_variant=m.grpo_variant, batch_size=bs, micro_batch=mb))


def _pick(names: tuple[str, ...], known: dict[str, Any], default: tuple[str, ...], what: str
          ) -> list[str]:
    picked = [n for name in names for n in name.split(",") if n] or list(default)
    bad = [n for n in picked if n not in known]
    if bad:
        raise EdgePuError(f"eval: unknown {what} {', '.join(bad)}; choose from "
                          f"{', '.join(known)}.")
    return list(dict.fromkeys(picked))


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
    per_family = sizes["train_per_family"] + sizes["heldout_per_family"]
    tasks = generate_tasks(len(FAMILIES) * per_family, seed=opts.task_seed)
    train_tasks, heldout = split(tasks, heldout_fraction=sizes["heldout_per_family"] / per_family,
                                 seed=opts.task_seed)
    write_jsonl_atomic(out / "tasks.jsonl", to_jsonl_rows(tasks))
    write_jsonl_atomic(out / "train_prompts.jsonl",
                       [{"id": t.id, "prompt": t.prompt} for t in train_tasks])
    cfg = resolve_config(opts, out)
    _check_fingerprint(out, cfg, sizes, opts.task_seed)
    methods = [METHODS[n] for n in _pick(opts.methods, METHODS, QUICK_METHODS if opts.quick
                                         else tuple(METHODS), "method")]
    rankers = _pick(opts.rankers, RANK_SPECS, tuple(RANK_SPECS), "ranker")
    for m in methods:  # a method trains on its ranker's scores, so that ranker must run
        if m.ranker and m.ranker_spec(cfg.ranker.mode) not in rankers:
            rankers.append(m.ranker_spec(cfg.ranker.mode))
    print(f"[eval] {len(train_tasks)} training and {len(heldout)} held-out prompts, methods "
          f"{', '.join(m.name for m in methods)}, rankers {', '.join(rankers)}, {opts.seeds} "
          f"seed(s), {threads} torch thread(s), out {out}", flush=True)

    from ..backends import make_backend

    stages = Stages()
    backend: Any = make_backend(cfg.backend)
    with stages.stage("load"):
        backend.load(cfg)
    prompts = load_prompts(cfg.data.prompts)
    with stages.stage("anchors"):
        anchors = _anchors(cfg, prompts, out / "anchors")
    with stages.stage("eval:before") as info:
        before = _cached_eval(out / "before.json", backend, heldout, sizes, adapter=False,
                              info=info)
    task_of = {t.id: t for t in tasks}
    ranker_runs: dict[str, list[dict[str, Any]]] = {r: [] for r in rankers}
    method_runs: dict[str, list[dict[str, Any]]] = {m.name: [] for m in methods}
    for seed in range(opts.seeds):
        scfg = replace(cfg, sampling=replace(cfg.sampling, seed=seed),
                       train=replace(cfg.train, seed=seed))
        shared = out / f"seed-{seed}" / "shared"
        reset_adapter(backend, scfg, seed)
        with stages.stage("sample", seed=seed) as info:
            from ..pipeline import sample_round

            info["cached"] = (shared / "candidates.jsonl").exists()
            cands = sample_round(backend, scfg, prompts, set(anchors), shared, 1)
        quality = {pid: [check(task_of[pid], c["text"].strip()) for c in cs]
                   for pid, cs in cands.items()}
        scores: dict[str, dict[str, list[float]]] = {}
        for spec in rankers:
            with stages.stage(f"rank:{spec}", seed=seed) as info:
                info["cached"] = (shared / f"scores-{spec}.jsonl").exists()
                scores[spec] = _cached_scores(shared / f"scores-{spec}.jsonl", backend, spec,
                                              scfg, prompts, anchors, cands)
            pids = list(cands)
            ranker_runs[spec].append({"seed": seed, **summarize(
                [scores[spec][p] for p in pids], [quality[p] for p in pids])})
        for m in methods:
            if m.kind == "none":
                method_runs[m.name].append({"seed": seed, **_strip(before)})
                continue
            res = _run_method(backend, m, scfg, seed, out, shared, cands, scores, anchors,
                              prompts, heldout, sizes, stages)
            method_runs[m.name].append(res)
    from .report import build_results, write_outputs

    results = build_results(
        opts=asdict(opts), sizes=sizes, cfg=config_to_dict(cfg), threads=threads,
        suite={"families": sorted(FAMILIES), "train_prompts": len(train_tasks),
               "heldout_prompts": len(heldout), "task_seed": opts.task_seed},
        before=_strip(before), methods=method_runs, rankers=ranker_runs,
        teacher=teacher_calls(out, [p.id for p in prompts]), stages=stages.as_list(),
        curves=_curves(out, [m.name for m in methods], opts.seeds), seconds=time.time() - t0)
    write_outputs(results, out)
    return results


def _check_fingerprint(out: Path, cfg: RunConfig, sizes: dict[str, int], task_seed: int) -> None:
    """Refuse to mix cached candidates, scores and results made under another config."""
    now = {"config": {k: v for k, v in config_to_dict(cfg).items() if k != "run_dir"},
           "sizes": sizes, "task_seed": task_seed}
    path = out / "eval_config.json"
    if path.exists():
        old = json.loads(path.read_text())
        # Keys added to edge_pu since the folder was made count as their defaults.
        default = json.loads(json.dumps(config_to_dict(RunConfig())))
        old["config"] = {k: {**default[k], **v} if isinstance(v, dict) and
                         isinstance(default.get(k), dict) else v
                         for k, v in old.get("config", {}).items()}
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


def _strip(res: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in res.items() if k != "answers"}


def _cached_eval(path: Path, backend: Any, heldout: list[Task], sizes: dict[str, int], *,
                 adapter: bool, info: dict[str, Any], extra: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    if path.exists():
        info["cached"] = True
        return dict(json.loads(path.read_text()))
    answers = greedy_answers(backend, heldout, adapter=adapter,
                             max_new_tokens=sizes["eval_max_new_tokens"],
                             batch=sizes["eval_batch"], desc="eval" if adapter else "before")
    res = {**(extra or {}), **score(heldout, answers),
           "answers": [{"id": t.id, "answer": a} for t, a in zip(heldout, answers, strict=True)]}
    write_atomic(path, json.dumps(res, indent=1))
    return res


def _cached_scores(path: Path, backend: Any, spec: str, cfg: RunConfig, prompts: list[Prompt],
                   anchors: dict[str, str], cands: dict[str, list[dict]]
                   ) -> dict[str, list[float]]:
    have = {r["prompt_id"]: r["scores"] for r in read_jsonl(path)}
    if set(cands) <= set(have):
        return {pid: have[pid] for pid in cands}
    text = {p.id: p.text for p in prompts}
    items = [RankItem(pid, text[pid], anchors[pid], [c["token_ids"] for c in cs],
                      [c["text"] for c in cs]) for pid, cs in cands.items()]
    got = score_items(backend, items, spec, cfg.ranker, cfg.sampling.k)
    write_jsonl_atomic(path, [{"round": 1, "prompt_id": it.prompt_id, "mode": spec,
                               "scores": s} for it, s in zip(items, got, strict=True)])
    return {it.prompt_id: s for it, s in zip(items, got, strict=True)}


def _run_method(backend: Any, m: Method, cfg: RunConfig, seed: int, out: Path, shared: Path,
                cands: dict[str, list[dict]], scores: dict[str, dict[str, list[float]]],
                anchors: dict[str, str], prompts: list[Prompt], heldout: list[Task],
                sizes: dict[str, int], stages: Stages) -> dict[str, Any]:
    run_dir = out / f"seed-{seed}" / m.name
    done = run_dir / "eval.json"
    if done.exists():
        print(f"[eval] {m.name} seed {seed}: already scored ({done})", flush=True)
        res = json.loads(done.read_text())
        for rec in res.get("stages", []):
            stages.add(rec, resumed=True)
        return _strip(res)
    shutil.rmtree(run_dir, ignore_errors=True)  # a half-finished method starts over
    run_dir.mkdir(parents=True)
    mcfg = method_config(cfg, m, run_dir)
    reset_adapter(backend, mcfg, seed)
    print(f"[eval] {m.name} seed {seed}: training ({m.about})", flush=True)
    prompt_ids = {p.id: backend.chat_ids([{"role": "user", "content": p.text}])
                  for p in prompts if p.id in anchors}
    diag: dict[str, Any] = {}
    with stages.stage(f"train:{m.name}", seed=seed) as train_info:
        if m.kind == "pipeline":
            from ..pipeline import run

            identity = make_teacher(cfg.teacher).identity
            AnchorStore(run_dir).import_file(out / "anchors" / "anchors.jsonl", identity,
                                             cfg.teacher)
            shutil.copyfile(shared / "candidates.jsonl", run_dir / "candidates.jsonl")
            spec = m.ranker_spec(cfg.ranker.mode)
            write_jsonl_atomic(run_dir / "scores.jsonl", [
                {"round": 1, "prompt_id": pid, "mode": spec, "scores": s}
                for pid, s in scores[spec].items()])
            result = run(mcfg, backend=backend)
            diag = result.rounds[-1] if result.rounds else {}
            shutil.rmtree(run_dir / "state", ignore_errors=True)
        elif m.kind == "sft":
            completions = {pid: anchor_completion(backend, a) for pid, a in anchors.items()}
            rows = 2 * mcfg.train.batch_size
            train_sft(backend, prompt_ids, completions, mcfg.train, rows_per_step=rows,
                      micro_rows=2 * mcfg.train.micro_batch, run_dir=run_dir)
        elif m.kind == "spin":
            completions = {pid: anchor_completion(backend, a) for pid, a in anchors.items()}
            rejected = {pid: cs[0]["token_ids"] for pid, cs in cands.items()}
            units = spin_units(prompt_ids, completions, rejected)
            train_spin(backend, units, mcfg.train, run_dir=run_dir,
                       ref_batch=mcfg.ranker.batch_size)
        else:
            raise EdgePuError(f"eval: method {m.name} has unknown kind {m.kind!r}")
        train_info["steps"] = mcfg.train.steps
    with stages.stage(f"eval:{m.name}", seed=seed) as info:
        res = _cached_eval(done, backend, heldout, sizes, adapter=True, info=info, extra={
            "seed": seed, "train_diag": diag, "stages": stages.as_list()[-1:]})
    return _strip(res)


def teacher_calls(out: Path, prompt_ids: list[str]) -> dict[str, Any]:
    """Teacher requests per training prompt, summed over every teacher_ledger.jsonl in `out`."""
    from collections import Counter

    counts: Counter[str] = Counter()
    ledgers = sorted(out.rglob("teacher_ledger.jsonl"))
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
