"""Benchmark: the error `student.import_as` adds, against the student format's own error.

    python bench/import_error.py [--import-as q8_0] [--threads 1] [--json OUT.json]

On the demo's held-out prompts (chat-templated, as the demo's greedy evaluation sees them) and
the demo student SmolLM2-135M-Instruct (Q4_1 GGUF), compares torch forwards of:
  - `source`: dequantize(Q4_1), what training sees without the import;
  - `import`: dequantize(q8_0(dequantize(Q4_1))), what it sees with `student.import_as: q8_0`;
  - `q4_1-noise`: the source plus the Q4_1 rounding error redrawn: uniform in +-d/2 per weight,
    d = (max - min) / 15 of the weight's block of 32 (the step of the Q4_1 grid the weights lie
    on). The original bf16 weights differ from the source by such an error, so source vs
    q4_1-noise estimates the size of Q4_1's own quantization error, which we cannot measure
    directly (the original weights are not in the file);
and llama.cpp's logits from the two GGUF files against torch on the same weights (the engine's
own difference, which the sampler already accepts: it quantizes activations in its dot products).

Reported per comparison: logit max-abs and mean-abs difference over every prompt position and
the whole vocabulary, next-token (argmax) agreement over those positions, and the demo's greedy
continuations (40 tokens) that agree token for token, with the mean agreeing prefix.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import load_average, set_threads  # noqa: E402


def _noisy_copy(model: Any, seed: int = 0) -> Any:
    """The model with every 2-D weight moved by a fresh Q4_1-sized rounding error."""
    import copy

    import torch

    noisy = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in noisy.named_parameters():
            if p.ndim != 2 or p.shape[-1] % 32:
                continue
            blocks = p.view(-1, 32)
            d = (blocks.max(1, keepdim=True).values - blocks.min(1, keepdim=True).values) / 15
            blocks += (torch.rand(blocks.shape, generator=gen) - 0.5) * d
    return noisy


def _torch_logits(model: Any, prompts: list[list[int]]) -> list[Any]:
    import torch

    with torch.no_grad():
        return [model(input_ids=torch.tensor([p])).logits[0].float().numpy() for p in prompts]


def _torch_greedy(model: Any, prompts: list[list[int]], n: int, eos: set[int]) -> list[list[int]]:
    import torch

    out = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(input_ids=torch.tensor([p]), do_sample=False, max_new_tokens=n,
                                 attention_mask=torch.ones(1, len(p), dtype=torch.long))
            toks = ids[0, len(p):].tolist()
            cut = next((i + 1 for i, t in enumerate(toks) if t in eos), len(toks))
            out.append(toks[:cut])
    return out


def _llama_logits(gguf: Path, prompts: list[list[int]], threads: int) -> list[Any]:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=512, n_batch=512, logits_all=True, verbose=False,
                n_threads=threads, n_threads_batch=threads)
    out = []
    for p in prompts:
        llm.reset()
        llm.eval(p)
        out.append(np.array(llm.scores[:len(p)], dtype=np.float32))
    llm.close()
    return out


def _compare(a: list[Any], b: list[Any]) -> dict[str, float]:
    import numpy as np

    diff = np.concatenate([np.abs(x - y).ravel() for x, y in zip(a, b, strict=True)])
    agree = np.concatenate([x.argmax(-1) == y.argmax(-1) for x, y in zip(a, b, strict=True)])
    return {"logit_max_abs": float(diff.max()), "logit_mean_abs": float(diff.mean()),
            "argmax_agreement": float(agree.mean()), "positions": int(agree.size)}


def _greedy_agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    def prefix(x: list[int], y: list[int]) -> int:
        return next((i for i, (s, t) in enumerate(zip(x, y, strict=False)) if s != t),
                    min(len(x), len(y)))

    return {"greedy_identical": sum(x == y for x, y in zip(a, b, strict=True)) / len(a),
            "greedy_mean_prefix": sum(prefix(x, y) for x, y in zip(a, b, strict=True)) / len(a)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--import-as", default="q8_0")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    threads = set_threads(args.threads)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_pu.backends.llamacpp_sampler import LlamaCppSampler
    from edge_pu.config import SamplingConfig, load_config
    from edge_pu.demo import (
        DEFAULTS,
        EVAL_MAX_NEW_TOKENS,
        HELDOUT_PER_FAMILY,
        TRAIN_PER_FAMILY,
        find_demo_student,
    )
    from edge_pu.quant.imported import imported_gguf
    from edge_pu.quant.student import resolve_student
    from edge_pu.tasks import generate_tasks, split

    gguf = find_demo_student()
    print(f"[bench] import error: {gguf.name} -> {args.import_as}, threads={threads}; load "
          f"average {load_average()}", flush=True)
    tasks = generate_tasks(9 * (TRAIN_PER_FAMILY + HELDOUT_PER_FAMILY), seed=0)
    _, heldout = split(tasks, heldout_fraction=HELDOUT_PER_FAMILY /
                       (TRAIN_PER_FAMILY + HELDOUT_PER_FAMILY), seed=0)
    src_dir, _ = resolve_student(str(gguf))
    imp_dir, _ = resolve_student(str(gguf), args.import_as)
    tok = AutoTokenizer.from_pretrained(src_dir)
    prompts = [tok.apply_chat_template([{"role": "user", "content": t.prompt}],
                                       add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for t in heldout]
    models = {"source": AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32),
              "import": AutoModelForCausalLM.from_pretrained(imp_dir, dtype=torch.float32)}
    models["q4_1-noise"] = _noisy_copy(models["source"])
    eos = {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id}
    logits = {k: _torch_logits(m, prompts) for k, m in models.items()}
    greedy = {k: _torch_greedy(m, prompts, EVAL_MAX_NEW_TOKENS, eos) for k, m in models.items()}
    files = {"llama.cpp Q4_1 file": (gguf, ""), f"llama.cpp {args.import_as} file":
             (imported_gguf(imp_dir), args.import_as)}
    for name, (path, imp) in files.items():
        logits[name] = _llama_logits(path, prompts, threads)
        cfg = load_config(None, base={**DEFAULTS, "student": {"path": str(gguf),
                                                              "import_as": imp}})
        sampler = LlamaCppSampler(cfg, imp_dir if imp else src_dir, Path(tempfile.mkdtemp()),
                                  sorted(eos), tok.decode)
        scfg = SamplingConfig(k=1, max_new_tokens=EVAL_MAX_NEW_TOKENS, temperature=0.0)
        greedy[name] = [s[0].token_ids for s in sampler.sample(prompts, 1, scfg,
                                                               list(range(len(prompts))))]
        sampler.close()
    pairs = [("import", "source", "what the import adds (torch on both)"),
             ("q4_1-noise", "source", "estimate of Q4_1's own error (redrawn rounding)"),
             ("llama.cpp Q4_1 file", "source", "engine: llama.cpp vs torch, no import"),
             (f"llama.cpp {args.import_as} file", "import",
              "engine: llama.cpp vs torch, with the import")]
    rows = []
    lines = ["| comparison | logit max-abs | logit mean-abs | next-token agreement | greedy "
             f"{EVAL_MAX_NEW_TOKENS}-token continuations identical | mean agreeing prefix |",
             "|---|---|---|---|---|---|"]
    for a, b, what in pairs:
        row = {"a": a, "b": b, "what": what, **_compare(logits[a], logits[b]),
               **_greedy_agreement(greedy[a], greedy[b])}
        rows.append(row)
        lines.append(f"| {a} vs {b}: {what} | {row['logit_max_abs']:.3f} | "
                     f"{row['logit_mean_abs']:.4f} | {row['argmax_agreement']:.3f} | "
                     f"{row['greedy_identical']:.2f} | {row['greedy_mean_prefix']:.1f} |")
    print(f"{len(prompts)} prompts, {rows[0]['positions']} positions")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "prompts": len(prompts)}, indent=2))


if __name__ == "__main__":
    main()
