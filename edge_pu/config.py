"""Run configuration: one frozen dataclass per stage, resolved in a fixed order.

Precedence, lowest first: dataclass defaults < device profile < config file < `--set key=value`.
`load_config(path, overrides)` returns a `RunConfig`; `config_to_dict` gives the resolved form that
the run prints at start and saves as `run_dir/config.resolved.yaml`. An unknown key is refused
with the nearest valid key suggested; a value of the wrong type names its field.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import EdgePuError


@dataclass(frozen=True)
class StudentConfig:
    path: str = ""  # HF model dir, or a .gguf file (dequantized once, cached)
    dtype: str = "float32"  # float32 | bfloat16 (compute dtype of the trained weights)
    quant: str = "none"  # none | nf4 (bitsandbytes) | mlx-affine-4 ; GGUF inputs add gguf:<type>
    trust_remote_code: bool = False
    max_length: int = 512  # prompt + completion tokens the student may see


@dataclass(frozen=True)
class TeacherConfig:
    kind: str = "file"  # openai | hf | gguf | file | oracle
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = ""
    api_key_env: str = ""  # name of the environment variable holding the key (never the key)
    path: str = ""  # hf: model dir; gguf: .gguf file; file: anchors JSONL
    system_prompt: str = ""
    max_tokens: int = 256
    temperature: float = 0.0
    timeout_s: float = 60.0
    retries: int = 4
    backoff_s: float = 1.0
    max_calls: int = 0  # 0 = no budget; otherwise never exceeded, across restarts


@dataclass(frozen=True)
class DataConfig:
    prompts: str = ""  # JSONL: {"prompt": str, "id"?: str}
    limit: int = 0  # 0 = all prompts


@dataclass(frozen=True)
class SamplingConfig:
    k: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class RankerConfig:
    mode: str = "likelihood"  # likelihood | judge | similarity | random
    judge: str = "initial"  # initial (frozen starting student) | current (the policy)
    judge_style: str = "yesno"  # yesno | rating
    batch_size: int = 8


@dataclass(frozen=True)
class TrainConfig:
    algorithm: str = "dpo"  # dpo | grpo
    grpo_variant: str = "distribution"  # advantage | distribution
    pair_strategy: str = "best-worst"  # best-worst | all
    margin: float = 0.0
    tau: float = 1.0  # listwise target temperature
    steps: int = 0  # 0 = derive from epochs
    epochs: float = 1.0
    batch_size: int = 4  # pairs (DPO) or groups (GRPO) per optimizer step
    micro_batch: int = 2  # pairs/groups per forward pass (gradient accumulation in between)
    lr: float = 5e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    beta: float = 0.1
    beta_kl: float = 0.04
    clip_eps: float = 0.2
    length_norm: str = "sequence"
    rounds: int = 1
    seed: int = 0
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


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
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    backend: str = "auto"  # auto | cpu | cuda | mlx
    device: str = ""  # device profile name (edge_pu/devices/profiles), or "" for none
    run_dir: str = "runs/default"


CHOICES: dict[str, tuple[str, ...]] = {
    "teacher.kind": ("openai", "hf", "gguf", "file", "oracle"),
    "ranker.mode": ("likelihood", "judge", "similarity", "random"),
    "ranker.judge": ("initial", "current"),
    "ranker.judge_style": ("yesno", "rating"),
    "train.algorithm": ("dpo", "grpo"),
    "train.grpo_variant": ("advantage", "distribution"),
    "train.pair_strategy": ("best-worst", "all"),
    "train.length_norm": ("sequence", "token"),
    "student.dtype": ("float32", "bfloat16"),
    "student.quant": ("none", "nf4", "mlx-affine-4"),
    "backend": ("auto", "cpu", "cuda", "mlx"),
}
POSITIVE = ("sampling.k", "sampling.max_new_tokens", "train.batch_size", "train.micro_batch",
            "train.rounds", "lora.r", "student.max_length", "ranker.batch_size")


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
        if typ is int and float(value) != num:
            raise EdgePuError(f"{where}: expected a whole number, got {value!r}.")
        return num
    if typ is str:
        if isinstance(value, (dict, list)):
            raise EdgePuError(f"{where}: expected a string, got {value!r}.")
        return "" if value is None else str(value)
    return value


def _unknown(key: str, valid: list[str], where: str) -> EdgePuError:
    near = difflib.get_close_matches(key, valid, n=1)
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
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise EdgePuError(f"{source}: '{dotted}' must be a mapping of keys.")
            kwargs[key] = _build(typ, value, f"{dotted}.", source)
        else:
            kwargs[key] = _coerce(value, typ, f"{source}: {dotted}")
    return cls(**kwargs)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["train.lr=1e-4", "backend=cpu"]` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise EdgePuError(f"--set {item!r}: expected section.key=value, e.g. train.lr=1e-4.")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else ""
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EdgePuError(f"{path}: config file not found.") from None
    except UnicodeDecodeError as exc:
        raise EdgePuError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise EdgePuError(f"{path}:{line}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise EdgePuError(f"{path}: the config must be a mapping of sections, got {type(data)}.")
    return data


def build_config(layers: list[tuple[str, dict[str, Any]]]) -> RunConfig:
    """Merge (source, dict) layers lowest-precedence first and validate the result."""
    merged: dict[str, Any] = {}
    for source, data in layers:
        _build(RunConfig, data, "", source)  # names the layer that holds a bad key
        merged = _merge(merged, data)
    cfg = _build(RunConfig, merged, "", "config")
    validate(cfg)
    return cfg


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

        layers.append((f"device profile '{device}'", load_profile(str(device)).config_defaults()))
    if path:
        layers.append((str(path), file_data))
    if overrides:
        layers.append(("--set", parse_overrides(overrides)))
    return build_config(layers)


def _get(cfg: RunConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: RunConfig) -> None:
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise EdgePuError(f"config: {key} = {value!r} is not one of {', '.join(allowed)}.")
    for key in POSITIVE:
        if _get(cfg, key) <= 0:
            raise EdgePuError(f"config: {key} must be > 0, got {_get(cfg, key)}.")
    if cfg.sampling.k < 2:
        raise EdgePuError("config: sampling.k must be at least 2 to rank candidates.")
    if cfg.train.micro_batch > cfg.train.batch_size:
        raise EdgePuError("config: train.micro_batch must not exceed train.batch_size.")
    if cfg.train.tau <= 0:
        raise EdgePuError("config: train.tau must be > 0.")


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = {k: plain(v) for k, v in dataclasses.asdict(value).items()}
        else:
            out[f.name] = value
    return out


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
