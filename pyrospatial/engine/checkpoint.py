"""Checkpoints written during training, atomically, and read back safely.

:func:`~pyrospatial.engine.infer.fit` with ``checkpoint_dir`` adds a :class:`PeriodicCheckpoint`
callback that writes ``checkpoint_dir/last.ckpt`` *while* training runs:

- every ``every_n_steps`` optimiser steps (``None``: off),
- after the last step of every ``every_n_epochs``-th epoch (default: every epoch),
- whenever ``every_seconds`` of wall time have passed since the last write (default 120 s),
- and after the last step when ``max_steps``/``max_epochs`` ends the fit (so a finished run
  leaves its final state; a fit stopped early by a callback leaves the last periodic write).

Writes happen only at the end of a training batch, after its optimiser step (under gradient
accumulation, after a step that completed its accumulation): that is the state Lightning
resumes exactly.

Each write goes to a temporary file in the same folder, is flushed to disk (``fsync``) and then
renamed over ``last.ckpt`` with :func:`os.replace`, so a process killed at any moment leaves
either the previous complete checkpoint or the new complete one, never a half-written file.

What a checkpoint holds
-----------------------
Lightning's checkpoint dictionary: the model and guide state dict, the Adam and learning-rate
scheduler states, the loop counters (epoch, step, batch within the epoch), callback states, the
position of the data loader within its epoch (:class:`ResumableLoader`) and, under
:data:`~pyrospatial.engine.infer.CKPT_KEY`, the ELBO history and the settings that the
trajectory depends on. Only tensors, numbers, strings, lists and dicts: it is read with
``torch.load(..., weights_only=True)``. No RNG state is stored because none is needed: torch's
generator is reseeded before every step from ``(seed, step)``, the minibatch partition of an
epoch is a function of ``(seed, epoch)`` and the non-edges of a batch of its own seed. A run
resumed from a checkpoint written in the middle of an epoch continues that epoch with the
batches it had not yet seen, so (on CPU, same thread settings) it reaches bit-identical
parameters to an uninterrupted run.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Checkpoint

from pyrospatial.errors import CheckpointError, InputError

__all__ = [
    "CHECKPOINT_NAME",
    "CKPT_KEY",
    "PeriodicCheckpoint",
    "ResumableLoader",
    "ResumableSampler",
    "check_matches",
    "engine_state",
    "read_checkpoint",
    "restore_engine_state",
    "resumable_loader",
    "settings_differences",
]

#: File name of the rolling checkpoint inside ``checkpoint_dir``.
CHECKPOINT_NAME = "last.ckpt"
#: Key under which the engine's own state (:func:`engine_state`) sits in a Lightning checkpoint.
CKPT_KEY = "pyrospatial"
_TMP_PREFIX = ".last.ckpt.tmp-"
#: Keys Lightning needs to continue a fit (absent from parameter-only files written by ``save``).
_TRAINING_KEYS = ("loops", "optimizer_states", "global_step", "epoch")


# ------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------
def _delete_hint(path: Path) -> str:
    return (f"Delete it (rm {str(path)!r}) and start the fit afresh, or run without --resume "
            "(resume=None) to start from scratch.")


def read_checkpoint(path: str | os.PathLike, *, for_resume: bool = False) -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)`` and check its structure.

    ``for_resume`` also requires the training state (optimiser, loop counters) that Lightning
    needs to continue a fit. Raises :class:`~pyrospatial.errors.CheckpointError` naming the file
    for a missing file, a truncated or corrupt file, pickled objects, or a file without a
    ``state_dict``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not exist. Check the path (or checkpoint_dir); without "
            "--resume (resume=None) the fit starts from scratch."
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        text = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}"
        if "Unsupported global" in str(error):  # a class or function reference: pickled objects
            raise CheckpointError(
                f"cannot load {str(path)!r} with torch.load(weights_only=True): {text}. pyrospatial "
                "checkpoints hold tensors and primitives only; a file with pickled objects is not one."
            ) from error
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated (torch.load failed: {text}). "
            + _delete_hint(path)
        ) from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(checkpoint).__name__}, not a dict. "
                              + _delete_hint(path))
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} holds no state_dict. " + _delete_hint(path))
    if for_resume:
        missing = [key for key in _TRAINING_KEYS if key not in checkpoint]
        if missing:
            raise CheckpointError(
                f"{str(path)!r} holds parameters but no training state (missing {missing}): it was "
                "not written by fit(checkpoint_dir=...) (e.g. it was written by save()). Load it with "
                "load()/load_checkpoint, or resume from checkpoint_dir/last.ckpt."
            )
    return checkpoint


def check_matches(path: Path, checkpoint: dict, module: torch.nn.Module) -> None:
    """Raise :class:`CheckpointError` when the checkpoint's keys or shapes differ from ``module``'s."""
    state = checkpoint.get("state_dict", checkpoint)
    own = module.state_dict()
    expected, found = set(own.keys()), set(state.keys())
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not match the model/guide: missing keys {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}, unexpected keys {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''}. Build the model and guide with the same "
            "settings (and the same dataset sizes) as the fit that wrote it."
        )
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(expected)
        if isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape
    ]
    if shapes:
        raise CheckpointError(f"checkpoint {str(path)!r} has mismatched shapes: {shapes[:10]}.")


# ------------------------------------------------------------------------------------------
# the engine's own state (of an SVIModule: its ELBO history, epoch accumulators, settings)
# ------------------------------------------------------------------------------------------
def _transient_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Non-persistent buffers of the model and guide (e.g. warm starts carried from step to
    step): not in ``state_dict`` but part of the training trajectory."""
    persistent = set(module.state_dict().keys())
    return {name: buf.detach().cpu().clone() for name, buf in module.named_buffers()
            if name not in persistent and isinstance(buf, torch.Tensor)}


def engine_state(module) -> dict[str, Any]:
    """What an ``SVIModule`` adds to a checkpoint under :data:`CKPT_KEY`: only tensors and
    primitives, so that the file loads with ``torch.load(weights_only=True)``."""
    return {
        "elbo_history": torch.tensor(module.elbo_history, dtype=torch.float64),
        "seed": module.seed,
        "lr": module.lr,
        "lr_decay": module.lr_decay,
        "num_particles": module.num_particles,
        "run_settings": dict(module.run_settings),
        "epoch_sum": float(module._epoch_sum),
        "epoch_count": int(module._epoch_count),
        "epoch_index": int(module._epoch_index),
        "transient_buffers": _transient_buffers(module),
    }


def restore_engine_state(module, state: dict[str, Any]) -> None:
    """Put :func:`engine_state` back into ``module`` (missing entries keep their defaults)."""
    if "elbo_history" in state:
        module.elbo_history = [float(x) for x in state["elbo_history"].tolist()]
    module._epoch_sum = float(state.get("epoch_sum", 0.0))
    module._epoch_count = int(state.get("epoch_count", 0))
    module._epoch_index = int(state.get("epoch_index", -1))
    for name, value in dict(state.get("transient_buffers", {}) or {}).items():
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if attr in owner._buffers:
            current = owner._buffers[attr]
            owner._buffers[attr] = value.to(current.device) if isinstance(current, torch.Tensor) else value


def settings_differences(module, checkpoint: dict) -> list[str]:
    """The settings (seed, lr, lr_decay, num_particles, batch_size) in which ``checkpoint``
    differs from ``module``: a resumed fit with other settings would not continue the
    interrupted one."""
    state = checkpoint.get(CKPT_KEY, {})
    if not isinstance(state, dict):
        return []
    mine = {"seed": module.seed, "lr": module.lr, "lr_decay": module.lr_decay,
            "num_particles": module.num_particles, **module.run_settings}
    theirs = {**{k: state[k] for k in ("seed", "lr", "lr_decay", "num_particles") if k in state},
              **dict(state.get("run_settings", {}) or {})}
    return [f"{k}: checkpoint {theirs[k]!r} vs now {mine[k]!r}"
            for k in sorted(set(mine) & set(theirs)) if theirs[k] != mine[k]]


# ------------------------------------------------------------------------------------------
# a data loader that can continue an epoch
# ------------------------------------------------------------------------------------------
class ResumableSampler(torch.utils.data.Sampler):
    """Wraps an epoch sampler: defers its ``__iter__`` and can skip an epoch's first batches.

    Lightning creates the training iterator *before* calling ``set_epoch`` for the first epoch
    of a ``trainer.fit`` (and does not recreate it when resuming), so an eager sampler would
    draw the resumed epoch's partition with a stale epoch number: this generator reads the
    epoch when the first batch is requested. After :meth:`resume_at` ``(epoch, completed)``,
    the iteration of that epoch skips its first ``completed`` batches (the ones trained on
    before the checkpoint); the partition itself is redrawn from ``(seed, epoch)``.
    """

    def __init__(self, inner) -> None:
        self.inner = inner
        self.epoch = 0
        #: (epoch, batches of that epoch already trained on), written into checkpoints
        self.position: tuple[int, int] = (0, 0)
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = int(epoch)
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def resume_at(self, epoch: int, completed: int) -> None:
        """Skip the first ``completed`` batches when epoch ``epoch`` is next iterated."""
        self._resume = (int(epoch), int(completed))

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[Any]:
        skip = 0
        if self._resume is not None:
            epoch, completed = self._resume
            self._resume = None
            if epoch == self.epoch:
                skip = completed
        yield from itertools.islice(iter(self.inner), skip, None)


class ResumableLoader(torch.utils.data.DataLoader):
    """A DataLoader whose position in the epoch is saved in Lightning checkpoints.

    Lightning stores ``state_dict()`` of a training loader that has one and calls
    ``load_state_dict`` when a fit resumes; the position is set by :class:`PeriodicCheckpoint`
    just before each write.
    """

    def state_dict(self) -> dict[str, int]:
        epoch, completed = self.sampler.position
        return {"epoch": int(epoch), "completed": int(completed)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume_at(int(state.get("epoch", 0)), int(state.get("completed", 0)))


def resumable_loader(loader: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
    """The same loader as a :class:`ResumableLoader` whose sampler is a :class:`ResumableSampler`
    (a loader built on a ``batch_sampler`` is returned unchanged)."""
    if loader.batch_sampler is not None or loader.sampler is None:  # pragma: no cover - not ours
        return loader
    return ResumableLoader(
        loader.dataset,
        sampler=ResumableSampler(loader.sampler),
        batch_size=None,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers if loader.num_workers > 0 else False,
    )


# ------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------
def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


class PeriodicCheckpoint(Checkpoint):
    """Writes ``dirpath/last.ckpt`` during training (see the module docstring for when).

    Parameters
    ----------
    dirpath
        Folder of the checkpoint (created if missing).
    every_n_steps
        Write after every ``n``-th optimiser step (``None``/0: not by steps).
    every_n_epochs
        Write after the last step of every ``n``-th epoch (``None``/0: not by epochs).
    every_seconds
        Write after the first step that ends at least this many seconds of wall time after the
        previous write (``None``/0: not by time).
    sampler
        The :class:`ResumableSampler` of the training loader, whose position is recorded.
    """

    def __init__(self, dirpath: str | os.PathLike, *, every_n_steps: int | None = None,
                 every_n_epochs: int | None = 1, every_seconds: float | None = 120.0,
                 sampler: ResumableSampler | None = None) -> None:
        super().__init__()
        for name, value in (("checkpoint_every_n_steps", every_n_steps),
                            ("checkpoint_every_n_epochs", every_n_epochs),
                            ("checkpoint_every_seconds", every_seconds)):
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                          and value >= 0):
                raise InputError(f"{name} must be a number >= 0 (0 or None: off), got {value!r}.")
        self.dirpath = Path(dirpath)
        self.every_n_steps = int(every_n_steps or 0)
        self.every_n_epochs = int(every_n_epochs or 0)
        self.every_seconds = float(every_seconds or 0.0)
        self.sampler = sampler
        self.path = self.dirpath / CHECKPOINT_NAME
        self.writes = 0
        self._last_write = time.monotonic()

    @property
    def state_key(self) -> str:
        """One such callback per fit: its key does not depend on its intervals."""
        return "PeriodicCheckpoint"

    # -- hooks ---------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        if trainer.is_global_zero:
            for stale in self.dirpath.glob(_TMP_PREFIX + "*"):  # left by a process killed mid-write
                stale.unlink(missing_ok=True)
        self._last_write = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # Every write happens here, after an optimiser step: Lightning resumes a checkpoint
        # written at a batch's end exactly (also at an epoch's last batch), whereas one written
        # in on_train_epoch_end resumes into a wrong epoch count.
        last_of_epoch = batch_idx + 1 >= trainer.num_training_batches
        if not last_of_epoch and (batch_idx + 1) % max(1, trainer.accumulate_grad_batches) != 0:
            return  # gradients of this step are still accumulating: nothing to resume from
        step, epoch = trainer.global_step, trainer.current_epoch
        by_steps = self.every_n_steps > 0 and step % self.every_n_steps == 0
        by_epochs = last_of_epoch and self.every_n_epochs > 0 and (epoch + 1) % self.every_n_epochs == 0
        by_time = self.every_seconds > 0 and time.monotonic() - self._last_write >= self.every_seconds
        final = ((trainer.max_steps > 0 and step >= trainer.max_steps)
                 or (last_of_epoch and trainer.max_epochs is not None and 0 < trainer.max_epochs <= epoch + 1)
                 or trainer.should_stop)
        if by_steps or by_epochs or by_time or final:
            self.write(trainer, epoch, batch_idx + 1)

    # -- writing -------------------------------------------------------------------------
    def write(self, trainer, epoch: int, completed: int) -> None:
        """Write the checkpoint atomically: temporary file, ``fsync``, ``os.replace``."""
        if self.sampler is not None:
            self.sampler.position = (int(epoch), int(completed))
        tmp = self.dirpath / f"{_TMP_PREFIX}{os.getpid()}"
        # weights_only=False is Lightning's *save* option (keep optimiser and loop state, not only the
        # weights); every load reads with torch.load(weights_only=True). Every rank calls it; rank 0 writes
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
            _fsync_dir(self.dirpath)
        self.writes += 1
        self._last_write = time.monotonic()
