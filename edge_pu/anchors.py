"""The anchor store: exactly one teacher answer per prompt, ever, within a budget that holds.

Files in the run dir:
- `anchors.jsonl`: one line per anchored prompt, appended and fsynced the moment the answer
  arrives: {"key", "id", "prompt", "anchor", "teacher"} (+ "truncated": true when the teacher
  stopped at teacher.max_tokens). The key is a hash of (teacher identity, prompt, generation
  settings), so a rerun, a restart or another run dir that imports these anchors makes no new
  call for a prompt it already has. A key found twice (two writers at once, before run dirs
  were locked: edge_pu.lock) counts once, with its first answer.
- `teacher_requests.jsonl`: one line per request (retries included), {"req", "key", "id",
  "attempt", "reserved_tokens", "time"}, fsynced BEFORE the request goes out, so a request cut
  short by a crash still counts. It is what `teacher.max_calls` and `teacher.token_budget` are
  checked against, across restarts (`requests_made()`, `tokens_spent()`).
- `teacher_ledger.jsonl`: one line per request that came back, ok or not: {"key", "id",
  "attempt", "status": "ok"|"error", "error", "seconds", "req", "tokens", "finish_reason"}.
  Without a crash it has as many lines as teacher_requests.jsonl.
- `teacher_failures.jsonl`: prompts that could not be anchored in a stage, with the reason and
  the attempts spent; reported at the end of the stage without stopping the other prompts. It
  is a log: a prompt anchored by a later rerun keeps its old lines (`open_failures()` gives the
  ones still unanchored).

Budgets (never exceeded, across restarts; 0 = none):
- `teacher.max_calls`: requests, retries included.
- `teacher.token_budget`: the sum of the server's usage.total_tokens. A request is sent only if
  its worst case fits: prompt bytes (a byte-level or byte-fallback tokenizer never makes more
  tokens than bytes) + PROMPT_OVERHEAD_TOKENS for the chat template + teacher.max_tokens. A
  request whose usage is unknown (timeout, crash, a teacher that reports none) counts at that
  worst case.

Faults: retryable errors are retried up to teacher.retries times with exponential backoff and
jitter, or after exactly the server's Retry-After; a Retry-After longer than MAX_WAIT_S ends that
prompt's tries. A fatal error (refused key, wrong URL) stops the stage. So does a teacher that
looks down: GIVE_UP_AFTER prompts in a row that failed on retryable errors only, with prompts
still to ask. In both cases every prompt not anchored is written to teacher_failures.jsonl
before the stage stops.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import TeacherConfig
from .data import Prompt
from .errors import EdgePuError
from .jsonl import append_jsonl, iter_jsonl, read_jsonl, write_jsonl_atomic
from .lock import holds
from .teachers.base import Teacher, TeacherError, generation_settings

MAX_WAIT_S = 300.0  # longest single wait between tries, a server's Retry-After included
PROMPT_OVERHEAD_TOKENS = 64  # chat-template tokens a server may add around the messages
GIVE_UP_AFTER = 3  # consecutive prompts failed on retryable errors only: the teacher is down


def anchor_key(identity: str, prompt: str, settings: dict[str, Any]) -> str:
    blob = json.dumps([identity, prompt, settings], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def reserved_tokens(prompt: str, cfg: TeacherConfig) -> int:
    """Worst-case tokens one request for `prompt` can cost (see the module docstring)."""
    size = len(prompt.encode("utf-8")) + len(cfg.system_prompt.encode("utf-8"))
    return size + PROMPT_OVERHEAD_TOKENS + cfg.max_tokens


@dataclass
class AnchorReport:
    total: int
    cached: int
    new: int
    failed: int
    requests: int  # HTTP requests/attempts sent in this stage (retries included)
    truncated: int = 0  # new anchors cut off at teacher.max_tokens (kept, flagged)
    tokens: int = 0  # tokens counted against teacher.token_budget in this stage
    failures: list[dict[str, Any]] = field(default_factory=list)  # this stage's failure records


@dataclass
class _Spent:
    requests: int
    tokens: int


@dataclass
class _Outcome:
    sent: int = 0
    tokens: int = 0
    ok: bool = False
    truncated: bool = False
    transient: bool = True  # every failure was retryable: a sign the teacher is down
    error: str = "no attempt made"


class AnchorStore:
    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        self.path = self.dir / "anchors.jsonl"
        self.sent = self.dir / "teacher_requests.jsonl"
        self.ledger = self.dir / "teacher_ledger.jsonl"
        self.failures = self.dir / "teacher_failures.jsonl"
        self.by_key: dict[str, dict[str, Any]] = {}
        dropped = 0
        for rec in read_jsonl(self.path):
            if rec["key"] in self.by_key:
                dropped += 1
            else:
                self.by_key[rec["key"]] = rec
        if dropped:
            self._heal(dropped)

    def _heal(self, dropped: int) -> None:
        """Duplicated keys (two writers at once, before run dirs were locked): keep the first.

        The file is rewritten without them only by a process that holds the run dir's lock;
        any other reader just ignores them, since a writer may be appending right now.
        """
        if holds(self.dir):
            write_jsonl_atomic(self.path, self.by_key.values())
            print(f"[anchors] {self.path}: removed {dropped} duplicate anchors (kept the first "
                  "answer per prompt; no teacher call is made for them)", flush=True)
        else:
            print(f"[anchors] {self.path}: ignoring {dropped} duplicate anchors (kept the first "
                  "answer per prompt)", flush=True)

    # ---- the ledger ------------------------------------------------------------------------
    def _spent(self) -> _Spent:
        ledger = read_jsonl(self.ledger)
        actual = {r["req"]: r.get("tokens") for r in ledger if "req" in r}
        # A request with no outcome (a crash mid-request) or no usage counts at its worst case.
        sent = read_jsonl(self.sent)
        tokens = sum(a if (a := actual.get(r["req"])) is not None
                     else int(r.get("reserved_tokens") or 0) for r in sent)
        older = sum(1 for r in ledger if "req" not in r)  # run dirs from before this file
        return _Spent(len(sent) + older, tokens)

    def requests_made(self) -> int:
        """Requests ever sent from this run dir (a request cut short by a crash included)."""
        return self._spent().requests

    def tokens_spent(self) -> int:
        """Tokens counted against teacher.token_budget, ever, from this run dir."""
        return self._spent().tokens

    def open_failures(self) -> list[dict[str, Any]]:
        """The latest failure record of every prompt that is still not anchored."""
        latest = {r["key"]: r for r in read_jsonl(self.failures)}
        return [r for k, r in latest.items() if k not in self.by_key]

    # ---- anchors ---------------------------------------------------------------------------
    def anchor_for(self, key: str) -> str | None:
        rec = self.by_key.get(key)
        return None if rec is None else rec["anchor"]

    def add(self, rec: dict[str, Any]) -> None:
        append_jsonl(self.path, [rec])
        self.by_key[rec["key"]] = rec

    def fetch(self, prompts: Sequence[Prompt], teacher: Teacher, cfg: TeacherConfig, *,
              progress: Callable[[int], None] | None = None,
              sleep: Callable[[float], None] = time.sleep,
              rng: random.Random | None = None,
              give_up_after: int = GIVE_UP_AFTER) -> AnchorReport:
        """Anchor every prompt not yet in the store; one successful call per prompt, ever."""
        settings = generation_settings(cfg)
        spent = self._spent()
        report = AnchorReport(len(prompts), 0, 0, 0, 0)
        rng = rng or random.Random()  # jitter exists to de-synchronise clients: not seeded
        streak: list[str] = []  # errors of the consecutive prompts that failed transiently
        for i, prompt in enumerate(prompts):
            key = anchor_key(teacher.identity, prompt.text, settings)
            if key in self.by_key:
                report.cached += 1
            else:
                try:
                    out = self._ask(prompt, key, teacher, cfg, spent, rng, sleep)
                except TeacherError as exc:  # fatal: no prompt can succeed
                    reason = f"teacher ({teacher.identity}): {exc}"
                    self._abandon(prompts[i:], teacher, settings, reason, report)
                    raise EdgePuError(f"{reason} Stopped the anchor stage; {report.new} new "
                                      f"anchors are kept and {report.failed} prompts are listed "
                                      f"in {self.failures}. Fix this and rerun to continue."
                                      ) from None
                report.requests += out.sent
                report.tokens += out.tokens
                if out.ok:
                    report.new += 1
                    report.truncated += out.truncated
                    streak = []
                else:
                    self._fail(report, key, prompt, out.error, out.sent)
                    streak = streak + [out.error] if out.transient and out.sent else []
                if give_up_after and len(streak) >= give_up_after:
                    self._give_up(prompts[i + 1:], teacher, settings, streak, report)
            if progress:
                progress(1)
        return report

    def _give_up(self, rest: Sequence[Prompt], teacher: Teacher, settings: dict[str, Any],
                 streak: list[str], report: AnchorReport) -> None:
        """The teacher looks down: record the prompts still to ask and stop the stage."""
        rest = [p for p in rest
                if anchor_key(teacher.identity, p.text, settings) not in self.by_key]
        if not rest:  # nothing left to ask: the failures are reported like any others
            return
        reason = (f"the teacher ({teacher.identity}) looks down: {len(streak)} prompts in a row "
                  f"failed after retries (last error: {streak[-1]})")
        self._abandon(rest, teacher, settings, reason, report)
        raise EdgePuError(f"{reason}. Stopped the anchor stage; {report.new} new anchors are "
                          f"kept and {report.failed} prompts are listed in {self.failures}. "
                          "Rerun when the teacher is back.")

    def _budget_block(self, prompt: Prompt, cfg: TeacherConfig, spent: _Spent) -> str | None:
        if cfg.max_calls and spent.requests >= cfg.max_calls:
            return (f"teacher budget exhausted: {spent.requests} requests made, teacher.max_calls"
                    f" = {cfg.max_calls}; raise it to anchor the rest")
        worst = reserved_tokens(prompt.text, cfg)
        if cfg.token_budget and spent.tokens + worst > cfg.token_budget:
            return (f"teacher token budget: {spent.tokens} of teacher.token_budget = "
                    f"{cfg.token_budget} tokens used and this request may cost up to {worst}; "
                    "raise it to anchor the rest")
        return None

    def _ask(self, prompt: Prompt, key: str, teacher: Teacher, cfg: TeacherConfig,
             spent: _Spent, rng: random.Random, sleep: Callable[[float], None]) -> _Outcome:
        """Try one prompt with bounded retries. Updates `spent` as requests go out."""
        out = _Outcome()
        wait = 0.0
        for attempt in range(cfg.retries + 1):
            blocked = self._budget_block(prompt, cfg, spent)
            if blocked:
                out.error, out.transient = blocked, False
                return out
            if wait:
                sleep(wait)
            req = uuid.uuid4().hex[:16]
            worst = reserved_tokens(prompt.text, cfg)
            # Counted before it is sent: a crash mid-request cannot hide a paid call.
            append_jsonl(self.sent, [{"req": req, "key": key, "id": prompt.id,
                                      "attempt": attempt, "reserved_tokens": worst,
                                      "time": round(time.time(), 3)}])
            spent.requests += 1
            spent.tokens += worst
            out.sent += 1
            started = time.monotonic()
            try:
                text = teacher.answer(prompt.messages())  # the conversation, as is
            except TeacherError as exc:
                used = self._done(req, key, prompt, attempt, teacher, worst, "error", str(exc),
                                  started)
                spent.tokens += used - worst
                out.tokens += used
                out.error = str(exc)
                if exc.fatal:
                    raise
                if not exc.retryable:
                    out.transient = False
                    return out
                if exc.retry_after is not None and exc.retry_after > MAX_WAIT_S:
                    out.error += (f" (the server asked to wait {exc.retry_after:.0f}s, more than "
                                  f"edge_pu waits: {MAX_WAIT_S:.0f}s)")
                    return out
                wait = exc.retry_after if exc.retry_after is not None else min(
                    MAX_WAIT_S, cfg.backoff_s * 2**attempt * (0.5 + rng.random()))
                continue
            truncated = getattr(teacher, "last_finish_reason", None) == "length"
            # The answer is written before the ledger line: a crash in between leaves an anchor
            # whose request counts at its worst case (never a paid call without its anchor on
            # disk).
            self.add({"key": key, "id": prompt.id, "prompt": prompt.text, "anchor": text,
                      "teacher": teacher.identity, **({"truncated": True} if truncated else {})})
            used = self._done(req, key, prompt, attempt, teacher, worst, "ok", "", started)
            spent.tokens += used - worst
            out.tokens += used
            out.ok, out.truncated = True, truncated
            return out
        return out

    def _done(self, req: str, key: str, prompt: Prompt, attempt: int, teacher: Teacher,
              worst: int, status: str, error: str, started: float) -> int:
        """Record a request's outcome in the ledger; returns the tokens it counts for."""
        tokens = _usage_tokens(getattr(teacher, "last_usage", None))
        append_jsonl(self.ledger, [{"key": key, "id": prompt.id, "attempt": attempt,
                                    "status": status, "error": error,
                                    "seconds": round(time.monotonic() - started, 3), "req": req,
                                    "tokens": tokens, "finish_reason":
                                    getattr(teacher, "last_finish_reason", None)}])
        return worst if tokens is None else tokens

    def _fail(self, report: AnchorReport, key: str, prompt: Prompt, error: str,
              attempts: int) -> None:
        rec = {"key": key, "id": prompt.id, "error": error, "attempts": attempts,
               "time": round(time.time(), 3)}
        append_jsonl(self.failures, [rec])
        report.failed += 1
        report.failures.append(rec)

    def _abandon(self, prompts: Sequence[Prompt], teacher: Teacher, settings: dict[str, Any],
                 reason: str, report: AnchorReport) -> None:
        """Record every prompt of `prompts` that has no anchor as failed, with `reason`."""
        recs = []
        for p in prompts:
            key = anchor_key(teacher.identity, p.text, settings)
            if key not in self.by_key:
                recs.append({"key": key, "id": p.id, "error": f"not anchored: {reason}",
                             "attempts": 0, "time": round(time.time(), 3)})
        append_jsonl(self.failures, recs)
        report.failed += len(recs)
        report.failures += recs

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
        """Write every anchor to `path` (replacing it, atomically); returns the count."""
        recs = list(self.by_key.values())
        write_jsonl_atomic(path, recs)
        return len(recs)

    def import_file(self, path: str | Path, identity: str, cfg: TeacherConfig) -> int:
        """Add anchors from a JSONL ({"prompt", "anchor"} and optionally "key"); returns added.

        The whole file is checked before anything is added, so a bad line adds nothing.
        """
        settings = generation_settings(cfg)
        new: dict[str, dict[str, Any]] = {}
        for line, rec in iter_jsonl(path, strict=True):
            if not isinstance(rec.get("prompt"), str) or not isinstance(rec.get("anchor"), str):
                raise EdgePuError(f"{path}:{line}: needs \"prompt\" and \"anchor\" strings.")
            if not rec["anchor"].strip():
                raise EdgePuError(f"{path}:{line}: \"anchor\" is empty.")
            key = rec.get("key") or anchor_key(identity, rec["prompt"], settings)
            if not isinstance(key, str):
                raise EdgePuError(f"{path}:{line}: \"key\" must be a string (as exported).")
            if key not in self.by_key and key not in new:
                new[key] = {"key": key, "id": rec.get("id", ""), "prompt": rec["prompt"],
                            "anchor": rec["anchor"], "teacher": rec.get("teacher", identity)}
        append_jsonl(self.path, new.values())
        self.by_key.update(new)
        return len(new)


def _usage_tokens(usage: Any) -> int | None:
    """Tokens from an OpenAI-style usage object; None when absent or unreadable."""
    if not isinstance(usage, dict):
        return None
    total = usage.get("total_tokens")
    if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
        return total
    parts = [usage.get("prompt_tokens"), usage.get("completion_tokens")]
    if all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in parts):
        return int(sum(parts))  # type: ignore[arg-type]
    return None
