"""`edge-pu serve RUN_DIR [--port 8000] [--api-key-env VAR | --api-key-file FILE]
[--host ADDR --allow-remote] [--gguf FILE]`: the trained model behind an OpenAI-compatible HTTP
API (llama-cpp-python's server: /v1/chat/completions, /v1/completions, /v1/models), so any
OpenAI client or tool that speaks that API can try it.

What is served is the run's verified GGUF export: the newest `RUN_DIR/export/gguf*/` whose
export_report.json says the gate passed and that is newer than `RUN_DIR/adapter` (`edge-pu
export RUN_DIR --format gguf` makes one; a `lora-gguf` export is served as its base plus the
LoRA). The chat template is the one stored in the GGUF, which the gate checked against the
student's.

Binding: 127.0.0.1 by default. Any other address needs `--allow-remote` and an API key; with a
key (optional on loopback) every request must carry `Authorization: Bearer KEY` or is answered
401. The key is read like the teacher's, from the environment variable named by
`--api-key-env` or from `--api-key-file` (a mounted secret), and is never printed or logged.
Browser requests from another origin (a web page calling the local server) are refused (403)
unless `--allow-origin` names that origin.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import sys
from pathlib import Path
from typing import Any

from .errors import EdgePuError
from .keys import read_key

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_api_key(env: str = "", file: str = "") -> str:
    """The key from $env or the file; "" when neither is given. Never echoed."""
    if env and file:
        raise EdgePuError("serve: give --api-key-env or --api-key-file, not both.")
    return read_key(env, file, env_name="serve: --api-key-env", file_name="serve: --api-key-file",
                    env_fix="export it first")


def check_binding(host: str, allow_remote: bool, key: str) -> None:
    if is_loopback(host):
        return
    if not allow_remote:
        raise EdgePuError(f"serve: --host {host} is not a loopback address: anyone who can "
                          "reach it could use the model. Pass --allow-remote (and an API key) "
                          "to listen there, or keep the default 127.0.0.1.")
    if not key:
        raise EdgePuError(f"serve: --host {host} with --allow-remote needs an API key: "
                          "--api-key-env VAR or --api-key-file FILE.")


def find_verified_gguf(run_dir: str | Path) -> tuple[Path, Path | None, dict[str, Any]]:
    """(model .gguf, LoRA .gguf or None, its gate report) of the newest fresh passed export."""
    from .export_stage import _passed_and_fresh

    d = Path(run_dir)
    adapter = d / "adapter"
    if not (adapter / "adapter_config.json").exists():
        raise EdgePuError(f"{d}: not a finished run (no adapter/); run `edge-pu run` first.")
    found = []
    for rep_path in d.glob("export/*/export_report.json"):
        try:
            rep = json.loads(rep_path.read_text())
        except ValueError:
            continue
        if rep.get("format") not in ("gguf", "lora-gguf"):
            continue
        if not _passed_and_fresh(rep_path.parent, adapter):
            continue
        arts = [Path(a) for a in rep.get("artifacts") or []]
        if rep["format"] == "gguf" and arts and arts[0].exists():
            found.append((rep_path.stat().st_mtime, 1, arts[0], None, rep))
        elif rep["format"] == "lora-gguf" and len(arts) == 2 and all(a.exists() for a in arts):
            found.append((rep_path.stat().st_mtime, 0, arts[1], arts[0], rep))
    if not found:
        raise EdgePuError(f"{d}: no verified GGUF export of the current adapter; make one with "
                          f"`edge-pu export {d} --format gguf` (the gate checks it in llama.cpp "
                          "against the merged model), then serve it.")
    _, _, model, lora, rep = max(found, key=lambda f: (f[1], f[0]))
    return model, lora, rep


class _Guard:
    """ASGI middleware in front of the server: the API key on every request (constant-time
    compare), and no cross-origin browser requests unless the origin is allowed."""

    def __init__(self, app: Any, key: str, origins: set[str]) -> None:
        self.app, self.key, self.origins = app, key.encode(), origins

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") == "http":
            headers = {k.lower(): v for k, v in scope.get("headers", [])}
            origin = headers.get(b"origin", b"").decode("latin-1")
            if origin and origin not in self.origins and not _same_origin(origin, headers):
                return await _deny(send, 403, "cross-origin request refused; pass "
                                              "--allow-origin ORIGIN to allow it")
            if self.key and not hmac.compare_digest(headers.get(b"authorization", b""),
                                                    b"Bearer " + self.key):
                return await _deny(send, 401, "missing or wrong API key")
        await self.app(scope, receive, send)


def _same_origin(origin: str, headers: dict[bytes, bytes]) -> bool:
    """A page served from this very loopback address (FastAPI's /docs): the origin's host is
    loopback and its host:port is the request's Host (a DNS-rebound name is not loopback)."""
    from urllib.parse import urlsplit

    parts = urlsplit(origin)
    return is_loopback(parts.hostname or "") and \
        parts.netloc == headers.get(b"host", b"").decode("latin-1")


async def _deny(send: Any, code: int, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "code": code}}).encode()
    await send({"type": "http.response.start", "status": code,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def build_app(model: Path, lora: Path | None, *, alias: str, key: str, n_ctx: int = 0,
              origins: set[str] | None = None) -> Any:
    try:
        from llama_cpp.server.app import create_app
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as exc:
        raise EdgePuError(f"serve needs llama-cpp-python's server ({exc.name} is missing): pip "
                          "install 'edge-pu[gguf]' (llama-cpp-python[server]).") from None
    os.environ.pop("CONFIG_FILE", None)  # create_app would read its settings from that file
    server = ServerSettings(api_key=key or None)
    models = [ModelSettings(model=str(model), model_alias=alias, n_ctx=n_ctx, verbose=False,
                            lora_path=str(lora) if lora else None)]
    app = create_app(server_settings=server, model_settings=models)
    return _Guard(app, key, origins or set())


def serve_command(run_dir: str, *, host: str = "127.0.0.1", port: int = 8000,
                  allow_remote: bool = False, api_key_env: str = "", api_key_file: str = "",
                  gguf: str = "", n_ctx: int = 0, allow_origin: list[str] | None = None) -> int:
    key = read_api_key(api_key_env, api_key_file)
    check_binding(host, allow_remote, key)  # refused before anything is loaded
    if gguf:
        model, lora = Path(gguf), None
        if not model.exists():
            raise EdgePuError(f"serve: --gguf {model} does not exist.")
        what = f"{model} (given with --gguf, not checked by the gate here)"
    else:
        model, lora, rep = find_verified_gguf(run_dir)
        what = f"{model}{' + ' + str(lora) if lora else ''} (gate passed: " \
               f"{rep.get('format')} {rep.get('quant') or ''})".replace(" )", ")")
    alias = f"edge-pu-{Path(run_dir).resolve().name}"
    app = build_app(model, lora, alias=alias, key=key, n_ctx=n_ctx,
                    origins=set(allow_origin or []))
    import uvicorn

    shown = f"[{host}]" if ":" in host else host
    print(f"[serve] {what}\n[serve] OpenAI-compatible API at http://{shown}:{port}/v1, model "
          f"{alias!r}; {'API key required' if key else 'no API key (loopback only)'}; Ctrl-C "
          "stops it.", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
    return 0
