"""The methods the evaluation compares, and how a shared backend is reset between them.

Every trained method starts from the same untrained student (the LoRA adapter re-initialised
for the seed), trains on the same prompts for the same number of optimizer steps with the same
number of completion rows per step (DPO: batch_size pairs = 2 x batch_size rows; GRPO: 2 x
batch_size / K groups of K rows; SFT: 2 x batch_size anchors), and is scored greedily on the
same held-out prompts.

| name           | kind     | training signal                                                  |
|----------------|----------|------------------------------------------------------------------|
| none           | none     | no training (the untrained student)                              |
| pu-dpo         | pipeline | DPO on anchor-conditioned self-ranking (ranker.mode, anchor on)  |
| pu-grpo-adv    | pipeline | LDL-GRPO `advantage` on the same ranking                         |
| pu-grpo-dist   | pipeline | LDL-GRPO `distribution` on the same ranking                      |
| sft            | sft      | NLL of the anchors                                               |
| spin           | spin     | DPO, anchor = chosen, a student sample = rejected                |
| similarity     | pipeline | DPO on chrF-to-anchor ranking                                    |
| random         | pipeline | DPO on random pairs                                              |
| self-noanchor  | pipeline | DPO on the same self-ranking without the anchor                  |
| grpo-random    | pipeline | LDL-GRPO `advantage` on random scores: what GRPO's on-policy,    |
|                |          | clipped, KL-held training does with no ranking signal at all     |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # none | pipeline | sft | spin
    algorithm: str = "dpo"
    grpo_variant: str = "distribution"
    ranker: str = ""  # a RANK_SPECS name; "{mode}" stands for the config's ranker.mode
    about: str = ""

    def ranker_spec(self, mode: str) -> str:
        return self.ranker.replace("{mode}", mode)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("none", "none", about="untrained student"),
    Method("pu-dpo", "pipeline", "dpo", ranker="{mode}", about="PU self-ranking + DPO"),
    Method("pu-grpo-adv", "pipeline", "grpo", "advantage", ranker="{mode}",
           about="PU self-ranking + LDL-GRPO (advantage)"),
    Method("pu-grpo-dist", "pipeline", "grpo", "distribution", ranker="{mode}",
           about="PU self-ranking + LDL-GRPO (distribution)"),
    Method("sft", "sft", about="SFT on the anchors"),
    Method("spin", "spin", "dpo", about="DPO: anchor chosen, student sample rejected"),
    Method("similarity", "pipeline", "dpo", ranker="similarity",
           about="DPO on chrF-to-anchor ranking"),
    Method("random", "pipeline", "dpo", ranker="random", about="DPO on random pairs"),
    Method("self-noanchor", "pipeline", "dpo", ranker="{mode}-noanchor",
           about="DPO on self-ranking without the anchor"),
    Method("grpo-random", "pipeline", "grpo", "advantage", ranker="random",
           about="LDL-GRPO (advantage) on random scores"),
)}
QUICK_METHODS = ("pu-dpo", "sft")


def reset_adapter(backend: Any, cfg: Any, seed: int) -> None:
    """Give `backend` a freshly initialised LoRA adapter (seeded) and no optimizer state.

    For the torch backend the adapter's weights are re-initialised in place the way peft
    initialises them (A: Kaiming uniform, B: 0, so the policy equals the base again); the
    backend's `cfg` is replaced so the optimizer is rebuilt from this method's train config.
    Other backends are reloaded from `cfg` (a few seconds for a small student).
    """
    model = getattr(backend, "model", None)
    if model is None or not hasattr(model, "peft_config"):
        backend.load(cfg)
        return
    import torch
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in list(module.lora_A.keys()):
                module.reset_lora_parameters(name, True)
    backend.cfg = cfg
    backend.optimizer = None
    backend.scheduler = None
    model.eval()
