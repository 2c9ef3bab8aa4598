"""The backend contract: every backend on this machine against the CPU torch reference.

Each backend in `edge_pu.backends.REGISTRY` is a parameter; one whose framework or device is
missing skips with the reason (mlx: `pip install "mlx[cpu]" mlx-lm`; cuda: an NVIDIA GPU). The
reference is `CPUBackend` on the same tiny model (tests/tiny.py: Llama with tied embeddings,
Qwen2 with an untied head, q/k/v biases and rope in transformers 5's `rope_parameters`), with
the same LoRA adapter: a seeded, nonzero one (B random) so that the adapter changes the
log-probs and both A and B get a gradient.

Tolerances (fp32, unquantized; measured on this 2-core Linux box with mlx 0.32 CPU):
- log-probs per token: |backend - reference| <= LOGP_TOL = 1e-4 (mlx measured 3e-6..6e-6).
- one training step (DPO and both GRPO variants, 2 micro-batches, clipping, weight decay,
  warmup): loss and every metric within 1e-4 abs + 1e-4 rel (measured 3e-6); grad_norm within
  1e-3 rel; cosine of the LoRA parameter deltas > 0.99 (measured 0.9999996); the
  chosen-minus-rejected margin moves the same way, by the same amount within 1e-2 rel.
- sampling: a fixed seed repeats its tokens exactly on each backend; across backends only
  greedy continuations must agree (exactly, EOS handling included).
- mlx-affine-4 (group 64): log-probs of the quantized policy against the torch reference
  running the dequantized weights (`merge` output) within QUANT_TOL = 1e-3 (measured 2e-6);
  against the original fp32 weights they differ by ~1 nat per token on this random tiny model,
  which is only asserted to be > 1e-3 (so the weights really are quantized).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the CPU torch reference needs torch")
pytest.importorskip("transformers", reason="the CPU torch reference needs transformers")
pytest.importorskip("peft", reason="the CPU torch reference needs peft")

from edge_pu.algo.losses import LOSSES, LossConfig  # noqa: E402
from edge_pu.backends import Backend, TrainBatch, make_backend, nvidia_present  # noqa: E402
from edge_pu.config import (  # noqa: E402
    LoraConfig,
    RunConfig,
    SamplingConfig,
    StudentConfig,
    TrainConfig,
)

LOGP_TOL = 1e-4
QUANT_TOL = 1e-3
HAS_MLX = importlib.util.find_spec("mlx") is not None and \
    importlib.util.find_spec("mlx_lm") is not None
MLX_REASON = 'mlx is not installed: pip install "mlx[cpu]" mlx-lm (Linux) or mlx mlx-lm (macOS)'
needs_mlx = [pytest.mark.mlx, pytest.mark.skipif(not HAS_MLX, reason=MLX_REASON)]

BACKENDS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("mlx", id="mlx", marks=needs_mlx),
    pytest.param("cuda", id="cuda", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not (nvidia_present() and torch.cuda.is_available()),
                           reason="no NVIDIA GPU visible to torch")]),
]
TRAIN = TrainConfig(lr=1e-2, weight_decay=0.1, warmup_steps=2, max_grad_norm=1.0, seed=3)
LORA = LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "o_proj", "down_proj"))


# ---- helpers --------------------------------------------------------------------------------
def run_config(model_dir: Path, **student: Any) -> RunConfig:
    return RunConfig(student=StudentConfig(path=str(model_dir), **student), train=TRAIN,
                     lora=LORA)


def load(name: str, model_dir: Path, adapter: Path | None = None, **student: Any) -> Backend:
    backend = make_backend(name)
    backend.load(run_config(model_dir, **student))
    if adapter is not None:
        adopt(backend, adapter)
    return backend


def adopt(backend: Backend, adapter: Path) -> None:
    """Give a backend the LoRA weights of a PEFT adapter dir (not part of the Protocol)."""
    if hasattr(backend, "load_adapter"):
        backend.load_adapter(adapter)
        return
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(backend.model, load_file(str(adapter / "adapter_model.safetensors")))


def lora_weights(backend: Backend, tmp: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    backend.save_adapter(tmp)
    return load_file(str(tmp / "adapter_model.safetensors"))


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(r) for r in a] == [len(r) for r in b]
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb,
                                                                              strict=True))


def hf_logprobs(model_dir: Path, prompts: list[list[int]], comps: list[list[int]]
                ) -> list[list[float]]:
    """Completion-token log-probs from a plain transformers model: no PEFT, no backend."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p, c in zip(prompts, comps, strict=True):
            logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1: -1]
            lp = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(c)[:, None])
            out.append(lp[:, 0].tolist())
    return out


@pytest.fixture(scope="module")
def data(tiny_llama_dir: Path) -> dict[str, Any]:
    """Prompts and completions of uneven lengths (so padding is exercised)."""
    ref = load("cpu", tiny_llama_dir)
    prompts = [ref.chat_ids([{"role": "user", "content": text}]) for text in
               ("what is the capital city", "sort one two three", "write a json key")]
    comps = [ref.token_ids(text) for text in
             ("the answer is red apple", "two", "one two three four five", "banana",
              '{"name": "x"}', "no")]
    return {"prompts": [prompts[i // 2] for i in range(6)], "comps": comps}


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded nonzero LoRA adapter written by the reference, shared by every backend."""
    ref = load("cpu", tiny_llama_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ref.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    out = tmp_path_factory.mktemp("adapter") / "init"
    ref.save_adapter(out)
    return out


@pytest.fixture(scope="module")
def eos_model_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory,
                  data: dict[str, Any]) -> Path:
    """The tiny Llama with one more EOS id: the 4th token of the first greedy continuation.

    A random tiny model almost never emits <|im_end|>, so without this no test would see a
    sample end on EOS. Greedy then stops after 4 tokens with the EOS kept, and sampled rows
    finish at different steps.
    """
    import json
    import shutil

    ref = load("cpu", tiny_llama_dir)
    greedy = ref.sample([data["prompts"][0]], 1, SamplingConfig(temperature=0.0,
                                                                max_new_tokens=8), [0])
    tokens = greedy[0][0].token_ids
    stop = tokens[3]
    assert stop not in tokens[:3], "pick another prompt: the stop token repeats"
    out = tmp_path_factory.mktemp("eos") / "llama"
    shutil.copytree(tiny_llama_dir, out)
    gen = json.loads((out / "generation_config.json").read_text())
    gen["eos_token_id"] = [gen["eos_token_id"], stop]
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out


# ---- tokens and log-probs -------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKENDS)
def test_tokens_and_chat_template_match_reference(name: str, tiny_llama_dir: Path) -> None:
    ref, b = load("cpu", tiny_llama_dir), load(name, tiny_llama_dir)
    messages = [{"role": "system", "content": "reply only with words"},
                {"role": "user", "content": "what is the capital city"}]
    assert b.chat_ids(messages) == ref.chat_ids(messages)
    assert b.chat_ids(messages, assistant="red apple") == ref.chat_ids(messages,
                                                                      assistant="red apple")
    ids = ref.token_ids('the {"name": "x"} answer 42')
    assert b.token_ids('the {"name": "x"} answer 42') == ids
    assert b.decode(ids) == ref.decode(ids)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("name", BACKENDS)
def test_logprobs_match_reference(name: str, arch: str, request: pytest.FixtureRequest,
                                  data: dict[str, Any], tmp_path: Path) -> None:
    """Policy (adapter on, seeded nonzero B) and reference (adapter off) within LOGP_TOL."""
    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    ref, b = load("cpu", model_dir), load(name, model_dir)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in ref.model.named_parameters():
            if "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    adapter = tmp_path / "adapter"
    ref.save_adapter(adapter)
    adopt(b, adapter)
    prompts, comps = data["prompts"], data["comps"]
    for on in (True, False):
        assert max_diff(b.logprobs(prompts, comps, adapter=on),
                        ref.logprobs(prompts, comps, adapter=on)) <= LOGP_TOL
    assert max_diff(b.logprobs(prompts, comps), b.logprobs(prompts, comps, adapter=False)) > 0.01
    cands = [1, 2, 5, 17, 300]
    assert max_diff(b.next_token_logprobs(prompts[::2], cands),
                    ref.next_token_logprobs(prompts[::2], cands)) <= LOGP_TOL


@pytest.mark.parametrize("name", BACKENDS)
def test_adapter_off_is_the_base_model(name: str, tiny_llama_dir: Path, adapter_dir: Path,
                                       data: dict[str, Any]) -> None:
    """adapter=False gives the plain transformers model's log-probs, whatever the adapter."""
    b = load(name, tiny_llama_dir, adapter_dir)
    prompts, comps = data["prompts"][:3], data["comps"][:3]
    assert max_diff(b.logprobs(prompts, comps, adapter=False),
                    hf_logprobs(tiny_llama_dir, prompts, comps)) <= LOGP_TOL


# ---- sampling -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKENDS)
def test_greedy_matches_reference_with_eos(name: str, eos_model_dir: Path, adapter_dir: Path,
                                           data: dict[str, Any]) -> None:
    ref, b = load("cpu", eos_model_dir, adapter_dir), load(name, eos_model_dir, adapter_dir)
    cfg = SamplingConfig(k=2, temperature=0.0, max_new_tokens=6)
    prompts = [data["prompts"][0], data["prompts"][4]]
    for adapter in (True, False):
        got = b.sample(prompts, 2, cfg, [0, 1], adapter=adapter)
        want = ref.sample(prompts, 2, cfg, [0, 1], adapter=adapter)
        assert [[s.token_ids for s in row] for row in got] == \
            [[s.token_ids for s in row] for row in want]
        assert [[(s.text, s.finished) for s in row] for row in got] == \
            [[(s.text, s.finished) for s in row] for row in want]
    base = b.sample(prompts[:1], 1, cfg, [0], adapter=False)[0][0]
    assert base.finished and len(base.token_ids) == 4  # stopped on the extra EOS, kept it


@pytest.mark.parametrize("name", BACKENDS)
def test_sampling_is_reproducible(name: str, eos_model_dir: Path, data: dict[str, Any]) -> None:
    b = load(name, eos_model_dir)
    cfg = SamplingConfig(k=4, temperature=1.0, top_p=0.95, max_new_tokens=6)
    prompts = [data["prompts"][0], data["prompts"][4]]
    first = b.sample(prompts, 4, cfg, [11, 12])
    again = b.sample(prompts, 4, cfg, [11, 12])
    other = b.sample(prompts, 4, cfg, [13, 14])
    tokens = [[s.token_ids for s in row] for row in first]
    assert tokens == [[s.token_ids for s in row] for row in again]
    assert tokens != [[s.token_ids for s in row] for row in other]
    eos = set(b.eos_ids)
    for row in first:
        assert len(row) == 4 and len({tuple(s.token_ids) for s in row}) > 1
        for s in row:
            assert not eos & set(s.token_ids[:-1])  # EOS only ever as the last token
            assert s.finished == (s.token_ids[-1] in eos)
            assert s.finished or len(s.token_ids) == cfg.max_new_tokens


# ---- training -------------------------------------------------------------------------------
def step_batches(data: dict[str, Any], ref: Backend, loss: str) -> list[TrainBatch]:
    """Two micro-batches (weights 2/3 and 1/3) as `train.to_batch` builds them."""
    p, c = data["prompts"], data["comps"]
    refs = ref.logprobs(p, c, adapter=False)
    if loss == "dpo":
        return [TrainBatch(p[:4], c[:4], refs[:4], pairs=[(0, 1), (2, 3)], weight=2 / 3),
                TrainBatch(p[4:], c[4:], refs[4:], pairs=[(1, 0)], weight=1 / 3)]
    old = ref.logprobs(p, c)
    old = [[x - 0.3 * (i % 2) for x in row] for i, row in enumerate(old)]  # some ratios clip
    return [TrainBatch(p[:4], c[:4], refs[:4], old[:4], groups=[[0, 1], [2, 3]],
                       target=[[0.7, 0.3], [0.5, 0.5]], weight=2 / 3),
            TrainBatch(p[4:], c[4:], refs[4:], old[4:], groups=[[0, 1]],
                       target=[[0.1, 0.9]], weight=1 / 3)]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("loss", ["dpo", "grpo-advantage", "grpo-distribution"])
@pytest.mark.parametrize("name", BACKENDS)
def test_train_step_matches_reference(name: str, loss: str, tiny_llama_dir: Path,
                                      adapter_dir: Path, data: dict[str, Any],
                                      tmp_path: Path) -> None:
    ref = load("cpu", tiny_llama_dir, adapter_dir)
    b = load(name, tiny_llama_dir, adapter_dir)
    batches = step_batches(data, ref, loss)
    p, c = data["prompts"], data["comps"]
    cfg = LossConfig(beta=0.5, beta_kl=0.05)
    before = lora_weights(ref, tmp_path / "before")
    margin0 = {k: _margins(x, p, c) for k, x in (("ref", ref), ("b", b))}
    base0 = b.logprobs(p, c, adapter=False)

    got = b.train_step(batches, LOSSES[loss], cfg)
    want = ref.train_step(batches, LOSSES[loss], cfg)
    assert set(got) == set(want)
    for key, value in want.items():
        tol = 1e-3 * abs(value) if key == "grad_norm" else 1e-4 + 1e-4 * abs(value)
        assert abs(got[key] - value) <= tol, (key, got[key], value)

    after_ref, after_b = lora_weights(ref, tmp_path / "ref"), lora_weights(b, tmp_path / "b")
    assert set(after_b) == set(after_ref)
    d_ref = np.concatenate([(after_ref[k] - before[k]).ravel() for k in sorted(before)])
    d_b = np.concatenate([(after_b[k] - before[k]).ravel() for k in sorted(before)])
    assert np.linalg.norm(d_ref) > 0 and cosine(d_ref, d_b) > 0.99
    # The reference policy never moves, and the policy's log-probs still agree.
    assert max_diff(b.logprobs(p, c, adapter=False), base0) <= 1e-6
    assert max_diff(b.logprobs(p, c), ref.logprobs(p, c)) <= 10 * LOGP_TOL
    if loss == "dpo":
        moved = {k: _margins(x, p, c) - margin0[k] for k, x in (("ref", ref), ("b", b))}
        assert np.all(np.sign(moved["b"]) == np.sign(moved["ref"]))
        assert np.allclose(moved["b"], moved["ref"], rtol=1e-2, atol=1e-3)


def _margins(b: Backend, p: list[list[int]], c: list[list[int]]) -> np.ndarray:
    """Chosen-minus-rejected summed log-prob of the three DPO pairs in `step_batches`."""
    s = [sum(r) for r in b.logprobs(p, c)]
    return np.array([s[0] - s[1], s[2] - s[3], s[5] - s[4]])


@pytest.mark.parametrize("name", BACKENDS)
def test_state_resume_replays_the_next_step(name: str, tiny_llama_dir: Path, adapter_dir: Path,
                                            data: dict[str, Any], tmp_path: Path) -> None:
    """step, save_state, step == load_state into a fresh backend, step (optimizer + warmup)."""
    b = load(name, tiny_llama_dir, adapter_dir)
    batches = step_batches(data, b, "dpo")
    b.train_step(batches, LOSSES["dpo"], LossConfig())
    b.save_state(tmp_path / "state")
    second = b.train_step(batches, LOSSES["dpo"], LossConfig())
    resumed = load(name, tiny_llama_dir)
    resumed.load_state(tmp_path / "state")
    again = resumed.train_step(batches, LOSSES["dpo"], LossConfig())
    assert again["lr"] == second["lr"] and math.isclose(again["loss"], second["loss"],
                                                        rel_tol=1e-6)
    want, got = lora_weights(b, tmp_path / "a"), lora_weights(resumed, tmp_path / "b")
    assert all(np.allclose(got[k], want[k], atol=1e-7) for k in want)


@pytest.mark.parametrize("name", BACKENDS)
def test_saved_adapter_loads_in_peft(name: str, tiny_llama_dir: Path, adapter_dir: Path,
                                     data: dict[str, Any], tmp_path: Path) -> None:
    """run_dir/adapter contract: PeftModel.from_pretrained on torch reproduces the policy."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    b = load(name, tiny_llama_dir, adapter_dir)
    b.train_step(step_batches(data, b, "dpo"), LOSSES["dpo"], LossConfig())
    b.save_adapter(tmp_path / "adapter")
    ref = load("cpu", tiny_llama_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ref.model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    p, c = data["prompts"], data["comps"]
    assert max_diff(b.logprobs(p, c), ref.logprobs(p, c)) <= LOGP_TOL


# ---- MLX only -------------------------------------------------------------------------------
def _loss_inputs(lib: str) -> tuple[Any, list[tuple[str, Any]]]:
    """Hand-made LossInputs for `lib` ("torch" or "mlx"): 4 rows, T = 3, -inf and NaN in the
    padding, one tied (zero-variance) group, and old log-probs that push ratios past the clip.
    Returns (the token_logp leaf, [(loss name, inputs)])."""
    logp = [[-1.0, -2.0, float("-inf")], [-0.5, float("nan"), -9.0], [-3.0, -1.0, -0.2],
            [-0.7, -0.1, float("-inf")]]
    ref = [[-1.2, -1.5, 0.0], [-0.4, 0.0, 0.0], [-2.0, -1.5, -0.1], [-0.9, -0.3, 0.0]]
    old = [[-1.5, -2.0, 0.0], [-0.5, 0.0, 0.0], [-2.5, -1.0, -0.6], [-0.7, -0.1, 0.0]]
    mask = [[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]]
    groups, target = [[0, 1], [2, 3]], [[0.8, 0.2], [0.5, 0.5]]
    if lib == "torch":
        from edge_pu.algo.losses import LossInputs as Inputs

        arr: Callable[..., Any] = torch.tensor
        leaf = torch.tensor(logp, requires_grad=True)
        ints: Any = torch.long
        floats: Any = torch.float32
    else:
        import mlx.core as mx

        from edge_pu.backends.mlx_losses import MLXLossInputs as Inputs

        arr, leaf, ints, floats = mx.array, mx.array(logp), mx.int32, mx.float32

    def make(token_logp: Any, **kw: Any) -> Any:
        base = dict(token_logp=token_logp, ref_token_logp=arr(ref, dtype=floats),
                    mask=arr(mask, dtype=floats))
        return Inputs(**base, **kw)

    return leaf, [
        ("dpo", lambda t: make(t, pairs=arr([[0, 1], [3, 2]], dtype=ints))),
        ("grpo-advantage", lambda t: make(t, old_token_logp=arr(old, dtype=floats),
                                          groups=arr(groups, dtype=ints),
                                          target=arr(target, dtype=floats))),
        ("grpo-distribution", lambda t: make(t, groups=arr(groups, dtype=ints),
                                             target=arr(target, dtype=floats))),
    ]


@pytest.mark.parametrize(("loss", "norm", "kl_cap"), [
    ("dpo", "sequence", 4.0), ("grpo-advantage", "sequence", 4.0),
    ("grpo-advantage", "token", 4.0), ("grpo-advantage", "sequence", 0.0),
    ("grpo-advantage", "sequence", 0.05),
    ("grpo-distribution", "sequence", 4.0), ("grpo-distribution", "none", 4.0)])
@pytest.mark.mlx
@pytest.mark.skipif(not HAS_MLX, reason=MLX_REASON)
def test_mlx_losses_mirror_torch(loss: str, norm: str, kl_cap: float) -> None:
    """Same loss, metrics and d loss / d token_logp (finite, 0 on padding) as the torch loss;
    kl_cap 0.05 puts some tokens past the k3 KL's cap, 0 turns it off."""
    import mlx.core as mx

    from edge_pu.backends.mlx_losses import MLX_LOSSES, mlx_loss_for

    assert mlx_loss_for(LOSSES[loss]) is MLX_LOSSES[loss]
    assert mlx_loss_for(lambda x, c: LOSSES[loss](x, c)) is None
    cfg = LossConfig(beta=0.7, beta_kl=0.1, clip_eps=0.2, length_norm=norm, kl_cap=kl_cap)
    leaf, cases = _loss_inputs("torch")
    make_t = dict(cases)[loss]
    out = LOSSES[loss](make_t(leaf), cfg)
    out.loss.backward()
    mleaf, mcases = _loss_inputs("mlx")
    make_m = dict(mcases)[loss]

    def f(t: mx.array) -> tuple[mx.array, dict[str, mx.array]]:
        return MLX_LOSSES[loss](make_m(t), cfg)

    (value, metrics), grad = mx.value_and_grad(f)(mleaf)
    assert math.isclose(value.item(), out.loss.item(), rel_tol=1e-5, abs_tol=1e-6)
    assert set(metrics) == set(out.metrics)
    for key, want in out.metrics.items():
        assert math.isclose(metrics[key].item(), want, rel_tol=1e-5, abs_tol=1e-6), key
    assert leaf.grad is not None
    assert np.allclose(np.array(grad), leaf.grad.numpy(), atol=1e-6)
    assert np.isfinite(np.array(grad)).all()
    if loss == "grpo-advantage" and kl_cap == 0.05:
        assert 0 < out.metrics["kl_capped_fraction"] < 1


@pytest.mark.mlx
@pytest.mark.skipif(not HAS_MLX, reason=MLX_REASON)
def test_mlx_injected_torch_loss_matches_mirror(tiny_llama_dir: Path, adapter_dir: Path,
                                                data: dict[str, Any], tmp_path: Path) -> None:
    """A loss with no MLX mirror runs in torch (the bridge) and gives the same step."""
    a = load("mlx", tiny_llama_dir, adapter_dir)
    b = load("mlx", tiny_llama_dir, adapter_dir)
    batches = step_batches(data, a, "grpo-advantage")
    cfg = LossConfig(beta_kl=0.05)
    mirror = a.train_step(batches, LOSSES["grpo-advantage"], cfg)
    bridged = b.train_step(batches, lambda x, c: LOSSES["grpo-advantage"](x, c), cfg)
    for key, value in mirror.items():
        assert math.isclose(bridged[key], value, rel_tol=1e-4, abs_tol=1e-5), key
    wa, wb = lora_weights(a, tmp_path / "a"), lora_weights(b, tmp_path / "b")
    assert all(np.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


@pytest.mark.mlx
@pytest.mark.skipif(not HAS_MLX, reason=MLX_REASON)
def test_mlx_gradient_checkpointing_changes_nothing(tiny_llama_dir: Path, adapter_dir: Path,
                                                    data: dict[str, Any], tmp_path: Path
                                                    ) -> None:
    from dataclasses import replace

    plain = load("mlx", tiny_llama_dir, adapter_dir)
    ckpt = make_backend("mlx")
    cfg = run_config(tiny_llama_dir)
    ckpt.load(replace(cfg, train=replace(cfg.train, gradient_checkpointing=True)))
    adopt(ckpt, adapter_dir)
    batches = step_batches(data, plain, "dpo")
    want = plain.train_step(batches, LOSSES["dpo"], LossConfig())
    got = ckpt.train_step(batches, LOSSES["dpo"], LossConfig())
    assert math.isclose(got["loss"], want["loss"], rel_tol=1e-6)
    wa, wb = lora_weights(plain, tmp_path / "a"), lora_weights(ckpt, tmp_path / "b")
    assert all(np.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=4)  # inference path unaffected
    p = data["prompts"][:1]
    assert ckpt.sample(p, 1, greedy, [0])[0][0].token_ids == \
        plain.sample(p, 1, greedy, [0])[0][0].token_ids


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.mlx
@pytest.mark.skipif(not HAS_MLX, reason=MLX_REASON)
def test_mlx_quantized_matches_dequantized_reference(arch: str, request: pytest.FixtureRequest,
                                                     data: dict[str, Any], tmp_path: Path
                                                     ) -> None:
    """mlx-affine-4: train a step, merge (dequantized base + LoRA delta), and the torch
    reference on the merged dir gives the quantized policy's log-probs within QUANT_TOL."""
    from edge_pu.backends.base import MLX_AFFINE

    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    q = load("mlx", model_dir, quant="mlx-affine-4")
    assert q.quant_format == "mlx-affine-4" and MLX_AFFINE in q.capabilities
    assert q.dense_layers == []  # every in-dim of the tiny model is a multiple of 64
    p, c = data["prompts"], data["comps"]
    base = q.logprobs(p, c, adapter=False)
    fp = load("cpu", model_dir)
    assert max_diff(base, fp.logprobs(p, c, adapter=False)) > QUANT_TOL  # really quantized
    q.train_step(step_batches(data, q, "dpo"), LOSSES["dpo"], LossConfig())
    assert max_diff(q.logprobs(p, c, adapter=False), base) <= 1e-6  # frozen 4-bit base
    merged = q.merge(tmp_path / "merged")
    ref = load("cpu", merged)
    assert max_diff(q.logprobs(p, c), ref.logprobs(p, c, adapter=False)) <= QUANT_TOL
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=8)
    assert [s.token_ids for s in q.sample(p[:1], 2, greedy, [0])[0]] == \
        [s.token_ids for s in ref.sample(p[:1], 2, greedy, [0], adapter=False)[0]]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cpu_nf4_trains_on_and_merges_into_its_4bit_base(arch: str,
                                                         request: pytest.FixtureRequest,
                                                         data: dict[str, Any], tmp_path: Path
                                                         ) -> None:
    """nf4 on CPU (bitsandbytes): the 4-bit base really is quantized, stays frozen through a
    step, and `merge` folds the adapter into the dequantized NF4 weights (what training saw),
    so the merged dense model reproduces the QLoRA policy; merging into the original fp32
    weights instead would be off by the NF4 rounding error."""
    pytest.importorskip("bitsandbytes")
    from edge_pu.backends.base import NF4
    from edge_pu.export import merge_adapter
    from edge_pu.quant.nf4 import nf4_base_dir

    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    q = load("cpu", model_dir, quant="nf4")
    assert q.quant_format == "nf4" and NF4 in q.capabilities
    p, c = data["prompts"], data["comps"]
    base = q.logprobs(p, c, adapter=False)
    fp = load("cpu", model_dir)
    assert max_diff(base, fp.logprobs(p, c, adapter=False)) > QUANT_TOL  # really quantized
    assert max_diff(base, load("cpu", nf4_base_dir(model_dir)).logprobs(p, c, adapter=False)
                    ) <= QUANT_TOL
    q.train_step(step_batches(data, q, "dpo"), LOSSES["dpo"], LossConfig())
    assert max_diff(q.logprobs(p, c, adapter=False), base) <= 1e-6  # frozen 4-bit base
    trained = q.logprobs(p, c)
    assert max_diff(trained, base) > 1e-3  # the step moved the policy
    merged = load("cpu", q.merge(tmp_path / "merged"))
    assert max_diff(merged.logprobs(p, c, adapter=False), trained) <= QUANT_TOL
    naive = load("cpu", merge_adapter(model_dir, tmp_path / "merged.adapter", tmp_path / "x"))
    assert max_diff(naive.logprobs(p, c, adapter=False), trained) > QUANT_TOL
