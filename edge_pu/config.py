"""Run configuration: one frozen dataclass per stage, resolved in a fixed order.

Precedence, lowest first: dataclass defaults < device profile < config file < `--set key=value`.
`load_config(path, overrides)` returns a `RunConfig`; `config_to_dict` gives the resolved form that
the run prints at start and saves as `run_dir/config.resolved.yaml`. An unknown key is refused
with the nearest valid key suggested; a value of the wrong type names its field.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .config_checks import CHOICES, EXPORT_FORMATS, POSITIVE, validate  # noqa: F401 (re-exported)
from .errors import EdgePuError

if typing.TYPE_CHECKING:
    from .devices import DeviceProfile


@dataclass(frozen=True)
class StudentConfig:
    path: str = ""  # HF model dir, a .gguf file (dequantized once, cached), or a model
    # name `edge-pu fetch` knows (qwen-0.5b, ...): its verified file in the cache
    dtype: str = "float32"  # float32 | bfloat16 (compute dtype of the trained weights)
    quant: str = "none"  # none | nf4 (bitsandbytes) | mlx-affine-4 ; GGUF inputs add gguf:<type>
    # auto: q8_0 for a Q4_1 GGUF that llama.cpp samples (no batched Q4_1 kernel on AVX2), else
    # the student's own weights (""); q8_0 (q4_0, f16) re-quantizes them once into that GGUF
    # type and trains on its dequantization. Resolved when the config is built (the resolved
    # config holds the choice). edge_pu.quant.auto, edge_pu.quant.imported; bench/README.md
    import_as: str = "auto"
    trust_remote_code: bool = False
    max_length: int = 512  # prompt + completion tokens the student may see


@dataclass(frozen=True)
class TeacherConfig:
    kind: str = "file"  # openai | hf | gguf | file | oracle
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = ""
    api_key_env: str = ""  # name of the environment variable holding the key (never the key)
    api_key_file: str = ""  # or a file holding the key (a mounted secret); never the key itself
    path: str = ""  # hf: model dir; gguf: .gguf file; file: anchors JSONL
    system_prompt: str = ""
    max_tokens: int = 256  # per answer (the API's max_tokens); part of every anchor's key
    temperature: float = 0.0
    timeout_s: float = 60.0
    retries: int = 4
    backoff_s: float = 1.0
    max_calls: int = 0  # requests, retries included; 0 = no budget; never exceeded, ever
    # Tokens (the server's usage.total_tokens, summed over requests); 0 = no budget. Named
    # token_budget because max_tokens is already the per-answer length. See edge_pu.anchors.
    token_budget: int = 0


@dataclass(frozen=True)
class DataConfig:
    # JSONL, JSON (array), CSV, Parquet or a datasets save_to_disk folder (edge_pu.data)
    prompts: str = ""
    limit: int = 0  # 0 = all prompts
    format: str = "auto"  # auto (by the name) | jsonl | json | csv | parquet | datasets
    prompt_field: str = "prompt"  # the field holding a prompt string ("messages" is also read)
    system_prompt: str = ""  # put first in every conversation that has no system turn


@dataclass(frozen=True)
class SamplingConfig:
    k: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 0.95  # the demo's and eval's setting: the tail of a 135M model's vocabulary
    seed: int = 0
    prompt_batch: int = 8  # prompts decoded together (each with its K rows)
    engine: str = "backend"  # backend | llama-cpp (CPU: draw candidates from the GGUF + LoRA)


@dataclass(frozen=True)
class RankerConfig:
    # recall: on SmolLM2-135M's SFT candidates it orders them like the checker with Kendall tau
    # 0.62 [0.53, 0.70] where the likelihood gain reaches 0.38 [0.24, 0.50] (3 seeds, same
    # candidates; the judge 0.18 the day before): bench/eval-results/smollm2-recall-2026-12-02.md
    mode: str = "recall"  # recall | likelihood | judge | similarity | bleu | random | reward
    judge: str = "initial"  # initial (frozen starting student) | current (the policy)
    judge_style: str = "yesno"  # yesno | rating
    batch_size: int = 8
    # backend | llama-cpp (the scoring passes through the model sampling.engine: llama-cpp
    # opens, on the same weights; bench/scoring.py measures both)
    engine: str = "backend"
    # Verifiers (edge_pu.rewards): "module:function" in TRL's reward-function convention,
    # scored by mode: reward, and (train.anchor_check) used to test each anchor.
    reward_funcs: tuple[str, ...] = ()
    reward_weights: tuple[str, ...] = ()  # one number per function; () = all 1.0
    reward_tiebreak: str = ""  # mode: reward: a self-ranking mode orders equal rewards


@dataclass(frozen=True)
class SftConfig:
    """Stage 1: supervised fine-tuning of the LoRA on the anchors (METHOD.md, "Two stages").

    The PU stage then starts from this adapter, with it as the reference policy, the frozen
    judge and the round-1 sampler. `enabled: false` skips the stage (single-stage PU)."""

    enabled: bool = True
    steps: int = 0  # 0 = derive from epochs
    epochs: float = 2.0
    batch_size: int = 8  # (prompt, anchor) rows per optimizer step
    micro_batch: int = 2  # rows per forward pass; anchors are up to teacher.max_tokens long
    lr: float = 5e-4
    warmup_steps: int = 2
    # Early stopping on held-back anchors (label-free: the teacher's own answers): every
    # eval_every steps the mean token NLL of val_fraction of the anchors (never trained on);
    # stop after `patience` evaluations without a new best and keep the best adapter.
    early_stop: bool = False
    val_fraction: float = 0.1
    eval_every: int = 4
    patience: int = 2


@dataclass(frozen=True)
class TrainConfig:
    algorithm: str = "grpo"  # dpo | grpo
    grpo_variant: str = "advantage"  # advantage | distribution
    pair_strategy: str = "best-worst"  # best-worst | all
    margin: float = 0.0
    tau: float = 0.5  # listwise target temperature, in calibrated units (see calibration)
    # How the ranker's raw scores are put on one scale before pairs or softmax (METHOD.md):
    # pooled = centred per prompt, divided by the round's pooled within-prompt std (tau then
    # means the same for every ranker, and a prompt whose candidates barely differ keeps a
    # small spread); zscore = per-prompt std (inflates near-ties); rank; none (raw scores).
    calibration: str = "pooled"
    unfinished: str = "below"  # below (ranked under every finished candidate) | drop | keep
    anchor: str = "positive"  # positive: the anchor joins as the labelled best | none
    anchor_margin: float = 1.0  # the anchor's calibrated score above the best candidate
    # With ranker.reward_funcs set: reward = an anchor joins as the positive only where it
    # scores at least the group's best candidate under them (one that fails its own prompt's
    # constraints is not pushed); none = always. Without reward functions nothing checks it.
    anchor_check: str = "reward"
    advantage_norm: str = "pooled"  # pooled (round-level std of r) | group (per-group std)
    # Which prompts a round trains on: all | spread (only prompts whose candidates the ranker
    # tells apart, and under a fixed step budget the widest-spread ones: not the prompts the
    # student already answers the same way every time). edge_pu.train.select_prompts
    select: str = "spread"
    # Prompts a PU round samples K candidates for: 0 = every anchored prompt; N = a seeded
    # subset of N, drawn afresh each round (sampling is the round's costliest stage, and
    # under a fixed step budget only the widest-spread prompts train). edge_pu.train.pu_subset
    sample_prompts: int = 0
    steps: int = 0  # 0 = derive from epochs
    epochs: float = 1.0
    batch_size: int = 4  # pairs (DPO) or groups (GRPO) per optimizer step
    micro_batch: int = 2  # pairs/groups per forward pass (gradient accumulation in between)
    lr: float = 1e-4  # preference stage; the SFT stage has its own (sft.lr)
    warmup_steps: int = 2
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    beta: float = 0.1  # DPO: scale of the summed log-ratio
    dist_beta: float = 5.0  # distribution variant: sharpness of q over mean-token log-ratios
    beta_kl: float = 0.04
    kl_cap: float = 4.0  # k3 KL linear past ref - logp = kl_cap (algo.losses.k3_kl); 0 = off
    clip_eps: float = 0.2
    length_norm: str = "sequence"
    rounds: int = 1
    seed: int = 0
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # Every linear layer of a Llama/Qwen block: on SmolLM2, SFT on attention only learned
    # less per step (the demo and the eval have used all seven since they were measured).
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                       "up_proj", "down_proj")


@dataclass(frozen=True)
class ExportConfig:
    formats: tuple[str, ...] = ()  # hf | gguf | lora-gguf | onnx
    gguf_quant: str = "q8_0"


@dataclass(frozen=True)
class RunConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    backend: str = "auto"  # auto | cpu | cuda | mlx
    device: str = ""  # device profile name (edge_pu/devices/profiles), or "" for none
    run_dir: str = "runs/default"


# The rules a resolved config must keep live in edge_pu/config_checks.py (re-exported here).


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check/convert one leaf value against its annotated type, naming `where` on failure."""
    origin = typing.get_origin(typ)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise EdgePuError(f"{where}: expected a list, got {value!r}.")
        return tuple(str(v) for v in value)
    if origin in (typing.Union, types.UnionType):
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
        raise EdgePuError(f"{where}: expected true or false, got {value!r}.")
    if typ in (int, float):
        if isinstance(value, bool):
            raise EdgePuError(f"{where}: expected a number, got {value!r}.")
        try:
            num = typ(value) if not isinstance(value, str) else typ(float(value))
        except (TypeError, ValueError):
            raise EdgePuError(f"{where}: expected a number, got {value!r}.") from None
        if not math.isfinite(num):
            raise EdgePuError(f"{where}: expected a finite number, got {value!r}.")
        if typ is int and float(value) != num:
            raise EdgePuError(f"{where}: expected a whole number, got {value!r}.")
        return num
    if typ is str:
        if isinstance(value, (dict, list)):
            raise EdgePuError(f"{where}: expected a string, got {value!r}.")
        return "" if value is None else str(value)
    return value


# Names other trainers (transformers, TRL, peft) use for our keys.
ALIASES = {
    "learning_rate": "train.lr", "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size", "warmup": "train.warmup_steps",
    "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "num_generations": "sampling.k", "max_completion_length": "sampling.max_new_tokens",
    "max_prompt_length": "student.max_length", "model_name_or_path": "student.path",
    "model": "student.path", "loss_type": "train.algorithm", "api_key": "teacher.api_key_env",
}


def _is_section(typ: Any) -> bool:
    return isinstance(typ, type) and dataclasses.is_dataclass(typ)


def all_keys(cls: type | None = None, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the config, e.g. 'train.lr'."""
    cls = cls or RunConfig
    hints = typing.get_type_hints(cls)
    out: list[str] = []
    for f in fields(cls):
        typ = hints[f.name]
        out += all_keys(typ, f"{prefix}{f.name}.") if _is_section(typ) else [f"{prefix}{f.name}"]
    return out


def _unknown(key: str, valid: list[str], where: str) -> EdgePuError:
    """Suggest, in order: a key of the same section that the name starts with (or that starts
    with it), a close spelling in the same section, the same name in another
    section (train.k -> sampling.k), another trainer's name for it, a close spelling anywhere."""
    prefix, _, leaf = key.rpartition(".")
    leaves = {v.rsplit(".", 1)[-1]: v for v in valid}
    everywhere = all_keys()
    near = ([v for lf, v in leaves.items() if leaf.startswith(lf + "_")  # lr_rate -> lr
             or lf.startswith(leaf + "_")][:1]
            or [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=1)]
            or [k for k in everywhere if k.rsplit(".", 1)[-1] == leaf and k != key]
            or ([ALIASES[leaf]] if leaf in ALIASES else [])
            or difflib.get_close_matches(key, everywhere, n=1))
    hint = f" Did you mean '{near[0]}'?" if near else f" Valid keys: {', '.join(sorted(valid))}."
    return EdgePuError(f"{where}: unknown config key '{key}'.{hint}")


def _build(cls: type, data: dict[str, Any], prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise _unknown(dotted, [f"{prefix}{n}" for n in names], source)
        typ = hints[key]
        if _is_section(typ):
            value = {} if value is None else value  # a section with every key commented out
            if not isinstance(value, dict):
                raise EdgePuError(f"{source}: '{dotted}' must be a mapping of keys.")
            kwargs[key] = _build(typ, value, f"{dotted}.", source)
        else:
            kwargs[key] = _coerce(value, typ, f"{source}: {dotted}")
    return cls(**kwargs)


def merge_dicts(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """A new dict: `top` laid over `base`, nested dicts merged key by key. Nothing in it is
    shared with either input, so a caller may edit the result (e.g. a defaults table's copy)."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["train.lr=1e-4", "backend=cpu"]` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise EdgePuError(f"--set {item!r}: expected section.key=value, e.g. train.lr=1e-4.")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise EdgePuError(f"--set {item!r}: '{key}' is not a key; write section.key=value, "
                              "e.g. train.lr=1e-4.")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as exc:
            raise EdgePuError(f"--set {item!r}: the value is not valid YAML "
                              f"({getattr(exc, 'problem', None) or exc}); quote it.") from None
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise EdgePuError(f"--set {item!r}: '{part}' was already set to a value, so it "
                                  "cannot also hold keys.")
        node[parts[-1]] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            if key in seen:
                raise EdgePuError(f"{self.name}:{line}: key '{key}' is given twice (first on "
                                  f"line {seen[key]}); YAML would silently keep the last one.")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EdgePuError(f"{path}: config file not found.") from None
    except IsADirectoryError:
        raise EdgePuError(f"{path}: is a folder; give the YAML config file.") from None
    except UnicodeDecodeError as exc:
        raise EdgePuError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    except OSError as exc:
        raise EdgePuError(f"{path}: cannot read the config ({exc.strerror}).") from None
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)
    try:
        data = loader.get_single_data() or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise EdgePuError(f"{where}: invalid YAML ({what}).") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise EdgePuError(f"{path}: the config must be a mapping of sections (student:, "
                          f"teacher:, ...), got a {type(data).__name__}.")
    return data


def build_config(layers: list[tuple[str, dict[str, Any]]]) -> RunConfig:
    """Merge (source, dict) layers lowest-precedence first and validate the result."""
    merged: dict[str, Any] = {}
    for source, data in layers:
        _build(RunConfig, data, "", source)  # names the layer that holds a bad key
        merged = merge_dicts(merged, data)
    cfg = _build(RunConfig, merged, "", "config")
    validate(cfg)
    return _resolve_import_as(_resolve_model_names(cfg))


def _resolve_model_names(cfg: RunConfig) -> RunConfig:
    """`student.path: qwen-0.5b` (a model `edge-pu fetch` knows) -> its verified cached file."""
    from .fetch import resolve_model_name

    student = resolve_model_name(cfg.student.path, "student.path")
    teacher = (resolve_model_name(cfg.teacher.path, "teacher.path")
               if cfg.teacher.kind == "gguf" else cfg.teacher.path)
    return dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, path=student),
                               teacher=dataclasses.replace(cfg.teacher, path=teacher))


def _resolve_import_as(cfg: RunConfig) -> RunConfig:
    """`student.import_as: auto` -> the concrete choice for this student file and engine."""
    from .quant.auto import import_as_for

    chosen = import_as_for(cfg)
    return dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, import_as=chosen))


def profile_defaults(profile: DeviceProfile) -> dict[str, Any]:
    """A device profile's config layer, refused (naming its file) where its `[defaults]` hold an
    unknown key or break the profile's own limits."""
    defaults = profile.config_defaults()
    bad = profile.problems(build_config([(f"{profile.source} [defaults]", defaults)]))
    if bad:
        raise EdgePuError(f"{profile.source}: its own [defaults] break its rules: "
                          f"{'; '.join(bad)}.")
    return defaults


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> RunConfig:
    layers: list[tuple[str, dict[str, Any]]] = []
    if base:
        layers.append(("defaults", base))
    file_data = read_yaml(path) if path else {}
    device = (parse_overrides(overrides or []).get("device") or file_data.get("device")
              or (base or {}).get("device"))
    if device:
        from .devices import load_profile

        layers.append((f"device profile '{device}'", profile_defaults(load_profile(str(device)))))
    if path:
        layers.append((str(path), file_data))
    if overrides:
        layers.append(("--set", parse_overrides(overrides)))
    return build_config(layers)


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out[f.name] = {k: plain(v) for k, v in dataclasses.asdict(value).items()}
        else:
            out[f.name] = value
    return out


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
