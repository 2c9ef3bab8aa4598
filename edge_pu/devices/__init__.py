"""Device profiles: data files (`profiles/*.toml`) validated into frozen `DeviceProfile`s.

A profile names a class of machine (`laptop-cpu-8gb`, `apple-m-16gb`, `h100-80gb`, ...) and says
how much memory edge_pu may use there, which backend to prefer, which quant formats work, the
limits past which a config is refused, and config defaults. The defaults are one config layer:
dataclass defaults < device profile < config file < `--set` (see `edge_pu.config.load_config`).

    load_profile("apple-m-16gb").config_defaults()   # {"backend": "mlx", "student": {...}}
    list_profiles()                                   # every shipped profile, by name
    detect_profile()                                  # best guess for this machine, or None

Detection reads the platform, total RAM, /etc/nv_tegra_release and (when an NVIDIA driver is
present) `nvidia-smi`; it imports no framework. The file format and its checks live in
`edge_pu.devices.profile`; adding a device means adding a TOML file there, no code.
"""

from __future__ import annotations

import difflib
import functools
import os
import platform
import shutil
import subprocess
from pathlib import Path

from ..errors import EdgePuError
from .profile import DeviceProfile, HostFacts, Limits, parse_profile

PROFILE_DIR = Path(__file__).parent / "profiles"
GIB = 2**30


@functools.cache
def _profiles(directory: Path = PROFILE_DIR) -> dict[str, DeviceProfile]:
    return {p.stem: parse_profile(p) for p in sorted(directory.glob("*.toml"))}


def list_profiles() -> list[DeviceProfile]:
    """Every shipped profile, sorted by name (a malformed file raises, naming it)."""
    return list(_profiles().values())


def load_profile(name: str) -> DeviceProfile:
    """The profile called `name`; an unknown name lists the known ones, nearest first."""
    known = _profiles()
    if name in known:
        return known[name]
    near = difflib.get_close_matches(name, list(known), n=1, cutoff=0.4)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    raise EdgePuError(f"config: device '{name}' is not a known device profile.{hint} Known: "
                      f"{', '.join(known)} (files in {PROFILE_DIR}).")


def total_ram_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def nvidia_gpu() -> tuple[str, int]:
    """(name, memory bytes) of GPU 0 from nvidia-smi, or ("", 0); never imports torch."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "", 0
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader,"
                              "nounits"], capture_output=True, text=True, timeout=10, check=True)
        name, mib = out.stdout.splitlines()[0].rsplit(",", 1)
        return name.strip(), int(float(mib)) * 2**20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return "", 0


def host_facts() -> HostFacts:
    gpu_name, gpu_bytes = nvidia_gpu()
    return HostFacts(system=platform.system(), machine=platform.machine(),
                     ram_bytes=total_ram_bytes(), gpu_name=gpu_name, gpu_bytes=gpu_bytes,
                     tegra=os.path.exists("/etc/nv_tegra_release"))


def match_profile(facts: HostFacts, profiles: list[DeviceProfile] | None = None
                  ) -> DeviceProfile | None:
    """The profile whose `[detect]` rule fits `facts` best: a GPU rule that matches the GPU's
    name beats a RAM rule; among RAM rules, the largest nominal RAM the machine has. A GPU
    that no profile names gives None rather than a wrong guess."""
    candidates = [p for p in (profiles if profiles is not None else list_profiles())
                  if p.detect.matches(facts)]
    gpu = [p for p in candidates if p.detect.gpu_name]
    if gpu:
        return max(gpu, key=lambda p: len(p.detect.gpu_name))
    if facts.gpu_name and not facts.tegra:
        return None
    ram = [p for p in candidates if p.detect.ram_gb and not p.detect.gpu_name]
    # the largest RAM class the machine has; on a tie the narrower rule wins (apple-m-16gb over
    # laptop-cpu-16gb on a Mac)
    return max(ram, key=lambda p: (p.detect.ram_gb, -len(p.detect.system)
                                   - len(p.detect.machine))) if ram else None


def detect_profile() -> DeviceProfile | None:
    """Best-effort profile for this machine (None when nothing fits well enough)."""
    return match_profile(host_facts())


__all__ = ["DeviceProfile", "HostFacts", "Limits", "PROFILE_DIR", "detect_profile",
           "host_facts", "list_profiles", "load_profile", "match_profile", "nvidia_gpu",
           "total_ram_bytes"]
