"""How `edge-pu eval` trains and scores one method on one seed (edge_pu.eval.suite drives it).

- `_candidates_and_scores`: K candidates per training prompt from the current policy (the
  untrained student, or the SFT checkpoint for two-stage methods) and every ranker's scores,
  cached in the set's folder (`seed-S/shared/` or `seed-S/shared-sft/`).
- `run_method`: trains the method (a pipeline run dir pre-filled with those candidates and
  scores, and for two-stage methods with the SFT checkpoint as its finished SFT stage), then
  scores it greedily on the held-out prompts (`seed-S/<method>/eval.json`, per-prompt passes
  kept for the paired intervals) and, when asked, on IFEval.
- `Benchmark`: the IFEval side (edge_pu.eval.ifeval), cached per method and seed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..anchors import AnchorStore
from ..config import RunConfig
from ..data import Prompt
from ..data import prompt_ids as chat_prompt_ids
from ..errors import EdgePuError, NothingToTrain
from ..evaluate import greedy_answers, score
from ..jsonl import read_jsonl, write_atomic, write_jsonl_atomic
from ..measure import Stages
from ..rank import RankItem
from ..tasks import Task, check, passed
from ..teachers import make_teacher
from .methods import Method, reset_adapter
from .ranking import RANK_SPECS, score_items


def strip(res: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in res.items() if k != "answers"}


def cached_eval(path: Path, backend: Any, tasks: list[Task], sizes: dict[str, int], *,
                adapter: bool, info: dict[str, Any], extra: dict[str, Any] | None = None,
                desc: str = "eval") -> dict[str, Any]:
    if path.exists():
        info["cached"] = True
        return dict(json.loads(path.read_text()))
    answers = greedy_answers(backend, tasks, adapter=adapter,
                             max_new_tokens=sizes["eval_max_new_tokens"],
                             batch=sizes["eval_batch"], desc=desc)
    res = {**(extra or {}), **score(tasks, answers),
           "passes": [int(passed(t, a)) for t, a in zip(tasks, answers, strict=True)],
           "answers": [{"id": t.id, "answer": a} for t, a in zip(tasks, answers, strict=True)]}
    write_atomic(path, json.dumps(res, indent=1))
    return res


def cached_scores(path: Path, backend: Any, spec: str, cfg: RunConfig, prompts: list[Prompt],
                  anchors: dict[str, str], cands: dict[str, list[dict]],
                  task_of: dict[str, Task]) -> dict[str, list[float]]:
    have = {r["prompt_id"]: r["scores"] for r in read_jsonl(path)}
    if set(cands) <= set(have):
        return {pid: have[pid] for pid in cands}
    if spec == "oracle":  # the checker itself: the ceiling of any ranking, eval only
        got = [[check(task_of[pid], c["text"].strip()) for c in cs] for pid, cs in cands.items()]
        pids = list(cands)
    else:
        by_id = {p.id: p for p in prompts}
        items = [RankItem(pid, by_id[pid], anchors[pid], [c["token_ids"] for c in cs],
                          [c["text"] for c in cs]) for pid, cs in cands.items()]
        got = score_items(backend, items, spec, cfg.ranker, cfg.sampling.k)
        pids = [it.prompt_id for it in items]
    write_jsonl_atomic(path, [{"round": 1, "prompt_id": pid, "mode": spec, "scores": s}
                              for pid, s in zip(pids, got, strict=True)])
    return dict(zip(pids, got, strict=True))


def candidates_and_scores(backend: Any, cfg: RunConfig, seed: int, shared: Path,
                          prompts: list[Prompt], anchors: dict[str, str], rankers: list[str],
                          task_of: dict[str, Task], stages: Stages, name: str,
                          engine: Any = None
                          ) -> tuple[dict[str, list[dict]], dict[str, dict[str, list[float]]]]:
    """`engine`: the llama.cpp view that samples (and, where ranker.engine says so, scores)."""
    from ..pipeline import sample_round, scorer

    with stages.stage(f"sample:{name}", seed=seed) as info:
        info["cached"] = (shared / "candidates.jsonl").exists()
        cands = sample_round(backend, cfg, prompts, set(anchors), shared, 1, engine)
    backend = scorer(backend, cfg, engine)
    scores: dict[str, dict[str, list[float]]] = {}
    for spec in rankers:
        with stages.stage(f"rank:{spec}:{name}", seed=seed) as info:
            info["cached"] = (shared / f"scores-{spec}.jsonl").exists()
            scores[spec] = cached_scores(shared / f"scores-{spec}.jsonl", backend, spec, cfg,
                                         prompts, anchors, cands, task_of)
    return cands, scores


@dataclass
class MethodContext:
    backend: Any
    cfg: RunConfig
    seed: int
    out: Path
    sets: dict[str, tuple[Path, dict[str, list[dict]], dict[str, dict[str, list[float]]]]]
    anchors: dict[str, str]
    prompts: list[Prompt]
    heldout: list[Task]
    validation: list[Task]
    sizes: dict[str, int]
    stages: Stages
    path_root: Path
    n_sft: int
    n_pu: int
    n_total: int
    best_steps: list[int]
    bench: Benchmark
    engine: Any = None  # the llama.cpp view (sampling.engine: llama-cpp), else None

    @property
    def greedy(self) -> Any:
        """What answers greedily: the llama.cpp view where there is one, else the backend."""
        return self.engine if self.engine is not None else self.backend


def method_config(cfg: RunConfig, m: Method, run_dir: Path, n_sft: int = 0,
                  n_pu: int = 0) -> RunConfig:
    """The method's run config: the same budget of steps and ~rows per step as every method."""
    t, k = cfg.train, cfg.sampling.k
    bs, mb = t.batch_size, t.micro_batch
    if m.algorithm == "grpo" and m.kind in ("pipeline", "two"):  # K rows a group, 2 a pair
        bs = max(1, 2 * t.batch_size // k)
        mb = max(1, min(bs, 2 * t.micro_batch // k))
    ranker = cfg.ranker
    if m.ranker and m.ranker_spec(cfg.ranker.mode) != "oracle":
        ranker = replace(ranker, mode=RANK_SPECS[m.ranker_spec(cfg.ranker.mode)][0])
    if m.ranker_spec(cfg.ranker.mode) == "reward+recall":
        ranker = replace(ranker, reward_tiebreak="recall")
    if not m.verifier:  # a label-free method never sees the verifier, not even for anchors
        ranker = replace(ranker, reward_funcs=(), reward_weights=())
    train = replace(t, algorithm=m.algorithm, grpo_variant=m.grpo_variant, batch_size=bs,
                    micro_batch=mb, **dict(m.train))
    sft = replace(cfg.sft, enabled=False)
    if m.kind == "two":
        sft = replace(cfg.sft, enabled=True, steps=n_sft)
        train = replace(train, steps=n_pu)
    return replace(cfg, run_dir=str(run_dir), ranker=ranker, train=train, sft=sft)


def run_method(m: Method, ctx: MethodContext) -> dict[str, Any]:
    from .baselines import anchor_completion, spin_units, train_spin
    from .sft_path import install_as_sft_stage, load_checkpoint

    backend, cfg, seed, stages = ctx.backend, ctx.cfg, ctx.seed, ctx.stages
    run_dir = ctx.out / f"seed-{seed}" / m.name
    done = run_dir / "eval.json"
    if done.exists():
        print(f"[eval] {m.name} seed {seed}: already scored ({done})", flush=True)
        res = json.loads(done.read_text())
        for rec in res.get("stages", []):
            stages.add(rec, resumed=True)
        if ctx.bench.wants(m.name, seed):  # scored before the benchmark was asked for
            _restore(m, ctx, run_dir)
        ctx.bench.run(ctx.greedy, m.name, seed, adapter=True)  # from its cache if it has one
        return strip(res)
    shutil.rmtree(run_dir, ignore_errors=True)  # a half-finished method starts over
    run_dir.mkdir(parents=True)
    mcfg = method_config(cfg, m, run_dir, ctx.n_sft, ctx.n_pu)
    reset_adapter(backend, mcfg, seed)
    print(f"[eval] {m.name} seed {seed}: training ({m.about})", flush=True)
    diag: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    with stages.stage(f"train:{m.name}", seed=seed) as train_info:
        if m.kind in ("pipeline", "two"):
            from ..pipeline import run

            shared, _, scores = ctx.sets["sft" if m.kind == "two" else "untrained"]
            identity = make_teacher(cfg.teacher).identity
            AnchorStore(run_dir).import_file(ctx.out / "anchors" / "anchors.jsonl", identity,
                                             cfg.teacher)
            shutil.copyfile(shared / "candidates.jsonl", run_dir / "candidates.jsonl")
            spec = m.ranker_spec(cfg.ranker.mode)
            write_jsonl_atomic(run_dir / "scores.jsonl", [
                {"round": 1, "prompt_id": pid, "mode": spec, "scores": s}
                for pid, s in scores[spec].items()])
            if m.kind == "two":
                install_as_sft_stage(ctx.path_root, ctx.n_sft, run_dir)
            try:
                result = run(mcfg, backend=backend, engine=ctx.engine)
                diag = result.rounds[-1] if result.rounds else {}
            except NothingToTrain as e:  # the adapter stays where the SFT stage left it
                print(f"[eval] {m.name} seed {seed}: {e} Scored as its SFT stage left it.",
                      flush=True)
                diag = {"nothing_to_train": str(e)}
                train_info["steps"] = ctx.n_sft if m.kind == "two" else 0
            shutil.rmtree(run_dir / "state", ignore_errors=True)
            backend.save_adapter(run_dir / "adapter")
        elif m.kind in ("sft", "sft-stage1"):
            steps = ctx.n_total if m.kind == "sft" else ctx.n_sft
            load_checkpoint(backend, ctx.path_root, steps)
            train_info["steps"] = steps
        elif m.kind == "sft-best":
            extra["validation"] = _pick_best_sft(ctx)
            load_checkpoint(backend, ctx.path_root, extra["validation"]["best_steps"])
        elif m.kind == "spin":
            _, cands, _ = ctx.sets["untrained"]
            prompt_ids = {p.id: chat_prompt_ids(backend, p)
                          for p in ctx.prompts if p.id in ctx.anchors}
            completions = {pid: anchor_completion(backend, a) for pid, a in ctx.anchors.items()}
            rejected = {pid: cs[0]["token_ids"] for pid, cs in cands.items()}
            units = spin_units(prompt_ids, completions, rejected)
            train_spin(backend, units, mcfg.train, run_dir=run_dir,
                       ref_batch=mcfg.ranker.batch_size)
        else:
            raise EdgePuError(f"eval: method {m.name} has unknown kind {m.kind!r}")
        train_info.setdefault("steps", mcfg.train.steps)
    if m.kind != "sft-best" and ctx.validation and ctx.validation is not ctx.heldout:
        # The same adapter on the validation split: settings (method variants) are chosen by
        # this column, never by the held-out pass rate next to it.
        val = cached_eval(run_dir / "validation.json", ctx.greedy, ctx.validation, ctx.sizes,
                          adapter=True, info={}, desc="validation")
        extra["validation_pass_rate"], extra["validation_quality"] = (val["pass_rate"],
                                                                      val["quality"])
    with stages.stage(f"eval:{m.name}", seed=seed) as info:
        res = cached_eval(done, ctx.greedy, ctx.heldout, ctx.sizes, adapter=True, info=info,
                          extra={"seed": seed, "train_diag": diag, **extra,
                                 "stages": stages.as_list()[-1:]})
    ctx.bench.run(ctx.greedy, m.name, seed, adapter=True)
    return strip(res)


TEACHER_ROW = "teacher-row"  # the teacher's own answers: not anchors, not counted as such


def teacher_answers(cfg: RunConfig, prompts: list[tuple[str, str]], folder: Path,
                    max_tokens: int) -> list[str]:
    """The teacher's greedy answer to each (id, prompt), asked once and cached in `folder`
    (an anchors store of its own, so a rerun asks nothing again)."""
    tcfg = replace(cfg.teacher, max_tokens=max_tokens, temperature=0.0)
    store = AnchorStore(folder)
    asked = [Prompt(pid, text) for pid, text in prompts]
    teacher = make_teacher(tcfg)
    store.fetch(asked, teacher, tcfg)
    got = store.anchors_for(asked, teacher.identity, tcfg)
    missing = [p.id for p in asked if p.id not in got]
    if missing:
        raise EdgePuError(f"eval: the teacher gave no answer for {len(missing)} prompts "
                          f"({', '.join(missing[:3])}...); see {folder}/teacher_failures.jsonl.")
    return [got[p.id].strip() for p in asked]


def teacher_eval(cfg: RunConfig, heldout: list[Task], sizes: dict[str, int], out: Path,
                 bench: Benchmark, stages: Stages) -> dict[str, Any]:
    """The `teacher` row: the teacher's own answers on the held-out prompts and the benchmark."""
    path = out / TEACHER_ROW / "eval.json"
    with stages.stage("eval:teacher") as info:
        if path.exists():
            info["cached"] = True
            res = json.loads(path.read_text())
        else:
            answers = teacher_answers(cfg, [(t.id, t.prompt) for t in heldout],
                                      out / TEACHER_ROW / "heldout", sizes["eval_max_new_tokens"])
            res = {**score(heldout, answers),
                   "passes": [int(passed(t, a)) for t, a in zip(heldout, answers, strict=True)],
                   "answers": [{"id": t.id, "answer": a} for t, a in zip(heldout, answers,
                                                                          strict=True)]}
            write_atomic(path, json.dumps(res, indent=1))
    bench.run_teacher(cfg, out / TEACHER_ROW / "ifeval")
    return res


def _restore(m: Method, ctx: MethodContext, run_dir: Path) -> None:
    """Put a scored method's adapter back (for a benchmark asked for after it was scored)."""
    from .sft_path import load_checkpoint

    if m.kind in ("sft", "sft-stage1"):
        load_checkpoint(ctx.backend, ctx.path_root,
                        ctx.n_total if m.kind == "sft" else ctx.n_sft)
    elif m.kind == "sft-best":
        best = json.loads((run_dir / "eval.json").read_text())["validation"]["best_steps"]
        load_checkpoint(ctx.backend, ctx.path_root, best)
    else:
        ctx.backend.load_adapter(run_dir / "adapter")


def _pick_best_sft(ctx: MethodContext) -> dict[str, Any]:
    """Validation pass rate at each SFT checkpoint; the best, ties broken by mean checker
    quality (partial credit: on 45 prompts pass rates often tie), then by fewer steps."""
    from .sft_path import checkpoint_dir, load_checkpoint

    rates: dict[int, float] = {}
    quality: dict[int, float] = {}
    for steps in ctx.best_steps:
        load_checkpoint(ctx.backend, ctx.path_root, steps)
        res = cached_eval(checkpoint_dir(ctx.path_root, steps) / "validation.json",
                          ctx.greedy, ctx.validation, ctx.sizes, adapter=True, info={},
                          desc=f"validation {steps}")
        rates[steps], quality[steps] = res["pass_rate"], res["quality"]
    best = max(ctx.best_steps, key=lambda s: (rates[s], quality[s], -s))
    print(f"[eval] sft-best seed {ctx.seed}: validation pass rate by steps "
          f"{ {s: round(r, 3) for s, r in rates.items()} } -> {best} steps", flush=True)
    return {"pass_rate_by_steps": {str(s): r for s, r in rates.items()},
            "quality_by_steps": {str(s): q for s, q in quality.items()}, "best_steps": best}


class Benchmark:
    """IFEval for the methods in IFEval_METHODS when `--benchmark ifeval` is given."""

    def __init__(self, opts: Any, out: Path, stages: Stages, methods: tuple[str, ...]) -> None:
        self.enabled = opts.benchmark == "ifeval"
        if opts.benchmark not in ("", "ifeval"):
            raise EdgePuError(f"eval: --benchmark {opts.benchmark!r} is not known; use ifeval.")
        self.opts, self.out, self.stages, self.methods = opts, out / "ifeval", stages, methods
        self.items: list[Any] = []
        self.records: dict[str, list[dict[str, Any]]] = {}
        if self.enabled:
            from .ifeval import load_ifeval

            self.items = load_ifeval(opts.ifeval_prompts, seed=0)

    def _path(self, method: str, seed: int | None) -> Path:
        return self.out / (f"{method}.json" if seed is None else f"seed-{seed}-{method}.json")

    def _scored(self, method: str) -> bool:
        """IFEval scores IFEval_METHODS and their variants (`sft+pu-grpo-adv@lr=2e-4`)."""
        return method.split("@")[0] in self.methods

    def wants(self, method: str, seed: int | None) -> bool:
        return self.enabled and self._scored(method) and not self._path(method, seed).exists()

    def run(self, backend: Any, method: str, seed: int | None, *, adapter: bool) -> None:
        if not self.enabled or not self._scored(method):
            return
        path = self._path(method, seed)
        if not path.exists():
            from .ifeval import ifeval_answers, score_ifeval

            with self.stages.stage(f"ifeval:{method}", seed=seed if seed is not None else ""):
                answers = ifeval_answers(backend, self.items, adapter=adapter,
                                         max_new_tokens=self.opts.ifeval_max_new_tokens)
                res = score_ifeval(self.items, answers)
            res["answers"] = answers
            write_atomic(path, json.dumps(res, indent=1))
        res = json.loads(path.read_text())
        self.records.setdefault(method, []).append(
            {"seed": seed, **{k: v for k, v in res.items() if k != "answers"}})

    def run_teacher(self, cfg: RunConfig, folder: Path) -> None:
        """IFEval answered by the teacher itself (the `teacher` row), once for every seed."""
        if not self.enabled or not self._scored("teacher"):
            return
        path = self._path("teacher", None)
        if not path.exists():
            from .ifeval import score_ifeval

            with self.stages.stage("ifeval:teacher"):
                answers = teacher_answers(cfg, [(f"ifeval-{it.key}", it.prompt)
                                                for it in self.items], folder,
                                          self.opts.ifeval_max_new_tokens)
                res = score_ifeval(self.items, answers)
            res["answers"] = answers
            write_atomic(path, json.dumps(res, indent=1))
        if "teacher" not in self.records:
            res = json.loads(path.read_text())
            self.records["teacher"] = [{"seed": None, **{k: v for k, v in res.items()
                                                          if k != "answers"}}]

    def results(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        return {"prompts": len(self.items), "max_new_tokens": self.opts.ifeval_max_new_tokens,
                "methods": self.records}
