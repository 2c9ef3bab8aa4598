"""`edge-pu chat RUN_DIR [--base] [--system TEXT] [--max-new-tokens N] [--temperature T]`:
talk to the trained student in the terminal.

The run's student is loaded through its torch backend (edge_pu.backends: the weights, the chat
template and the EOS tokens training used) with the run's final adapter, `RUN_DIR/adapter`, or
with none under `--base` (the untrained student, to compare). Each reply is printed token by
token as it is decoded. The conversation so far is the next turn's prompt, chat template
applied; when it no longer fits `student.max_length` the oldest turns are dropped. Commands:
`/reset` forgets the conversation, `/exit` (or Ctrl-D) quits. Nothing is written to the run dir.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import EdgePuError


class _Streamer:
    """transformers' streamer interface (`put` each new token, `end`): decodes everything
    generated so far and hands on the new text, holding back half a multi-byte character."""

    def __init__(self, decode: Callable[[list[int]], str], on_text: Callable[[str], None]
                 ) -> None:
        self.decode, self.on_text = decode, on_text
        self.ids: list[int] = []
        self.shown = ""
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() puts the prompt first
            self.prompt_seen = True
            return
        self.ids += [int(t) for t in value.reshape(-1).tolist()]
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        text = self.decode(self.ids)
        if not final and text.endswith("\ufffd"):
            return
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.on_text(text[len(self.shown):])
            self.shown = text


class ChatSession:
    """A conversation with one loaded backend: `reply(text, on_text)` streams the answer."""

    def __init__(self, backend: Any, *, system: str = "", max_new_tokens: int = 256,
                 temperature: float = 0.7, top_p: float = 0.9, max_length: int = 2048,
                 seed: int = 0) -> None:
        self.backend, self.system = backend, system
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.max_length, self.seed = max_length, seed
        self.history: list[dict[str, str]] = []

    def messages(self, user: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history + [{"role": "user", "content": user}]

    def prompt_ids(self, user: str) -> list[int]:
        """The templated conversation plus `user`, oldest turns dropped until it fits."""
        while True:
            ids = self.backend.chat_ids(self.messages(user))
            if len(ids) + self.max_new_tokens <= self.max_length or not self.history:
                return ids
            self.history = self.history[2:]  # one user turn and its answer

    def reply(self, user: str, on_text: Callable[[str], None] = lambda _: None) -> str:
        import torch
        from transformers import GenerationConfig

        ids = self.prompt_ids(user)
        b = self.backend
        gen = {"max_new_tokens": self.max_new_tokens, "eos_token_id": list(b.eos_ids),
               "pad_token_id": b.pad_id}
        if self.temperature > 0:
            gen.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            gen.update(do_sample=False)
        streamer = _Streamer(b.decode, on_text)
        torch.manual_seed(self.seed + len(self.history))
        x = torch.tensor([ids], device=b.device)
        with torch.no_grad():
            b.model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                             generation_config=GenerationConfig(**gen), streamer=streamer)
        text = b.decode(streamer.ids)
        self.history += [{"role": "user", "content": user},
                         {"role": "assistant", "content": text}]
        return text


def load_chat_backend(run_dir: str | Path, *, base: bool = False, backend: str = ""
                      ) -> tuple[Any, Any]:
    """(backend, config): the run's student on its torch backend (cpu, or cuda where the run
    used it), with RUN_DIR/adapter unless `base`."""
    from .backends import make_backend
    from .config import load_config

    d = Path(run_dir)
    saved = d / "config.resolved.yaml"
    adapter = d / "adapter"
    if not saved.exists():
        raise EdgePuError(f"{d}: not a run dir (no config.resolved.yaml); pass the run_dir of "
                          "`edge-pu run` or `edge-pu demo`.")
    if not base and not (adapter / "adapter_model.safetensors").exists():
        raise EdgePuError(f"{d}: no trained adapter in {adapter} (the run has not finished); "
                          "finish it, or pass --base to talk to the untrained student.")
    cfg = load_config(saved)
    if not Path(cfg.student.path).exists():
        raise EdgePuError(f"{saved}: student.path {cfg.student.path!r} does not exist here.")
    name = backend or ("cuda" if cfg.backend == "cuda" else "cpu")  # torch: cpu or cuda
    be = make_backend(name)
    print(f"[chat] loading {cfg.student.path} on {be.name}"
          + ("" if base else f" with {adapter}"), file=sys.stderr, flush=True)
    be.load(cfg)
    if not base:
        be.load_adapter(adapter)  # a fresh LoRA (B = 0) is the base itself: --base loads none
    return be, cfg


def chat_loop(session: ChatSession, *, label: str, stdin: Any = None, out: Any = None) -> None:
    """Read a line, stream the reply, until /exit or end of input."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    if stdin.isatty():
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
    while True:
        try:
            line = input("you> ") if stdin is sys.stdin else _readline(stdin, out)
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.history = []
            out.write("(conversation cleared)\n")
            continue
        out.write(f"{label}> ")
        out.flush()

        def show(piece: str) -> None:
            out.write(piece)
            out.flush()

        try:
            session.reply(text, show)
        except KeyboardInterrupt:  # stop this answer, keep chatting
            out.write(" [stopped]")
        out.write("\n")
        out.flush()


def _readline(stdin: Any, out: Any) -> str:
    out.write("you> ")
    out.flush()
    line = stdin.readline()
    if not line:
        raise EOFError
    return str(line)


def chat_command(run_dir: str, *, base: bool = False, system: str = "",
                 max_new_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.9,
                 seed: int = 0, backend: str = "") -> int:
    be, cfg = load_chat_backend(run_dir, base=base, backend=backend)
    system = system or getattr(cfg.data, "system_prompt", "") or ""
    session = ChatSession(be, system=system, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, seed=seed,
                          max_length=cfg.student.max_length)
    label = "base" if base else "student"
    print(f"edge-pu chat: the {'untrained' if base else 'trained'} student of {run_dir}"
          f"{' (system prompt set)' if system else ''}; /reset starts over, /exit or Ctrl-D "
          "quits.", flush=True)
    chat_loop(session, label=label)
    return 0
