"""`student.import_as`: the student re-quantized once into a GGUF type llama.cpp batches well.

The import writes the student as a q8_0 GGUF and trains on that file's dequantized weights, so
the llama.cpp engine (which samples the file) and torch (which trains and ranks) see the same
numbers. Checked on tiny Llama models: the imported weights are the source's within half a
q8_0 step (bound derived below), the cache is reused, a GGUF student goes Q4_1 -> q8_0, and
with the import on llama.cpp's greedy continuations equal torch's on the imported weights,
with seeded samples that repeat and do not depend on the other prompts of a batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_pu.config import SamplingConfig, load_config
from edge_pu.errors import EdgePuError

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

PROMPTS = ["what is two plus three?", "write the word apple in capital letters",
           "list three red fruits", "sort one two three", "name a capital city"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    """A private $EDGE_PU_CACHE, so the imports land nowhere near the user's cache."""
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("cache")
    mp.setenv("EDGE_PU_CACHE", str(root))
    yield root
    mp.undo()


def test_imported_weights_are_the_source_within_half_a_q8_0_step(cache: Path,
                                                                  tiny_llama_dir: Path) -> None:
    """q8_0 stores a block of 32 as d * q with d = max|x| / 127 (kept as f16) and
    q = round(x / d), so |x - f16(d) * q| <= d / 2 + 127 * |d - f16(d)| <= d * (1/2 + 127 * 2^-11):
    0.562 d. A q/k row left in llama.cpp's RoPE order would miss that bound by far."""
    from edge_pu.export.gguf_writer import iter_safetensors
    from edge_pu.quant.imported import IMPORT_MARKER, import_student, imported_gguf

    gguf_path, out = import_student(tiny_llama_dir, "q8_0")
    assert imported_gguf(out) == gguf_path and (out / IMPORT_MARKER).exists()
    src, imp = dict(iter_safetensors(tiny_llama_dir)), dict(iter_safetensors(out))
    assert set(imp) == set(src) - {"lm_head.weight"}  # tied: transformers re-ties it on load
    moved = 0
    for name, w in imp.items():
        x = src[name]
        if x.ndim == 1:  # norms stay f32 in the file: exact
            assert np.array_equal(w, x), name
            continue
        blocks = x.reshape(-1, 32)
        d = np.abs(blocks).max(axis=1, keepdims=True) / 127
        err = np.abs(w.reshape(-1, 32) - blocks)
        assert (err <= d * (0.5 + 127 * 2**-11) + 1e-12).all(), name
        moved += int((err > 0).sum())
    assert moved > 1000  # a real re-quantization, not a copy
    # Cached: a second import returns the same files without writing them again.
    mtime = gguf_path.stat().st_mtime_ns
    assert import_student(tiny_llama_dir, "q8_0") == (gguf_path, out)
    assert gguf_path.stat().st_mtime_ns == mtime


def test_a_q4_1_gguf_student_trains_on_its_q8_0_import(cache: Path, tiny_llama_dir: Path,
                                                       tmp_path: Path) -> None:
    """student.path a Q4_1 GGUF, import_as q8_0: the torch backend loads
    dequantize(q8_0(dequantize(Q4_1))), the sampler picks the q8_0 file, the format travels."""
    from edge_pu.backends import make_backend
    from edge_pu.backends.llamacpp_sampler import student_gguf
    from edge_pu.export.gguf_writer import gguf_tensor_types, write_gguf
    from edge_pu.quant.student import resolve_student

    q41 = write_gguf(tiny_llama_dir, tmp_path / "tiny.Q4_1.gguf", "q4_1")
    try:
        plain, fmt = resolve_student(str(q41))
    except EdgePuError as exc:  # transformers' GGUF reader is the only way in for a GGUF
        pytest.skip(f"transformers cannot read the tiny GGUF: {exc}")
    assert fmt == "gguf:q4_1"
    cfg = load_config(None, base={"student": {"path": str(q41), "import_as": "q8_0"},
                                  "backend": "cpu"})
    backend = make_backend("cpu")
    backend.load(cfg)
    assert backend.quant_format == "gguf:q8_0"
    gguf_path = student_gguf(cfg.student.path, backend.student_dir)
    assert gguf_path != q41 and "q8_0" in set(gguf_tensor_types(gguf_path).values())
    assert backend.student_dir != plain and backend.student_dir.name.startswith(plain.name)


def test_bad_import_settings_are_refused(tiny_llama_dir: Path) -> None:
    with pytest.raises(EdgePuError, match="student.import_as"):
        load_config(None, base={"student": {"path": str(tiny_llama_dir), "import_as": "q4_1"}})
    with pytest.raises(EdgePuError, match="student.import_as q8_0 and student.quant nf4"):
        load_config(None, base={"student": {"path": str(tiny_llama_dir), "import_as": "q8_0",
                                            "quant": "nf4"}})


@pytest.fixture(scope="module")
def imported_pair(cache: Path, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(torch backend on the q8_0 import with a random non-zero adapter, llama.cpp sampler on
    the q8_0 file with that adapter as a GGUF LoRA)."""
    from tiny import random_lora_pair

    root = tmp_path_factory.mktemp("imported")
    backend, sampler = random_lora_pair({"path": str(tiny_llama_dir), "import_as": "q8_0"},
                                        root)
    sampler.refresh(root / "adapter", "test")
    yield backend, sampler
    sampler.close()


def test_imported_greedy_matches_torch_on_the_imported_weights(imported_pair) -> None:
    from edge_pu.quant.imported import imported_gguf

    backend, sampler = imported_pair
    assert sampler.gguf == imported_gguf(backend.student_dir)  # the file training came from
    ids = [backend.chat_ids([{"role": "user", "content": p}]) for p in PROMPTS]
    greedy = SamplingConfig(k=1, max_new_tokens=16, temperature=0.0)
    seeds = list(range(len(ids)))
    ref = [s[0].token_ids for s in backend.sample(ids, 1, greedy, seeds)]
    assert [s[0].token_ids for s in sampler.sample(ids, 1, greedy, seeds)] == ref
    assert [[c.token_ids for c in s] for s in sampler.sample(ids, 3, greedy, seeds)] == \
        [[r] * 3 for r in ref]
    assert sum(len(r) for r in ref) >= 3 * len(PROMPTS)  # real continuations, not empty


def test_imported_samples_repeat_and_do_not_depend_on_company(imported_pair) -> None:
    backend, sampler = imported_pair
    ids = [backend.chat_ids([{"role": "user", "content": p}]) for p in PROMPTS]
    cfg = SamplingConfig(k=3, max_new_tokens=8, temperature=1.0, top_p=0.95)
    a = sampler.sample(ids, 3, cfg, [11, 12, 13, 14, 15])
    assert sampler.sample(ids, 3, cfg, [11, 12, 13, 14, 15]) == a
    assert sampler.sample(ids[2:], 3, cfg, [13, 14, 15]) == a[2:]  # other company, same seeds
    assert len({tuple(x.token_ids) for x in a[0]}) > 1  # K candidates differ from one another


def test_import_as_auto_imports_a_q4_1_gguf_only_where_llama_cpp_samples_it(
        tiny_llama_dir: Path, tmp_path: Path) -> None:
    """`auto` (the default) picks q8_0 for a GGUF whose matrices are mostly Q4_1 when llama.cpp
    samples it, and keeps the student's own weights for the torch sampler, for NF4, for an HF
    folder and for a q8_0 file; an explicit value wins. The resolved config holds the choice."""
    from edge_pu.config import RunConfig, StudentConfig, dump_config
    from edge_pu.export.gguf_writer import iter_safetensors, write_gguf
    from edge_pu.quant.auto import import_as_for, matrix_types

    q41 = write_gguf(tiny_llama_dir, tmp_path / "tiny.Q4_1.gguf", "q4_1")
    q80 = write_gguf(tiny_llama_dir, tmp_path / "tiny.q8_0.gguf", "q8_0")
    counts = matrix_types(q41)
    # Every 2-D tensor of the source is one matrix of the file (the tied lm_head is not written).
    src = {n: a for n, a in iter_safetensors(tiny_llama_dir)
           if a.ndim == 2 and n != "lm_head.weight"}
    assert sum(counts.values()) == sum(a.size for a in src.values())
    assert counts["q4_1"] * 2 > sum(counts.values())

    def chosen(path: Path, **sections: dict) -> str:
        base = {"student": {"path": str(path), **sections.pop("student", {})}, **sections}
        return load_config(None, base=base).student.import_as

    llama = {"sampling": {"engine": "llama-cpp"}, "backend": "cpu"}
    assert chosen(q41, **llama) == "q8_0"
    assert chosen(q41, backend="cpu") == ""  # the torch sampler: nothing to gain
    assert chosen(q41, student={"quant": "nf4"}, **llama) == ""  # NF4 chooses the weights
    assert chosen(q80, **llama) == ""  # already a type with batched kernels
    assert chosen(tiny_llama_dir, **llama) == ""  # an HF folder: an exact f32 copy
    assert chosen(q41, student={"import_as": ""}, **llama) == ""  # explicit values win
    assert chosen(q80, student={"import_as": "f16"}, **llama) == "f16"
    cfg = load_config(None, base={"student": {"path": str(q41)}, **llama})
    assert "import_as: q8_0" in dump_config(cfg)  # config.resolved.yaml records the choice
    # A RunConfig built in code (no build_config) gets the same choice where it is used.
    direct = RunConfig(student=StudentConfig(path=str(q41)), sampling=SamplingConfig(
        engine="llama-cpp"))
    assert direct.student.import_as == "auto" and import_as_for(direct) == "q8_0"
