"""Memory planner: predicted peak bytes of each stage of a run, and settings that fit a budget.

    edge-pu plan CONFIG.yaml [--device NAME] [--nproc N] [--set key=value ...]

`plan(cfg, model_config, budget_bytes=...)` reads only the student's shape (config.json, or GGUF
metadata through `read_model_shape`), never its weights, and imports no framework.
`check_fits(cfg, path)` is what `edge-pu run` calls before loading anything.

What is predicted. CPU: the absolute peak RSS of the process, so `RUNTIME_BYTES["cpu"]` (peak RSS
of a fresh process that imported torch, transformers and peft and trained a 64-wide model one
step: `bench/planner_accuracy.py`) is added to every stage. This holds with glibc's mmap
threshold pinned (`pin_cpu_allocator`, which the run should call before loading the student);
without it freed activations stay in the heap and RSS ran up to 1.6x higher here. CUDA: meant
as `torch.cuda.max_memory_allocated()` plus a CUDA-context allowance, MLX likewise; FIXME: both
reuse the torch CPU formulas and are not measured (no such device here). Every sequence is
taken at `student.max_length` tokens (T) with min(max_new_tokens, T-1) completion tokens (C):
the worst case the config allows. Not counted: the tokenizer and Python-side data. A .gguf
student's load is planned as its first run, the one-time dequantization into the cache (the file
plus one float32 tensor beside the weights); later runs map the cached weights lazily and stay
far under it.

The formulas (bytes; e = 4 for float32, 2 for bfloat16; h hidden, I intermediate, L layers,
nh heads of width d, kv = n_kv_heads*d, V vocab, r LoRA rank, N rows in one forward pass):
- weights: every parameter at e; with nf4 the decoder's linear weights take
  0.5 + 1/64 + 4/(64*256) bytes (4-bit codes, 8-bit absmax per 64, fp32 absmax per 256 blocks)
  and embeddings, lm_head and norms stay at e; mlx-affine-4 takes 0.5 + 4/64 (bf16 scale and
  bias per 64) for linears and embeddings. A dtype conversion at load maps the whole file too.
- LoRA: r*(in+out) per targeted module per layer, fp32: 4 (param) + 4 (grad) + 8 (AdamW).
- training activations saved per token per layer (`saved_per_token_layer`): both RMSNorm inputs
  upcast to fp32 (8h), q/k/v after RoPE and the attention output kept by SDPA (2*nh*d + 2*kv)*e
  (k, v repeated to nh heads once a padding mask is passed, which a batch of unequal rows
  always has), the fp32 log-sum-exp (4*nh), the float mask materialized per layer (T*e), the
  MLP's gate output, SiLU output and up output (3*I*e), and each LoRA module's input in fp32
  (shared between modules that read the same tensor when e = 4; peft casts per module else) plus
  its r-wide A output. Eager attention adds its probabilities (2*nh*T*e). A unit's rows share
  their prompt, run once (`shared_prefix_activations`): its T-C tokens count once per unit,
  each row adds its C completion tokens and the copy of the prompt's keys and values that its
  attention keeps. Gradient checkpointing runs every row whole (transformers returns no cache
  then), keeps only each layer's input (h*e) and recomputes one layer at a time.
- backward transients on top: the vocab projection of one chunk (LOGIT_CHUNK_BYTES of fp32
  logits, held as LOGIT_COPIES copies while its gradient is formed) or one layer's gradients
  over the widest pass, N*T*(3I + 2h)*e (whole rows) or max(prompts, completions) tokens,
  whichever is larger.
- no-grad passes (ranking, reference): the final hidden states N*T*h*e plus the larger of one
  layer's working set N*T*((3h + 3I) + T)*e and one logits chunk (two fp32 copies).
- sampling: the KV cache 2*L*K*T*kv*e, the prefill's logits (T-C)*V*e, and one layer's cache
  being regrown by torch.cat.
- `sampling.engine: llama-cpp` (`llamacpp_bytes`) instead: the GGUF it maps (its pages resident
  once the first decode has read them, so from `sample` on, in every later stage too: the
  sampler lives until the run ends), the LoRA as f32, its f16 KV cache of n_ctx cells (sized as
  edge_pu.backends.llamacpp_sampler sizes it), the compute buffer, dominated by the logits of one
  micro-batch of min(512, n_ctx) tokens (4*V each), and the output buffer (4*V per sequence).
  Measured peak RSS on the 0.5B student (18 task prompts, K = 4, T = 160) against this plan:
  sample +1%, rank and reference -2% (-6% to -2% at K = 2, T = 80), where the plan without
  this term was 20-25% under.
- data-parallel (torchrun, `--nproc N`; edge_pu.distributed): every rank holds the whole model,
  adapter and optimizer and runs micro-batches of the configured size, so the table is per rank;
  N ranks share one host's RAM on CPU (the budget is divided by the host's ranks), each has its
  own GPU on CUDA. A step all-reduces the adapter's fp32 gradients: 4 bytes per LoRA parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import RunConfig
from .errors import EdgePuError
from .model_shape import ModelShape, read_model_shape

MIB, GIB = 2**20, 2**30
LOGIT_CHUNK_BYTES = 64 * MIB  # = edge_pu.backends.torch_backend.LOGIT_CHUNK_BYTES (a test checks)
LOGIT_COPIES = 4  # logits, exp() inside logsumexp, its gradient, the gather's scattered gradient
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
MLX_AFFINE4_BYTES = 0.5 + 4 / 64
# CPU: peak RSS of a fresh python that imported torch 2.13.0+cpu, transformers 5.24 and peft
# 0.21.2 and trained a 64-wide model one step (427 MiB, Linux x86-64; 397 MiB after the imports
# alone): `python bench/planner_accuracy.py --case none` prints it as the baseline row.
# CUDA and MLX: FIXME not measured here (no such device); a CUDA context is ~0.5 GiB.
RUNTIME_BYTES = {"cpu": 426 * MIB, "cuda": 600 * MIB, "mlx": 300 * MIB}
LORA_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in",
              "o_proj": "attn_out", "gate_proj": "mlp_in", "up_proj": "mlp_in",
              "down_proj": "mlp_mid"}


@dataclass(frozen=True)
class Stage:
    name: str
    parts: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        return sum(b for _, b in self.parts)


@dataclass(frozen=True)
class Settings:
    """The knobs the planner may turn."""

    max_length: int
    micro_batch: int
    gradient_checkpointing: bool
    rank_batch: int
    k_chunk: int


def elem_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def weight_bytes(s: ModelShape, dtype: str, quant: str) -> int:
    e = elem_bytes(dtype)
    linear, embed = s.linear_params(), s.embed_params()
    rest = s.param_count() - linear - embed
    if quant == "nf4":
        return int(linear * NF4_BYTES) + (embed + rest) * e
    if quant == "mlx-affine-4":
        return int((linear + embed) * MLX_AFFINE4_BYTES) + rest * e
    return s.param_count() * e


def lora_params(s: ModelShape, targets: tuple[str, ...], r: int) -> int:
    dims = s.module_dims()
    return s.layers * sum(r * (dims[t][0] + dims[t][1]) for t in targets if t in dims)


def saved_per_token_layer(s: ModelShape, targets: tuple[str, ...], r: int, e: int, T: int,
                          padded: bool = True) -> int:
    """Bytes autograd keeps per token per decoder layer for the backward pass (no checkpoint)."""
    qd = s.heads * s.head_dim
    kv_width = qd if padded else s.kv_dim
    b = 8 * s.hidden + (2 * qd + 2 * kv_width) * e + 4 * s.heads + 3 * s.intermediate * e
    if padded:
        b += T * e
    if s.attn_impl == "eager":
        b += 2 * s.heads * T * e
    width = {"attn_in": s.hidden, "attn_out": qd, "mlp_in": s.hidden, "mlp_mid": s.intermediate}
    known = [t for t in targets if t in LORA_INPUT]
    if e == 4:  # fp32: modules reading the same tensor share it; o_proj reads SDPA's output
        b += sum(4 * width[g] for g in {LORA_INPUT[t] for t in known} if g != "attn_out")
    else:  # peft casts the input to the adapter's fp32 in every module
        b += sum(4 * width[LORA_INPUT[t]] for t in known)
    return b + 4 * r * len(known)


def shared_prefix_activations(s: ModelShape, targets: tuple[str, ...], r: int, e: int,
                              units: int, rows: int, P: int, C: int) -> int:
    """Bytes a training forward without checkpointing saves for backward when `units`
    prompts of P tokens are run once and their `rows` completions of C tokens attend to the
    gathered cache (edge_pu.backends.torch_backend `_shared_prefix_logp`): the prompt tokens
    with a P-wide mask, the completion tokens with a (P+C)-wide one, each row's copy of its
    prompt's keys and values that attention keeps (at the query heads' width once a mask is
    passed), and the final norm's fp32 input plus the completion hidden states."""
    L, T = s.layers, P + C
    prompt = units * P * L * saved_per_token_layer(s, targets, r, e, P)
    answer = rows * C * L * saved_per_token_layer(s, targets, r, e, T)
    kept_kv = rows * L * P * 2 * s.heads * s.head_dim * e
    head = (units * P + rows * C) * 4 * s.hidden + rows * C * s.hidden * e
    return prompt + answer + kept_kv + head


# = edge_pu.backends.llamacpp_sampler's (a test checks): llama.cpp's sequence limit, the rows
# past which each sequence gets its own KV stream, and a stream's cells; llama-cpp-python's
# default micro-batch (n_ubatch)
LLAMA_MAX_SEQUENCES, LLAMA_UNIFIED_MAX_ROWS, LLAMA_STREAM_CELLS, LLAMA_UBATCH = 256, 32, 256, 512
IMPORT_BYTES = {"q8_0": 34 / 32, "q4_0": 18 / 32, "f16": 2.0}  # per weight, student.import_as


def llamacpp_bytes(cfg: RunConfig, s: ModelShape, T: int, C: int) -> int:
    """Resident bytes of the llama.cpp sampler once it has decoded (see the module docstring)."""
    k = cfg.sampling.k
    if cfg.student.import_as:
        gguf, kv_e = int(s.param_count() * IMPORT_BYTES.get(cfg.student.import_as, 2.0)), 2
    elif s.gguf:
        gguf, kv_e = s.file_bytes, 2
    else:  # an HF folder is sampled from an f32 copy, with an f32 KV cache
        gguf, kv_e = s.param_count() * 4, 4
    prompts = max(1, min(cfg.sampling.prompt_batch, LLAMA_MAX_SEQUENCES // k))
    if prompts * k <= LLAMA_UNIFIED_MAX_ROWS:
        n_ctx = prompts * (T + (k - 1) * C)
    else:
        n_ctx = prompts * k * LLAMA_STREAM_CELLS
    kv = n_ctx * s.layers * 2 * s.kv_dim * kv_e
    buffers = (min(LLAMA_UBATCH, n_ctx) + prompts * k) * 4 * s.vocab
    return gguf + 4 * lora_params(s, cfg.lora.target_modules, cfg.lora.r) + kv + buffers


def _logit_rows(s: ModelShape, tokens: int) -> int:
    return max(1, min(tokens, LOGIT_CHUNK_BYTES // (4 * s.vocab)))


def stages(cfg: RunConfig, s: ModelShape, st: Settings) -> list[Stage]:
    """Predicted bytes of each stage, runtime excluded, for the settings `st`."""
    e, T = elem_bytes(cfg.student.dtype), st.max_length
    C = max(1, min(cfg.sampling.max_new_tokens, T - 1))
    h, i, L = s.hidden, s.intermediate, s.layers
    w = ("weights", weight_bytes(s, cfg.student.dtype, cfg.student.quant))
    n_lora = lora_params(s, cfg.lora.target_modules, cfg.lora.r)
    lora = ("LoRA params+grads+AdamW", 16 * n_lora)
    out = [Stage("load", (w, ("load transient", _load_transient(cfg, s))))]

    if cfg.sampling.engine == "llama-cpp":  # llama.cpp samples; torch holds weights + adapter
        cpp = (("llama.cpp sampler (GGUF, LoRA, KV)", llamacpp_bytes(cfg, s, T, C)),)
        out.append(Stage("sample", (w, lora, *cpp)))
    else:
        cpp = ()
        kv = 2 * L * st.k_chunk * T * s.kv_dim * e
        out.append(Stage("sample", (w, lora, (f"KV cache {st.k_chunk} rows x {T}", kv),
                                    ("prefill logits", (T - C) * s.vocab * e),
                                    ("cache regrowth", kv // (2 * L)),
                                    ("decode step", st.k_chunk * ((3 * h + 3 * i) * e
                                                                  + 24 * s.vocab)))))
    R = st.rank_batch
    scoring = (w, lora, *cpp, ("final hidden states", R * T * h * e))
    layer = R * T * ((3 * h + 3 * i) * e + T * e)  # one layer's working set, mask included
    chunk = _logit_rows(s, R * C) * s.vocab * (8 + (0 if e == 4 else 2))
    if cfg.ranker.mode == "judge":
        out.append(Stage("rank", (*scoring, ("max(layer, next-token logits)",
                                             max(layer, R * s.vocab * 8)))))
    elif cfg.ranker.mode == "likelihood":
        out.append(Stage("rank", (*scoring, ("max(layer, logits chunk)", max(layer, chunk)))))
    elif cfg.ranker.mode == "recall":  # each row scores the anchor after prompt + draft
        A = max(1, min(cfg.teacher.max_tokens + 1, T - 1))
        chunk_a = _logit_rows(s, R * A) * s.vocab * (8 + (0 if e == 4 else 2))
        out.append(Stage("rank", (*scoring, ("max(layer, logits chunk)",
                                             max(layer, chunk_a)))))
    out.append(Stage("reference", (*scoring, ("max(layer, logits chunk)",
                                              max(layer, chunk)))))

    group = cfg.sampling.k + (1 if cfg.train.anchor == "positive" else 0)  # K + the anchor
    units = st.micro_batch
    rows = units * (2 if cfg.train.algorithm == "dpo" else group)
    out.append(_train_stage("train", cfg, s, st, (w, lora, *cpp), units, rows, C))
    if cfg.sft.enabled:  # stage 1: micro_batch distinct prompts, each with its whole anchor
        A = max(1, min(cfg.teacher.max_tokens + 1, T - 1))
        out.append(_train_stage("sft", cfg, s, st, (w, lora), cfg.sft.micro_batch,
                                cfg.sft.micro_batch, A))
    return out


def _train_stage(name: str, cfg: RunConfig, s: ModelShape, st: Settings,
                 fixed: tuple[tuple[str, int], ...], units: int, rows: int, C: int) -> Stage:
    """One optimizer step's peak: `units` prompts (each run once) and `rows` completions of
    up to C tokens."""
    e, T = elem_bytes(cfg.student.dtype), st.max_length
    h, i, L = s.hidden, s.intermediate, s.layers
    per_layer = saved_per_token_layer(s, cfg.lora.target_modules, cfg.lora.r, e, T)
    head = rows * T * 4 * h + rows * C * h * e  # final norm input; completion hidden states
    logits = LOGIT_COPIES * 4 * _logit_rows(s, rows * C) * s.vocab
    if cfg.student.dtype != "float32":
        logits += 2 * _logit_rows(s, rows * C) * s.vocab  # the head's bf16 output before .float()
    # Without checkpointing a unit's prompt runs once (T - C tokens) and each row adds C.
    widest = rows * T if st.gradient_checkpointing else max(units * (T - C), rows * C)
    grads = widest * (3 * i + 2 * h) * e
    if cfg.student.quant != "none":  # a 4-bit layer dequantizes its weight for each matmul
        grads += s.largest_linear() * e
    if st.gradient_checkpointing:
        acts = (f"layer inputs {rows} x {T}", rows * T * L * h * e + head)
        trans = ("backward transient", max(logits, rows * T * per_layer + grads))
    else:
        acts = (f"activations {units} prompts x {T - C} + {rows} x {C}",
                shared_prefix_activations(s, cfg.lora.target_modules, cfg.lora.r, e, units,
                                          rows, T - C, C))
        trans = ("backward transient", max(logits, grads))
    return Stage(name, (*fixed, acts, trans))


def _load_transient(cfg: RunConfig, s: ModelShape) -> int:
    """Bytes mapped or copied while loading, beyond the resident weights."""
    if cfg.student.quant == "nf4":
        return 2 * s.largest_linear() * elem_bytes(s.file_dtype)  # one tensor read, quantized
    if s.gguf:  # the first run's dequantization (edge_pu.quant.student): the file mapped,
        # and transformers' float32 copy of one tensor at a time, the embedding the largest.
        # Measured first-time peaks, Qwen2.5-Coder Q4_K_M: 0.5B 3,792 MiB (this plan 3,817),
        # 1.5B 8,820 MiB (9,161).
        return s.file_bytes + 4 * s.vocab * s.hidden
    if cfg.student.dtype != s.file_dtype:
        return s.file_bytes or s.param_count() * elem_bytes(s.file_dtype)
    return 0


@dataclass(frozen=True)
class Plan:
    backend: str
    budget_bytes: int
    runtime_bytes: int
    settings: Settings
    stages: tuple[Stage, ...]
    fits: bool  # the chosen settings fit the budget
    given_fits: bool  # the config exactly as given fits
    given_peak: int
    changes: dict[str, Any]  # dotted config key -> value the planner chose
    notes: tuple[str, ...] = ()

    @property
    def peak_stage(self) -> Stage:
        return max(self.stages, key=lambda st: st.total)

    @property
    def peak_bytes(self) -> int:
        return self.runtime_bytes + self.peak_stage.total

    def overrides(self) -> list[str]:
        return [f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                for k, v in self.changes.items()]

    def table(self) -> str:
        lines = [f"{'stage':<10} {'part':<34} {'MiB':>10}"]
        for stage in self.stages:
            for j, (name, b) in enumerate(stage.parts):
                lines.append(f"{stage.name if j == 0 else '':<10} {name:<34} {b / MIB:>10.1f}")
            lines.append(f"{'':<10} {'= ' + stage.name + ' (+ runtime)':<34} "
                         f"{(stage.total + self.runtime_bytes) / MIB:>10.1f}")
        lines.append(f"runtime    {self.backend + ' framework baseline':<34} "
                     f"{self.runtime_bytes / MIB:>10.1f}")
        lines.append(f"peak       {self.peak_stage.name:<34} {self.peak_bytes / MIB:>10.1f}")
        lines.append(f"budget     {'':<34} {self.budget_bytes / MIB:>10.1f}")
        return "\n".join(lines)


def _model_shape(model_config: Any) -> ModelShape:
    if isinstance(model_config, ModelShape):
        return model_config
    if isinstance(model_config, (str, Path)):
        return read_model_shape(model_config)
    if not isinstance(model_config, Mapping):
        model_config = model_config.to_dict()  # a transformers PretrainedConfig
    return ModelShape.from_config(dict(model_config))


def plan(cfg: RunConfig, model_config: Any, *, budget_bytes: int,
         backend: str | None = None) -> Plan:
    """Predict each stage's peak and pick settings that fit `budget_bytes`.

    Tried in order until everything fits: the config as given; smaller ranker.batch_size;
    smaller train.micro_batch (checkpointing left as given); checkpointing on with the largest
    micro_batch that fits; K candidates sampled in chunks (only where the config has
    sampling.k_chunk); max_length halved, down to max_new_tokens + 16.
    """
    s = _model_shape(model_config)
    backend = backend or _backend(cfg)
    runtime = RUNTIME_BYTES.get(backend, RUNTIME_BYTES["cpu"])
    room = budget_bytes - runtime
    k_chunk = getattr(cfg.sampling, "k_chunk", 0) or cfg.sampling.k
    given = Settings(cfg.student.max_length, cfg.train.micro_batch,
                     cfg.train.gradient_checkpointing, cfg.ranker.batch_size, k_chunk)
    given_peak = max(x.total for x in stages(cfg, s, given))

    def fits(*names: str) -> Callable[[Settings], bool]:
        return lambda x: all(y.total <= room for y in stages(cfg, s, x) if y.name in names)

    floor = min(given.max_length, cfg.sampling.max_new_tokens + 16)
    T = given.max_length
    while True:
        chosen = _shrink(replace(given, max_length=T), "rank_batch", fits("rank", "reference"))
        chosen = _fit_train(chosen, fits("train"))
        if hasattr(cfg.sampling, "k_chunk"):
            chosen = _shrink(chosen, "k_chunk", fits("sample"))
        if fits(*(x.name for x in stages(cfg, s, chosen)))(chosen) or T <= floor:
            break
        T = max(floor, T // 2)
    final = tuple(stages(cfg, s, chosen))
    all_fit = max(x.total for x in final) <= room
    keys = {"max_length": "student.max_length", "micro_batch": "train.micro_batch",
            "gradient_checkpointing": "train.gradient_checkpointing",
            "rank_batch": "ranker.batch_size", "k_chunk": "sampling.k_chunk"}
    changes = {keys[k]: getattr(chosen, k) for k in keys
               if getattr(chosen, k) != getattr(given, k)}
    notes = []
    if not hasattr(cfg.sampling, "k_chunk") and not fits("sample")(chosen):
        notes.append("sampling holds all K candidates' KV cache at once; this edge_pu has no "
                     "sampling.k_chunk to split it: lower sampling.k or max_new_tokens")
    if weight_bytes(s, cfg.student.dtype, cfg.student.quant) > room:
        notes.append("the weights alone exceed the budget: use a smaller student, bfloat16, "
                     "or a 4-bit quant format")
    return Plan(backend, budget_bytes, runtime, chosen, final, all_fit,
                given_peak <= room, given_peak + runtime, changes, tuple(notes))


def _shrink(st: Settings, knob: str, ok: Callable[[Settings], bool]) -> Settings:
    """Halve `knob` until `ok` (or 1)."""
    while getattr(st, knob) > 1 and not ok(st):
        st = replace(st, **{knob: getattr(st, knob) // 2})
    return st


def _fit_train(st: Settings, ok: Callable[[Settings], bool]) -> Settings:
    """The user's checkpointing with the largest micro_batch that fits, else checkpointing on."""
    for gc in (st.gradient_checkpointing, True):
        for mb in range(st.micro_batch, 0, -1):
            cand = replace(st, micro_batch=mb, gradient_checkpointing=gc)
            if ok(cand):
                return cand
    return replace(st, micro_batch=1, gradient_checkpointing=True)


def _backend(cfg: RunConfig) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    from .backends import detect

    return detect()


def budget_for(cfg: RunConfig, backend: str) -> tuple[int, str]:
    """(budget bytes, where it came from): the device profile, else this machine's memory."""
    if cfg.device:
        from .devices import load_profile

        prof = load_profile(cfg.device)
        return prof.budget_bytes, f"device profile '{prof.name}'"
    from . import devices

    if backend == "cuda":
        name, total = devices.nvidia_gpu()
        if total:
            return total, f"{name} memory (nvidia-smi)"
    return devices.total_ram_bytes(), "this machine's total RAM"


def rank_budget(budget: int, source: str, backend: str, host_ranks: int) -> tuple[int, str]:
    """One rank's share of the budget: CPU ranks on one host share its memory; a CUDA rank
    has a GPU of its own."""
    if host_ranks <= 1 or backend != "cpu":
        return budget, source
    return budget // host_ranks, f"{source}, shared by {host_ranks} ranks"


def check_fits(cfg: RunConfig, model_config_path: str | Path) -> None:
    """Refuse, with the numbers, a config whose predicted peak exceeds its memory budget.

    Reads only config.json (or the GGUF header); the device profile's limits are checked too.
    In a torchrun job the budget is this rank's (`rank_budget`).
    """
    from . import distributed as dist

    if cfg.device:
        from .devices import load_profile

        load_profile(cfg.device).check(cfg)
    shape = read_model_shape(model_config_path)
    backend = _backend(cfg)
    budget, source = rank_budget(*budget_for(cfg, backend), backend, dist.world().local_size)
    if not budget:
        return
    p = plan(cfg, shape, budget_bytes=budget, backend=backend)
    if p.given_fits:
        return
    fix = (f" It fits with: {' '.join('--set ' + o for o in p.overrides())}." if p.fits else
           " Nothing the planner may change makes it fit" + (f" ({'; '.join(p.notes)})."
                                                            if p.notes else "."))
    raise EdgePuError(f"{model_config_path}: this config needs about {p.given_peak / GIB:.2f} GiB"
                      f" at its peak, more than the {budget / GIB:.2f} GiB budget of {source}."
                      f"{fix} See `edge-pu plan` for each stage.", exit_code=3)


def model_config_path(student_path: str) -> Path:
    """config.json of an HF student dir, or the .gguf file itself."""
    if not student_path:
        raise EdgePuError("config: student.path is not set; the planner reads its config.json "
                          "(or GGUF header) to size the model.")
    path = Path(student_path).expanduser()
    if not path.exists():  # the same words as the loader's, whichever check runs first
        raise EdgePuError(f"student.path {path}: no such file or folder.")
    return path / "config.json" if path.is_dir() else path


def data_parallel_lines(cfg: RunConfig, s: ModelShape, nproc: int, backend: str) -> list[str]:
    """What `--nproc N` adds to the plan: each step's split over the ranks and the bytes
    all-reduced per optimizer step."""
    n_lora = lora_params(s, cfg.lora.target_modules, cfg.lora.r)
    lines = [f"data-parallel over {nproc} ranks (torchrun --nproc-per-node {nproc}): every rank "
             "holds the whole model,\n  adapter and optimizer, so the table above is per rank"
             + (f"; the {nproc} ranks of one host need {nproc} x its peak of RAM"
                if backend == "cpu" else "; one GPU per rank")]
    idle = []
    unit = "pairs" if cfg.train.algorithm == "dpo" else "groups"
    for name, batch, micro, what in (
            ("sft", cfg.sft.batch_size, cfg.sft.micro_batch, "anchors"),
            (cfg.train.algorithm, cfg.train.batch_size, cfg.train.micro_batch, unit)):
        if name == "sft" and not cfg.sft.enabled:
            continue
        m = -(-batch // micro)
        lines.append(f"  {name} step: {batch} {what} in {m} micro-batch(es) of {micro}, dealt "
                     f"to the ranks: up to {-(-m // nproc)} per rank per step")
        if m < nproc:
            idle.append(f"note: a {name} step has {m} micro-batch(es) for {nproc} ranks, so "
                        f"{nproc - m} ranks wait during its training; set "
                        f"{'sft' if name == 'sft' else 'train'}.micro_batch <= "
                        f"{max(1, batch // nproc)} to give each rank one")
    lines.append(f"  sampling and scoring: every {nproc}th prompt per rank; the anchors are "
                 "rank 0's alone (one teacher call per prompt)")
    lines.append(f"  all-reduced per optimizer step: {n_lora:,} LoRA parameters x 4 bytes "
                 f"(fp32 gradients) = {4 * n_lora / MIB:.1f} MiB (a ring all-reduce sends and "
                 f"receives 2(N-1)/N of it per rank)")
    return lines + idle


def plan_command(config: str, overrides: list[str], device: str = "", nproc: int = 1) -> int:
    """`edge-pu plan`: print the per-stage table and the choices; 0 if the config as given
    fits its budget, 1 if not (the output says which --set changes make it fit, if any).
    `nproc` > 1 plans one rank of a torchrun job of that many processes on this host."""
    from .config import load_config
    from .devices import detect_profile, load_profile

    if nproc < 1:
        raise EdgePuError(f"--nproc {nproc}: the number of processes must be at least 1.")
    cfg = load_config(config, [*overrides, *([f"device={device}"] if device else [])])
    shape = read_model_shape(model_config_path(cfg.student.path))
    backend = _backend(cfg)
    budget, source = rank_budget(*budget_for(cfg, backend), backend, nproc)
    print(f"student: {cfg.student.path} ({shape.arch or 'decoder'}, "
          f"{shape.param_count() / 1e6:.1f}M params, {cfg.student.dtype}, quant "
          f"{cfg.student.quant}); backend {backend}; budget {budget / GIB:.2f} GiB from {source}")
    if not cfg.device:
        found = detect_profile()
        if found:
            print(f"(this machine looks like '{found.name}'; --device {found.name} plans for "
                  "it)")
    bad = load_profile(cfg.device).problems(cfg) if cfg.device else []
    p = plan(cfg, shape, budget_bytes=budget, backend=backend)
    st = p.settings
    comp = min(cfg.sampling.max_new_tokens, st.max_length - 1)
    print(f"sequences of {st.max_length} tokens ({comp} completion); {cfg.train.algorithm} "
          f"micro-batch {st.micro_batch}, gradient checkpointing "
          f"{'on' if st.gradient_checkpointing else 'off'}; scoring batch "
          f"{st.rank_batch}; {st.k_chunk} of K={cfg.sampling.k} candidates sampled at once\n")
    print(p.table() + "\n")
    if nproc > 1:
        print("\n".join(data_parallel_lines(cfg, shape, nproc, backend)) + "\n")
    for note in (*bad, *p.notes):
        print(f"note: {note}")
    if p.given_fits and not bad:
        print(f"fits: peak {p.peak_bytes / GIB:.2f} GiB ({p.peak_stage.name}) of "
              f"{budget / GIB:.2f} GiB")
        return 0
    if not p.given_fits and p.fits:
        print(f"does not fit as given (peak {p.given_peak / GIB:.2f} GiB); the table above fits "
              f"with: {' '.join('--set ' + o for o in p.overrides())}")
    elif not p.fits:
        print(f"cannot fit: even the smallest settings tried need {p.peak_bytes / GIB:.2f} GiB "
              f"of {budget / GIB:.2f} GiB")
    return 1


TIGHT_MMAP_THRESHOLD = 128 * 1024  # what the CPU predictions are measured under
FAST_MMAP_THRESHOLD = 4 * 2**20
FAST_HEADROOM = 1.5  # the fast setting's peak RSS measured up to 1.38x the tight one's


def pin_cpu_allocator(threshold: int = TIGHT_MMAP_THRESHOLD) -> bool:
    """Make glibc hand freed tensor memory back to the OS; True where it applied (Linux glibc).

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
    activation-sized tensors come from the heap and are kept there after free: the process's
    RSS then holds the previous step's peak plus fragmentation, measured here at up to 1.6x the
    live tensors and growing from step to step. A fixed threshold keeps every tensor above it
    in its own mapping, returned on free, so RSS follows the live tensors this planner counts.
    That has a price: every mapping is page-faulted in afresh when touched. On SmolLM2 (bench/
    allocator.py, bench/README.md) 128 KiB made a DPO step of 8 rows 1.8x slower (8.3 s vs
    4.5 s) and sampling 1.3x slower than a 4 MiB threshold, which in turn peaked 38% higher
    (3.0 GB vs 2.2 GB). `cpu_allocator_threshold` picks between the two per run.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another libc: no mallopt to call
        return False
    m_mmap_threshold = -3
    return bool(libc.mallopt(m_mmap_threshold, threshold))


def cpu_allocator_threshold(cfg: RunConfig) -> int:
    """The mmap threshold for this run: fast (4 MiB) where the predicted peak, with the fast
    setting's extra heap, still fits the memory budget 1.5 times over; else tight (128 KiB),
    under which the predictions were measured. $EDGE_PU_MMAP_THRESHOLD (bytes; 0 leaves glibc's
    dynamic threshold alone) overrides."""
    import os

    env = os.environ.get("EDGE_PU_MMAP_THRESHOLD", "")
    if env.isdigit():
        return int(env)
    try:
        budget, _ = budget_for(cfg, "cpu")
        p = plan(cfg, read_model_shape(model_config_path(cfg.student.path)),
                 budget_bytes=budget or 2**62, backend="cpu")
    except (EdgePuError, OSError, ValueError, KeyError):
        return TIGHT_MMAP_THRESHOLD  # cannot size the run: stay predictable
    fast = budget and p.given_peak * FAST_HEADROOM <= budget
    return FAST_MMAP_THRESHOLD if fast else TIGHT_MMAP_THRESHOLD
