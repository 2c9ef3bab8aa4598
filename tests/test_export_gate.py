"""The gate's arithmetic on hand-made logits (no model, no runtime): each number derived below."""

from __future__ import annotations

import numpy as np
import pytest

from edge_pu.export import GateFailed
from edge_pu.export.verify import Reference, compare, run_gate, thresholds_for


class FakeRunner:
    """Returns fixed logits and a fixed greedy continuation; tokenizes like the reference."""

    def __init__(self, logits: np.ndarray, greedy: list[int], ids: list[int]) -> None:
        self._logits, self._greedy, self._ids = logits, greedy, ids

    def logits(self, ids: list[int]) -> np.ndarray:
        return self._logits

    def greedy(self, ids: list[int], n: int) -> list[int]:
        return self._greedy[:n]

    def tokenize(self, text: str) -> list[int] | None:
        return self._ids


REF_LOGITS = np.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]], dtype=np.float32)
REF = Reference(
    prompts=["p"], texts=["t"], ids=[[4, 5, 6]], logits=[REF_LOGITS], greedy=[[1, 2, 0, 1]]
)


def test_checks_on_hand_made_logits() -> None:
    """Artifact logits: position 1 argmax moves to token 0 (top-1 2/3); the last row is off by
    [0.5, -0.25, 0] (max-abs 0.5); greedy [1, 2, 1, 1] vs [1, 2, 0, 1] matches a prefix of 2 of
    4 tokens (0.5). The last reference row [0, 0, 3] has std sqrt(2) = 1.4142, so the q8_0
    threshold is 0.75 x 1.4142 = 1.0607 (pass) and f16's is 0.05 x 1.4142 = 0.0707 (fail)."""
    art = REF_LOGITS.copy()
    art[1] = [4.0, 3.0, 0.0]
    art[2] += [0.5, -0.25, 0.0]
    runner = FakeRunner(art, [1, 2, 1, 1], [4, 5, 6])
    checks, details = compare(runner, REF, thresholds_for("q8_0")[1])
    assert checks["logits_max_abs"]["value"] == pytest.approx(0.5)
    assert checks["logits_max_abs"]["threshold"] == pytest.approx(0.75 * np.sqrt(2), rel=1e-6)
    assert checks["top1_agreement"]["value"] == pytest.approx(2 / 3)
    assert checks["greedy_match"]["value"] == pytest.approx(0.5)
    assert checks["tokenization"]["value"] == 1.0
    assert details[0]["artifact_greedy"] == [1, 2, 1, 1]

    checks16, _ = compare(runner, REF, thresholds_for("f16")[1])
    assert checks16["logits_max_abs"]["threshold"] == pytest.approx(0.05 * np.sqrt(2), rel=1e-6)
    assert not checks16["logits_max_abs"]["pass"]


def test_gate_failure_names_every_failed_check_with_numbers() -> None:
    """Wrong tokenization (1 of 1 prompts) and top-1 2/3 < 0.97 fail the f16 row."""
    art = REF_LOGITS.copy()
    art[1] = [4.0, 3.0, 0.0]
    runner = FakeRunner(art, [1, 2, 0, 1], [4, 5])
    with pytest.raises(GateFailed) as info:
        run_gate(runner, REF, fmt="gguf", quant="f16", artifact="m.gguf")
    message = str(info.value)
    assert "tokenization = 0 (needs >= 1)" in message
    assert "top1_agreement = 0.666667 (needs >= 0.97)" in message
    assert "greedy_match" not in message and info.value.report["passed"] is False


@pytest.mark.parametrize(
    ("quant", "row"),
    [
        (None, "f32"),
        ("f16", "f16"),
        ("q8_0", "q8_0"),
        ("q4_k_m", "q4"),
        ("q5_1", "q5"),
        ("q6_k", "q6"),
        ("q2_k", "q4"),
    ],
)
def test_threshold_rows(quant: str | None, row: str) -> None:
    assert thresholds_for(quant)[0] == row
