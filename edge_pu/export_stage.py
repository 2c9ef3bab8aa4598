"""The export stage: `edge-pu export RUN_DIR --format F [--quant Q]`, and the `export:` section
that makes `edge-pu run` end with verified artifacts.

Each format lands in RUN_DIR/export/<format>/ with its export_report.json (edge_pu.export).
A format whose report says it passed, written after the current adapter, is not redone: a
killed export resumes with the formats it had not finished.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import EdgePuError


def _passed_and_fresh(out: Path, adapter: Path) -> bool:
    report = out / "export_report.json"
    if not report.exists():
        return False
    try:
        ok = bool(json.loads(report.read_text()).get("passed"))
    except ValueError:
        return False
    newest = max((p.stat().st_mtime for p in adapter.iterdir()), default=0.0)
    return ok and report.stat().st_mtime >= newest


def export_run(run_dir: str | Path, fmt: str, *, quant: str | None = None,
               prompts: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Export RUN_DIR's adapter on its student to `fmt`, verified; returns the gate's report."""
    import yaml

    from .export import export

    run_dir = Path(run_dir)
    saved = run_dir / "config.resolved.yaml"
    adapter = run_dir / "adapter"
    if not saved.exists() or not (adapter / "adapter_config.json").exists():
        raise EdgePuError(f"{run_dir}: not a finished run (needs config.resolved.yaml and "
                          "adapter/); run `edge-pu run` first.")
    student_cfg = (yaml.safe_load(saved.read_text()) or {}).get("student", {})
    student = student_cfg.get("path", "")
    if not student or not Path(student).exists():
        raise EdgePuError(f"{saved}: student.path {student!r} does not exist here; the export "
                          "merges the adapter into the weights it was trained on.")
    if student_cfg.get("quant") == "nf4":  # QLoRA: the base training saw is the NF4 one
        from .quant.nf4 import nf4_base_dir
        from .quant.student import resolve_student

        student = str(nf4_base_dir(resolve_student(student)[0]))
    elif student_cfg.get("import_as"):  # the re-quantized student's dequantized weights
        from .quant.student import resolve_student

        student = str(resolve_student(student, student_cfg["import_as"])[0])
    out = run_dir / "export" / (fmt if not quant else f"{fmt}-{quant}")
    if not force and _passed_and_fresh(out, adapter):
        print(f"[export] {fmt}: already verified in {out}", flush=True)
        return dict(json.loads((out / "export_report.json").read_text()))
    print(f"[export] {fmt}{' ' + quant if quant else ''}: merging and writing to {out}",
          flush=True)
    report = export((student, adapter), fmt, out, quant=quant, prompts=prompts)
    print(f"[export] {fmt}: gate passed; report in {out / 'export_report.json'}", flush=True)
    return report
