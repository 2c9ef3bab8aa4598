"""The anchor store: exactly one teacher answer per prompt, ever.

Files in the run dir:
- `anchors.jsonl`: one line per anchored prompt, appended and fsynced the moment the answer
  arrives: {"key", "id", "prompt", "anchor", "teacher"}. The key is a hash of (teacher identity,
  prompt, generation settings), so a rerun, a restart or another run dir that imports these
  anchors makes no new call for a prompt it already has.
- `teacher_ledger.jsonl`: one line per HTTP request/attempt sent to the teacher (ok or not). It is
  what `teacher.max_calls` is checked against, across restarts, and what the tests count.
- `teacher_failures.jsonl`: prompts that could not be anchored, with the reason; reported at the
  end of the stage without stopping the other prompts.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import TeacherConfig
from .data import Prompt
from .errors import EdgePuError
from .jsonl import append_jsonl, read_jsonl
from .teachers.base import Teacher, TeacherError, generation_settings


def anchor_key(identity: str, prompt: str, settings: dict[str, Any]) -> str:
    blob = json.dumps([identity, prompt, settings], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


@dataclass
class AnchorReport:
    total: int
    cached: int
    new: int
    failed: int
    requests: int  # HTTP requests/attempts sent in this stage (retries included)


class AnchorStore:
    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        self.path = self.dir / "anchors.jsonl"
        self.ledger = self.dir / "teacher_ledger.jsonl"
        self.failures = self.dir / "teacher_failures.jsonl"
        self.by_key: dict[str, dict[str, Any]] = {r["key"]: r for r in read_jsonl(self.path)}

    def requests_made(self) -> int:
        return len(read_jsonl(self.ledger))

    def anchor_for(self, key: str) -> str | None:
        rec = self.by_key.get(key)
        return None if rec is None else rec["anchor"]

    def add(self, rec: dict[str, Any]) -> None:
        append_jsonl(self.path, [rec])
        self.by_key[rec["key"]] = rec

    def fetch(self, prompts: Sequence[Prompt], teacher: Teacher, cfg: TeacherConfig, *,
              progress: Callable[[int], None] | None = None,
              sleep: Callable[[float], None] = time.sleep) -> AnchorReport:
        """Anchor every prompt not yet in the store; one successful call per prompt."""
        settings = generation_settings(cfg)
        spent = self.requests_made()
        report = AnchorReport(len(prompts), 0, 0, 0, 0)
        rng = random.Random(0)
        for prompt in prompts:
            key = anchor_key(teacher.identity, prompt.text, settings)
            if key in self.by_key:
                report.cached += 1
            else:
                outcome = self._ask(prompt, key, teacher, cfg, spent, rng, sleep)
                report.requests += outcome
                spent += outcome
                if key in self.by_key:
                    report.new += 1
                else:
                    report.failed += 1
            if progress:
                progress(1)
        return report

    def _ask(self, prompt: Prompt, key: str, teacher: Teacher, cfg: TeacherConfig,
             spent: int, rng: random.Random, sleep: Callable[[float], None]) -> int:
        """Try one prompt with bounded retries; returns the requests sent."""
        sent = 0
        error = "no attempt made"
        for attempt in range(cfg.retries + 1):
            if cfg.max_calls and spent + sent >= cfg.max_calls:
                error = f"teacher budget exhausted (teacher.max_calls = {cfg.max_calls})"
                break
            sent += 1
            started = time.time()
            try:
                text = teacher.answer(prompt.text)
            except TeacherError as exc:
                self._log(key, prompt, attempt, "error", str(exc), started)
                error = str(exc)
                if exc.fatal:
                    raise EdgePuError(f"teacher ({teacher.identity}): {exc}") from None
                if not exc.retryable:
                    break
                wait = exc.retry_after if exc.retry_after is not None else (
                    cfg.backoff_s * 2**attempt * (0.5 + rng.random()))
                if attempt < cfg.retries:
                    sleep(min(wait, 60.0))
                continue
            # The answer is written before the ledger says "ok": a crash in between leaves an
            # anchor without a ledger line (never a paid call without its anchor on disk).
            self.add({"key": key, "id": prompt.id, "prompt": prompt.text, "anchor": text,
                      "teacher": teacher.identity})
            self._log(key, prompt, attempt, "ok", "", started)
            return sent
        append_jsonl(self.failures, [{"key": key, "id": prompt.id, "error": error,
                                      "attempts": sent, "time": time.time()}])
        return sent

    def _log(self, key: str, prompt: Prompt, attempt: int, status: str, error: str,
             started: float) -> None:
        append_jsonl(self.ledger, [{"key": key, "id": prompt.id, "attempt": attempt,
                                    "status": status, "error": error,
                                    "seconds": round(time.time() - started, 3)}])

    def anchors_for(self, prompts: Sequence[Prompt], identity: str,
                    cfg: TeacherConfig) -> dict[str, str]:
        """prompt id -> anchor, for the prompts that have one."""
        settings = generation_settings(cfg)
        out = {}
        for p in prompts:
            text = self.anchor_for(anchor_key(identity, p.text, settings))
            if text is not None:
                out[p.id] = text
        return out

    def export(self, path: str | Path) -> int:
        recs = list(self.by_key.values())
        append_jsonl(path, recs)
        return len(recs)

    def import_file(self, path: str | Path, identity: str, cfg: TeacherConfig) -> int:
        """Add anchors from a JSONL ({"prompt", "anchor"} and optionally "key"); returns added."""
        settings = generation_settings(cfg)
        added = 0
        for line, rec in enumerate(read_jsonl(path), start=1):
            if not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("anchor"), str):
                raise EdgePuError(f"{path}:{line}: needs \"prompt\" and \"anchor\" strings.")
            key = rec.get("key") or anchor_key(identity, rec["prompt"], settings)
            if key not in self.by_key:
                self.add({"key": key, "id": rec.get("id", ""), "prompt": rec["prompt"],
                          "anchor": rec["anchor"], "teacher": rec.get("teacher", identity)})
                added += 1
        return added
