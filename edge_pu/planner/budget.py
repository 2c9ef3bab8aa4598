"""The memory budget and the check `edge-pu run` makes before loading anything.

`budget_for(cfg, backend)`: the device profile's budget, else this machine's memory (nvidia-smi
for CUDA); `rank_budget`: one torchrun rank's share; `check_fits(cfg, path)`: refuse, with the
numbers and the `--set` changes that would fit, a config whose planned peak exceeds it;
`model_config_path`: the file the planner reads the student's shape from.
"""

from __future__ import annotations

from pathlib import Path

from ..config import RunConfig
from ..errors import EdgePuError
from ..model_shape import read_model_shape
from .fit import backend_name, plan
from .torch_terms import GIB


def budget_for(cfg: RunConfig, backend: str) -> tuple[int, str]:
    """(budget bytes, where it came from): the device profile, else this machine's memory."""
    if cfg.device:
        from ..devices import load_profile

        prof = load_profile(cfg.device)
        return prof.budget_bytes, f"device profile '{prof.name}'"
    from .. import devices

    if backend == "cuda":
        name, total = devices.nvidia_gpu()
        if total:
            return total, f"{name} memory (nvidia-smi)"
    return devices.total_ram_bytes(), "this machine's total RAM"


def rank_budget(budget: int, source: str, backend: str, host_ranks: int) -> tuple[int, str]:
    """One rank's share of the budget: CPU ranks on one host share its memory; a CUDA rank
    has a GPU of its own."""
    if host_ranks <= 1 or backend != "cpu":
        return budget, source
    return budget // host_ranks, f"{source}, shared by {host_ranks} ranks"


def check_fits(cfg: RunConfig, model_config_path: str | Path) -> None:
    """Refuse, with the numbers, a config whose predicted peak exceeds its memory budget.

    Reads only config.json (or the GGUF header); the device profile's limits are checked too.
    In a torchrun job the budget is this rank's (`rank_budget`).
    """
    from .. import distributed as dist

    if cfg.device:
        from ..devices import load_profile

        load_profile(cfg.device).check(cfg)
    shape = read_model_shape(model_config_path)
    backend = backend_name(cfg)
    budget, source = rank_budget(*budget_for(cfg, backend), backend, dist.world().local_size)
    if not budget:
        return
    p = plan(cfg, shape, budget_bytes=budget, backend=backend)
    if p.given_fits:
        return
    fix = (f" It fits with: {' '.join('--set ' + o for o in p.overrides())}." if p.fits else
           " Nothing the planner may change makes it fit" + (f" ({'; '.join(p.notes)})."
                                                            if p.notes else "."))
    raise EdgePuError(f"{model_config_path}: this config needs about {p.given_peak / GIB:.2f} GiB"
                      f" at its peak, more than the {budget / GIB:.2f} GiB budget of {source}."
                      f"{fix} See `edge-pu plan` for each stage.", exit_code=3)


def model_config_path(student_path: str) -> Path:
    """config.json of an HF student dir, or the .gguf file itself."""
    if not student_path:
        raise EdgePuError("config: student.path is not set; the planner reads its config.json "
                          "(or GGUF header) to size the model.")
    path = Path(student_path).expanduser()
    if not path.exists():  # the same words as the loader's, whichever check runs first
        raise EdgePuError(f"student.path {path}: no such file or folder.")
    return path / "config.json" if path.is_dir() else path
