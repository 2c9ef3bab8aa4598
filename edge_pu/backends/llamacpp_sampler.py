"""Candidate sampling on CPU through llama.cpp, from the student's own GGUF plus the current LoRA.

`sampling.engine: llama-cpp` with `backend: cpu`. Torch stays the reference and does the
training and its log-probs; llama.cpp draws the K candidates, answers an evaluation's prompts
greedily and, under `ranker.engine: llama-cpp`, runs the rankers' scoring passes (`logprobs`,
`next_token_logprobs`), from the same weights training sees (edge_pu.backends.llamacpp_engine
keeps the LoRA it holds in step with the backend's):

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
    from ..quant.cache import cache_root, weights_tag

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
        # Up to UNIFIED_MAX_ROWS rows one unified KV cache (a prompt's K candidates then share
        # its cells; seq_cp only tags them), past it one stream per sequence (seq_cp copies the
        # prompt's stream). The mode follows from the config alone, so a prompt's samples never
        # depend on how full its group is.
        unified = prompts * k <= UNIFIED_MAX_ROWS
        # The cells a group can need at worst: every prompt at max_length, of which the first
        # candidate's tokens are part, plus the other K-1 candidates' tokens.
        n_ctx = prompts * (self.max_length + (k - 1) * self.max_new_tokens)
        if not unified:  # streams of n_ctx / n_seq_max cells, as many as in use
            n_ctx = prompts * k * self.stream_cells
        self._context(prompts * k, n_ctx, unified)
        self.k, self.prompts = k, prompts

    def _context(self, n_seq: int, n_ctx: int, unified: bool) -> None:
        """A fresh llama.cpp model and context: `n_seq` sequences over `n_ctx` cells, the
        current LoRA applied."""
        import llama_cpp.llama_cpp as ll
        from llama_cpp import Llama

        if self.llm is not None:
            self.llm.close()
        kwargs: dict[str, Any] = {"lora_path": str(self.lora)} if self.lora else {}
        if self.gguf.name.endswith("-f32.gguf"):  # an exact copy: keep the KV cache exact too
            kwargs.update(type_k=0, type_v=0)  # GGML_TYPE_F32 (default f16 moves logits ~1e-2)
        # Llama() offers no n_seq_max: its context takes llama_context_default_params(), so
        # hand it defaults with n_seq sequences and the KV layout asked for.
        self.kv_unified = unified
        defaults = ll.llama_context_default_params

        def params() -> Any:
            p = defaults()
            p.n_seq_max, p.kv_unified = n_seq, unified
            return p

        ll.llama_context_default_params = params
        try:
            self.llm = Llama(model_path=str(self.gguf), n_ctx=n_ctx, n_batch=n_ctx,
                             n_threads=_threads(), n_threads_batch=_threads(), seed=0,
                             verbose=False, **kwargs)
        finally:
            ll.llama_context_default_params = defaults
        self.n_vocab = self.llm.n_vocab()
        self.shape = (n_seq, n_ctx, unified)
        self.k = self.prompts = 0  # no sampling layout until _load sets one
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
        if self.k:
            self._load(self.k, self.prompts)
        else:
            self._context(*self.shape)

    def fit(self, tokens: int) -> None:
        """Room for prompts and answers of `tokens` in all (an evaluation's prompts may be
        longer than training's student.max_length): the next sample() reloads if need be."""
        if tokens > self.max_length:
            self.max_length = tokens
            self.k = 0

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

    def logprobs(self, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]]
                 ) -> list[list[float]]:
        """Log-prob of every completion token given its prompt (Backend.logprobs), under the
        weights loaded now: base + the current LoRA."""
        inputs = [list(p) + list(c[:-1]) for p, c in zip(prompt_ids, completion_ids,
                                                          strict=True)]
        picks = [[[t] for t in c] for c in completion_ids]
        return [[x[0] for x in row] for row in self._score(prompt_ids, inputs, picks)]

    def next_token_logprobs(self, prompt_ids: Sequence[list[int]], candidates: Sequence[int]
                            ) -> list[list[float]]:
        """Log-probs of the `candidates` token ids right after each prompt."""
        picks = [[list(candidates)] for _ in prompt_ids]
        return [row[0] for row in self._score(prompt_ids, [list(p) for p in prompt_ids], picks)]

    def _score(self, prompts: Sequence[list[int]], inputs: Sequence[list[int]],
               picks: Sequence[list[list[int]]]) -> list[list[list[float]]]:
        """Row r decodes `inputs[r]` (its prompt, then what follows); the logits at positions
        len(prompt) - 1 onwards give log-probs of `picks[r][j]`'s tokens at the j-th of them.

        Rows in a run that share most of their prompt (a ranker's K candidates of one item:
        the instruction, then the draft or the candidate) decode that prefix once as the run's
        first sequence; its cells are shared with the others (seq_cp, a unified KV cache) and
        only each row's own tail is decoded, in one batch for every row. Logits are computed
        only where a log-prob is read."""
        import llama_cpp.llama_cpp as ll

        out: list[list[list[float]]] = [[] for _ in inputs]
        todo = [r for r in range(len(inputs)) if picks[r]]
        if not todo:
            return out
        runs = _prefix_runs([prompts[r] for r in todo])
        cells = sum(n for _, _, n in runs) + sum(len(inputs[r]) for r in todo)
        rows = len(todo)
        n_seq, n_ctx, unified = self.shape
        if not unified or rows > n_seq or cells > n_ctx:
            # Room to spare, so that the next calls of a ranking seldom reload.
            self._context(max(rows, UNIFIED_MAX_ROWS), max(2 * cells, n_ctx if unified else 0),
                          True)
        mem = ll.llama_get_memory(self.llm._ctx.ctx)
        ll.llama_memory_clear(mem, True)
        heads: list[tuple[int, int, int, bool]] = []
        for first, _, shared in runs:
            heads += [(t, i, first, False) for i, t in enumerate(prompts[todo[first]][:shared])]
        if heads:
            self._decode(heads)
        tails: list[tuple[int, int, int, bool]] = []
        where: list[tuple[int, int]] = []  # (row, batch index of its first read logit)
        for first, end, shared in runs:
            for j in range(first, end):
                if j != first and shared:
                    ll.llama_memory_seq_cp(mem, first, j, 0, shared)
                r = todo[j]
                start = len(prompts[r]) - 1
                where.append((r, len(tails) + start - shared))
                tails += [(t, i, j, i >= start) for i, t in enumerate(inputs[r]) if i >= shared]
        self._decode(tails)
        for r, at in where:  # llama_get_logits_ith takes the batch index of the row
            got = []
            for j, want in enumerate(picks[r]):
                z = self._logits_view(at + j).astype(np.float64)
                m = z.max()
                lse = m + np.log(np.exp(z - m).sum())
                got.append([float(z[t] - lse) for t in want])
            out[r] = got
        return out

    def _logits_view(self, i: int) -> np.ndarray:
        """The logits of batch row i of the last decode, not copied."""
        ptr = self.llm._ctx.get_logits_ith(i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

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


def _prefix_runs(prompts: Sequence[list[int]]) -> list[tuple[int, int, int]]:
    """(first row, end row, shared tokens) for runs of consecutive prompts that share a prefix:
    a row joins the run while the run's common prefix keeps at least half of what its first two
    rows share. The shared part stops one token short of the shortest prompt, so every logit
    read (from a prompt's last token on) comes from a row's own tail."""
    runs: list[tuple[int, int, int]] = []
    i = 0
    while i < len(prompts):
        shared, j = len(prompts[i]) - 1, i + 1
        floor = 0
        while j < len(prompts):
            common = _common(prompts[i], prompts[j], min(shared, len(prompts[j]) - 1))
            if j == i + 1:
                floor = max(1, common // 2)
            if common < floor:
                break
            shared, j = common, j + 1
        runs.append((i, j, shared if j > i + 1 else 0))
        i = j
    return runs


def _common(a: Sequence[int], b: Sequence[int], cap: int) -> int:
    n = 0
    while n < cap and a[n] == b[n]:
        n += 1
    return n


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
