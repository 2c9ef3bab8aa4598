"""The CPU backend with its candidate, scoring and greedy passes run by llama.cpp.

`EngineView(backend, sampler)` is what the candidate sampler (edge_pu.pipeline), the rankers
(edge_pu.rank) and the greedy evaluation (edge_pu.evaluate) are handed under
`sampling.engine: llama-cpp`. `sample`, `logprobs` and `next_token_logprobs` go to llama.cpp
(edge_pu.backends.llamacpp_sampler) on the weights the backend would use for the same call:
`adapter=True` the policy's LoRA as it is now, `adapter=False` the reference policy (the SFT
adapter after stage 1, else the base). Whenever those differ from what llama.cpp holds, they
are written once as a GGUF LoRA and the model is reloaded with it. Everything else (tokenizer,
chat template, training) is the backend's, by attribute.

Training's own log-probs (the reference and the GRPO ratio's denominator, edge_pu.train) stay
the backend's: they must be what the loss recomputes, to the last digit.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from typing import Any

from ..config import SamplingConfig
from .base import Sample


class EngineView:
    def __init__(self, backend: Any, sampler: Any) -> None:
        self.backend, self.sampler = backend, sampler
        self._held: Any = ()  # what llama.cpp holds: () unknown, None the base, else a copy
        self._n = 0

    def __getattr__(self, name: str) -> Any:  # the tokenizer, chat template, ...: the backend's
        return getattr(self.backend, name)

    def sync(self, adapter: bool, tag: str = "") -> None:
        """Make llama.cpp hold the weights a backend call with `adapter` would use."""
        import torch

        want = self.backend.lora_weights(adapter)
        held = self._held
        if held == () or (want is None) != (held is None) or (
                want is not None and any(not torch.equal(v, held[n]) for n, v in want.items())):
            old = self.sampler.lora
            if want is None:
                self.sampler.refresh(None, "base")
            else:
                self._n += 1
                tag = tag or f"v{self._n}"
                path = self.sampler.work_dir / f"adapter-{tag}"
                self.backend.save_adapter_for(adapter, path)
                self.sampler.refresh(path, tag)
            if old is not None and old.name.startswith("lora-v"):  # a passing copy: not kept
                old.unlink(missing_ok=True)
                shutil.rmtree(old.with_name(old.stem.replace("lora-", "adapter-")),
                              ignore_errors=True)
            self._held = None if want is None else {n: v.clone() for n, v in want.items()}

    def sample(self, prompt_ids: Sequence[list[int]], k: int, cfg: SamplingConfig,
               seeds: Sequence[int], *, adapter: bool = True) -> list[list[Sample]]:
        self.sync(adapter)
        self.sampler.fit(max(map(len, prompt_ids), default=0) + cfg.max_new_tokens)
        return self.sampler.sample(prompt_ids, k, cfg, seeds)

    def logprobs(self, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], *,
                 adapter: bool = True) -> list[list[float]]:
        self.sync(adapter)
        return self.sampler.logprobs(prompt_ids, completion_ids)

    def next_token_logprobs(self, prompt_ids: Sequence[list[int]], candidates: Sequence[int], *,
                            adapter: bool = True) -> list[list[float]]:
        self.sync(adapter)
        return self.sampler.next_token_logprobs(prompt_ids, candidates)

    def close(self) -> None:
        self.sampler.close()
