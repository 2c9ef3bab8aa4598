"""PNG figures of one run for its report (edge_pu.report): training curves per step across the
SFT stage and the PU rounds, candidate lengths, score spreads, anchor lengths, before/after
evaluation. matplotlib, headless (Agg); importing this module raises ImportError without it.

Each function takes the plain dict `edge_pu.report.collect_run` builds and returns a figure, or
None when the run has nothing to draw for it.
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Step-metric panels: (title, [(metrics key, label)]); a panel is drawn when any key is logged.
PANELS: list[tuple[str, list[tuple[str, str]]]] = [
    ("loss", [("loss", "loss")]),
    ("reward margin (DPO, beta * log-ratio)", [("reward_margin", "margin"),
                                               ("chosen_reward", "chosen"),
                                               ("rejected_reward", "rejected")]),
    ("accuracy / agreement", [("reward_accuracy", "reward accuracy"),
                              ("top1_agreement", "top-1 agreement"),
                              ("clip_fraction", "clipped tokens")]),
    ("KL to the reference", [("kl", "per-token KL (step)"),
                             ("log_ratio", "mean token log-ratio (step)")]),
    ("learning rate", [("lr", "lr")]),
    ("gradient norm", [("grad_norm", "grad norm")]),
]
COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]


def close(fig: Any) -> None:
    plt.close(fig)


def steps_figure(run: dict[str, Any]) -> Any:
    """Every optimizer step on one x axis: the SFT stage, then each PU round (dashed lines)."""
    rows = [("sft", m) for m in run["sft_steps"]] + [(f"round {m.get('round', 1)}", m)
                                                    for m in run["pu_steps"]]
    if not rows:
        return None
    panels = [(t, [(k, lab) for k, lab in keys if any(k in m for _, m in rows)])
              for t, keys in PANELS]
    has_round_kl = any("kl_to_reference" in r for r in run["rounds"])
    panels = [(t, keys) for t, keys in panels if keys or (t.startswith("KL") and has_round_kl)]
    cols = 2
    nrows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(nrows, cols, figsize=(10, 2.6 * nrows), squeeze=False,
                             sharex=True)
    xs = list(range(1, len(rows) + 1))
    bounds = [i + 0.5 for i in range(1, len(rows)) if rows[i][0] != rows[i - 1][0]]
    for ax, (title, keys) in zip(axes.flat, panels, strict=False):
        for c, (key, label) in enumerate(keys):
            for stage in dict.fromkeys(s for s, _ in rows):  # one line per stage and key
                pts = [(x, m[key]) for x, (s, m) in zip(xs, rows, strict=True)
                       if s == stage and key in m]
                if pts:
                    ax.plot(*zip(*pts, strict=True), lw=1.3, marker="." if len(pts) < 30 else "",
                            color=COLORS[c % len(COLORS)],
                            label=label if stage == next(s for s, m in rows if key in m) else None)
        if title.startswith("KL"):  # the round-level estimates, at the round's first/last step
            _round_kl(ax, run, rows)
        for b in bounds:
            ax.axvline(b, color="gray", ls="--", lw=0.8)
        if ax is axes.flat[0]:  # name the stages once, above the first panel
            starts = [0.5] + bounds + [len(rows) + 0.5]
            names = list(dict.fromkeys(s for s, _ in rows))
            for lo, hi, stage in zip(starts, starts[1:], names, strict=False):
                ax.text((lo + hi) / 2, 1.0, stage, transform=ax.get_xaxis_transform(),
                        ha="center", va="bottom", fontsize=7, color="gray")
        ax.set_title(title, fontsize=9, pad=12 if ax is axes.flat[0] else 6)
        ax.tick_params(labelsize=7)
        if len(keys) > 1 or title.startswith("KL"):
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    for ax in axes.flat:
        ax.xaxis.set_tick_params(labelbottom=True)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step (SFT, then PU rounds)", fontsize=8)
    stages = list(dict.fromkeys(s for s, _ in rows))
    fig.suptitle("Training, per optimizer step: " + " | ".join(stages), fontsize=10)
    fig.tight_layout()
    return fig


def _round_kl(ax: Any, run: dict[str, Any], rows: list[tuple[str, dict[str, Any]]]) -> None:
    for r in run["rounds"]:
        idx = [i + 1 for i, (s, _) in enumerate(rows) if s == f"round {r['round']}"]
        if not idx:
            continue
        if "kl_to_reference" in r:
            ax.scatter([idx[0]], [r["kl_to_reference"]], color="black", marker="o", s=18,
                       zorder=3, label="sequence KL, round start" if r is run["rounds"][0]
                       else None)
        if "kl_to_reference_end" in r:
            ax.scatter([idx[-1]], [r["kl_to_reference_end"]], color="black", marker="x", s=24,
                       zorder=3, label="sequence KL, round end" if r is run["rounds"][0]
                       else None)


def candidates_figure(run: dict[str, Any]) -> Any:
    """Candidate lengths per round (histograms) and the share that never reached EOS."""
    rounds = run["candidates"]
    if not rounds:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 2.9), gridspec_kw={"width_ratios": [2, 1]})
    top = max(max(c["lengths"], default=1) for c in rounds.values())
    bins = list(range(0, top + 2, max(1, (top + 1) // 30)))
    for i, (r, c) in enumerate(rounds.items()):
        a.hist(c["lengths"], bins=bins, histtype="step", lw=1.4, color=COLORS[i % len(COLORS)],
               label=f"round {r} (mean {c['mean_length']:.1f})")
    if run.get("max_new_tokens"):
        a.axvline(run["max_new_tokens"], color="gray", ls="--", lw=0.8,
                  label="sampling.max_new_tokens")
    a.set_xlabel("candidate length (tokens)", fontsize=8)
    a.set_ylabel("candidates", fontsize=8)
    a.legend(fontsize=7)
    a.set_title("Candidate lengths", fontsize=9)
    _share_bars(b, rounds, [100 * c["unfinished_share"] for c in rounds.values()], "#c44e52",
                "% of candidates", "Unfinished (no EOS)")
    return _finish(fig, (a, b))


def scores_figure(run: dict[str, Any]) -> Any:
    """Per prompt, max - min of the ranker's scores over its K candidates; tied prompts."""
    rounds = run["scores"]
    if not rounds:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 2.9), gridspec_kw={"width_ratios": [2, 1]})
    for i, (r, s) in enumerate(rounds.items()):
        a.hist(s["spreads"], bins=20, histtype="step", lw=1.4, color=COLORS[i % len(COLORS)],
               label=f"round {r} (mean {s['spread_mean']:.3g})")
    a.set_xlabel(f"score spread per prompt (max - min, ranker {run.get('ranker', '?')})",
                 fontsize=8)
    a.set_ylabel("prompts", fontsize=8)
    a.legend(fontsize=7)
    a.set_title("Score spread", fontsize=9)
    _share_bars(b, rounds, [100 * s["tied_share"] for s in rounds.values()], "#8172b3",
                "% of prompts", "Tied (no signal)")
    return _finish(fig, (a, b))


def _share_bars(ax: Any, rounds: dict[Any, Any], pct: list[float], color: str, ylabel: str,
                title: str) -> None:
    """One bar per round with its percentage written on top."""
    ax.bar([f"r{r}" for r in rounds], pct, color=color)
    for x, v in enumerate(pct):
        ax.text(x, v, f"{v:.0f}%", ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, 105)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)


def _finish(fig: Any, axes: Any) -> Any:
    for ax in axes:
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def anchors_figure(run: dict[str, Any]) -> Any:
    a = run["anchors"]
    if not a["lengths"]:
        return None
    fig, ax = plt.subplots(figsize=(6, 2.8))
    full = [n for n, t in zip(a["lengths"], a["truncated_flags"], strict=True) if not t]
    cut = [n for n, t in zip(a["lengths"], a["truncated_flags"], strict=True) if t]
    ax.hist([full, cut], bins=20, stacked=True, color=["#55a868", "#c44e52"],
            label=["complete", f"truncated at teacher.max_tokens ({len(cut)})"])
    ax.set_xlabel(f"anchor length ({a['unit']})", fontsize=8)
    ax.set_ylabel("anchors", fontsize=8)
    ax.set_title(f"Anchor lengths ({len(a['lengths'])} anchors)", fontsize=9)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def evaluation_figure(run: dict[str, Any]) -> Any:
    """Held-out pass rate per family for each evaluation of the run (demo: before/after)."""
    ev = run.get("evaluation") or {}
    cols = [(name, res) for name, res in ev.get("columns", []) if res]
    if not cols:
        return None
    fams = list(cols[0][1]["by_family"]) + ["all"]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(fams) + 2), 3.0))
    width = 0.8 / len(cols)
    for i, (name, res) in enumerate(cols):
        vals = [100 * res["by_family"][f]["pass_rate"] for f in fams[:-1]]
        vals.append(100 * res["pass_rate"])
        ax.bar([x + (i - (len(cols) - 1) / 2) * width for x in range(len(fams))], vals, width,
               label=f"{name} ({100 * res['pass_rate']:.0f}%)", color=COLORS[i % len(COLORS)])
    ax.set_xticks(range(len(fams)), fams, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("held-out pass rate (%)", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_title("Held-out evaluation (greedy)", fontsize=9)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


RUN_FIGURES = (("training_steps", steps_figure), ("candidates", candidates_figure),
               ("score_spread", scores_figure), ("anchors", anchors_figure),
               ("evaluation", evaluation_figure))
