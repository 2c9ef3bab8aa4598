"""The methods the evaluation compares, and how a shared backend is reset between them.

Budget: every trained method takes the same number of optimizer steps N (`train.steps` of the
eval config) of about the same number of completion rows per step (SFT: sft.batch_size
anchors; DPO: train.batch_size pairs = 2 x that many rows; GRPO: groups of K (+1 with the
anchor) rows, 2 x batch_size / K groups). Two-stage methods spend N_sft = N - N_pu steps on
SFT (the same SFT trajectory as `sft`, so they share its first N_sft steps exactly) and N_pu on
the PU stage, which starts from that SFT adapter, with it as reference and frozen judge, on K
candidates sampled from it. `sft-best` is the strong baseline: SFT checkpoints at N/2, N, 3N/2
and 2N steps, the one with the best pass rate on a validation split (never the held-out set).

| name                 | kind     | training signal                                                |
|----------------------|----------|----------------------------------------------------------------|
| none                 | none     | no training (the untrained student)                            |
| sft                  | sft      | NLL of the anchors, N steps                                    |
| sft-best             | sft-best | NLL of the anchors, steps chosen on the validation split       |
| sft-stage1           | sft-stage1 | NLL of the anchors, N - pu_steps steps: the two-stage start  |
| sft+pu-grpo-adv      | two      | SFT, then LDL-GRPO `advantage` on anchor-conditioned           |
|                      |          | self-ranking (ranker.mode), the PU steps spent on the prompts  |
|                      |          | the ranking tells apart (train.select): the library default    |
| sft+pu-dpo           | two      | SFT, then DPO on the same ranking                              |
| sft+pu-grpo-dist     | two      | SFT, then LDL-GRPO `distribution` on the same ranking          |
| sft+oracle           | two      | SFT, then GRPO-adv on the checker's quality: the ceiling of    |
|                      |          | any ranking                                                    |
| sft+random           | two      | SFT, then GRPO-adv on random scores (no ranking signal; the    |
|                      |          | anchor and the unfinished rule still act)                      |
| sft+similarity       | two      | SFT, then GRPO-adv on chrF to the anchor                       |
| sft+pu-recall        | two      | SFT, then GRPO-adv on the student's own recall of the anchor  |
|                      |          | with the candidate shown (ranker `recall`)                     |
| sft+pu-likelihood    | two      | SFT, then GRPO-adv on the likelihood-gain self-ranker          |
| sft+bleu             | two      | SFT, then GRPO-adv on BLEU to the anchor (BLEUBERI)            |
| sft+pu:no-anchor     | two      | the default without the anchor as positive                     |
| sft+pu:keep-unfinished | two    | the default with unfinished candidates ranked like answers     |
| sft+pu:zscore        | two      | the default with per-group z-scores instead of pooled scale    |
| sft+pu:group-adv     | two      | the default with advantages divided by each group's std        |
| sft+verifier         | two      | SFT, then GRPO-adv on the reward functions (reward_funcs, e.g. |
|                      |          | the workload's constraint checker): not label-free             |
| sft+verifier+recall  | two      | the same, equal rewards ordered by the recall self-ranking     |
| sft+pu:anchor-check  | two      | the default; the anchor is the positive only where the reward  |
|                      |          | functions score it at least as high as the best candidate      |
| teacher              | teacher  | the teacher's own answers (the ceiling a student can reach)    |
| pu-dpo ...           | pipeline | single-stage: PU from the untrained student (as before)        |

Any PU method takes train.* settings of its own as a variant, `name@key=value[@...]`
(`method_named`), e.g. `sft+oracle@lr=5e-4` or `sft+pu-grpo-adv@select=all` (every prompt, the
old rule): settings are compared in one eval folder, on the same SFT path and candidates
(choose them with `edge-pu eval --tune`, on the validation split).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # none | pipeline | two | sft | sft-best | spin
    algorithm: str = "dpo"
    grpo_variant: str = "distribution"
    ranker: str = ""  # a RANK_SPECS name; "{mode}" stands for the config's ranker.mode
    about: str = ""
    train: tuple[tuple[str, Any], ...] = ()  # train.* overrides (the ablations)
    # Whether the method may see ranker.reward_funcs (a verifier): "" no (label-free), "rank"
    # (its ranker), "anchor" (only to check each anchor, train.anchor_check).
    verifier: str = ""

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
    Method("sft-best", "sft-best", about="SFT, steps chosen on the validation split"),
    Method("sft-stage1", "sft-stage1",
           about="SFT for N - pu_steps steps: where the two-stage methods start"),
    Method("sft+pu-grpo-adv", "two", "grpo", "advantage", ranker="{mode}",
           about="SFT, then PU self-ranking + LDL-GRPO (advantage): the default"),
    Method("sft+pu-dpo", "two", "dpo", ranker="{mode}", about="SFT, then PU + DPO"),
    Method("sft+pu-grpo-dist", "two", "grpo", "distribution", ranker="{mode}",
           about="SFT, then PU + LDL-GRPO (distribution)"),
    Method("sft+oracle", "two", "grpo", "advantage", ranker="oracle",
           about="SFT, then GRPO on the checker's quality (ceiling)"),
    Method("sft+random", "two", "grpo", "advantage", ranker="random",
           about="SFT, then GRPO on random scores (control)"),
    Method("sft+similarity", "two", "grpo", "advantage", ranker="similarity",
           about="SFT, then GRPO on chrF to the anchor"),
    Method("sft+pu-recall", "two", "grpo", "advantage", ranker="recall",
           about="SFT, then PU self-ranking by anchor recall + LDL-GRPO (advantage)"),
    Method("sft+pu-likelihood", "two", "grpo", "advantage", ranker="likelihood",
           about="SFT, then PU self-ranking by likelihood gain + LDL-GRPO (advantage)"),
    Method("sft+bleu", "two", "grpo", "advantage", ranker="bleu",
           about="SFT, then GRPO on BLEU to the anchor"),
    Method("sft+verifier", "two", "grpo", "advantage", ranker="reward", verifier="rank",
           about="SFT, then GRPO on the reward functions (a verifier; not label-free)"),
    Method("sft+verifier+recall", "two", "grpo", "advantage", ranker="reward+recall",
           verifier="rank", about="SFT, then GRPO on the reward functions, ties by recall"),
    Method("sft+pu:anchor-check", "two", "grpo", "advantage", ranker="{mode}",
           verifier="anchor", about="default; an anchor that fails the verifier is no positive"),
    Method("teacher", "teacher", about="the teacher's own answers (the ceiling)"),
    Method("sft+pu:no-anchor", "two", "grpo", "advantage", ranker="{mode}",
           train=(("anchor", "none"),), about="default without the anchor as positive"),
    Method("sft+pu:keep-unfinished", "two", "grpo", "advantage", ranker="{mode}",
           train=(("unfinished", "keep"),), about="default, unfinished ranked like answers"),
    Method("sft+pu:zscore", "two", "grpo", "advantage", ranker="{mode}",
           train=(("calibration", "zscore"),), about="default, per-group z-score"),
    Method("sft+pu:group-adv", "two", "grpo", "advantage", ranker="{mode}",
           train=(("advantage_norm", "group"),), about="default, per-group advantage std"),
)}
QUICK_METHODS = ("sft", "sft+pu-grpo-adv")
DEFAULT_METHODS = ("none", "sft", "sft-best", "sft-stage1", "sft+pu-grpo-adv",
                   "sft+pu-likelihood", "sft+pu-dpo", "sft+pu-grpo-dist", "sft+oracle",
                   "sft+random", "sft+similarity", "sft+bleu", "sft+pu:no-anchor",
                   "sft+pu:keep-unfinished", "sft+pu:zscore", "sft+pu:group-adv")


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def method_named(name: str) -> Method:
    """A METHODS entry, or a variant of one: `base@key=value[@key=value...]` sets train.* keys
    for that method only (e.g. `sft+oracle@lr=5e-4`), so settings can be compared in one eval
    folder, on the same SFT path and candidates."""
    from dataclasses import fields, replace

    from ..config import TrainConfig
    from ..errors import EdgePuError

    base, *sets = name.split("@")
    if base not in METHODS:
        raise EdgePuError(f"eval: unknown method {base}; choose from {', '.join(METHODS)}.")
    if not sets:
        return METHODS[base]
    m, known = METHODS[base], {f.name for f in fields(TrainConfig)}
    if m.kind not in ("two", "pipeline"):
        raise EdgePuError(f"eval: method {name}: only PU methods take train.* settings.")
    extra = []
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or key not in known:
            raise EdgePuError(f"eval: method {name}: {item!r} is not train.KEY=VALUE (keys: "
                              f"{', '.join(sorted(known))}).")
        extra.append((key, _value(value)))
    return replace(m, name=name, train=(*m.train, *extra))


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
    backend.clear_reference()
    backend.reset_optimizer(cfg.train)
    backend.cfg = cfg
    model.eval()
