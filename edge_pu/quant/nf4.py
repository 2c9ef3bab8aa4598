"""The dense weights an NF4 (QLoRA) run trained against: dequantize(quantize_nf4(W)).

A QLoRA adapter learned its update on top of the 4-bit base, not on top of the original dense
weights. Merging it into the original W would add the NF4 rounding error (about 1e-2 relative
per weight) back on top of an update that may have learned to compensate part of it, so the
merged model would not be the model that was trained. `nf4_base_dir` quantizes the student with
the same bitsandbytes settings the backend uses (NF4, double quant, blocksize 64), dequantizes
every 4-bit layer back to fp32 and saves the result as a plain HF dir, once, in the cache.
Layers bitsandbytes leaves dense (embeddings, norms, the LM head) are copied unchanged.

NF4 quantization is elementwise given each block's absmax, so the CPU and CUDA kernels give the
same codes; training on CUDA computed with the dequantized weight in bf16, which differs from
this fp32 copy by bf16 rounding only.

`exact_cpu_compute(model)` keeps a 4-bit model on CPU computing x @ dequantize(W).T in its
compute dtype, so that this copy reproduces it (see there why bitsandbytes would not).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .cache import cache_root, publish_model, weights_tag


def exact_cpu_compute(model: Any) -> int:
    """Turn off bitsandbytes' AVX512-BF16 inference path in every 4-bit layer of `model`;
    returns how many layers it touched (0 on a model without them).

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weight at its first
    forward in eval mode without grad, and from then on runs every forward, training included,
    through `gemv_4bit`, which casts the input and the absmax to bf16 whatever the compute dtype.
    The log-probs then differ from the dequantized fp32 base (0.08 nat on the tiny test model),
    so merges are not exact; and `gemv_4bit` has no autograd kernel, so no gradient flows
    through a repacked base layer to the adapters before it. Whether it happens depends on the
    CPU, not on edge_pu. FIXME: relies on bitsandbytes' `support_avx512bf16_for_cpu`
    attribute; if it is renamed, the nf4 parity test in tests/test_backend_contract.py fails
    on such a CPU.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def nf4_base_dir(student_dir: str | Path) -> Path:
    """HF dir of `student_dir`'s weights after an NF4 round trip (cached)."""
    student_dir = Path(student_dir)
    out = cache_root() / "nf4" / f"{student_dir.name}-{weights_tag(student_dir)}"
    if (out / "edge_pu_nf4.json").exists():
        return out
    import bitsandbytes.functional as bnbf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    print(f"[nf4] writing the dequantized NF4 base of {student_dir} into {out} (once)",
          flush=True)
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32,
                                                     quantization_config=qcfg,
                                                     device_map={"": "cpu"})
    state = {}
    for name, module in quantized.named_modules():
        weight = getattr(module, "weight", None)
        if weight is not None and getattr(weight, "quant_state", None) is not None:
            state[f"{name}.weight"] = bnbf.dequantize_4bit(weight.data, weight.quant_state
                                                           ).float()
    dense = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    sd = dense.state_dict()
    missing = [k for k in state if k not in sd]
    if missing:
        raise RuntimeError(f"NF4 layers without a dense counterpart: {missing[:3]}")
    with torch.no_grad():
        for key, value in state.items():
            sd[key].copy_(value.reshape(sd[key].shape))
    return publish_model(out, dense, AutoTokenizer.from_pretrained(student_dir),
                         "edge_pu_nf4.json", {"source": str(student_dir.resolve()),
                                              "quant": "nf4", "double_quant": True,
                                              "layers": len(state)})
