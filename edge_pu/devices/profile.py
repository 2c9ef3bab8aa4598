"""One device profile file (TOML) -> a validated, frozen `DeviceProfile`.

File format (`edge_pu/devices/profiles/<name>.toml`, the file stem is the name):

    name = "rtx-4060-8gb"
    description = "..."
    memory_budget_gib = 7.5          # what edge_pu may use (weights, activations, caches)
    preferred_backend = "cuda"       # the config layer's `backend`
    backends = ["cuda", "cpu"]       # backends that run there; `backend:` must be one
    quant_formats = ["none", "nf4", "gguf:q4_k_m"]
    [limits]                         # 0 or absent = no limit
    max_length = 2048                # student.max_length
    max_k = 16                       # sampling.k
    max_batch = 4                    # train.micro_batch (pairs/groups per forward pass)
    [defaults]                       # config overrides, same keys as the YAML config
    student = { quant = "nf4", dtype = "bfloat16" }
    [detect]                         # how detect_profile() recognises the machine
    system = ["Linux"]; machine = ["x86_64"]; ram_gb = 8; gpu_name = "RTX 4060"; tegra = false

Every field is checked on load; an error names the file and the field. Whether `[defaults]`
are valid config keys that obey the profile's own limits is the config layer's check
(`edge_pu.config.profile_defaults`, run when a config names the device): this package never
imports the config.
"""

from __future__ import annotations

import copy
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EdgePuError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib

BACKENDS = ("cpu", "cuda", "mlx")
QUANT_RE = re.compile(r"^(none|nf4|mlx-affine-4|gguf:[a-z0-9_]+)$")
GB = 10**9  # RAM is sold in GB; the OS reports bytes


@dataclass(frozen=True)
class HostFacts:
    """What detection knows about this machine."""

    system: str  # platform.system(): Linux | Darwin | Windows
    machine: str  # platform.machine(): x86_64 | arm64 | aarch64 | AMD64
    ram_bytes: int
    gpu_name: str = ""  # NVIDIA GPU 0, from nvidia-smi
    gpu_bytes: int = 0
    tegra: bool = False  # /etc/nv_tegra_release exists (Jetson)


@dataclass(frozen=True)
class DetectRule:
    system: tuple[str, ...] = ()
    machine: tuple[str, ...] = ()
    ram_gb: float = 0.0  # nominal RAM; the machine matches with >= 90% of it visible
    gpu_name: str = ""  # substring of the NVIDIA GPU name
    gpu_memory_gb: float = 0.0
    tegra: bool = False

    def matches(self, f: HostFacts) -> bool:
        if self.system and f.system not in self.system:
            return False
        if self.machine and f.machine not in self.machine:
            return False
        if self.tegra != f.tegra:
            return False
        if self.gpu_name and self.gpu_name.lower() not in f.gpu_name.lower():
            return False
        if self.gpu_memory_gb and f.gpu_bytes < 0.9 * self.gpu_memory_gb * GB:
            return False
        return not self.ram_gb or f.ram_bytes >= 0.9 * self.ram_gb * GB


@dataclass(frozen=True)
class Limits:
    max_length: int = 0
    max_k: int = 0
    max_batch: int = 0


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    memory_budget_gib: float
    preferred_backend: str
    backends: tuple[str, ...]
    quant_formats: tuple[str, ...]
    limits: Limits = Limits()
    defaults: dict[str, Any] = field(default_factory=dict, hash=False)
    detect: DetectRule = DetectRule()
    source: str = ""  # the file it came from

    @property
    def budget_bytes(self) -> int:
        return int(self.memory_budget_gib * 2**30)

    def config_defaults(self) -> dict[str, Any]:
        """The config layer this profile supplies (a fresh copy each call)."""
        return {"backend": self.preferred_backend, **copy.deepcopy(self.defaults)}

    def problems(self, cfg: Any) -> list[str]:
        """Why `cfg` (a RunConfig) cannot run on this device; [] when it can."""
        out = []
        if cfg.student.quant not in self.quant_formats:
            out.append(f"student.quant = {cfg.student.quant!r} is not supported here (use one "
                       f"of {', '.join(q for q in self.quant_formats if ':' not in q)})")
        if cfg.backend != "auto" and cfg.backend not in self.backends:
            out.append(f"backend = {cfg.backend!r} does not run here (use one of "
                       f"{', '.join(self.backends)})")
        for key, limit, value in (("student.max_length", self.limits.max_length,
                                   cfg.student.max_length),
                                  ("sampling.k", self.limits.max_k, cfg.sampling.k),
                                  ("train.micro_batch", self.limits.max_batch,
                                   cfg.train.micro_batch)):
            if limit and value > limit:
                out.append(f"{key} = {value} exceeds this device's limit of {limit}")
        return out

    def check(self, cfg: Any) -> None:
        bad = self.problems(cfg)
        if bad:
            raise EdgePuError(f"device profile '{self.name}' ({self.source}): "
                              + "; ".join(bad) + ". Change these keys or pick another device.")


def _field(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str,
           default: Any = None) -> Any:
    if key not in data:
        if default is None:
            raise EdgePuError(f"{where}: missing field '{key}'.")
        return default
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise EdgePuError(f"{where}: field '{key}' has the wrong type ({value!r}).")
    return value


def _strings(data: dict[str, Any], key: str, where: str, default: Any = None) -> tuple[str, ...]:
    value = _field(data, key, list, where, default)
    if not all(isinstance(v, str) for v in value):
        raise EdgePuError(f"{where}: field '{key}' must be a list of strings, got {value!r}.")
    return tuple(value)


def parse_profile(path: Path) -> DeviceProfile:
    """Read and validate one profile file; errors name the file and the field."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise EdgePuError(f"{path}: invalid TOML: {exc}.") from None
    known = {"name", "description", "memory_budget_gib", "preferred_backend", "backends",
             "quant_formats", "limits", "defaults", "detect"}
    for key in data:
        if key not in known:
            raise EdgePuError(f"{path}: unknown field '{key}' (known: {', '.join(sorted(known))}).")
    name = _field(data, "name", str, str(path))
    if name != path.stem:
        raise EdgePuError(f"{path}: field 'name' is {name!r} but the file is {path.name}; "
                          "they must agree.")
    budget = _field(data, "memory_budget_gib", (int, float), str(path))
    if budget <= 0:
        raise EdgePuError(f"{path}: field 'memory_budget_gib' must be > 0, got {budget}.")
    backends = _strings(data, "backends", str(path))
    preferred = _field(data, "preferred_backend", str, str(path))
    for b in (preferred, *backends):
        if b not in BACKENDS:
            raise EdgePuError(f"{path}: backend {b!r} is not one of {', '.join(BACKENDS)}.")
    if preferred not in backends:
        raise EdgePuError(f"{path}: field 'preferred_backend' ({preferred}) is not in "
                          f"'backends' {list(backends)}.")
    quants = _strings(data, "quant_formats", str(path))
    for q in quants:
        if not QUANT_RE.match(q):
            raise EdgePuError(f"{path}: field 'quant_formats' has {q!r}; use none, nf4, "
                              "mlx-affine-4 or gguf:<type>.")
    lim = _field(data, "limits", dict, str(path), {})
    for key, value in lim.items():
        if key not in Limits.__dataclass_fields__:
            raise EdgePuError(f"{path}: unknown field 'limits.{key}'.")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise EdgePuError(f"{path}: field 'limits.{key}' must be a whole number >= 0.")
    det = _field(data, "detect", dict, str(path), {})
    for key in det:
        if key not in DetectRule.__dataclass_fields__:
            raise EdgePuError(f"{path}: unknown field 'detect.{key}'.")
    where = f"{path} [detect]"
    rule = DetectRule(system=_strings(det, "system", where, []),
                      machine=_strings(det, "machine", where, []),
                      ram_gb=float(_field(det, "ram_gb", (int, float), where, 0)),
                      gpu_name=_field(det, "gpu_name", str, where, ""),
                      gpu_memory_gb=float(_field(det, "gpu_memory_gb", (int, float), where, 0)),
                      tegra=_field(det, "tegra", bool, where, False))
    defaults = _field(data, "defaults", dict, str(path), {})
    return DeviceProfile(name=name, description=_field(data, "description", str, str(path)),
                         memory_budget_gib=float(budget), preferred_backend=preferred,
                         backends=backends, quant_formats=quants, limits=Limits(**lim),
                         defaults=defaults, detect=rule, source=str(path))
