"""Quant formats, named explicitly, that travel with the model handle.

`nf4` (bitsandbytes 4-bit NormalFloat, CUDA and CPU), `mlx-affine-4` (MLX group-wise affine),
`gguf:<type>` (a GGUF file's tensor type, e.g. gguf:q4_1). `none` means dense weights.
Export never folds an adapter into quantized weights: it merges into dense weights and then
re-quantizes with the target format's own quantizer (edge_pu.export).
"""

from __future__ import annotations

FORMATS = ("none", "nf4", "mlx-affine-4")


def is_known(fmt: str) -> bool:
    return fmt in FORMATS or fmt.startswith("gguf:")
