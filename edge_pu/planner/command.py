"""`edge-pu plan`: the per-stage table, the planner's choices and what `--nproc N` adds.

    edge-pu plan CONFIG.yaml [--device NAME] [--nproc N] [--set key=value ...]

Data-parallel (torchrun, `--nproc N`; edge_pu.distributed): every rank holds the whole model,
adapter and optimizer and runs micro-batches of the configured size, so the table is per rank;
N ranks share one host's RAM on CPU (the budget is divided by the host's ranks), each has its
own GPU on CUDA. A step all-reduces the adapter's fp32 gradients: 4 bytes per LoRA parameter.
"""

from __future__ import annotations

from ..config import RunConfig
from ..errors import EdgePuError
from ..model_shape import ModelShape, read_model_shape
from .budget import budget_for, model_config_path, rank_budget
from .fit import backend_name, plan
from .torch_terms import GIB, MIB, lora_params


def data_parallel_lines(cfg: RunConfig, s: ModelShape, nproc: int, backend: str) -> list[str]:
    """What `--nproc N` adds to the plan: each step's split over the ranks and the bytes
    all-reduced per optimizer step."""
    n_lora = lora_params(s, cfg.lora.target_modules, cfg.lora.r)
    lines = [f"data-parallel over {nproc} ranks (torchrun --nproc-per-node {nproc}): every rank "
             "holds the whole model,\n  adapter and optimizer, so the table above is per rank"
             + (f"; the {nproc} ranks of one host need {nproc} x its peak of RAM"
                if backend == "cpu" else "; one GPU per rank")]
    idle = []
    unit = "pairs" if cfg.train.algorithm == "dpo" else "groups"
    for name, batch, micro, what in (
            ("sft", cfg.sft.batch_size, cfg.sft.micro_batch, "anchors"),
            (cfg.train.algorithm, cfg.train.batch_size, cfg.train.micro_batch, unit)):
        if name == "sft" and not cfg.sft.enabled:
            continue
        m = -(-batch // micro)
        lines.append(f"  {name} step: {batch} {what} in {m} micro-batch(es) of {micro}, dealt "
                     f"to the ranks: up to {-(-m // nproc)} per rank per step")
        if m < nproc:
            idle.append(f"note: a {name} step has {m} micro-batch(es) for {nproc} ranks, so "
                        f"{nproc - m} ranks wait during its training; set "
                        f"{'sft' if name == 'sft' else 'train'}.micro_batch <= "
                        f"{max(1, batch // nproc)} to give each rank one")
    lines.append(f"  sampling and scoring: every {nproc}th prompt per rank; the anchors are "
                 "rank 0's alone (one teacher call per prompt)")
    lines.append(f"  all-reduced per optimizer step: {n_lora:,} LoRA parameters x 4 bytes "
                 f"(fp32 gradients) = {4 * n_lora / MIB:.1f} MiB (a ring all-reduce sends and "
                 f"receives 2(N-1)/N of it per rank)")
    return lines + idle


def plan_command(config: str, overrides: list[str], device: str = "", nproc: int = 1) -> int:
    """`edge-pu plan`: print the per-stage table and the choices; 0 if the config as given
    fits its budget, 1 if not (the output says which --set changes make it fit, if any).
    `nproc` > 1 plans one rank of a torchrun job of that many processes on this host."""
    from ..config import load_config
    from ..devices import detect_profile, load_profile

    if nproc < 1:
        raise EdgePuError(f"--nproc {nproc}: the number of processes must be at least 1.")
    cfg = load_config(config, [*overrides, *([f"device={device}"] if device else [])])
    shape = read_model_shape(model_config_path(cfg.student.path))
    backend = backend_name(cfg)
    budget, source = rank_budget(*budget_for(cfg, backend), backend, nproc)
    print(f"student: {cfg.student.path} ({shape.arch or 'decoder'}, "
          f"{shape.param_count() / 1e6:.1f}M params, {cfg.student.dtype}, quant "
          f"{cfg.student.quant}); backend {backend}; budget {budget / GIB:.2f} GiB from {source}")
    if not cfg.device:
        found = detect_profile()
        if found:
            print(f"(this machine looks like '{found.name}'; --device {found.name} plans for "
                  "it)")
    bad = load_profile(cfg.device).problems(cfg) if cfg.device else []
    p = plan(cfg, shape, budget_bytes=budget, backend=backend)
    st = p.settings
    comp = min(cfg.sampling.max_new_tokens, st.max_length - 1)
    print(f"sequences of {st.max_length} tokens ({comp} completion); {cfg.train.algorithm} "
          f"micro-batch {st.micro_batch}, gradient checkpointing "
          f"{'on' if st.gradient_checkpointing else 'off'}; scoring batch "
          f"{st.rank_batch}; {st.k_chunk} of K={cfg.sampling.k} candidates sampled at once\n")
    print(p.table() + "\n")
    if nproc > 1:
        print("\n".join(data_parallel_lines(cfg, shape, nproc, backend)) + "\n")
    for note in (*bad, *p.notes):
        print(f"note: {note}")
    if p.given_fits and not bad:
        print(f"fits: peak {p.peak_bytes / GIB:.2f} GiB ({p.peak_stage.name}) of "
              f"{budget / GIB:.2f} GiB")
        return 0
    if not p.given_fits and p.fits:
        print(f"does not fit as given (peak {p.given_peak / GIB:.2f} GiB); the table above fits "
              f"with: {' '.join('--set ' + o for o in p.overrides())}")
    elif not p.fits:
        print(f"cannot fit: even the smallest settings tried need {p.peak_bytes / GIB:.2f} GiB "
              f"of {budget / GIB:.2f} GiB")
    return 1
