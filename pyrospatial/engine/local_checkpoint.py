"""Checkpoints of the default posterior, so a killed sampler continues where it stopped.

The per-spot HMC of :func:`pyrospatial.engine.local.local_posterior` is the longest stage of a
large CORAL run (about 23 CPU minutes at 100k cells, ``docs/scaling.md``). With ``checkpoint``
it writes its whole state to one file every ``every_seconds`` of wall time and after the last
iteration; ``resume=True`` reads it back and continues with the next iteration.

What a checkpoint holds: the iteration reached; every chunk's HMC kernel and the global
latents' kernel (:meth:`pyrospatial.engine.hmc._HMC.state_dict`: states, cached densities and
gradients, masses, step sizes and their dual averaging, open warm-up windows); the
Monte Carlo EM parameters and their Adam state; the kept states so far; torch's random
generator. A run resumed from it continues the same Markov chains: on a CPU (same threads) its
draws equal those of an uninterrupted run bit for bit (``tests/test_posterior_resume.py`` kills
a real process to check this).

It also holds what the chains depend on (the settings, the tissue's size, the chunking and a
fingerprint of the trained parameters): resuming with anything else is a
:class:`~pyrospatial.errors.CheckpointError` naming the difference. Writes are atomic
(temporary file, ``fsync``, ``os.replace``), the file holds tensors, numbers, strings, lists and
dicts only and is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from pyrospatial.engine.checkpoint import _fsync_dir, read_checkpoint
from pyrospatial.errors import CheckpointError

__all__ = ["POSTERIOR_CHECKPOINT_NAME", "SamplerCheckpoint", "atomic_save", "parameter_fingerprint"]

#: File name of the posterior's checkpoint inside a ``checkpoint_dir`` (beside training's ``last.ckpt``).
POSTERIOR_CHECKPOINT_NAME = "posterior.pt"
#: Version of the file's layout.
FORMAT = 1


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, ``fsync``, then rename over ``path``:
    a process killed at any moment leaves the previous complete file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def parameter_fingerprint(*modules: torch.nn.Module) -> torch.Tensor:
    """Sum and sum of squares (float64) of every parameter of ``modules``, in name order: equal
    for the same trained weights, different after any change to them."""
    rows = []
    for module in modules:
        for _, value in sorted(module.named_parameters(), key=lambda item: item[0]):
            flat = value.detach().double().flatten().cpu()
            rows.append(torch.stack([flat.sum(), (flat * flat).sum()]))
    return torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.float64)


class SamplerCheckpoint:
    """The checkpoint file of one sampler run: when to write, what to write, what to read back.

    Parameters
    ----------
    path
        The file (written atomically; its folder is created).
    identity
        What the chains depend on (settings, sizes, ``fingerprint``); a resume checks it.
    every_seconds
        Write after the first iteration that ends at least this long after the previous write
        (0: after every iteration); the last iteration is always written.
    """

    def __init__(self, path: str | os.PathLike, identity: dict[str, Any], every_seconds: float = 300.0) -> None:
        self.path = Path(path)
        self.identity = identity
        self.every_seconds = float(every_seconds)
        self.writes = 0
        self._last_write = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self._last_write >= self.every_seconds

    def write(self, iteration: int, kernels: list, global_kernel, em: list, optimiser, em_trace: dict,
              kept: list[list[dict[str, torch.Tensor]]]) -> None:
        """Write the state after ``iteration`` iterations."""
        state = {
            "format": FORMAT, "identity": self.identity, "iteration": int(iteration),
            "kernels": [kernel.state_dict() for kernel in kernels],
            "global_kernel": global_kernel.state_dict() if global_kernel is not None else None,
            "em": {name: value.detach().clone() for name, value in em},
            "optimiser": optimiser.state_dict() if optimiser is not None else None,
            "em_trace": {k: list(v) for k, v in em_trace.items()},
            "kept": kept,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        atomic_save(state, self.path)
        self.writes += 1
        self._last_write = time.monotonic()

    def read(self) -> dict[str, Any]:
        """The saved state, checked against this run's identity (a :class:`CheckpointError`
        names each difference and the fix)."""
        saved = read_checkpoint(self.path)
        if saved.get("format") != FORMAT or "identity" not in saved or "kernels" not in saved:
            raise CheckpointError(f"{str(self.path)!r} is not a posterior checkpoint of this version (format "
                                  f"{saved.get('format')!r}, expected {FORMAT}). Delete it to sample afresh.")
        differences = _differences(saved["identity"], self.identity)
        if differences:
            raise CheckpointError(
                f"the posterior checkpoint {str(self.path)!r} was written by another run: "
                + "; ".join(differences)
                + ". Resume with the same data, trained model and sampler settings, or delete it to sample afresh.")
        return saved

    @staticmethod
    def restore(saved: dict[str, Any], kernels: list, global_kernel, em: list, optimiser, em_trace: dict,
                kept: list[list[dict[str, torch.Tensor]]]) -> int:
        """Put ``saved`` back into the freshly built sampler; returns the next iteration."""
        for kernel, state in zip(kernels, saved["kernels"]):
            kernel.load_state_dict(state)
        if global_kernel is not None:
            global_kernel.load_state_dict(saved["global_kernel"])
        with torch.no_grad():
            for name, value in em:
                value.copy_(saved["em"][name].to(value.device))
        if optimiser is not None and saved["optimiser"] is not None:
            optimiser.load_state_dict(saved["optimiser"])
        for name, trace in saved["em_trace"].items():
            em_trace[name] = list(trace)
        for mine, theirs in zip(kept, saved["kept"]):
            mine[:] = theirs
        torch.set_rng_state(saved["rng"])
        if saved["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        return int(saved["iteration"])


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                    and torch.allclose(a.double(), b.double(), rtol=1e-12, atol=0.0))
            if not same:
                out.append(f"{key} differs (the trained parameters are not those the checkpoint was sampled from)"
                           if key == "fingerprint" else f"{key} differs")
        elif a != b:
            out.append(f"{key}: checkpoint {a!r}, this run {b!r}")
    return out
