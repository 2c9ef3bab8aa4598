"""Candidate sampling on CPU through llama.cpp, from the student's own GGUF plus the current LoRA.

`sampling.engine: llama-cpp` with `backend: cpu`. Torch stays the reference and does the
training, the log-probs and the ranking; llama.cpp only draws the K candidates, from the same
weights training sees:

  - a `.gguf` student is sampled from that very file (training uses its dequantized weights,
    so both read the same numbers; llama.cpp quantizes activations inside its q4/q8 dot
    products, which moves logits by a few hundredths);
  - an HF-folder student is written once as an f32 GGUF into the cache (exact);
  - with `student.import_as: q8_0` either is re-quantized once to a q8_0 GGUF, which has
    batched kernels where Q4_1 has none on AVX2, and training uses *that* file's dequantized
    weights (edge_pu.quant.imported): sampled from the q8_0 file itself.

After each round the trained adapter is written as a GGUF LoRA (edge_pu.export.lora_gguf) and
the model is reloaded with it, so round r+1 samples from the policy round r produced.

Up to `sampling.prompt_batch` prompts go through llama.cpp together. Each is evaluated once, as
the first of its K sequences in a unified KV cache; its other K-1 sequences share those cells
(llama_memory_seq_cp), and then every unfinished candidate of every prompt in the group is one
row of the same llama_decode batch (8 prompts x K=4: 32 rows a step, where one prompt at a time
gave 4: the matrix products run at a far better rate on wide batches). Each prompt draws its
tokens from its own seeded generator, as the torch backend does, so a prompt's candidates do
not depend on the other prompts in its group.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import RunConfig, SamplingConfig
from ..errors import EdgePuError
from .base import Sample

MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ: sequences one context can hold
# Up to this many rows a group (prompts x K) shares one unified KV cache; past it each sequence
# gets a stream of its own. In a unified cache every row attends over every prompt's cells
# (masked), which grows with the square of the rows: SmolLM2 q8_0, 1 thread, tokens per
# CPU-second: 8 x K=4 (32 rows) 190 unified vs 182 streams; 16 x K=8 (128 rows) 109 vs 245.
UNIFIED_MAX_ROWS = 32
STREAM_CELLS = 256  # llama.cpp pads a stream's cells to a multiple of 256


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
    """The GGUF llama.cpp samples from: the file an imported student (`student.import_as`) was
    dequantized from, else the student's own file, else an f32 copy in the cache."""
    from ..quant.imported import imported_gguf

    imported = imported_gguf(student_dir)
    if imported is not None:
        return imported
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
        self.stream_cells = STREAM_CELLS
        self._load(cfg.sampling.k, _group_size(cfg.sampling.prompt_batch, cfg.sampling.k))

    def _load(self, k: int, prompts: int) -> None:
        """(Re)create the llama.cpp model with room for `prompts` prompts of K sequences each."""
        import llama_cpp.llama_cpp as ll
        from llama_cpp import Llama

        if self.llm is not None:
            self.llm.close()
        kwargs: dict[str, Any] = {"lora_path": str(self.lora)} if self.lora else {}
        if self.gguf.name.endswith("-f32.gguf"):  # an exact copy: keep the KV cache exact too
            kwargs.update(type_k=0, type_v=0)  # GGML_TYPE_F32 (default f16 moves logits ~1e-2)
        # Llama() offers no n_seq_max: its context takes llama_context_default_params(), so
        # hand it defaults with prompts x K sequences, over one unified KV cache (a prompt's K
        # candidates then share its cells; seq_cp only tags them) or, past UNIFIED_MAX_ROWS, one
        # stream per sequence (seq_cp copies the prompt's stream). The mode follows from the
        # config alone, so a prompt's samples never depend on how full its group is.
        self.kv_unified = prompts * k <= UNIFIED_MAX_ROWS
        defaults = ll.llama_context_default_params

        def params() -> Any:
            p = defaults()
            p.n_seq_max, p.kv_unified = prompts * k, self.kv_unified
            return p

        # The cells a group can need at worst: every prompt at max_length, of which the first
        # candidate's tokens are part, plus the other K-1 candidates' tokens.
        n_ctx = prompts * (self.max_length + (k - 1) * self.max_new_tokens)
        if not self.kv_unified:  # streams of n_ctx / n_seq_max cells, as many as in use
            n_ctx = prompts * k * self.stream_cells
        ll.llama_context_default_params = params
        try:
            self.llm = Llama(model_path=str(self.gguf), n_ctx=n_ctx, n_batch=n_ctx,
                             n_threads=_threads(), n_threads_batch=_threads(), seed=0,
                             verbose=False, **kwargs)
        finally:
            ll.llama_context_default_params = defaults
        self.k, self.prompts, self.n_vocab = k, prompts, self.llm.n_vocab()
        from llama_cpp._internals import LlamaBatch

        self.batch = LlamaBatch(n_tokens=n_ctx, embd=0, n_seq_max=1, verbose=False)

    def refresh(self, adapter_dir: Path | None, tag: str) -> None:
        """Sample from base + this PEFT adapter from now on (None: the base alone)."""
        if adapter_dir is None:
            self.lora = None
        else:
            from ..export.lora_gguf import write_lora_gguf

            self.lora = write_lora_gguf(adapter_dir, self.student_dir,
                                        self.work_dir / f"lora-{tag}.gguf")
        self._load(self.k, self.prompts)

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
        for i, prompt in enumerate(prompt_ids):
            if len(prompt) + cfg.max_new_tokens > self.max_length:
                raise EdgePuError(f"prompt {i}: {len(prompt)} tokens plus sampling."
                                  f"max_new_tokens {cfg.max_new_tokens} exceeds student."
                                  f"max_length {self.max_length}.")
        group = _group_size(cfg.prompt_batch, k)
        need = max(map(len, prompt_ids), default=0) + cfg.max_new_tokens
        grow = not self.kv_unified and need > self.stream_cells
        if (k, group) != (self.k, self.prompts) or cfg.max_new_tokens > self.max_new_tokens \
                or grow:
            self.max_new_tokens = max(self.max_new_tokens, cfg.max_new_tokens)
            self.stream_cells = max(self.stream_cells, -(-need // STREAM_CELLS) * STREAM_CELLS)
            self._load(k, group)
        out: list[list[Sample]] = []
        for start in range(0, len(prompt_ids), self.prompts):
            out += self._sample_group(prompt_ids[start:start + self.prompts], k, cfg,
                                      seeds[start:start + self.prompts])
        return out

    def _sample_group(self, prompts: Sequence[list[int]], k: int, cfg: SamplingConfig,
                      seeds: Sequence[int]) -> list[list[Sample]]:
        """Prefill the group's prompts in one batch, prompt p as sequence p*K; share each
        prompt's cells with its sequences p*K+1 .. p*K+K-1; then decode every unfinished
        candidate of the group together, one batch row each."""
        import llama_cpp.llama_cpp as ll

        mem = ll.llama_get_memory(self.llm._ctx.ctx)
        ll.llama_memory_clear(mem, True)
        rows = [(t, i, p * k, i == len(ids) - 1) for p, ids in enumerate(prompts)
                for i, t in enumerate(ids)]
        self._decode(rows)
        ends = np.cumsum([len(ids) for ids in prompts]) - 1
        logits = {(p, 0): self._logits(int(e)) for p, e in enumerate(ends)}
        for p in range(len(prompts)):
            for j in range(1, k):
                ll.llama_memory_seq_cp(mem, p * k, p * k + j, -1, -1)
                logits[(p, j)] = logits[(p, 0)]
        rngs = [np.random.default_rng(seed) for seed in seeds]
        tokens: list[list[list[int]]] = [[[] for _ in range(k)] for _ in prompts]
        for step in range(cfg.max_new_tokens):
            live = []
            for p, j in sorted(logits):  # per prompt, candidates in order: u draws repeat
                tok = draw(logits[(p, j)], cfg.temperature, cfg.top_p, float(rngs[p].random()))
                tokens[p][j].append(tok)
                if tok not in self.eos_ids and step < cfg.max_new_tokens - 1:
                    live.append((p, j))
            if not live:
                break
            self._decode([(tokens[p][j][-1], len(prompts[p]) + step, p * k + j, True)
                          for p, j in live])
            logits = {pj: self._logits(i) for i, pj in enumerate(live)}
        return [[Sample(t, self.decode(t), t[-1] in self.eos_ids) for t in cands]
                for cands in tokens]

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


def _group_size(prompt_batch: int, k: int) -> int:
    """Prompts decoded together: sampling.prompt_batch, as far as llama.cpp's sequence limit
    allows K sequences for each."""
    return max(1, min(prompt_batch, MAX_SEQUENCES // k))


def _threads() -> int:
    """As many threads as torch uses (OMP_NUM_THREADS or torch.set_num_threads decide), for
    batched decodes too: llama-cpp-python's n_threads_batch otherwise takes every core, and the
    sampler's decodes are all batches (K rows and more)."""
    import torch

    return max(1, torch.get_num_threads())
