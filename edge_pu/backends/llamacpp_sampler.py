"""Candidate sampling on CPU through llama.cpp, from the student's own GGUF plus the current LoRA.

`sampling.engine: llama-cpp` with `backend: cpu`. Torch stays the reference and does the
training, the log-probs and the ranking; llama.cpp only draws the K candidates, from the same
weights training sees:

  - a `.gguf` student is sampled from that very file (training uses its dequantized weights,
    so both read the same numbers; llama.cpp quantizes activations inside its q4/q8 dot
    products, which moves logits by a few hundredths);
  - an HF-folder student is written once as an f32 GGUF into the cache (exact).

After each round the trained adapter is written as a GGUF LoRA (edge_pu.export.lora_gguf) and
the model is reloaded with it, so round r+1 samples from the policy round r produced.

Each prompt is evaluated once, as sequence 0 of a unified KV cache; sequences 1..K-1 share its
cells (llama_memory_seq_cp), and the K candidates then decode together, one batch row per
unfinished candidate. Each prompt draws its tokens from its own seeded generator, as the torch
backend does, so a prompt's candidates do not depend on the other prompts in the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import RunConfig, SamplingConfig
from ..errors import EdgePuError
from .base import Sample


def draw(logits: np.ndarray, temperature: float, top_p: float, u: float) -> int:
    """Next token from one row of logits; `u` in [0, 1) picks it by inverse CDF. Temperature 0
    is greedy. Top-p keeps the smallest head of the sorted distribution whose mass reaches p;
    the CDF then runs over that head in sorted order (only the head is ever sorted: a full
    argsort of a 49k vocabulary per token cost a quarter of the decode time)."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p >= 1.0:
        cdf = np.cumsum(p)
        return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), len(p) - 1))
    n, m = len(p), min(len(p), 64)
    while True:
        head = np.argpartition(-p, m - 1)[:m] if m < n else np.arange(n)
        head = head[np.argsort(-p[head], kind="stable")]
        mass = np.cumsum(p[head])
        if mass[-1] >= top_p or m == n:
            break
        m = min(n, m * 8)
    keep = max(1, int(np.count_nonzero(mass - p[head] < top_p)))  # a prefix: mass ascends
    return int(head[min(np.searchsorted(mass[:keep], u * mass[keep - 1], side="right"),
                        keep - 1)])


def student_gguf(student_path: str, student_dir: Path) -> Path:
    """The GGUF llama.cpp samples from: the student's own file, else an f32 copy in the cache."""
    src = Path(student_path).expanduser()
    if src.is_file() and src.suffix == ".gguf":
        return src
    from ..export.gguf_writer import write_gguf
    from ..quant.student import cache_root, weights_tag

    out = cache_root() / "gguf" / f"{student_dir.name}-{weights_tag(student_dir)}-f32.gguf"
    if not out.exists():
        print(f"[sampler] writing {student_dir} as f32 GGUF for llama.cpp: {out}", flush=True)
        tmp = out.with_name(out.name + ".tmp")
        write_gguf(student_dir, tmp, "f32")
        tmp.replace(out)
    return out


class LlamaCppSampler:
    """Draws candidates with llama-cpp-python; `refresh(adapter_dir)` applies a new LoRA."""

    def __init__(self, cfg: RunConfig, student_dir: Path, work_dir: Path,
                 eos_ids: Sequence[int], decode: Any) -> None:
        if cfg.student.quant != "none":
            raise EdgePuError(f"sampling.engine: llama-cpp samples the GGUF weights, but "
                              f"student.quant is {cfg.student.quant}, so training would see "
                              "other weights; use sampling.engine: backend.")
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise EdgePuError("sampling.engine: llama-cpp needs llama-cpp-python "
                              "(`pip install llama-cpp-python`, compiles in ~10 min), or use "
                              "sampling.engine: backend.") from None
        self.gguf = student_gguf(cfg.student.path, student_dir)
        self.student_dir = student_dir
        self.work_dir = work_dir
        self.max_length = cfg.student.max_length
        self.max_new_tokens = cfg.sampling.max_new_tokens
        self.eos_ids = set(eos_ids)
        self.decode = decode
        self.lora: Path | None = None
        self.llm: Any = None
        self._load(cfg.sampling.k)

    def _load(self, k: int) -> None:
        """(Re)create the llama.cpp model with room for `k` parallel sequences."""
        import llama_cpp.llama_cpp as ll
        from llama_cpp import Llama

        if self.llm is not None:
            self.llm.close()
        kwargs: dict[str, Any] = {"lora_path": str(self.lora)} if self.lora else {}
        if self.gguf.name.endswith("-f32.gguf"):  # an exact copy: keep the KV cache exact too
            kwargs.update(type_k=0, type_v=0)  # GGML_TYPE_F32 (default f16 moves logits ~1e-2)
        # Llama() offers no n_seq_max: its context takes llama_context_default_params(), so
        # hand it defaults with K sequences over one unified KV cache (the K candidates then
        # share the prompt's cells; seq_cp only tags them).
        defaults = ll.llama_context_default_params

        def params() -> Any:
            p = defaults()
            p.n_seq_max, p.kv_unified = k, True
            return p

        n_ctx = self.max_length + k * self.max_new_tokens
        ll.llama_context_default_params = params
        try:
            self.llm = Llama(model_path=str(self.gguf), n_ctx=n_ctx, n_batch=n_ctx,
                             n_threads=_threads(), seed=0, verbose=False, **kwargs)
        finally:
            ll.llama_context_default_params = defaults
        self.k, self.n_vocab = k, self.llm.n_vocab()
        from llama_cpp._internals import LlamaBatch

        self.batch = LlamaBatch(n_tokens=n_ctx, embd=0, n_seq_max=k, verbose=False)

    def refresh(self, adapter_dir: Path | None, tag: str) -> None:
        """Sample from base + this PEFT adapter from now on (None: the base alone)."""
        if adapter_dir is None:
            self.lora = None
        else:
            from ..export.lora_gguf import write_lora_gguf

            self.lora = write_lora_gguf(adapter_dir, self.student_dir,
                                        self.work_dir / f"lora-{tag}.gguf")
        self._load(self.k)

    def _logits(self, i: int) -> np.ndarray:
        ptr = self.llm._ctx.get_logits_ith(i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _decode(self, rows: Sequence[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, want logits) rows."""
        b = self.batch.batch
        b.n_tokens = len(rows)
        for i, (tok, pos, seq, logits) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        self.llm._ctx.decode(self.batch)

    def sample(self, prompt_ids: Sequence[list[int]], k: int, cfg: SamplingConfig,
               seeds: Sequence[int], *, adapter: bool = True) -> list[list[Sample]]:
        if not adapter and self.lora is not None:
            raise EdgePuError("llama-cpp sampler: reference-policy sampling is not offered.")
        if k > self.k or cfg.max_new_tokens > self.max_new_tokens:
            self.max_new_tokens = max(self.max_new_tokens, cfg.max_new_tokens)
            self._load(k)
        return [self._sample_prompt(p, k, cfg, seed) for p, seed in zip(prompt_ids, seeds,
                                                                          strict=True)]

    def _sample_prompt(self, prompt: list[int], k: int, cfg: SamplingConfig, seed: int
                       ) -> list[Sample]:
        """Prefill the prompt once as sequence 0, share its cells with sequences 1..K-1, then
        decode the K candidates together, one batch row per unfinished candidate."""
        import llama_cpp.llama_cpp as ll

        if len(prompt) + cfg.max_new_tokens > self.max_length:
            raise EdgePuError(f"a prompt of {len(prompt)} tokens plus sampling.max_new_tokens "
                              f"{cfg.max_new_tokens} exceeds student.max_length "
                              f"{self.max_length}.")
        rng = np.random.default_rng(seed)
        mem = ll.llama_get_memory(self.llm._ctx.ctx)
        ll.llama_memory_clear(mem, True)
        n = len(prompt)
        self._decode([(t, i, 0, i == n - 1) for i, t in enumerate(prompt)])
        first = self._logits(n - 1)
        for j in range(1, k):
            ll.llama_memory_seq_cp(mem, 0, j, -1, -1)
        tokens: list[list[int]] = [[] for _ in range(k)]
        logits = {j: first for j in range(k)}
        for step in range(cfg.max_new_tokens):
            live = []
            for j in sorted(logits):
                tok = draw(logits[j], cfg.temperature, cfg.top_p, float(rng.random()))
                tokens[j].append(tok)
                if tok not in self.eos_ids and step < cfg.max_new_tokens - 1:
                    live.append(j)
            if not live:
                break
            self._decode([(tokens[j][-1], n + step, j, True) for j in live])
            logits = {j: self._logits(i) for i, j in enumerate(live)}
        return [Sample(t, self.decode(t), t[-1] in self.eos_ids) for t in tokens]

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


def _threads() -> int:
    """As many threads as torch uses (OMP_NUM_THREADS or torch.set_num_threads decide)."""
    import torch

    return max(1, torch.get_num_threads())
