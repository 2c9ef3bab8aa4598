"""The export gate: an artifact, run in its real runtime, against the merged torch model.

    ref = build_reference(TorchRunner(model, tokenizer), tokenizer, prompts)  # once per export
    report = run_gate(runner, ref, fmt="gguf", quant="q8_0", artifact=path, out_dir=out)
    # -> writes out/export_report.json, returns the report, raises GateFailed on a failed check

Checks (each: value, threshold, pass), over fixed prompts rendered with the chat template:
- `tokenization`: fraction of prompts the runtime's tokenizer encodes to the HF ids (== 1).
- `logits_max_abs`: max |logit difference| at the last prompt token, the one generation starts
  from (<= logits_rel x std of the reference's last-token logits, so one table fits models
  whose logits differ in scale: std 1.6 on the tiny test models, 3.4 on SmolLM2-135M).
- `top1_agreement`: fraction of all prompt positions with the same argmax token (>= threshold);
  every position rather than the last only, so 3 prompts give ~100 samples, not 3.
- `greedy_match`: mean over prompts of the matching prefix of N greedy tokens, as a fraction
  of N; the runtime decodes with its own KV cache (>= threshold).
Extra checks (the chat template check of a GGUF) are passed in as `extra`.

The thresholds are in THRESHOLDS, one row per weight type. They were set from numbers measured
with llama-cpp-python 0.3.36 on tiny random Llama/Qwen2 models and SmolLM2-135M, with headroom;
a GGUF written with the Llama q/k permutation left out scores top-1 0.11-0.15, greedy 0 and
logits_max_abs 3.9 x std at every type, so even the q4 row rejects it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_pu.export.errors import GateFailed
from edge_pu.export.runtimes import Runner

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = (
    "What is the capital city of France? Reply with one word.",
    "Sort these numbers in ascending order: 7, 2, 5, 11.",
    "Write a JSON object with a key name and a value.",
)
N_GREEDY = 8


@dataclass(frozen=True)
class Thresholds:
    logits_rel: float  # logits_max_abs <= logits_rel * std(reference last-token logits)
    top1_agreement: float  # >=
    greedy_match: float  # >=


# One table for every format: "f32" also covers ONNX (fp32) and the merged HF dir; a LoRA-GGUF
# is judged by its base GGUF's type. Measured with llama-cpp-python 0.3.36 on x86 CPU as
# (last-token max-abs / std, top-1, greedy); tiny = tests/tiny.py Llama (std 1.62):
#             tiny Llama            SmolLM2-135M (std 3.36)
#   f32       6e-6, 1, 1            3e-5, 1, 1          (f32 KV cache; ONNX: 2e-5, 1, 1)
#   f16       0.012, 1, 1           0.010, 1, 1
#   bf16      0.066, 0.98, 0.79     0.070, 1, 1
#   q8_0      0.15, 0.91, 0.96      0.39, 0.95, 1
#   q4_k_m    0.60, 0.64, 0.25      1.01, 0.93, 0.71
#   q4_1      1.27, 0.48, 0.17      0.27, 0.99, 1       (SmolLM2's own Q4_1 grid)
#   q4_0      1.93, 0.58, 0.38      3.86, 0.65, 0.33    (fails: logits move 3.9 std)
# A random tiny model is the hardest case for 4-bit: its logits have no structure to survive
# rounding (tiny Qwen2 at q4_0 keeps greedy 0.04 and fails). At q4/q5 the gate catches
# breakage (names, permutation, tokenizer, metadata) and gross loss, not the last bit of quality.
THRESHOLDS: dict[str, Thresholds] = {
    "f32": Thresholds(logits_rel=1e-3, top1_agreement=1.0, greedy_match=1.0),
    "f16": Thresholds(logits_rel=0.05, top1_agreement=0.97, greedy_match=0.75),
    "bf16": Thresholds(logits_rel=0.25, top1_agreement=0.9, greedy_match=0.5),
    "q8_0": Thresholds(logits_rel=0.75, top1_agreement=0.85, greedy_match=0.5),
    "q6": Thresholds(logits_rel=1.0, top1_agreement=0.7, greedy_match=0.3),
    "q5": Thresholds(logits_rel=2.0, top1_agreement=0.5, greedy_match=0.1),
    "q4": Thresholds(logits_rel=3.0, top1_agreement=0.4, greedy_match=0.1),
}


def thresholds_for(quant: str | None) -> tuple[str, Thresholds]:
    """The THRESHOLDS row for a weight type name (None = full fp32 precision)."""
    q = (quant or "f32").lower()
    for key in (q, q[:2]):
        if key in THRESHOLDS:
            return key, THRESHOLDS[key]
    return "q4", THRESHOLDS["q4"]  # q2/q3 K-quants: judged like q4, the loosest row


@dataclass
class Reference:
    """The merged torch model's behaviour on the gate's prompts (computed once per export)."""

    prompts: list[str]
    texts: list[str]
    ids: list[list[int]]
    logits: list[np.ndarray]
    greedy: list[list[int]]


def render_prompt(tokenizer: Any, prompt: str) -> str:
    """The prompt as the model sees it: one user turn through the chat template, if any."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt


def build_reference(
    runner: Runner, tokenizer: Any, prompts: list[str] | None = None, n_greedy: int = N_GREEDY
) -> Reference:
    prompts, n_greedy = list(prompts or DEFAULT_PROMPTS), n_greedy or N_GREEDY
    texts = [render_prompt(tokenizer, p) for p in prompts]
    ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    return Reference(
        prompts=prompts,
        texts=texts,
        ids=ids,
        logits=[runner.logits(i) for i in ids],
        greedy=[runner.greedy(i, n_greedy) for i in ids],
    )


def _check(value: float, threshold: float, op: str, **info: Any) -> dict[str, Any]:
    ok = value <= threshold if op == "<=" else value >= threshold
    return {
        "value": float(value),
        "threshold": float(threshold),
        "op": op,
        "pass": bool(ok),
        **info,
    }


def compare(runner: Runner, ref: Reference, th: Thresholds) -> tuple[dict, list[dict]]:
    """The four checks of `runner` against `ref`, and per-prompt details for the report."""
    n_greedy = len(ref.greedy[0])
    max_abs, agree, positions, greedy, tok_ok, details = 0.0, 0, 0, [], [], []
    for text, ids, logits, want in zip(ref.texts, ref.ids, ref.logits, ref.greedy, strict=True):
        got_ids = runner.tokenize(text)
        if got_ids is not None:
            tok_ok.append(got_ids == ids)
        out = runner.logits(ids)
        max_abs = max(max_abs, float(np.abs(out[-1] - logits[-1]).max()))
        agree += int((out.argmax(-1) == logits.argmax(-1)).sum())
        positions += len(ids)
        got = runner.greedy(ids, n_greedy)
        prefix = next(
            (i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), n_greedy
        )
        greedy.append(prefix / n_greedy)
        details.append(
            {
                "tokens_match": None if got_ids is None else got_ids == ids,
                "reference_greedy": want,
                "artifact_greedy": got,
            }
        )
    checks = {}
    if tok_ok:
        checks["tokenization"] = _check(sum(tok_ok) / len(tok_ok), 1.0, ">=")
    scale = float(np.mean([logits[-1].std() for logits in ref.logits]))
    checks["logits_max_abs"] = _check(
        max_abs, th.logits_rel * scale, "<=", rule=f"{th.logits_rel} x std {scale:.4g}"
    )
    checks["top1_agreement"] = _check(agree / positions, th.top1_agreement, ">=")
    checks["greedy_match"] = _check(float(np.mean(greedy)), th.greedy_match, ">=")
    return checks, details


def write_report(report: dict[str, Any], out_dir: str | Path) -> Path:
    """Write `report` to out_dir/export_report.json; returns the path."""
    path = Path(out_dir) / "export_report.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    return path


def run_gate(
    runner: Runner,
    ref: Reference,
    *,
    fmt: str,
    quant: str | None,
    artifact: str | Path,
    out_dir: str | Path | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
    decode: Any = None,
) -> dict[str, Any]:
    """Run the gate; write export_report.json to out_dir; raise GateFailed if a check fails."""
    row, th = thresholds_for(quant)
    checks, details = compare(runner, ref, th)
    checks.update(extra or {})
    for prompt, detail in zip(ref.prompts, details, strict=True):
        detail["prompt"] = prompt
        if decode is not None:
            detail["reference_text"] = decode(detail["reference_greedy"])
            detail["artifact_text"] = decode(detail["artifact_greedy"])
    failed = [k for k, c in checks.items() if not c["pass"]]
    report = {
        "format": fmt,
        "quant": quant,
        "artifact": str(artifact),
        "threshold_row": row,
        "thresholds": asdict(th),
        "checks": checks,
        "prompts": details,
        "passed": not failed,
    }
    for name, c in checks.items():
        log.info(
            "gate %-15s %.6g (%s %g) %s",
            name,
            c["value"],
            c["op"],
            c["threshold"],
            "ok" if c["pass"] else "FAILED",
        )
    if out_dir is not None:
        write_report(report, out_dir)
    if failed:
        why = "; ".join(
            f"{k} = {checks[k]['value']:.6g} (needs {checks[k]['op']} {checks[k]['threshold']:.4g})"
            for k in failed
        )
        raise GateFailed(f"export gate failed for {artifact}: {why}", report)
    return report
