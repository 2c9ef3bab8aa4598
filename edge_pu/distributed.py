"""Data-parallel runs over torch.distributed: `torchrun --nproc-per-node N -m edge_pu run CFG`.

torchrun starts N copies of `edge-pu run` with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT in their environment; `init(backend)` joins them into one process
group, Gloo for the CPU backend and NCCL for CUDA (each rank on GPU LOCAL_RANK). Without those
variables (a plain `edge-pu run`) every helper here is the single-process no-op, rank 0 of 1,
so the pipeline calls them unconditionally.

What the ranks share (edge_pu.pipeline, edge_pu.sft, the torch backend's train_step):
- rank 0 alone holds the run dir's lock (`main_first`), asks the teacher and writes the shared
  files (anchors, metrics, pairs, state, adapter, summary, exports); the others wait for it at a
  barrier and then read what it wrote. The run dir must be one folder every rank sees (a local
  disk for one host; a shared mount at the same path for several).
- sampling and scoring: the prompts still to do are dealt round-robin (`shard`); each rank
  appends its records to its own file (`shard_path`: candidates.rank-R.jsonl); rank 0 then
  merges them into candidates.jsonl, once per record and in prompt order (`merge_shards`), so
  the run dir reads the same for any N, and leftovers of a killed run with another N are merged
  on the next start.
- training: every rank holds the same adapter and optimizer state. Each optimizer step's
  micro-batches (exactly the single-process ones) are dealt round-robin; a rank backpropagates
  its own with their step-wide weights and the adapter's gradients are summed over the ranks
  (`all_reduce_grads`) before clipping and the AdamW step: the same step as one process, up to
  the order of the float additions. The global batch is the config's; N only divides the work,
  so a step with fewer micro-batches than ranks leaves some ranks waiting (`edge-pu plan --nproc
  N` says so).

Not split (every rank does all of it, as one process would): loading the student, the
reference and sampling-policy log-probs before a round's training (edge_pu.train.
attach_logprobs) and the diagnostics after it. FIXME: attach_logprobs (one or two no-grad
passes over every row of the round) could be sharded and all-gathered like the scores.
LoRA dropout > 0 draws its masks from each rank's own generator, so with dropout the adapter
depends on N beyond float noise. Collectives time out after EDGE_PU_DIST_TIMEOUT_S (default
24 h: the other ranks wait while rank 0 asks the teacher; `edge-pu anchors CONFIG` beforehand
takes that wait out of the job).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from .errors import EdgePuError

T = TypeVar("T")
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# Rank 0 may spend hours asking the teacher while the others wait at a barrier; a crashed rank
# ends the whole job through torchrun anyway, so the collective timeout only guards hangs.
TIMEOUT_ENV = "EDGE_PU_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 24 * 3600


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


_world = World()
_device = "cpu"


def world() -> World:
    """This process's place in the job (rank 0 of 1 unless `init` joined a torchrun job)."""
    return _world


def env_world() -> World:
    """The job torchrun describes in the environment (rank 0 of 1 outside torchrun)."""
    if not all(k in os.environ for k in ENV):
        return World()
    try:
        rank, size, local = (int(os.environ[k]) for k in ENV)
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    except ValueError:
        raise EdgePuError(f"environment: {', '.join(ENV)} must be integers (torchrun sets "
                          "them); unset them for a single-process run.") from None
    if not 0 <= rank < size or not 0 <= local < max(local_size, 1):
        raise EdgePuError(f"environment: RANK={rank} WORLD_SIZE={size} LOCAL_RANK={local} "
                          "do not describe a rank of a job; start the job with torchrun.")
    return World(rank, size, local, local_size)


def init(backend: str) -> World:
    """Join the torchrun job (once) for a run on `backend` (cpu, cuda, or auto: detected);
    a no-op outside one."""
    global _world, _device
    env = env_world()
    if env.size == 1 or _world.size > 1:
        return _world
    if backend == "auto":
        from .hardware import detect

        backend = detect()
    if backend not in ("cpu", "cuda"):
        raise EdgePuError(f"backend: {backend} cannot run data-parallel; torchrun runs need the "
                          "cpu (Gloo) or cuda (NCCL) backend. Run it as one process.")
    import torch
    import torch.distributed as dist

    if backend == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise EdgePuError(f"torchrun: LOCAL_RANK {env.local_rank} but this host has "
                              f"{torch.cuda.device_count()} GPUs; use --nproc-per-node <= "
                              f"{torch.cuda.device_count()}.")
        torch.cuda.set_device(env.local_rank)  # torch.device("cuda") is this rank's GPU now
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    except ValueError:
        raise EdgePuError(f"environment: {TIMEOUT_ENV} must be a number of seconds.") from None
    dist.init_process_group("nccl" if backend == "cuda" else "gloo",
                            timeout=timedelta(seconds=timeout))
    _world, _device = env, backend
    return _world


def shutdown() -> None:
    global _world
    if _world.size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
        _world = World()


def barrier() -> None:
    if _world.size == 1:
        return
    import torch.distributed as dist

    if _device == "cuda":
        dist.barrier(device_ids=[_world.local_rank])
    else:
        dist.barrier()


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank (any picklable value)."""
    if _world.size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj: T) -> list[T]:
    """Every rank's `obj`, in rank order, on every rank."""
    if _world.size == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * _world.size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_grads(params: Sequence[Any]) -> None:
    """Sum the parameters' gradients over the ranks (a rank with no rows adds zeros)."""
    if _world.size == 1:
        return
    import torch

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_sum([p.grad for p in params])


def all_reduce_sum(tensors: Sequence[Any]) -> None:
    """Sum each tensor over the ranks, in place, in one flat buffer (one collective per call)."""
    if _world.size == 1 or not tensors:
        return
    import torch
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    at = 0
    for t in tensors:
        t.copy_(flat[at: at + t.numel()].view_as(t))
        at += t.numel()


def sum_metrics(totals: dict[str, float]) -> dict[str, float]:
    """Per-key sums of each rank's metrics (a rank with no micro-batch contributes nothing)."""
    if _world.size == 1:
        return totals
    out: dict[str, float] = {}
    for part in all_gather(totals):
        for key, value in part.items():
            out[key] = out.get(key, 0.0) + value
    return out


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of `items`: every size-th one, starting at its rank."""
    return list(items[_world.rank:: _world.size])


def main_does(fn: Callable[[], T]) -> T:
    """`fn()` on rank 0 only (a stage that writes the shared files: preparing the run dir,
    asking the teacher); every rank gets its result once it returns, or raises its error."""
    if _world.size == 1:
        return fn()
    if not _world.main:
        result, err = broadcast((None, None))
        if err:
            raise EdgePuError(err[0], exit_code=err[1])
        return result  # type: ignore[no-any-return]
    try:
        result = fn()
    except EdgePuError as exc:
        broadcast((None, (str(exc), exc.exit_code)))
        raise
    except BaseException:
        broadcast((None, ("rank 0 failed; its error is printed above.", 1)))
        raise
    broadcast((result, None))
    return result


@contextmanager
def main_first(enter: Callable[[], AbstractContextManager[Any]]) -> Iterator[None]:
    """Rank 0 enters `enter()` (the run dir's lock) while the others wait; an EdgePuError it
    raises (the run dir is in use) is raised on every rank, so a second job stops whole."""
    if _world.size == 1:
        with enter():
            yield
        return
    with ExitStack() as stack:
        err: tuple[str, int] | None = None
        if _world.main:
            try:
                stack.enter_context(enter())
            except EdgePuError as exc:
                err = (str(exc), exc.exit_code)
        err = broadcast(err)
        if err:
            raise EdgePuError(err[0], exit_code=err[1])
        yield


# ---- shard files -----------------------------------------------------------------------------
def shard_path(path: Path) -> Path:
    """Where this rank appends the records it makes for `path`: the file itself in a
    single-process run, `NAME.rank-R.jsonl` beside it in a job."""
    if _world.size == 1:
        return path
    return path.with_name(f"{path.stem}.rank-{_world.rank}{path.suffix}")


def shard_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.stem}.rank-*{path.suffix}"))


def merge_shards(path: Path, key: Callable[[dict], Hashable],
                 order: Callable[[dict], Any]) -> int:
    """Rank 0 appends to `path` every shard record whose key it lacks, sorted by `order`, then
    deletes the shard files; the others wait. Returns how many records were added.

    Idempotent, so a merge cut short by a kill is finished by the next start: records already
    in `path` are skipped by key, and the shards go only after their records are fsynced."""
    from .jsonl import append_jsonl, read_jsonl

    added = 0
    barrier()  # every rank has appended its last record
    if _world.main:
        shards = shard_files(path)
        if shards:
            have = {key(r) for r in read_jsonl(path)}
            new: dict[Hashable, dict] = {}
            for f in shards:
                for rec in read_jsonl(f):
                    k = key(rec)
                    if k not in have:
                        new.setdefault(k, rec)
            append_jsonl(path, sorted(new.values(), key=order))
            added = len(new)
            for f in shards:
                f.unlink(missing_ok=True)
    barrier()
    return added
