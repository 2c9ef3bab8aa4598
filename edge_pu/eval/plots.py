"""PNG plots of an evaluation (matplotlib, headless Agg): training curves, pass rate by method,
pass rate by family and method, ranker tau. Importing this module raises ImportError when
matplotlib is missing; edge_pu.eval.report then skips the plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

from .results import family_rows

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def write_plots(r: dict[str, Any], out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in (("pass_rate_by_method.png", _by_method),
                       ("pass_rate_by_family.png", _by_family),
                       ("ranker_tau.png", _ranker_tau),
                       ("training_curves.png", _curves)):
        fig = draw(r)
        if fig is not None:
            fig.savefig(out / name, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(name)
    return written


def _by_method(r: dict[str, Any]) -> Any:
    names = list(r["methods"])
    means = [100 * r["methods"][n]["pass_rate_mean"] for n in names]
    sds = [100 * r["methods"][n]["pass_rate_sd"] for n in names]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names)), 3.6))
    ax.bar(names, means, yerr=sds, capsize=3, color="#4c72b0")
    ax.axhline(100 * r["before"]["pass_rate"], color="gray", ls="--", lw=1, label="untrained")
    ax.set_ylabel("held-out pass rate (%)")
    ax.set_title(f"Held-out pass rate, mean ± sd over {r['options']['seeds']} seed(s)")
    ax.legend(loc="upper right", fontsize=8)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    return fig


def _by_family(r: dict[str, Any]) -> Any:
    rows = family_rows(r)
    names, fams = list(rows), list(r["before"]["by_family"])
    grid = [[100 * rows[n][f] for f in fams] for n in names]
    fig, ax = plt.subplots(figsize=(1.0 * len(fams) + 2, 0.45 * len(names) + 1.5))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(fams)), fams, rotation=35, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 60 else "black")
    fig.colorbar(im, ax=ax, label="pass rate (%)")
    ax.set_title("Held-out pass rate by family and method")
    return fig


def _ranker_tau(r: dict[str, Any]) -> Any:
    specs = [s for s, k in r["rankers"].items() if k["mean_tau"] is not None]
    if not specs:
        return None
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(specs)), 3.2))
    ax.bar(specs, [r["rankers"][s]["mean_tau"] for s in specs],
           yerr=[r["rankers"][s]["mean_tau_sd"] for s in specs], capsize=3, color="#55a868")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("mean Kendall tau vs checker")
    ax.set_title("Ranker quality over each prompt's K candidates")
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    return fig


def _curves(r: dict[str, Any]) -> Any:
    curves = r["curves"]
    if not curves:
        return None
    cols = min(3, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
    for ax, (name, by_seed) in zip(axes.flat, curves.items(), strict=False):
        for seed, losses in by_seed.items():
            ax.plot(range(1, len(losses) + 1), losses, lw=1.2, label=f"seed {seed}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    fig.suptitle("Training loss per optimizer step")
    fig.tight_layout()
    return fig
