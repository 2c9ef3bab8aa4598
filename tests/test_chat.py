"""`edge-pu chat` on the tiny finished run: replies stream piece by piece and equal the greedy
answer, the conversation carries into the next turn's prompt, and the real command, driven
through a pseudo-terminal, answers two turns with the trained student and, under --base, with
the untrained one."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_pu.chat import ChatSession, load_chat_backend
from edge_pu.config import SamplingConfig

TURNS = ["what is two plus three?", "and write the word apple"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def expected(finished_run: Path) -> dict[str, list[str]]:
    """Greedy replies to TURNS, in process, with the adapter and without (--base)."""
    out = {}
    for base in (False, True):
        backend, _ = load_chat_backend(finished_run, base=base)
        session = ChatSession(backend, temperature=0, max_new_tokens=NEW_TOKENS)
        out["base" if base else "student"] = [session.reply(t) for t in TURNS]
    return out


def test_reply_streams_the_greedy_answer_and_keeps_the_history(finished_run: Path) -> None:
    backend, _ = load_chat_backend(finished_run)
    session = ChatSession(backend, temperature=0, max_new_tokens=NEW_TOKENS)
    pieces: list[str] = []
    first = session.reply(TURNS[0], pieces.append)
    assert len(pieces) >= 2, pieces  # token by token, not one block at the end
    assert "".join(pieces) == first
    greedy = SamplingConfig(k=1, max_new_tokens=NEW_TOKENS, temperature=0.0)
    ids = backend.chat_ids([{"role": "user", "content": TURNS[0]}])
    assert first == backend.sample([ids], 1, greedy, [0])[0][0].text
    second_ids = session.prompt_ids(TURNS[1])
    assert second_ids[: len(ids)] == ids  # turn 2's prompt starts with the whole of turn 1
    assert backend.chat_ids([{"role": "user", "content": TURNS[0]},
                             {"role": "assistant", "content": first},
                             {"role": "user", "content": TURNS[1]}]) == second_ids
    session.reply(TURNS[1])
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2
    session.max_length = len(second_ids) + NEW_TOKENS - 1  # no longer fits: oldest turn goes
    session.prompt_ids("a third question")
    assert [m["content"] for m in session.history[::2]] == [TURNS[1]]


class Terminal:
    """A child process on a pseudo-terminal: `expect` reads until a pattern, `send` types."""

    def __init__(self, argv: list[str]) -> None:
        master, slave = os.openpty()
        env = {**os.environ, "TERM": "dumb", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True, close_fds=True)
        os.close(slave)
        self.fd, self.seen = master, ""

    def expect(self, pattern: str, timeout: float = 180.0) -> str:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.seen):
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and not select.select(
                    [self.fd], [], [], 0)[0]:
                raise AssertionError(f"no {pattern!r} on the terminal; it shows:\n{self.seen}")
            if select.select([self.fd], [], [], min(left, 1.0))[0]:
                try:
                    self.seen += os.read(self.fd, 65536).decode("utf-8", "replace")
                except OSError:  # EIO: the child closed the terminal
                    pass
        return self.seen

    def send(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=30)
        finally:
            os.close(self.fd)


def _replies(screen: str, label: str) -> list[str]:
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen).replace("\r\n", "\n")
    return re.findall(rf"^{label}> (.*?)\nyou> ", text, re.S | re.M)


@pytest.mark.parametrize("base", [False, True])
def test_chat_through_a_pseudo_terminal(finished_run: Path, expected: dict[str, list[str]],
                                        base: bool) -> None:
    label = "base" if base else "student"
    assert expected["base"] != expected["student"], "the adapter should change the answers"
    term = Terminal([sys.executable, "-m", "edge_pu", "chat", str(finished_run),
                     "--temperature", "0", "--max-new-tokens", str(NEW_TOKENS)]
                    + (["--base"] if base else []))
    try:
        term.expect(r"you> $")
        assert "untrained" in term.seen if base else "trained student" in term.seen
        for i, turn in enumerate(TURNS):
            term.send(turn)
            term.expect(rf"(?s)({label}> .*?\r\nyou> .*){{{i + 1}}}$")
        assert _replies(term.seen, label) == expected[label]
        term.send("/exit")
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
