"""One writer per run dir: an exclusive OS lock on `run_dir/.lock`, held while the work runs.

    with run_dir_lock("runs/my-run", command="edge-pu anchors run.yaml"):
        ...  # nothing else can write runs/my-run now

The lock is `fcntl.flock` on the lock file, so it belongs to the open file and the kernel drops
it when the process ends, however it ends: a kill -9 or a power cut never leaves a stale lock,
and there is nothing to clean up by hand. After taking it the holder writes who it is into the
file ({"pid", "command", "started", "host"}), which is what a refused writer reports; the CLI
exits with code 3 (EXIT_IN_USE) then, so a script can tell "busy" from a failure.

A second writer is refused at once with an EdgePuError naming the run dir and the holder;
`wait=True` queues behind the holder instead (one line says who it waits for). Within one
process the lock is re-entrant: a CLI command that holds it may call library code that takes it
again. Readers (`plan`, reports) take no lock.

A file system without working locks (some network mounts answer ENOLCK or EOPNOTSUPP) is
refused with an error that says so: running unprotected is what doubled paid teacher calls.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import EdgePuError

LOCK_NAME = ".lock"
EXIT_IN_USE = 3  # the CLI's exit code when the run dir is held by another process
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}

# realpath of a run dir this process holds -> nesting depth. flock belongs to an open file, so
# a second open + flock of the same file from this process would be refused like a stranger.
_held: dict[str, int] = {}
_guard = threading.Lock()


def holder(run_dir: str | Path) -> dict[str, Any] | None:
    """Who last took the run dir's lock, as its lock file says; None when unknown.

    It is the current holder only while the lock is held (a dead holder's record stays until
    the next one overwrites it).
    """
    try:
        text = (Path(run_dir) / LOCK_NAME).read_text(encoding="utf-8", errors="replace")
        # raw_decode: the record is rewritten in place, so old trailing bytes may follow it.
        rec, _ = json.JSONDecoder().raw_decode(text.lstrip())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def holds(run_dir: str | Path) -> bool:
    """True when this process holds the lock of `run_dir` or of a folder above it (eval's
    --out holds the run dirs of its methods)."""
    path = Path(os.path.realpath(run_dir))
    with _guard:
        return any(str(p) in _held for p in (path, *path.parents))


def describe(rec: dict[str, Any] | None) -> str:
    if not rec:
        return "a process that has not written its name yet"
    return (f"pid {rec.get('pid', '?')} on {rec.get('host', '?')}, `{rec.get('command', '?')}`,"
            f" started {rec.get('started', '?')}")


def _flock(fd: int, op: int, lock_file: Path) -> bool:
    """flock; False when another process holds it (non-blocking), raises when unsupported."""
    import fcntl

    try:
        fcntl.flock(fd, op)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            raise EdgePuError(
                f"{lock_file}: this file system does not support file locks "
                f"({exc.strerror or exc}), so edge_pu cannot make sure that only one process "
                "writes this run dir (two at once would pay the teacher twice). Use a run_dir "
                "on a local disk.") from None
        raise
    return True


def _read_holder(run_dir: Path) -> dict[str, Any] | None:
    # The holder writes its record right after taking the lock: give it a moment.
    for _ in range(20):
        rec = holder(run_dir)
        if rec:
            return rec
        time.sleep(0.025)
    return None


@contextmanager
def run_dir_lock(run_dir: str | Path, *, wait: bool = False, command: str | None = None,
                 create: bool = True,
                 say: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold the exclusive lock on `run_dir` (created if missing, unless `create` is False).

    Refuses with EdgePuError when another process holds it, or waits for it with `wait`
    (`say` gets the one line saying so; stderr by default). `command` is recorded as the
    holder's command line (default: this process's argv). Yields the run dir.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise EdgePuError(f"{run_dir}: exists and is not a folder; choose another run dir.")
    if not run_dir.exists():
        if not create:
            raise EdgePuError(f"{run_dir}: no such run directory; check the path.")
        run_dir.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(run_dir)
    with _guard:
        if key in _held:  # re-entrant: this process already holds it
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield run_dir
        finally:
            with _guard:
                _held[key] -= 1
        return
    try:
        import fcntl
    except ImportError:  # Windows
        raise EdgePuError(f"{run_dir}: edge_pu locks its run dirs with fcntl.flock, which this "
                          "platform lacks; run it on Linux or macOS (or WSL).") from None
    lock_file = run_dir / LOCK_NAME
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, lock_file):
            who = describe(_read_holder(run_dir))
            if not wait:
                raise EdgePuError(
                    f"{run_dir}: in use by another edge-pu process ({who}); a run dir belongs "
                    "to one run at a time. Let it finish, rerun with --wait to start when it "
                    "ends, or use another run dir.", exit_code=EXIT_IN_USE)
            (say or (lambda s: print(s, file=sys.stderr, flush=True)))(
                f"[lock] {run_dir} is in use by {who}; waiting for it to finish (Ctrl-C to stop)")
            _flock(fd, fcntl.LOCK_EX, lock_file)
        rec = {"pid": os.getpid(), "command": command if command is not None
               else " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
               "host": socket.gethostname()}
        data = (json.dumps(rec) + "\n").encode("utf-8")
        # In place, then cut: a reader never sees an empty file once a holder wrote one.
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        with _guard:
            _held[key] = 1
        try:
            yield run_dir
        finally:
            with _guard:
                _held.pop(key, None)
    finally:
        os.close(fd)  # closing the file releases the flock
