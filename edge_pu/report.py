"""`edge-pu report RUN_DIR [--out FILE]`: one self-contained HTML page about a run.

`edge-pu run`, `demo` and `eval` write it at their end and print its path (`report_at_end`).

Reads, and writes nothing but the report:
- `config.resolved.yaml`: what was run.
- `metrics.jsonl`: every optimizer step (SFT: `{"stage": "sft", ...}`; PU: `{"round": r, ...}`:
  loss, reward margin / accuracy, per-step KL or log-ratio, learning rate, grad norm, as the
  loss logs them) and the `sft_end` / `round_end` diagnostics (units, tied share, score spread,
  unfinished candidates, KL to the reference at the round's start and end, pair accuracies).
- `candidates.jsonl` (lengths, finished), `scores.jsonl` (spread per prompt, ties).
- `anchors.jsonl` (lengths in the student's tokens when its tokenizer is in `adapter/`,
  truncation flags), `teacher_requests.jsonl`, `teacher_failures.jsonl` (still-open failures).
- `summary.json`, `demo_report.json` (before / after SFT / after PU), and every
  `export/*/export_report.json` (the export gate's checks).
An `edge-pu eval` folder (`results.json`) gets its method table and its plots
(edge_pu.eval.plots), its anchors, and each method run's round diagnostics.

Output: RUN_DIR/report.html (or --out), every plot embedded as a base64 PNG so the page needs
no other file and no network, and the same PNGs in report_plots/ beside it. Without matplotlib
the page keeps its tables and says how to get the plots.
"""

from __future__ import annotations

import base64
import html
import json
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from .errors import EdgePuError
from .jsonl import read_jsonl, write_atomic

REPORT_NAME = "report.html"
PLOTS_DIR = "report_plots"


# ---- reading a run dir ---------------------------------------------------------------------
def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except ValueError:
        return None


def _config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.resolved.yaml"
    if not path.exists():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _length_counter(*dirs: Path) -> tuple[Any, str]:
    """Anchor length in the student's tokens (its tokenizer is saved with every adapter), else
    in words."""
    path = next((d / "tokenizer.json" for d in dirs if (d / "tokenizer.json").exists()), None)
    if path is not None:
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(path))
            return (lambda s: len(tok.encode(s, add_special_tokens=False).ids)), "tokens"
        except Exception:  # noqa: BLE001 - no tokenizers, or one it cannot read: count words
            pass
    return (lambda s: len(s.split())), "words"


def _anchors(run_dir: Path, *tokenizer_dirs: Path) -> dict[str, Any]:
    recs = list({r["key"]: r for r in reversed(read_jsonl(run_dir / "anchors.jsonl"))}.values())
    count, unit = _length_counter(*tokenizer_dirs)
    lengths = [count(r.get("anchor", "")) for r in recs]
    latest = {r["key"]: r for r in read_jsonl(run_dir / "teacher_failures.jsonl")}
    anchored = {r["key"] for r in recs}
    failures = [r for k, r in latest.items() if k not in anchored]
    return {"count": len(recs), "lengths": lengths, "unit": unit,
            "truncated_flags": [bool(r.get("truncated")) for r in recs],
            "truncated": sum(bool(r.get("truncated")) for r in recs),
            "requests": len(read_jsonl(run_dir / "teacher_requests.jsonl")),
            "failures": len(failures),
            "failure_reasons": Counter(str(f.get("error", "?")) for f in failures).most_common(5)}


def collect_run(run_dir: str | Path) -> dict[str, Any]:
    """Everything the report shows about a pipeline run dir, as plain data."""
    from .algo.preferences import is_tied

    d = Path(run_dir)
    cfg = _config(d)
    metrics = read_jsonl(d / "metrics.jsonl")
    steps = [m for m in metrics if "step" in m and "event" not in m]
    rounds = {m["round"]: m for m in metrics if m.get("event") == "round_end"}
    sft_end = [m for m in metrics if m.get("event") == "sft_end"]
    cands: dict[int, dict[str, Any]] = {}
    by_round: dict[int, list[dict]] = defaultdict(list)
    for c in read_jsonl(d / "candidates.jsonl"):
        by_round[c["round"]].append(c)
    for r, cs in sorted(by_round.items()):
        lengths = [len(c.get("token_ids", [])) for c in cs]
        cands[r] = {"n": len(cs), "lengths": lengths, "mean_length": statistics.fmean(lengths),
                    "unfinished": sum(not c.get("finished", True) for c in cs),
                    "unfinished_share": sum(not c.get("finished", True) for c in cs) / len(cs)}
    scores: dict[int, dict[str, Any]] = {}
    s_round: dict[int, list[list[float]]] = defaultdict(list)
    for s in read_jsonl(d / "scores.jsonl"):
        s_round[s["round"]].append(s["scores"])
    for r, ss in sorted(s_round.items()):
        spreads = [max(s) - min(s) for s in ss if s]
        tied = rounds.get(r, {}).get("tied_share")  # the pipeline's, after calibration
        scores[r] = {"spreads": spreads, "spread_mean": statistics.fmean(spreads) if spreads
                     else 0.0, "tied_share": tied if tied is not None else
                     sum(is_tied(s) for s in ss) / len(ss)}
    exports = []
    for path in sorted(d.glob("export/*/export_report.json")):
        rep = _json(path)
        if isinstance(rep, dict):
            exports.append({"dir": str(path.parent.relative_to(d)), **rep})
    demo = _json(d / "demo_report.json")
    evaluation = None
    if isinstance(demo, dict) and demo.get("before"):
        evaluation = {"source": "demo_report.json", "columns": [
            ("before", demo.get("before")), ("after SFT", demo.get("after_sft")),
            ("after PU", demo.get("after"))]}
    return {"kind": "run", "run_dir": str(d), "config": cfg,
            "summary": _json(d / "summary.json") or {},
            "sft_steps": [m for m in steps if m.get("stage") == "sft"],
            "pu_steps": [m for m in steps if m.get("stage") != "sft"],
            "sft": {k: v for k, v in (sft_end[-1] if sft_end else {}).items() if k != "event"},
            "rounds": [{k: v for k, v in rounds[r].items() if k != "event"}
                       for r in sorted(rounds)],
            "candidates": cands, "scores": scores,
            "anchors": _anchors(d, d / "adapter", d / "state" / "sft" / "adapter"),
            "exports": exports, "evaluation": evaluation,
            "max_new_tokens": (cfg.get("sampling") or {}).get("max_new_tokens"),
            "ranker": (cfg.get("ranker") or {}).get("mode")}


def collect_eval(out: str | Path) -> dict[str, Any]:
    """An `edge-pu eval` folder: results.json, its anchors, its method runs' diagnostics."""
    d = Path(out)
    results = _json(d / "results.json") or {}
    runs = []
    for metrics in sorted(d.glob("seed-*/*/metrics.jsonl")):
        for m in read_jsonl(metrics):
            if m.get("event") in ("sft_end", "round_end"):
                runs.append({"seed": metrics.parent.parent.name.removeprefix("seed-"),
                             "method": metrics.parent.name, **m})
    tok_dirs = sorted(d.glob("seed-*/*/adapter"))[:1]
    return {"kind": "eval", "run_dir": str(d), "results": results, "stage_diags": runs,
            "anchors": _anchors(d / "anchors", *tok_dirs)}


# ---- HTML ----------------------------------------------------------------------------------
CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;
padding:0 16px}table{display:block;overflow-x:auto;max-width:100%;border-collapse:collapse;
margin:8px 0;font-size:13px}h1{font-size:22px}h2{font-size:17px;border-bottom:1px solid #ddd;
padding-bottom:3px;margin-top:28px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}img{max-width:100%;
border:1px solid #eee}figure{margin:10px 0}figcaption{font-size:12px;color:#555}.pass{
color:#1a7f37;font-weight:600}.fail{color:#c62828;font-weight:600}.note{color:#666;
font-size:12px}code{background:#f4f4f4;padding:0 3px}"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return _e(json.dumps(v))
    return _e(v)


def _table(head: list[str], rows: list[list[Any]], raw: bool = False) -> str:
    out = ["<table>" + ("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"
                        if any(head) else "")]
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{c if raw else _fmt(c)}</td>" for c in row) + "</tr>")
    return "".join(out) + "</table>"


def _kv(pairs: list[tuple[str, Any]]) -> str:
    return _table(["", ""], [[k, v] for k, v in pairs if v not in (None, "", {})])


def _figure(fig: dict[str, Any] | None) -> str:
    if not fig:
        return ""
    data = base64.b64encode(fig["png"]).decode()
    return (f'<figure><img id="fig-{_e(fig["name"])}" alt="{_e(fig["title"])}" '
            f'src="data:image/png;base64,{data}"><figcaption>{_e(fig["title"])} '
            f'(<code>{PLOTS_DIR}/{_e(fig["name"])}.png</code>)</figcaption></figure>')


def _pass(ok: Any) -> str:
    return '<span class="pass">passed</span>' if ok else '<span class="fail">FAILED</span>'


def _anchors_html(a: dict[str, Any], fig: dict[str, Any] | None) -> str:
    lens = a["lengths"]
    stats = [("anchors", a["count"]), ("teacher requests (retries included)", a["requests"]),
             ("truncated at teacher.max_tokens", f"{a['truncated']} "
              f"({a['truncated'] / max(1, a['count']):.0%})"),
             ("prompts with no anchor (open teacher failures)", a["failures"])]
    if lens:
        stats.append((f"length, {a['unit']}: mean / median / max",
                      f"{statistics.fmean(lens):.1f} / {statistics.median(lens):g} / "
                      f"{max(lens)}"))
    out = "<h2>Anchors</h2>" + _kv(stats)
    if a["failure_reasons"]:
        out += _table(["failure reason", "prompts"], [list(x) for x in a["failure_reasons"]])
    return out + _figure(fig)


def _exports_html(exports: list[dict[str, Any]]) -> str:
    if not exports:
        return ("<h2>Export gate</h2><p class=note>No export yet: <code>edge-pu export RUN_DIR "
                "--format gguf</code> writes one, checked in llama.cpp against the merged "
                "model.</p>")
    out = ["<h2>Export gate</h2>"]
    for rep in exports:
        out.append(f"<h3>{_e(rep['dir'])}: {_e(rep.get('format'))} {_e(rep.get('quant') or '')}"
                   f" &mdash; {_pass(rep.get('passed'))}</h3>")
        rows = [[_e(name), _fmt(c.get("value")), f"{_e(c.get('op', ''))} "
                 f"{_fmt(c.get('threshold'))}", _pass(c.get("pass"))]
                for name, c in (rep.get("checks") or {}).items()]
        out.append(_table(["check", "value", "needs", ""], rows, raw=True))
        arts = rep.get("artifacts") or [rep.get("artifact")]
        out.append("<p class=note>artifacts: " + ", ".join(f"<code>{_e(x)}</code>"
                                                          for x in arts if x) + "</p>")
    return "".join(out)


def _evaluation_html(ev: dict[str, Any] | None, fig: dict[str, Any] | None) -> str:
    if not ev:
        return ("<h2>Evaluation</h2><p class=note>This run has no held-out evaluation "
                "(<code>edge-pu demo</code> and <code>edge-pu eval</code> write one).</p>")
    cols = [(n, r) for n, r in ev["columns"] if r]
    fams = list(cols[0][1]["by_family"])
    head = ["family", "n"] + [f"pass {n}" for n, _ in cols] + [f"quality {n}" for n, _ in cols]
    rows = [[f, cols[0][1]["by_family"][f]["n"]]
            + [f"{r['by_family'][f]['pass_rate']:.0%}" for _, r in cols]
            + [f"{r['by_family'][f]['quality']:.3f}" for _, r in cols] for f in fams]
    rows.append(["all", cols[0][1]["n"]] + [f"{r['pass_rate']:.0%}" for _, r in cols]
                + [f"{r['quality']:.3f}" for _, r in cols])
    return (f"<h2>Evaluation</h2><p class=note>From <code>{_e(ev['source'])}</code>: greedy "
            "answers to held-out prompts, checked.</p>" + _table(head, rows) + _figure(fig))


ROUND_KEYS = ["round", "prompts", "units", "tied_share", "unfinished_candidates",
              "score_spread_mean", "candidate_tokens_mean", "kl_to_reference",
              "kl_to_reference_end", "loss_last", "reward_accuracy", "preference_accuracy",
              "advantage_std"]


def _run_body(run: dict[str, Any], figs: dict[str, dict[str, Any]]) -> str:
    cfg, summ = run["config"], run["summary"]
    train, sft = cfg.get("train") or {}, cfg.get("sft") or {}
    teacher = cfg.get("teacher") or {}
    out = ["<h2>Overview</h2>", _kv([
        ("student", (cfg.get("student") or {}).get("path")),
        ("teacher", f"{teacher.get('kind', '?')} {teacher.get('model') or ''}".strip()),
        ("stages", ("SFT on the anchors, then " if sft.get("enabled", True) else "")
         + f"{train.get('rounds', 1)} PU round(s) of {train.get('algorithm', '?')}"
         + (f" ({train.get('grpo_variant')})" if train.get("algorithm") == "grpo" else "")),
        ("ranker", run.get("ranker")),
        ("candidates per prompt (K) / max new tokens",
         f"{(cfg.get('sampling') or {}).get('k')} / {run.get('max_new_tokens')}"),
        ("prompts / anchored", f"{summ.get('prompts', '?')} / {summ.get('anchored', '?')}"),
        ("wall time (s)", summ.get("seconds")), ("backend", cfg.get("backend"))])]
    out.append("<h2>Training</h2>")
    if run["sft"]:
        s = run["sft"]
        lrs = [m["lr"] for m in run["sft_steps"] if "lr" in m]
        out.append(f"<p>SFT: {s.get('steps')} steps on {s.get('anchors')} anchors, loss "
                   f"{_fmt(s.get('loss_first'))} &rarr; {_fmt(s.get('loss_last'))}"
                   + (f", lr {max(lrs):.3g}" if lrs else "") + ".</p>")
    if run["rounds"]:
        keys = [k for k in ROUND_KEYS[1:] if any(k in r for r in run["rounds"])]
        out.append(_table(["PU round"] + [str(r["round"]) for r in run["rounds"]],
                          [[k] + [r.get(k, "") for r in run["rounds"]] for k in keys]))
        out.append("<p class=note>kl_to_reference: KL(policy || reference) over the round's "
                   "sampled candidates, sum of token log-ratios: the sampling policy's at the "
                   "round's start, the trained policy's at its end (importance-weighted from "
                   "the same candidates). tied_share: prompts whose calibrated scores do not "
                   "differ.</p>")
    if not run["sft_steps"] and not run["pu_steps"]:
        out.append("<p class=note>No optimizer step logged yet.</p>")
    out += [_figure(figs.get("training_steps")), "<h2>Candidates and scores</h2>"]
    for r, c in run["candidates"].items():
        out.append(f"<p>Round {r}: {c['n']} candidates, mean length {c['mean_length']:.1f} "
                   f"tokens, {c['unfinished']} unfinished ({c['unfinished_share']:.0%}).</p>")
    out += [_figure(figs.get("candidates")), _figure(figs.get("score_spread")),
            _anchors_html(run["anchors"], figs.get("anchors")),
            _evaluation_html(run["evaluation"], figs.get("evaluation")),
            _exports_html(run["exports"])]
    return "".join(out)


def _eval_body(ev: dict[str, Any], figs: dict[str, dict[str, Any]]) -> str:
    r = ev["results"]
    out = ["<h2>Evaluation</h2>"]
    if r.get("methods"):
        before = r.get("before") or {}
        out.append(f"<p>Untrained student: held-out pass rate "
                   f"{before.get('pass_rate', 0):.1%}. Lifts are paired over held-out prompts, "
                   "with bootstrap 95% intervals.</p>")
        rows = []
        for name, m in r["methods"].items():
            lifts = [m.get("lift_vs", {}).get(ref) for ref in ("none", "sft", "sft-stage1")]
            rows.append([name, f"{m['pass_rate_mean']:.1%}", m.get("n_seeds")] + [
                "&mdash;" if not c else f"{c['points']:+.1f} [{c['lo']:+.1f}, {c['hi']:+.1f}]"
                for c in lifts])
        out.append(_table(["method", "pass rate", "seeds", "vs untrained", "vs sft",
                           "vs its SFT start"], rows, raw=True))
    for name in ("pass_rate_by_method", "pass_rate_by_family", "ranker_tau",
                 "training_curves"):
        out.append(_figure(figs.get(name)))
    if ev["stage_diags"]:
        keys = ["seed", "method", "event"] + [k for k in ROUND_KEYS + ["steps", "loss_first"]
                                              if any(k in x for x in ev["stage_diags"])]
        out += ["<h2>Stages of each method run</h2>",
                _table(keys, [[x.get(k, "") for k in keys] for x in ev["stage_diags"]])]
    out.append(_anchors_html(ev["anchors"], figs.get("anchors")))
    return "".join(out)


# ---- writing -------------------------------------------------------------------------------
def _figures(data: dict[str, Any], plots: Path) -> tuple[dict[str, dict[str, Any]], str]:
    """PNGs written to `plots` and kept in memory for embedding; (figures, note if none)."""
    try:
        from . import report_plots as rp
    except ImportError:
        return {}, ("Plots skipped: matplotlib is not installed (<code>pip install "
                    "matplotlib</code>, or the <code>report</code> extra).")
    plots.mkdir(parents=True, exist_ok=True)
    figs: dict[str, dict[str, Any]] = {}
    titles = {"training_steps": "Training curves per optimizer step",
              "candidates": "Candidate lengths and unfinished share per round",
              "score_spread": "Ranker score spread and tied share per round",
              "anchors": "Anchor lengths", "evaluation": "Held-out pass rate by family",
              "pass_rate_by_method": "Held-out pass rate by method",
              "pass_rate_by_family": "Pass rate by family and method",
              "ranker_tau": "Ranker quality (Kendall tau)",
              "training_curves": "Training loss per method"}
    if data["kind"] == "eval":
        from .eval.plots import write_plots  # the eval's own figures, reused as they are

        for name in write_plots(data["results"], plots) if data["results"] else []:
            stem = name.removesuffix(".png")
            figs[stem] = {"name": stem, "title": titles.get(stem, stem),
                          "png": (plots / name).read_bytes()}
        draw = [("anchors", rp.anchors_figure)]
    else:
        draw = list(rp.RUN_FIGURES)
    import io

    for name, fn in draw:
        fig = fn(data)
        if fig is None:
            continue
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        rp.close(fig)
        (plots / f"{name}.png").write_bytes(buf.getvalue())
        figs[name] = {"name": name, "title": titles.get(name, name), "png": buf.getvalue()}
    return figs, ""


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of `run_dir` (a run dir or an eval folder); returns the HTML's path."""
    d = Path(run_dir)
    is_eval = (d / "results.json").exists() and (d / "eval_config.json").exists()
    if not d.is_dir() or not (is_eval or (d / "config.resolved.yaml").exists()):
        raise EdgePuError(f"{d}: not a run dir (no config.resolved.yaml) nor an eval folder "
                          "(no results.json); pass the run_dir of `edge-pu run` or the --out "
                          "of `edge-pu eval`.")
    data = collect_eval(d) if is_eval else collect_run(d)
    path = Path(out) if out else d / REPORT_NAME
    figs, note = _figures(data, path.parent / PLOTS_DIR)
    body = _eval_body(data, figs) if is_eval else _run_body(data, figs)
    title = f"edge_pu {'evaluation' if is_eval else 'run'} report: {d.name}"
    page = (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{_e(title)}</h1><p class=note>"
            f"<code>{_e(d.resolve())}</code>, written {time.strftime('%Y-%m-%d %H:%M')} by "
            f"<code>edge-pu report</code>.</p>" + (f"<p class=note>{note}</p>" if note else "")
            + body + "</body></html>\n")
    write_atomic(path, page)
    return path


def report_at_end(run_dir: str | Path) -> Path | None:
    """The report a finished command writes; a failure to draw it does not fail the run."""
    try:
        path = write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - the run itself succeeded; say why, carry on
        print(f"[report] not written: {type(exc).__name__}: {exc} (rerun `edge-pu report "
              f"{run_dir}`)", file=sys.stderr, flush=True)
        return None
    print(f"[report] {path}", flush=True)
    return path
