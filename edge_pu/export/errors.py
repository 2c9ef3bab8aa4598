"""Errors raised by edge_pu.export; all are `EdgePuError`s, so the CLI prints them and exits.

- `UnsupportedArchitecture`: the model's architecture (or one of its options, such as a RoPE
  scaling type) has no verified writer; the message names it and the supported ones.
- `ExportError`: an input is unusable (a quantized base to merge into, an unknown tokenizer,
  a tensor the name map does not know); the message names the file or field.
- `GateFailed`: the exported artifact disagrees with the merged torch model beyond the stated
  thresholds; the message lists each failed check with its value and threshold, and `report`
  holds the whole report (also written to export_report.json).
"""

from __future__ import annotations

from typing import Any

from edge_pu.errors import EdgePuError


class ExportError(EdgePuError):
    """An export input is unusable; the message names the file or field and what to do."""


class UnsupportedArchitecture(ExportError):
    """The architecture (or an option of it) cannot be exported to this format."""

    def __init__(self, architecture: str, supported: list[str], detail: str = "") -> None:
        self.architecture = architecture
        self.supported = sorted(supported)
        what = f"architecture {architecture!r}" + (f" ({detail})" if detail else "")
        super().__init__(
            f"cannot export {what}: supported architectures are {', '.join(self.supported)}. "
            "Writing it anyway could produce a file that loads but computes something else."
        )


class GateFailed(EdgePuError):
    """The verification gate rejected an artifact; `report` holds every check's numbers."""

    exit_code = 3

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report
