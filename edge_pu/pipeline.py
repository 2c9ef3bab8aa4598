"""`edge-pu run`: anchors -> SFT -> (sample -> rank -> train) x rounds -> adapter, in a run dir.

Stage 1 (edge_pu.sft, `sft.enabled`, on by default) fine-tunes the LoRA on the anchors; the PU
rounds then continue the same adapter with the SFT policy as reference, judge and first sampler.

Run dir layout (every JSONL is append-only and fsynced per record, so a killed run resumes):
  config.resolved.yaml   the resolved config (printed at start too)
  anchors.jsonl          one teacher answer per prompt (edge_pu.anchors)
  candidates.jsonl       {"round", "prompt_id", "k", "text", "token_ids", "finished"}
  scores.jsonl           {"round", "prompt_id", "mode", "scores": [K floats]}
  pairs.jsonl            {"round", "prompt_id", ...} DPO pairs or GRPO targets
  candidates.rank-R.jsonl, scores.rank-R.jsonl
                         what rank R of a torchrun job appended, until rank 0 merges it into
                         the file above (edge_pu.distributed)
  metrics.jsonl          per optimizer step, plus one {"event": "round_end"} line per round
  report.html            the run report (edge_pu.report; `edge-pu report RUN_DIR`)
  state/sft/             the SFT stage's adapter (resume point; the PU stage's reference)
  state/round-N/         adapter + optimizer + RNG after round N (resume point)
  adapter/               the final PEFT adapter (peft.PeftModel.from_pretrained loads it)
  summary.json           what happened, in numbers; `stages`: wall time and peak RSS of each
                         stage (load, sft, sample, rank, reference, train; edge_pu.measure)
                         beside the memory planner's prediction for it (`memory_plan`)
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import distributed as dist
from .anchors import AnchorReport, AnchorStore
from .config import RunConfig, config_to_dict, dump_config
from .data import Prompt, check_prompt_lengths, load_data, prompt_ids
from .errors import EdgePuError, NothingToTrain
from .jsonl import append_jsonl, read_jsonl, write_atomic, write_jsonl_atomic
from .measure import Stages
from .teachers import make_teacher

# Sections whose change leaves earlier stages valid (export re-runs from the adapter).
_FREE_SECTIONS = {"export", "run_dir", "device"}
# Keys whose change leaves every stage valid: the teacher's transport and budgets (anchors are
# keyed on the teacher's identity and generation settings, not on these). Raising
# teacher.max_calls after a budget stop must continue the same run dir.
_FREE_KEYS = {"teacher.base_url", "teacher.api_key_env", "teacher.api_key_file",
              "teacher.timeout_s", "teacher.retries", "teacher.backoff_s", "teacher.max_calls",
              "teacher.token_budget"}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@dataclass
class RunResult:
    run_dir: Path
    anchors: AnchorReport | None = None
    sft: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def prepare_run_dir(cfg: RunConfig, *, restart: bool = False) -> Path:
    """Create the run dir, or check that an existing one was made by a compatible config."""
    run_dir = Path(cfg.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise EdgePuError(f"run_dir {run_dir}: exists and is not a folder; choose another "
                          "run_dir.")
    saved = run_dir / "config.resolved.yaml"
    if saved.exists() and not restart:
        import yaml

        old = _flat(yaml.safe_load(saved.read_text()) or {})
        new = _flat(config_to_dict(cfg))
        default = _flat(config_to_dict(RunConfig()))  # keys added since the run dir was made
        changed = [k for k, v in new.items() if k.split(".")[0] not in _FREE_SECTIONS
                   and k not in _FREE_KEYS and old.get(k, default.get(k)) != v]
        if changed:
            raise EdgePuError(
                f"{run_dir}: this run dir was started with a different config ({', '.join(changed)}"
                " changed), so its candidates, scores and adapter would not match. Use a new "
                "run_dir, or pass --restart to keep only the anchors and redo the rest.")
    if restart:
        for name in ("candidates.jsonl", "scores.jsonl", "pairs.jsonl", "metrics.jsonl",
                     "summary.json"):
            (run_dir / name).unlink(missing_ok=True)
        for shard in run_dir.glob("*.rank-*.jsonl"):  # a killed torchrun job's, unmerged
            shard.unlink()
        shutil.rmtree(run_dir / "state", ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(saved, dump_config(cfg))
    return run_dir


def run_anchors(cfg: RunConfig, prompts: list[Prompt], run_dir: Path) -> AnchorReport:
    store = AnchorStore(run_dir)
    teacher = make_teacher(cfg.teacher)
    with tqdm(total=len(prompts), desc="anchors", unit="prompt") as bar:
        report = store.fetch(prompts, teacher, cfg.teacher, progress=bar.update)
    print(f"[anchors] {report.total} prompts: {report.cached} already anchored, {report.new} "
          f"new, {report.failed} failed; {report.requests} teacher requests this run", flush=True)
    if report.failed:
        reasons = Counter(f["error"] for f in report.failures)
        for why, n in reasons.most_common(3):
            print(f"[anchors]   {n} x {why}", flush=True)
        print(f"[anchors] failures are listed in {store.failures}; those prompts are skipped.",
              flush=True)
    if report.truncated:
        print(f"[anchors] {report.truncated} anchors stopped at teacher.max_tokens = "
              f"{cfg.teacher.max_tokens} (kept, marked \"truncated\" in anchors.jsonl); raise it "
              "for complete anchors (that re-asks every prompt).", flush=True)
    return report


def _seed(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def sample_round(backend: Any, cfg: RunConfig, prompts: list[Prompt], anchored: set[str],
                 run_dir: Path, round_idx: int, sampler: Any = None,
                 info: dict[str, Any] | None = None) -> dict[str, list[dict]]:
    """K candidates per anchored prompt, drawn by `sampler` (default: the backend itself).
    `info` (a meter stage's record) gets `resumed: true` when every candidate came from disk."""
    from .train import pu_subset

    sampler = sampler or backend
    anchored = pu_subset(anchored, cfg.train.sample_prompts, cfg.sampling.seed, round_idx)
    path = run_dir / "candidates.jsonl"
    pos = {p.id: i for i, p in enumerate(prompts)}

    def merge() -> None:  # what the ranks of a job (this one, or a killed one) appended
        dist.merge_shards(path, key=lambda c: (c["round"], c["prompt_id"], c["k"]),
                          order=lambda c: (c["round"], pos.get(c["prompt_id"], -1), c["k"]))

    def read() -> dict[str, dict[int, dict]]:
        # Keyed by candidate index, so a prompt resampled after a crash (same seed, same
        # samples) replaces rather than duplicates what an interrupted write left behind.
        have: dict[str, dict[int, dict]] = defaultdict(dict)
        for rec in read_jsonl(path):
            if rec["round"] == round_idx:
                have[rec["prompt_id"]][rec["k"]] = rec
        return have

    merge()
    have = read()
    todo = [p for p in prompts if p.id in anchored and len(have[p.id]) < cfg.sampling.k]
    if info is not None:
        info["resumed"] = not todo
    mine, out = dist.shard(todo), dist.shard_path(path)  # each prompt's seed is its own
    step = cfg.sampling.prompt_batch
    with tqdm(total=len(mine), desc=f"sample r{round_idx}", unit="prompt") as bar:
        for s in range(0, len(mine), step):
            chunk = mine[s: s + step]
            ids = [prompt_ids(backend, p) for p in chunk]
            seeds = [_seed(cfg.sampling.seed, round_idx, p.id) for p in chunk]
            for p, samples in zip(chunk, sampler.sample(ids, cfg.sampling.k, cfg.sampling,
                                                        seeds), strict=True):
                recs = [{"round": round_idx, "prompt_id": p.id, "k": j, "text": x.text,
                         "token_ids": x.token_ids, "finished": x.finished}
                        for j, x in enumerate(samples)]
                append_jsonl(out, recs)  # a prompt's K candidates land together or not at all
                have[p.id] = dict(enumerate(recs))
            bar.update(len(chunk))
    if dist.world().size > 1:
        merge()
        have = read()
    return {p.id: [have[p.id][j] for j in sorted(have[p.id])] for p in prompts
            if p.id in anchored}


def rank_round(backend: Any, cfg: RunConfig, prompts: dict[str, Prompt], anchors: dict[str, str],
               cands: dict[str, list[dict]], run_dir: Path, round_idx: int,
               info: dict[str, Any] | None = None) -> dict[str, list[float]]:
    """The ranker's scores of every prompt's candidates; `info` as in sample_round."""
    from .rank import RANKERS, RankItem  # torch-free, but keeps `edge-pu anchors` light

    path = run_dir / "scores.jsonl"
    pos = {pid: i for i, pid in enumerate(prompts)}

    def merge() -> None:  # as in sample_round: one record per (round, prompt), prompt order
        dist.merge_shards(path, key=lambda s: (s["round"], s["prompt_id"]),
                          order=lambda s: (s["round"], pos.get(s["prompt_id"], -1)))

    merge()
    scores = {r["prompt_id"]: r["scores"] for r in read_jsonl(path) if r["round"] == round_idx}
    ranker = RANKERS[cfg.ranker.mode]
    missing = [pid for pid in cands if pid not in scores]
    if info is not None:
        info["resumed"] = not missing
    todo, out = dist.shard(missing), dist.shard_path(path)
    step = max(1, cfg.ranker.batch_size // cfg.sampling.k)
    for s in tqdm(range(0, len(todo), step), desc=f"rank r{round_idx}", unit="batch"):
        items = [RankItem(pid, prompts[pid], anchors[pid],
                          [c["token_ids"] for c in cands[pid]], [c["text"] for c in cands[pid]])
                 for pid in todo[s: s + step]]
        result = ranker(backend, items, cfg.ranker)
        append_jsonl(out, [{"round": round_idx, "prompt_id": it.prompt_id,
                            "mode": cfg.ranker.mode, "scores": sc}
                           for it, sc in zip(items, result, strict=True)])
        scores.update({it.prompt_id: sc for it, sc in zip(items, result, strict=True)})
    if dist.world().size > 1:
        merge()
        scores = {r["prompt_id"]: r["scores"] for r in read_jsonl(path)
                  if r["round"] == round_idx}
    return scores


def run(cfg: RunConfig, *, restart: bool = False, backend: Any = None,
        engine: Any = None) -> RunResult:
    """The whole pipeline; in a torchrun job (edge_pu.distributed) every rank calls it, rank 0
    writes the shared files and asks the teacher, and sampling, scoring and training are split
    over the ranks. `engine`: a llama.cpp view of `backend` (edge_pu.backends.llamacpp_engine)
    to sample through, kept open (an evaluation hands its own to every method's run); by
    default `sampling.engine` decides and the run opens and closes its own."""
    t0 = time.time()
    main = dist.world().main
    meter = Stages()
    run_dir = dist.main_does(lambda: prepare_run_dir(cfg, restart=restart))
    print("[config] resolved:\n" + dump_config(cfg), flush=True)
    prompts = load_data(cfg.data)
    if cfg.ranker.reward_funcs:  # a reward function that does not import fails before any work
        from .rewards import check_config

        check_config(cfg.ranker.reward_funcs, cfg.ranker.reward_weights)
    # The student is loaded and the prompts measured before the teacher is asked anything:
    # bad input must not cost a paid call.
    if backend is None:
        from .backends import make_backend
        from .planner import check_fits, model_config_path

        check_fits(cfg, model_config_path(cfg.student.path))  # refuse before loading anything
        backend = make_backend(cfg.backend)
        print(f"[backend] {backend.name}: loading {cfg.student.path}", flush=True)
        with meter.stage("load"):
            backend.load(cfg)
    check_prompt_lengths(prompts, [len(prompt_ids(backend, p)) for p in prompts],
                         max_length=cfg.student.max_length,
                         max_new_tokens=cfg.sampling.max_new_tokens, source=cfg.data.prompts)
    # Rank 0 alone asks the teacher; the other ranks wait for it, then read anchors.jsonl.
    result = RunResult(run_dir, anchors=dist.main_does(lambda: run_anchors(cfg, prompts,
                                                                           run_dir)))
    identity = make_teacher(cfg.teacher).identity
    anchors = AnchorStore(run_dir).anchors_for(prompts, identity, cfg.teacher)
    if not anchors:
        raise EdgePuError(f"{run_dir}: no prompt has an anchor, so there is nothing to train on;"
                          f" see {run_dir / 'teacher_failures.jsonl'}.")
    by_id = {p.id: p for p in prompts}
    sampler = engine if engine is not None else make_engine(backend, cfg, run_dir)
    try:  # a live llama.cpp model holds ~1-2 GB (0.5B); reference cycles keep it past run()
        if cfg.sft.enabled:  # stage 1: the PU stage starts from, and is measured against, SFT
            from .sft import run_sft

            ids = {pid: prompt_ids(backend, by_id[pid]) for pid in anchors}
            with meter.stage("sft") as info:
                result.sft = run_sft(backend, cfg, ids, anchors, run_dir, info)
            dist.barrier()  # rank 0 has saved the SFT state
            if sampler is not None:  # round 1 samples from the SFT policy
                sampler.sync(True, "sft")
        done = {m["round"]: m for m in read_jsonl(run_dir / "metrics.jsonl")
                if m.get("event") == "round_end"}
        for r in range(1, cfg.train.rounds + 1):
            state = run_dir / "state" / f"round-{r}"
            if r in done and (state / "COMPLETE").exists():
                backend.load_state(state)
                print(f"[round {r}] already trained; resumed from {state}", flush=True)
                result.rounds.append({k: v for k, v in done[r].items() if k != "event"})
                continue
            if sampler is not None and r > 1:  # round r samples from what round r-1 trained
                sampler.sync(True, f"r{r - 1}")
            result.rounds.append(_one_round(backend, cfg, prompts, by_id, anchors, run_dir, r,
                                            sampler, meter))
            # Written beside, then renamed: a crash mid-save never leaves a half state that
            # looks complete.
            if main:
                tmp = state.with_name(state.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                backend.save_state(tmp)
                shutil.rmtree(state, ignore_errors=True)
                tmp.rename(state)
            dist.barrier()
    finally:
        if sampler is not None and engine is None:
            sampler.close()
    result.seconds = time.time() - t0
    if not main:  # the adapter, summary and exports are rank 0's to write
        return result
    backend.save_adapter(run_dir / "adapter")
    from .planner.measured import stage_memory

    summary = {"seconds": round(result.seconds, 1), "prompts": len(prompts),
               "anchored": len(anchors), "teacher_requests_total":
               AnchorStore(run_dir).requests_made(), "sft": result.sft, "rounds": result.rounds,
               **stage_memory(cfg, backend, meter)}
    if cfg.export.formats:
        from .export_stage import export_run

        summary["exports"] = {}
        for fmt in cfg.export.formats:
            quant = cfg.export.gguf_quant if fmt == "gguf" else None
            report = export_run(run_dir, fmt, quant=quant)
            summary["exports"][fmt] = {"passed": report.get("passed"),
                                       "artifacts": report.get("artifacts")}
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    print(f"[done] adapter in {run_dir / 'adapter'} ({result.seconds:.0f}s)", flush=True)
    return result


def scorer(backend: Any, cfg: RunConfig, engine: Any) -> Any:
    """What the rankers score with: the llama.cpp view under ranker.engine: llama-cpp (the
    config check makes that need sampling.engine: llama-cpp, which opens it), else the
    backend."""
    return engine if cfg.ranker.engine == "llama-cpp" else backend


def make_engine(backend: Any, cfg: RunConfig, run_dir: Path) -> Any:
    """None (the backend samples), or the backend seen through llama.cpp over the student's
    GGUF (edge_pu.backends.llamacpp_engine)."""
    if cfg.sampling.engine == "backend":
        return None
    if dist.world().size > 1:
        raise EdgePuError("sampling.engine: llama-cpp runs in one process; a torchrun job "
                          "samples with the backend (use sampling.engine: backend).")
    if backend.name != "cpu":
        raise EdgePuError(f"sampling.engine: llama-cpp is the CPU backend's sampler; backend "
                          f"{backend.name} samples itself (use sampling.engine: backend).")
    from .backends.llamacpp_engine import EngineView
    from .backends.llamacpp_sampler import LlamaCppSampler

    print(f"[sampler] llama.cpp, from {cfg.student.path}", flush=True)
    return EngineView(backend, LlamaCppSampler(cfg, backend.student_dir, run_dir / "sampler",
                                               backend.eos_ids, backend.decode))


def _one_round(backend: Any, cfg: RunConfig, prompts: list[Prompt], by_id: dict[str, Prompt],
               anchors: dict[str, str], run_dir: Path, r: int, sampler: Any,
               meter: Stages) -> dict[str, Any]:
    # Imported here: train pulls in torch (the losses), and `edge-pu anchors` must run without.
    from .rank import RankItem, anchor_gate
    from .sft import anchor_completion
    from .train import attach_logprobs, build_units, pair_accuracy, train

    with meter.stage("sample", round=r) as info:
        cands = sample_round(backend, cfg, prompts, set(anchors), run_dir, r, sampler, info)
    with meter.stage("rank", round=r) as info:
        scores = rank_round(scorer(backend, cfg, sampler), cfg, by_id, anchors, cands,
                            run_dir, r, info)
    ids = {pid: prompt_ids(backend, by_id[pid]) for pid in cands}
    gate = anchor_gate(cfg.ranker, cfg.train.anchor_check, [RankItem(
        pid, by_id[pid], anchors[pid], [c["token_ids"] for c in cs], [c["text"] for c in cs])
        for pid, cs in cands.items()], scores)
    units, records, counts = build_units(
        cfg.train, ids, {pid: [c["token_ids"] for c in cs] for pid, cs in cands.items()},
        scores, finished={pid: [bool(c.get("finished", True)) for c in cs]
                          for pid, cs in cands.items()},
        anchors={pid: anchor_completion(backend, anchors[pid]) for pid in cands if pid in gate})
    tied = counts["tied"]
    path = run_dir / "pairs.jsonl"
    main = dist.world().main
    if main and not any(rec["round"] == r for rec in read_jsonl(path)):
        append_jsonl(path, [{"round": r, **rec} for rec in records])
    spreads = [max(s) - min(s) for s in scores.values()]
    diag: dict[str, Any] = {
        "round": r, "prompts": len(cands), "units": len(units), "tied_prompts": tied,
        "tied_share": tied / max(1, len(cands)),
        "unfinished_candidates": counts["unfinished"], "dropped_candidates": counts["dropped"],
        "anchor_units": counts["anchor_units"], "unselected_prompts": counts["unselected"],
        "anchors_checked_out": len(cands) - len(gate),
        "score_spread_mean": statistics.fmean(spreads) if spreads else 0.0,
        "candidate_tokens_mean": statistics.fmean(len(c["token_ids"]) for cs in cands.values()
                                                  for c in cs),
    }
    print(f"[round {r}] {len(units)} training units from {len(cands)} prompts; {tied} prompts "
          f"tied; {counts['unfinished']} unfinished candidates ({cfg.train.unfinished}); "
          f"anchor as positive in {counts['anchor_units']} units"
          + (f"; {counts['unselected']} prompts left out by train.select: spread"
             if counts["unselected"] else ""), flush=True)
    if not units:
        why = (f"{tied} of {len(cands)} prompts' candidates tied"
               + (f" and train.select: spread left {counts['unselected']} out"
                  if counts["unselected"] else ""))
        raise NothingToTrain(f"round {r}: {why}, so there is nothing to train on; raise "
                             "sampling.temperature or sampling.k, or lower train.margin.")
    grpo = cfg.train.algorithm == "grpo"
    # The sampling policy's log-probs are the GRPO ratio's denominator, and for both algorithms
    # give the round's KL(pi || ref) estimate: E over sampled rows of sum(log pi - log ref).
    with meter.stage("reference", round=r):
        attach_logprobs(backend, units, need_old=True, batch=cfg.ranker.batch_size)
    # Over the distinct sampled candidates only: the anchor rows were not drawn from the policy.
    rows = _candidate_rows(units, records)
    seq_kl = [sum((u.old or [])[j]) - sum((u.ref or [])[j]) for u, j in rows]
    diag["kl_to_reference"] = statistics.fmean(seq_kl) if seq_kl else 0.0
    # Training restarts a round from its start state, so drop what an interrupted attempt at
    # this round logged: the metrics then hold each step once.
    mpath = run_dir / "metrics.jsonl"
    kept = [m for m in read_jsonl(mpath) if m.get("round") != r]
    if main and mpath.exists() and len(kept) != len(read_jsonl(mpath)):
        write_jsonl_atomic(mpath, kept)
    log: list[dict] = []
    bar = tqdm(desc=f"train r{r}", unit="step")

    def on_step(m: dict) -> None:
        if main:
            append_jsonl(run_dir / "metrics.jsonl", [m])
        log.append(m)
        bar.total = m["steps"]
        bar.set_postfix(loss=f"{m['loss']:.4f}")
        bar.update(1)

    with meter.stage("train", round=r):
        train(backend, units, cfg.train, round_idx=r, on_step=on_step)
    bar.close()
    diag["kl_to_reference_end"] = _trained_kl(backend, rows, max(1, cfg.ranker.batch_size))
    for key in ("loss", "reward_margin", "reward_accuracy", "kl", "log_ratio"):
        vals = [m[key] for m in log if key in m]
        if vals:
            diag[f"{key}_last"] = vals[-1]
    if not grpo:
        diag.update(pair_accuracy(backend, units, cfg.train.beta))
    if grpo:
        from .train import loss_config

        diag["advantage_std"] = loss_config(cfg.train, units).adv_std
    if main:
        append_jsonl(run_dir / "metrics.jsonl", [{"event": "round_end", **diag}])
    print(f"[round {r}] " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in diag.items()), flush=True)
    return diag


def _candidate_rows(units: list[Any], records: list[dict]) -> list[tuple[Any, int]]:
    """(unit, row) of each distinct sampled candidate in the units; anchor rows left out."""
    from .train import ANCHOR

    seen: set[tuple[str, int]] = set()
    out = []
    for u, rec in zip(units, records, strict=True):  # build_units keeps them in step
        for j, k in enumerate(rec["rows"] if "rows" in rec else (rec["chosen"],
                                                                  rec["rejected"])):
            if k != ANCHOR and (u.prompt_id, k) not in seen:
                seen.add((u.prompt_id, k))
                out.append((u, j))
    return out


def _trained_kl(backend: Any, rows: list[tuple[Any, int]], batch: int) -> float:
    """KL(pi_trained || ref) after a round, from the candidates drawn before it: a
    self-normalized importance-weighted mean of sum(log pi - log ref), weights
    pi_trained / pi_sampling per sequence. The round-start value is 0 whenever the round starts
    at the reference (round 1 after SFT); this one says how far the round's steps moved."""
    import math

    new = [lp for s in range(0, len(rows), batch) for lp in backend.logprobs(
        [u.prompt_ids for u, _ in rows[s: s + batch]],
        [u.completions[j] for u, j in rows[s: s + batch]], adapter=True)]
    if not new:
        return 0.0
    log_w = [sum(n) - sum((u.old or [])[j]) for (u, j), n in zip(rows, new, strict=True)]
    top = max(log_w)
    w = [math.exp(x - top) for x in log_w]
    ratio = [sum(n) - sum((u.ref or [])[j]) for (u, j), n in zip(rows, new, strict=True)]
    return sum(a * b for a, b in zip(w, ratio, strict=True)) / sum(w)
