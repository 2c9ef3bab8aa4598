"""edge_pu's cache of derived models ($EDGE_PU_CACHE, else ~/.cache/edge_pu).

`cache_root()` is the folder; `weights_tag(dir)` names a copy derived from a model dir's
weights, so an edited student gets a fresh one; `publish_model` saves a derived model dir so that
a killed process never leaves one that looks complete. The GGUF student's dequantized copy
(edge_pu.quant.student), its `student.import_as` re-quantization (edge_pu.quant.imported), the
NF4 merge base (edge_pu.quant.nf4) and the fetched models (edge_pu.fetch) all live under it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    root = os.environ.get("EDGE_PU_CACHE") or Path.home() / ".cache" / "edge_pu"
    return Path(root)


def weights_tag(model_dir: Path) -> str:
    """A short hash of a model dir's weight files (path, size, mtime): names derived copies in
    the cache, so an edited or replaced student gets a fresh one."""
    files = sorted(model_dir.glob("*.safetensors*"))
    key = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def publish_model(out: Path, model: Any, tokenizer: Any, marker: str, info: dict) -> Path:
    """Save a derived model dir into the cache: written beside as `.tmp`, the marker file (what
    callers test for) last, then renamed, so a killed process never leaves a dir that looks
    complete."""
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / marker).write_text(json.dumps(info))
    if not out.exists():
        tmp.replace(out)
    return out
