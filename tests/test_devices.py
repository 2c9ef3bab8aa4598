"""Device profiles: every shipped file validates, errors name the file and field, the profile
is a config layer between the defaults and the config file, and detection picks sensibly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge_pu.config import load_config, profile_defaults
from edge_pu.devices import list_profiles, load_profile, match_profile
from edge_pu.devices.profile import HostFacts, parse_profile
from edge_pu.errors import EdgePuError

GIB = 2**30
REQUIRED = {"laptop-cpu-8gb", "laptop-cpu-16gb", "apple-m-8gb", "apple-m-16gb", "apple-m-36gb",
            "jetson-orin-8gb", "rtx-4060-8gb", "a100-80gb", "h100-80gb"}
GOOD = """name = "{name}"
description = "a test device"
memory_budget_gib = 4.0
preferred_backend = "cpu"
backends = ["cpu"]
quant_formats = ["none", "gguf:q4_0"]
[limits]
max_k = 8
[defaults]
train = {{ micro_batch = 1 }}
"""


def test_every_required_profile_ships_and_validates() -> None:
    profiles = {p.name: p for p in list_profiles()}
    assert REQUIRED <= set(profiles)
    for p in profiles.values():
        assert 0 < p.memory_budget_gib <= 80
        assert p.preferred_backend in p.backends
        assert "none" in p.quant_formats
        profile_defaults(p)  # its [defaults] are config keys that obey its own limits
    assert profiles["rtx-4060-8gb"].config_defaults()["student"]["quant"] == "nf4"
    assert profiles["apple-m-8gb"].config_defaults()["backend"] == "mlx"


def test_profile_is_a_layer_between_defaults_and_the_config_file(tmp_path: Path) -> None:
    cfg = load_config(None, ["device=rtx-4060-8gb"])
    assert (cfg.backend, cfg.student.quant, cfg.student.dtype) == ("cuda", "nf4", "bfloat16")
    assert cfg.train.gradient_checkpointing is True
    path = tmp_path / "run.yaml"
    path.write_text("device: rtx-4060-8gb\nstudent: {dtype: float32}\n")
    cfg = load_config(path, ["student.max_length=256"])
    assert cfg.student.dtype == "float32"  # the file beats the profile
    assert cfg.student.quant == "nf4"  # the profile beats the defaults
    assert cfg.student.max_length == 256  # --set beats the file


def test_unknown_name_lists_known_and_suggests_nearest() -> None:
    with pytest.raises(EdgePuError) as err:
        load_profile("apple-m-16")
    msg = str(err.value)
    assert "Did you mean 'apple-m-16gb'?" in msg and "h100-80gb" in msg


@pytest.mark.parametrize("change, field", [
    (("memory_budget_gib = 4.0", "memory_budget_gib = \"lots\""), "memory_budget_gib"),
    (("memory_budget_gib = 4.0", "memory_budget_gib = -1"), "memory_budget_gib"),
    (('backends = ["cpu"]', 'backends = ["tpu"]'), "tpu"),
    (('"gguf:q4_0"', '"int3"'), "quant_formats"),
    (("max_k = 8", "max_k = -2"), "limits.max_k"),
    (("micro_batch = 1", "micro_bach = 1"), "train.micro_bach"),
    (('description = "a test device"\n', ""), "description"),
    (("[limits]", "[limits"), "invalid TOML"),
])
def test_malformed_profile_names_file_and_field(tmp_path: Path, change: tuple[str, str],
                                                field: str) -> None:
    path = tmp_path / "toy.toml"
    text = GOOD.format(name="toy")
    assert change[0] in text
    path.write_text(text.replace(change[0], change[1]))
    with pytest.raises(EdgePuError) as err:
        profile_defaults(parse_profile(path))  # the file's fields, then its [defaults]' keys
    assert str(path) in str(err.value) and field in str(err.value)


def test_name_must_match_file_and_defaults_must_obey_own_limits(tmp_path: Path) -> None:
    path = tmp_path / "toy.toml"
    path.write_text(GOOD.format(name="other"))
    with pytest.raises(EdgePuError, match="must agree"):
        parse_profile(path)
    path.write_text(GOOD.format(name="toy").replace("max_k = 8", "max_k = 2"))
    with pytest.raises(EdgePuError, match="sampling.k = 4 exceeds"):
        # the default sampling.k (4) breaks the profile's own max_k; the config layer checks
        # that, since the profile parser never imports the config
        profile_defaults(parse_profile(path))
    path.write_text(GOOD.format(name="toy"))
    assert parse_profile(path).limits.max_k == 8
    assert profile_defaults(parse_profile(path)) == {"backend": "cpu",
                                                    "train": {"micro_batch": 1}}


def test_check_refuses_configs_past_the_limits() -> None:
    prof = load_profile("laptop-cpu-8gb")
    cfg = load_config(None, ["device=laptop-cpu-8gb", "sampling.k=16", "backend=cuda",
                             "student.quant=mlx-affine-4"])
    with pytest.raises(EdgePuError) as err:
        prof.check(cfg)
    msg = str(err.value)
    assert "sampling.k = 16 exceeds this device's limit of 8" in msg
    assert "backend = 'cuda' does not run here" in msg
    assert "student.quant = 'mlx-affine-4' is not supported" in msg
    prof.check(load_config(None, ["device=laptop-cpu-8gb"]))  # its own defaults pass


@pytest.mark.parametrize("facts, expected", [
    (HostFacts("Darwin", "arm64", 16 * 2**30), "apple-m-16gb"),
    (HostFacts("Darwin", "arm64", 36 * 2**30), "apple-m-36gb"),
    (HostFacts("Linux", "x86_64", int(7.6 * GIB)), "laptop-cpu-8gb"),
    (HostFacts("Windows", "AMD64", int(15.5 * GIB)), "laptop-cpu-16gb"),
    (HostFacts("Linux", "x86_64", 64 * GIB, "NVIDIA H100 80GB HBM3", 80 * 10**9), "h100-80gb"),
    (HostFacts("Linux", "x86_64", 64 * GIB, "NVIDIA A100-SXM4-80GB", 81 * 10**9), "a100-80gb"),
    (HostFacts("Linux", "x86_64", 32 * GIB, "NVIDIA GeForce RTX 4060 Laptop GPU", 8 * GIB),
     "rtx-4060-8gb"),
    (HostFacts("Linux", "aarch64", int(7.4 * GIB), tegra=True), "jetson-orin-8gb"),
    (HostFacts("Linux", "x86_64", 64 * GIB, "NVIDIA A100-PCIE-40GB", 40 * 10**9), None),
    (HostFacts("Linux", "x86_64", 4 * GIB), None),
])
def test_match_profile(facts: HostFacts, expected: str | None) -> None:
    found = match_profile(facts)
    assert (found.name if found else None) == expected


def test_detection_imports_no_framework() -> None:
    code = ("import sys, edge_pu.devices as d; d.detect_profile(); d.list_profiles(); "
            "print(sorted(m for m in ('torch', 'mlx', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
