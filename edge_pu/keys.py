"""API keys read from an environment variable or a file, never from the command line or a
config value, and never echoed: the teacher's key (teacher.api_key_env / api_key_file) and
`edge-pu serve`'s (--api-key-env / --api-key-file) share this reader and its messages."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import EdgePuError


def read_key(env: str, file: str, *, env_name: str, file_name: str, env_fix: str) -> str:
    """The key from $env, else from the file; "" when neither is given. `env_name` and
    `file_name` say where the setting came from in messages ("config: teacher.api_key_env");
    `env_fix` ends the unset-variable message."""
    if env:
        key = os.environ.get(env, "").strip()
        if not key:
            raise EdgePuError(f"{env_name} names ${env}, which is not set in the environment; "
                              f"{env_fix}.")
        return key
    if file:
        path = Path(file).expanduser()
        try:
            key = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise EdgePuError(f"{file_name} {path}: cannot read it "
                              f"({getattr(exc, 'strerror', None) or exc}).") from None
        if not key:
            raise EdgePuError(f"{file_name} {path} is empty.")
        return key
    return ""
