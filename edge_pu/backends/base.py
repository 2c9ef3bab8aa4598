"""The backend interface: everything the pipeline asks of a hardware framework.

A backend holds one student (a possibly quantized base plus a LoRA adapter) and its tokenizer.
`adapter=False` gives the reference policy, the same weights with the adapter disabled, so there
is never a second copy of the model. Optional abilities are declared in `capabilities`, not as
extra methods. Data crosses this boundary as plain Python lists, so the pipeline and the
algorithm never see a framework's tensor type.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..config import RunConfig, SamplingConfig

# Capability names a backend may declare.
NF4 = "quant:nf4"
MLX_AFFINE = "quant:mlx-affine-4"
GRAD_CHECKPOINTING = "gradient-checkpointing"
SHARED_PREFILL = "shared-prefill"  # K samples of one prompt share a single prefill


@dataclass(frozen=True)
class Sample:
    token_ids: list[int]  # completion tokens, EOS included when the sample finished
    text: str
    finished: bool  # ended on EOS rather than on max_new_tokens


@dataclass
class TrainBatch:
    """One micro-batch of rows and the structure the loss needs over them."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    ref_token_logp: list[list[float]]  # reference log-probs per completion token
    old_token_logp: list[list[float]] | None = None  # sampling policy (GRPO ratio)
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (chosen row, rejected row)
    groups: list[list[int]] = field(default_factory=list)  # rows of each prompt's candidates
    target: list[list[float]] = field(default_factory=list)  # label distribution per group
    weight: float = 1.0  # share of the optimizer step this micro-batch carries


class Backend(Protocol):
    name: str
    capabilities: frozenset[str]
    quant_format: str  # the weights sampling and training both use, e.g. "none", "nf4"

    def load(self, cfg: RunConfig) -> None: ...

    def chat_ids(self, messages: list[dict[str, str]], *, assistant: str | None = None
                 ) -> list[int]:
        """Token ids of the chat-templated conversation, ending with the assistant turn's
        opening (assistant=None) or with that text appended (for scoring)."""
        ...

    def token_ids(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def sample(self, prompt_ids: Sequence[list[int]], k: int, cfg: SamplingConfig,
               seeds: Sequence[int], *, adapter: bool = True) -> list[list[Sample]]:
        """K samples per prompt; temperature 0 is greedy. Reproducible for fixed seeds."""
        ...

    def logprobs(self, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], *,
                 adapter: bool = True) -> list[list[float]]:
        """Log-prob of every completion token given its prompt, under policy or reference."""
        ...

    def next_token_logprobs(self, prompt_ids: Sequence[list[int]], candidates: Sequence[int], *,
                            adapter: bool = True) -> list[list[float]]:
        """Log-probs of the `candidates` token ids as the next token after each prompt."""
        ...

    def train_step(self, micro_batches: Sequence[TrainBatch], loss_fn: Callable[..., Any],
                   loss_cfg: Any) -> dict[str, float]: ...

    def save_adapter(self, path: Path) -> None: ...

    def save_state(self, path: Path) -> None: ...

    def load_state(self, path: Path) -> None: ...

    def merge(self, out_dir: Path) -> Path: ...
