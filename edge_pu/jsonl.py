"""Durable JSONL and file writes: append with fsync, a tolerant reader, atomic replace.

Every record a stage produces is appended and fsynced as soon as it exists, so a crash loses
at most the record being written. The reader drops a torn last line (a crash mid-write) and
reports a malformed line anywhere else with its file and line number. An append that fails
(a full disk, ENOSPC) is rolled back to the file's previous length, so the records already
written stay and no half-written group of records is left behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import EdgePuError


def append_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records, one JSON object per line, then fsync: all of them land, or none."""
    path = Path(path)
    payload = "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
    if not payload:
        return
    data = payload.encode("utf-8")
    start = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _repair_tail(path)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.fstat(fd).st_size
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            if start is not None:
                try:  # undo the partial write: earlier records stay, this group never happened
                    os.ftruncate(fd, start)
                except OSError:
                    pass  # the reader still drops a torn last line
            raise
        finally:
            os.close(fd)
    except OSError as exc:
        raise EdgePuError(f"{path}: could not write ({exc.strerror or exc}); the records "
                          "already there are kept and the new ones were not added. Free some space "
                          "(or fix the permission) and rerun the same command to continue."
                          ) from None


def _repair_tail(path: Path) -> None:
    """Cut a torn last line (no trailing newline) left by a crash, so appends stay parseable."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as fh:
        fh.seek(-1, os.SEEK_END)
        if fh.read(1) == b"\n":
            return
        fh.seek(0)
        data = fh.read()
        keep = data.rfind(b"\n") + 1
        fh.truncate(keep)


def iter_jsonl(path: str | Path, *, strict: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_number, record). A torn last line is dropped unless `strict`.

    Any other bad line raises EdgePuError naming file and line. Blank lines are skipped.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise EdgePuError(f"{path}: file not found.") from None
    except IsADirectoryError:
        raise EdgePuError(f"{path}: is a folder; give a JSONL file.") from None
    except OSError as exc:
        raise EdgePuError(f"{path}: cannot read ({exc.strerror}).") from None
    raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark (Windows editors)
    lines = raw.split(b"\n")
    torn = not raw.endswith(b"\n") and raw != b""
    for idx, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        last = idx == len(lines)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            if last and torn and not strict:
                return  # a crash can cut a multi-byte character in half, too
            raise EdgePuError(f"{path}:{idx}: not UTF-8 (bad byte at column {exc.start + 1}); "
                              "save the file as UTF-8.") from None
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as exc:
            if last and torn and not strict:
                return  # a crash cut this line short: it never counted
            raise EdgePuError(f"{path}:{idx}: invalid JSON ({exc.msg}, column {exc.colno})."
                              ) from None
        if not isinstance(rec, dict):
            raise EdgePuError(f"{path}:{idx}: expected a JSON object, got {type(rec).__name__}.")
        yield idx, rec


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    return [rec for _, rec in iter_jsonl(path)] if path.exists() else []


def write_atomic(path: str | Path, text: str) -> None:
    """Write text to path via a temp file in the same folder and rename: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise EdgePuError(f"{path}: could not write ({exc.strerror}).") from None


def write_jsonl_atomic(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
