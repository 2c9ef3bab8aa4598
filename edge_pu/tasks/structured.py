"""Task families of the built-in suite, part 2: structured answers.

bullets (a "- " list of N items), json_key (a JSON object with a given key and value),
extract_name (a name from a one- or two-sentence passage), sort_numbers (3-4 numbers in order).
Types, the response reader and the shared word lists live in `families.py`; each checker's
docstring gives its partial-credit formula.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping
from typing import Any

from edge_pu.tasks.families import CITIES, NAMES, Family, Task, clean, clean_token, task_id, words

# --- bullets: a "- " list of N items ------------------------------------------------------------

# Broad on purpose: an item a small model names that is missing here costs it unfairly.
CATEGORIES: dict[str, frozenset[str]] = {
    "fruits": frozenset((
        "apple banana orange grape strawberry blueberry raspberry blackberry cherry peach pear "
        "plum mango pineapple watermelon melon cantaloupe kiwi lemon lime grapefruit apricot "
        "papaya coconut pomegranate fig date avocado guava lychee tangerine clementine nectarine "
        "cranberry persimmon quince mandarin jackfruit durian starfruit kumquat tomato olive"
    ).split() + ["passion fruit", "dragon fruit", "honeydew melon"]),
    "animals": frozenset((
        "dog cat lion tiger elephant giraffe zebra monkey bear wolf fox rabbit horse cow pig sheep "
        "goat chicken duck mouse rat snake frog fish bird eagle owl parrot penguin dolphin whale "
        "shark octopus deer kangaroo koala panda camel hippo hippopotamus rhino rhinoceros "
        "squirrel hamster turtle tortoise crocodile alligator bee ant butterfly spider cheetah "
        "leopard gorilla chimpanzee donkey bat seal otter beaver hedgehog lizard swan goose "
        "pigeon crow hawk falcon moose buffalo bison ox llama jaguar raccoon skunk crab lobster "
        "jellyfish starfish sloth ostrich flamingo peacock hen rooster puppy kitten cobra"
    ).split() + ["polar bear", "sea lion", "guinea pig"]),
    "colors": frozenset((
        "red blue green yellow orange purple pink brown black white gray grey violet indigo cyan "
        "magenta turquoise teal navy maroon beige gold silver crimson lavender olive lime tan "
        "coral ivory khaki scarlet amber peach mint burgundy charcoal cream"
    ).split()),
    "vegetables": frozenset((
        "carrot potato tomato onion garlic broccoli cauliflower cabbage lettuce spinach kale "
        "cucumber pepper zucchini eggplant pumpkin squash pea bean corn celery asparagus beet "
        "beetroot radish turnip leek artichoke okra mushroom yam parsnip chili courgette"
    ).split() + ["bell pepper", "green bean", "sweet potato", "brussels sprout"]),
}
# What the oracle lists and the "write these as a list" prompts use: items a small model knows.
_COMMON = {
    "fruits": "apple banana orange grape strawberry cherry peach pear mango lemon plum kiwi",
    "animals": "dog cat lion tiger elephant horse cow rabbit monkey bear duck sheep",
    "colors": "red blue green yellow orange purple pink brown black white gray gold",
    "vegetables": "carrot potato tomato onion broccoli cabbage lettuce spinach pea corn bean",
}
_LIST_PROMPTS = (
    'List {n} different {c}. Put each on its own line starting with "- " and write nothing else.',
    'Name {n} {c} as a bulleted list: one per line, each line starting with "- ".',
)
_ITEMS_PROMPT = 'Write these {c} as a bulleted list, one per line, each starting with "- ": {i}.'
_ITEM_LINE = re.compile(r"^(?:(-)|[*•+]|\d+[.)])\s+(.+)$")
_IRREGULAR = {"mice": "mouse", "geese": "goose", "oxen": "ox", "wolves": "wolf"}


def _make_bullets(rng: random.Random, index: int) -> Task:
    category = rng.choice(sorted(CATEGORIES))
    n = rng.randint(2, 5)
    picked = rng.sample(_COMMON[category].split(), n)
    items: list[str] | None = None
    if rng.random() < 0.4:  # "name N fruits": the space is small, so the rest copy given items
        prompt = rng.choice(_LIST_PROMPTS).format(n=n, c=category)
    else:
        items = picked
        prompt = _ITEMS_PROMPT.format(c=category, i=", ".join(items[:-1]) + " and " + items[-1])
    answer = "\n".join(f"- {w}" for w in picked)
    return Task(task_id("bullets", index), "bullets", prompt, answer,
                {"n": n, "category": category, "items": items})


def _normal_item(item: str) -> str:
    item = re.sub(r"\s*\(.*\)\s*$", "", item.lower()).strip(" .,;:!*`\"'")
    item = re.sub(r"^(?:a|an|the)\s+", "", item)
    return " ".join(item.split())


def _canonical(item: str, valid: frozenset[str]) -> str | None:
    """The member of `valid` that `item` names, plurals included (apples, cherries, peaches,
    tomatoes, mice), or None."""
    singulars = [item, _IRREGULAR.get(item, item)]
    if item.endswith("ies"):
        singulars.append(item[:-3] + "y")
    if item.endswith("es"):
        singulars.append(item[:-2])
    if item.endswith("s"):
        singulars.append(item[:-1])
    return next((s for s in singulars if s in valid), None)


def _check_bullets(spec: Mapping[str, Any], response: str) -> float:
    """count x content x style x extra, over the lines that look like list items ("- x", "* x",
    "1. x"): count = max(0, 1 - 0.25 * |items - n|); content = min(distinct valid items, n) / n,
    valid meaning one of the given items or a member of the category; style 1.0 if every item
    uses "- " else 0.5; extra 0.75 if any other line (a preamble) or an item with a description
    ("- apple: sweet") else 1.0. No items -> 0.0."""
    n = int(spec["n"])
    valid = frozenset(spec["items"]) if spec.get("items") else CATEGORIES[spec["category"]]
    items: list[str] = []
    dash_only, extra = True, False
    for line in clean(response).splitlines():
        match = _ITEM_LINE.match(line.strip())
        if match is None:
            extra = extra or bool(line.strip())
            continue
        # "- apple: a red fruit": the item is the head, the description is extra text
        head = re.split(r":|\s[-–—]\s", match.group(2), maxsplit=1)[0]
        extra = extra or head != match.group(2)
        items.append(_normal_item(head))
        dash_only = dash_only and match.group(1) is not None
    if not items:
        return 0.0
    count = max(0.0, 1.0 - 0.25 * abs(len(items) - n))
    distinct = {_canonical(i, valid) for i in items} - {None}  # "apple" and "apples" are one
    content = min(len(distinct), n) / n
    return count * content * (1.0 if dash_only else 0.5) * (0.75 if extra else 1.0)


# --- json_key: a JSON object with a given key ---------------------------------------------------

_JSON_VALUES: dict[str, Any] = {
    "name": NAMES,
    "city": CITIES,
    "color": sorted(CATEGORIES["colors"]),
    "fruit": sorted(w for w in CATEGORIES["fruits"] if " " not in w),
    "age": (5, 90),
    "count": (1, 20),
    "year": (1990, 2025),
    "score": (0, 100),
}
_JSON_PROMPTS = (
    'Reply with only a JSON object that has one key, "{k}", set to {v}.',
    'Write a JSON object whose only key is "{k}" with the value {v}. Output only the JSON.',
)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL | re.IGNORECASE)


def _make_json_key(rng: random.Random, index: int) -> Task:
    key = rng.choice(sorted(_JSON_VALUES))
    pool = _JSON_VALUES[key]
    value = rng.randint(*pool) if isinstance(pool, tuple) else rng.choice(pool)
    prompt = rng.choice(_JSON_PROMPTS).format(k=key, v=json.dumps(value))
    return Task(task_id("json_key", index), "json_key", prompt, json.dumps({key: value}),
                {"key": key, "value": value})


def _parse_object(text: str) -> tuple[dict[str, Any] | None, bool]:
    """(object, clean): a ```json fence is allowed at no cost; an object found inside other text
    comes back with clean=False."""
    fenced = _FENCE.match(text)
    text = fenced.group(1) if fenced else text
    start, end = text.find("{"), text.rfind("}")
    embedded = text[start : end + 1] if 0 <= start < end else ""
    for candidate, is_clean in ((text, True), (embedded, False)):
        try:
            obj = json.loads(candidate)
        except ValueError:
            continue
        return (obj, is_clean) if isinstance(obj, dict) else (None, False)
    return None, False


def _check_json_key(spec: Mapping[str, Any], response: str) -> float:
    """value x only_key x clean: value 1.0 if the key holds the exact value, 0.75 if equal only
    as text ("paris", "42" for 42), 0.5 if another value, 0.25 if the key is missing; only_key
    0.75 if the key has company, else 1.0; clean 1.0 if the reply is just the object (a ```json
    fence is fine) else 0.75. Not a JSON object -> 0.0."""
    obj, is_clean = _parse_object(clean(response))
    if obj is None:
        return 0.0
    key, want = spec["key"], spec["value"]
    if key not in obj:
        value = 0.25
    elif obj[key] == want and type(obj[key]) is type(want):  # True == 1, but is not 1
        value = 1.0
    elif str(obj[key]).strip().lower() == str(want).lower():
        value = 0.75
    else:
        value = 0.5
    only_key = 1.0 if key not in obj or set(obj) == {key} else 0.75
    return value * only_key * (1.0 if is_clean else 0.75)


# --- extract_name: who did what in a short passage ----------------------------------------------

# (passage, question whose answer is A, question whose answer is B)
_PASSAGES = (
    ("{A} gave a {o} to {B}.", "Who gave the {o}?", "Who received the {o}?"),
    ("{A} called {B} after lunch.", "Who made the call?", "Who was called?"),
    ("{A} lives in {c}. {B} visited {A} there last week.", "Who lives in {c}?", "Who visited?"),
    ("{A} and {B} ran a race. {B} won.", "Who lost the race?", "Who won the race?"),
    ("{A} is taller than {B}.", "Who is taller?", "Who is shorter?"),
    ("{A} wrote a letter to {B} from {c}.", "Who wrote the letter?", "Who got the letter?"),
    ("{A} cooked dinner, and {B} washed the dishes.", "Who cooked dinner?",
     "Who washed the dishes?"),
    ("{A} is a teacher. {B} is a doctor.", "Who is the teacher?", "Who is the doctor?"),
)
_THINGS = "book ball gift letter cake map hat key lamp photo".split()


def _make_extract_name(rng: random.Random, index: int) -> Task:
    a, b = rng.sample(NAMES, 2)
    passage, ask_a, ask_b = rng.choice(_PASSAGES)
    answer, other, question = (a, b, ask_a) if rng.random() < 0.5 else (b, a, ask_b)
    fields = {"A": a, "B": b, "o": rng.choice(_THINGS), "c": rng.choice(CITIES)}
    prompt = f"{passage.format(**fields)}\n{question.format(**fields)} Answer with the name only."
    return Task(task_id("extract_name", index), "extract_name", prompt, answer,
                {"name": answer, "other": other})


def _check_extract_name(spec: Mapping[str, Any], response: str) -> float:
    """1.0: just the name (any case); 0.5: the name inside a longer reply that does not also
    name the other person ("Maria gave it."); 0.0: the other name, both names, or neither."""
    text = clean_token(response)
    name, other = str(spec["name"]).lower(), str(spec["other"]).lower()
    toks = [t.lower().removesuffix("'s") for t in words(text)]
    if name not in toks or other in toks:
        return 0.0
    return 1.0 if toks == [name] and text.lower() == name else 0.5


# --- sort_numbers: 3-4 numbers in order ---------------------------------------------------------

_SORT_PROMPT = (
    "Sort these numbers from {order}: {nums}. Reply with only the sorted numbers, separated by "
    "commas."
)
_ENUMERATOR = re.compile(r"^\s*\d+[.)]\s+(?=\S)", re.MULTILINE)
_COMMA_LIST = re.compile(r"\[?\s*\d+(?:\s*,\s*\d+)*\s*\]?\.?")


def _make_sort_numbers(rng: random.Random, index: int) -> Task:
    numbers = rng.sample(range(1, 100), rng.choice((3, 4)))
    descending = rng.random() < 0.5
    order = "largest to smallest" if descending else "smallest to largest"
    prompt = _SORT_PROMPT.format(order=order, nums=", ".join(map(str, numbers)))
    answer = ", ".join(map(str, sorted(numbers, reverse=descending)))
    return Task(task_id("sort_numbers", index), "sort_numbers", prompt, answer,
                {"numbers": numbers, "descending": descending})


def _check_sort_numbers(spec: Mapping[str, Any], response: str) -> float:
    """1.0: the numbers in the asked order as a comma list ("7, 19, 42", "[7, 19, 42]");
    0.75: right order in another shape (a sentence, one per line, "1. 7"); same numbers in
    another order: 0.5 * (pairs in the asked order) / (all pairs); other numbers: 0.0."""
    text = clean(response)
    if len([line for line in text.splitlines() if line.strip()]) > 1:
        text = _ENUMERATOR.sub("", text)  # "1. 7\n2. 19" lists: the 1., 2. are not answers
    got = [int(x) for x in re.findall(r"\d+", text)]
    numbers = [int(x) for x in spec["numbers"]]
    want = sorted(numbers, reverse=bool(spec["descending"]))
    if got == want:
        return 1.0 if _COMMA_LIST.fullmatch(text) else 0.75
    if sorted(got) != sorted(numbers):
        return 0.0
    rank = {v: i for i, v in enumerate(want)}
    pairs = [(rank[x], rank[y]) for i, x in enumerate(got) for y in got[i + 1:]]
    return 0.5 * sum(rx < ry for rx, ry in pairs) / len(pairs)


STRUCTURED_FAMILIES: tuple[Family, ...] = (
    Family("bullets", 'a "- " bulleted list of N items', _make_bullets, _check_bullets),
    Family("json_key", "a JSON object with a given key and value", _make_json_key,
           _check_json_key),
    Family("extract_name", "a name from a short passage", _make_extract_name,
           _check_extract_name),
    Family("sort_numbers", "3-4 numbers sorted as asked", _make_sort_numbers,
           _check_sort_numbers),
)
