"""Where a model/guide pair lives, and how many CPU threads torch uses: the device helpers of
the package."""

from __future__ import annotations

import os
from typing import Any

import torch

from pyrospatial.errors import InputError

__all__ = ["default_num_threads", "module_device", "set_num_threads"]

#: the most intra-op threads chosen by default: CORAL's minibatch tensors are small (a few
#: thousand cells x a few hundred genes), so more threads mostly add synchronisation
MAX_DEFAULT_THREADS = 4


def module_device(*modules: Any) -> torch.device:
    """The device of the first parameter of ``modules`` (``nn.Module`` objects; others are
    skipped), else of their first buffer (e.g. a model holding only buffers), else the CPU."""
    torch_modules = [m for m in modules if isinstance(m, torch.nn.Module)]
    for m in torch_modules:
        for p in m.parameters():
            return p.device
    for m in torch_modules:
        for b in m.buffers():
            return b.device
    return torch.device("cpu")


def _usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _load_average() -> float:
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):  # pragma: no cover - not Unix
        return 0.0


def default_num_threads(cores: int | None = None, load: float | None = None) -> int:
    """The number of torch CPU threads chosen when the user names none.

    1 on a machine with at most 2 usable cores, or on a loaded one (1-minute load average at
    least half the cores): there, extra threads compete with other processes for the same
    cores and a busy-waiting OpenMP pool makes every operation slower (measured in
    ``docs/scaling.md``). Otherwise ``min(4, cores)``. ``cores`` and ``load`` default to this
    machine's (the CPU affinity mask and ``os.getloadavg``).
    """
    cores = _usable_cores() if cores is None else int(cores)
    load = _load_average() if load is None else float(load)
    if cores <= 2 or load >= cores / 2:
        return 1
    return min(MAX_DEFAULT_THREADS, cores)


def set_num_threads(threads: int | None = None) -> int:
    """Set torch's intra-op CPU threads (``torch.set_num_threads``) and return the number.

    ``threads=None``: ``OMP_NUM_THREADS`` when it is set (torch already read it at start-up;
    it is honoured, not overridden), else :func:`default_num_threads`. A number given
    explicitly wins over ``OMP_NUM_THREADS`` and is also written to ``OMP_NUM_THREADS`` and
    ``MKL_NUM_THREADS`` of this process's environment, so that processes it starts (e.g. the
    ranks of a multi-process fit) use the same number.

    Raises
    ------
    InputError
        ``threads`` is not a positive integer.
    """
    if threads is None:
        from_env = os.environ.get("OMP_NUM_THREADS", "").strip()
        if from_env.isdigit() and int(from_env) > 0:
            chosen = int(from_env)
        else:
            chosen = default_num_threads()
    else:
        if isinstance(threads, bool) or int(threads) != threads or int(threads) < 1:
            raise InputError(f"threads (--threads) must be a positive integer, got {threads!r}: e.g. --threads 1.")
        chosen = int(threads)
        os.environ["OMP_NUM_THREADS"] = str(chosen)
        os.environ["MKL_NUM_THREADS"] = str(chosen)
    if torch.get_num_threads() != chosen:
        torch.set_num_threads(chosen)
    return chosen
