"""What a command shows on the console: logging, library warnings, --quiet / --json, and the
final summary that names where everything is. Set up by the CLI entry (edge_pu.cli.main) only:
importing edge_pu changes nothing.

- `configure_logging()`: edge_pu's log on stderr from INFO up (`EDGE_PU_LOG=debug`: all).
  Warnings go through the log (`logging.captureWarnings`); FutureWarnings and deprecation
  warnings raised by other packages (torch, transformers, peft...) are logged at debug level,
  so a normal run does not print them between the progress bars; edge_pu's own warnings and
  every other category still show. The libraries' own progress bars (loading weights, writing
  shards) are turned off through HF_HUB_DISABLE_PROGRESS_BARS, unless it is already set.
- `command_output(quiet=..., as_json=...)`: around a command's work. `--json` sends everything
  the command prints to stderr, so stdout holds only the JSON summary; `--quiet` prints nothing
  but errors and the summary. Both also redirect the process's file descriptors, so what C
  libraries print (llama.cpp) cannot end up in the JSON either.
- `run_summary(run_dir)` / `demo_summary(run_dir)` and `print_summary(summary, as_json=...)`:
  the run dir, the adapter, the report, the metrics and the exports, as a short block or JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

_LIBRARY_NOISE = (FutureWarning, DeprecationWarning, PendingDeprecationWarning)
_PACKAGE_DIR = str(Path(__file__).resolve().parent)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at emit time (main() may run many times per process)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def configure_logging() -> None:
    # The loggers keep every record, debug included (for any handler a caller adds); the
    # console shows INFO and up.
    shown = logging.DEBUG if os.environ.get("EDGE_PU_LOG", "").lower() == "debug" else \
        logging.INFO
    for name in ("edge_pu", "py.warnings"):  # stage progress of modules that log; warnings
        log = logging.getLogger(name)
        handler = next((h for h in log.handlers if isinstance(h, _StderrHandler)), None)
        if handler is None:
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
            log.addHandler(handler)
        handler.setLevel(shown)
        log.setLevel(logging.DEBUG)
        log.propagate = name == "edge_pu"  # warnings print once, here
    # Warnings become records of the py.warnings logger, as logging.captureWarnings makes them
    # (which also keeps the original for captureWarnings(False) to restore), with the level
    # chosen by _showwarning.
    logging.captureWarnings(True)
    warnings.showwarning = _showwarning
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _showwarning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
    """A warning as a py.warnings record: debug for another package's future and deprecation
    notices, warning for the rest."""
    ours = os.path.abspath(filename).startswith(_PACKAGE_DIR)
    noise = issubclass(category, _LIBRARY_NOISE) and not ours
    logging.getLogger("py.warnings").log(
        logging.DEBUG if noise else logging.WARNING, "%s",
        warnings.formatwarning(message, category, filename, lineno, line).rstrip())


@contextlib.contextmanager
def _redirect(name: str, fd: int, target: TextIO) -> Iterator[None]:
    """sys.<name> and the OS-level descriptor `fd` both to `target`, then back."""
    stream = getattr(sys, name)
    stream.flush()
    try:
        target_fd = target.fileno()
        saved = os.dup(fd)
    except (AttributeError, OSError, ValueError):  # a capture object (tests): Python-level only
        target_fd = saved = -1
    if saved >= 0:
        os.dup2(target_fd, fd)
    setattr(sys, name, target)
    try:
        yield
    finally:
        target.flush()
        setattr(sys, name, stream)
        if saved >= 0:
            os.dup2(saved, fd)
            os.close(saved)


@contextlib.contextmanager
def command_output(*, quiet: bool = False, as_json: bool = False) -> Iterator[None]:
    if not (quiet or as_json):
        yield
        return
    with contextlib.ExitStack() as stack:
        if quiet:
            sink: TextIO = stack.enter_context(open(os.devnull, "w", encoding="utf-8"))
            stack.enter_context(_redirect("stderr", 2, sink))
        else:
            sink = sys.stderr
        stack.enter_context(_redirect("stdout", 1, sink))
        yield


# ---- the final summary -------------------------------------------------------------------
def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _existing(path: Path) -> str | None:
    return str(path.resolve()) if path.exists() else None


def run_summary(run_dir: str | Path, command: str = "run") -> dict[str, Any]:
    """Where a finished run's outputs are, and its numbers (from run_dir/summary.json)."""
    d = Path(run_dir)
    metrics = _read(d / "summary.json")
    exports = metrics.pop("exports", {}) or {}
    return {
        "command": command, "run_dir": str(d.resolve()), "adapter": _existing(d / "adapter"),
        "report": _existing(d / "report.html"),
        "files": {name: _existing(d / file) for name, file in (
            ("config", "config.resolved.yaml"), ("anchors", "anchors.jsonl"),
            ("metrics", "metrics.jsonl"), ("summary", "summary.json"),
            ("teacher_failures", "teacher_failures.jsonl")) if (d / file).exists()},
        "metrics": metrics,
        "exports": {fmt: {"passed": e.get("passed"), "artifacts": e.get("artifacts") or []}
                    for fmt, e in exports.items()},
    }


def demo_summary(run_dir: str | Path) -> dict[str, Any]:
    """run_summary plus the demo's held-out pass rates and its gated exports."""
    d = Path(run_dir)
    out = run_summary(d, "demo")
    demo = _read(d / "demo_report.json")
    out["files"]["demo_report"] = _existing(d / "demo_report.json")
    out["metrics"]["pass_rate"] = {k: (demo.get(k) or {}).get("pass_rate")
                                   for k in ("before", "after_sft", "after") if demo.get(k)}
    if (demo.get("teacher") or {}).get("anchor_pass"):  # a real teacher (demo --preset qwen)
        share = demo["teacher"]["anchor_pass"]
        out["metrics"]["teacher_anchor_pass"] = {k: share[k]
                                                 for k in ("passed", "anchored", "share")}
    for fmt, gate in (demo.get("exports") or {}).items():
        folder = d / "export" / fmt
        out["exports"][fmt] = {"passed": gate.get("passed"), "artifacts": sorted(
            str(p.resolve()) for p in folder.iterdir() if p.is_file()) if folder.is_dir()
            else []}
    return out


def _headline(summary: dict[str, Any]) -> list[str]:
    m = summary["metrics"]
    lines = []
    if "prompts" in m:
        lines.append(f"{m.get('anchored', 0)} of {m['prompts']} prompts anchored, "
                     f"{m.get('teacher_requests_total', 0)} teacher requests in all, "
                     f"{m.get('seconds', 0):.0f}s")
    sft = m.get("sft") or {}
    if "loss_first" in sft:
        lines.append(f"SFT: loss {sft['loss_first']:.3f} -> {sft['loss_last']:.3f} in "
                     f"{sft.get('steps')} steps")
    for r in m.get("rounds") or []:
        # After the round where the run measured it (DPO pairs, KL at the end), else its last step.
        shown = [f"{name} {v:.3f}" for name, keys in (
            ("loss", ("loss_last",)), ("reward accuracy", ("reward_accuracy",
                                                           "reward_accuracy_last")),
            ("KL to reference", ("kl_to_reference_end", "kl_to_reference")))
            if isinstance(v := next((r[k] for k in keys if k in r), None), (int, float))]
        lines.append(f"PU round {r.get('round')}: " + ", ".join(shown))
    if share := m.get("teacher_anchor_pass"):
        lines.append(f"teacher anchors passing the task checker: {share['share']:.0%} "
                     f"({share['passed']} of {share['anchored']})")
    rates = m.get("pass_rate") or {}
    if rates:
        lines.append("held-out pass rate: " + ", ".join(
            f"{k.replace('_', ' ')} {v:.0%}" for k, v in rates.items() if v is not None))
    return lines


def print_summary(summary: dict[str, Any], *, as_json: bool = False) -> None:
    """The summary on stdout: JSON (one object) or a short block of where everything is."""
    if as_json:
        print(json.dumps(summary, indent=2), flush=True)
        return
    rows = [("run dir", summary["run_dir"]), ("adapter", summary["adapter"]),
            ("report", summary["report"])]
    rows += [(name.replace("_", " "), path) for name, path in summary["files"].items()]
    rows += [(f"export {fmt}", f"{'passed' if e['passed'] else 'FAILED'}: "
              + (", ".join(e["artifacts"]) or "(no files)"))
             for fmt, e in summary["exports"].items()]
    out = [f"\nedge-pu {summary['command']}: done"] + [f"  {line}" for line in
                                                       _headline(summary)]
    out += [f"  {name:<17} {value}" for name, value in rows if value]
    print("\n".join(out), flush=True)
