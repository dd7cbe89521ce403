"""One training engine for every model/guide pair that honours the batch protocol.

Any ``model(batch)`` / ``guide(batch)`` pair (see :mod:`pyrospatial.engine.batch`), including
``pyro.infer.autoguide`` guides built with ``create_plates=batch_plates``, is trained by
stochastic variational inference on spot-complete minibatches with :func:`fit`::

    result = fit(model, guide, dataset, max_epochs=200, batch_size=64, checkpoint_dir="ckpt")
    result.elbo_history          # one loss (negative ELBO, full-data scale) per step

The loop is PyTorch Lightning's: :class:`SVIModule` is a ``LightningModule`` whose training
step returns ``Trace_ELBO(num_particles).differentiable_loss(model, guide, batch)``, so the
``Trainer`` gives devices (cuda when present, else cpu), the progress bar, gradient clipping,
early stopping and
multi-GPU/multi-node data parallelism (``strategy="ddp"``) for free. Checkpoints
(``checkpoint_dir/last.ckpt``, written during training and atomically, read with
``weights_only=True``) are :mod:`pyrospatial.engine.checkpoint`'s.

Parameters live in the modules
------------------------------
Pyro's ``module_local_params`` setting is switched on when this module is imported: every
``PyroParam``/``nn.Parameter`` of the model and guide is an ordinary module parameter, so
several models can be trained in one process and ``state_dict`` is a complete checkpoint.
Models and guides must therefore be ``torch.nn.Module``/``PyroModule`` objects (a parameter-free
model *function* is fine); functions that create parameters with ``pyro.param`` in Pyro's
global param store are rejected with an :class:`~pyrospatial.errors.InputError`. Construct
PyroModules *after* importing pyrospatial (the setting must be on when they are built).

Optimiser
---------
Adam with learning rate ``lr`` decayed exponentially per optimiser step,
``lr_t = lr * lr_decay ** t`` (``torch.optim.lr_scheduler.ExponentialLR`` stepped every step;
the same schedule as Pyro's ``ClippedAdam(lrd=lr_decay)``; e.g. ``lr_decay=0.1 ** (1 / T)``
divides the rate by 10 over ``T`` steps). Gradients are clipped element-wise to
``[-gradient_clip_val, gradient_clip_val]`` by the Trainer (``gradient_clip_algorithm="value"``),
which is what ``ClippedAdam(clip_norm=...)`` does. The loss is the full-data negative ELBO
estimate (minibatch terms scaled by the batch protocol); Adam is invariant to its scale.

Reproducibility
---------------
``fit(seed=s)`` seeds Python, numpy and torch, the data partition of epoch ``e`` is a
function of ``(s, e)`` (see :class:`~pyrospatial.data.batching.SpotBatchSampler`), and before every
training step torch's RNG is reseeded from ``(s, global_step, rank)``. The optimiser,
scheduler, loop counters, the loader's position in its epoch and the ELBO history are in the
checkpoint, so a fit killed at any point and resumed from ``last.ckpt`` reaches the same
parameters as an uninterrupted fit (on the same hardware/thread settings).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import lightning as L
import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from lightning.pytorch.callbacks import EarlyStopping
from pyro.infer import Trace_ELBO
from pyro.poutine.util import site_is_subsample

from pyrospatial.engine.batch import Batch
from pyrospatial.engine.checkpoint import (
    CHECKPOINT_NAME,
    CKPT_KEY,
    PeriodicCheckpoint,
    check_matches,
    engine_state,
    read_checkpoint,
    restore_engine_state,
    resumable_loader,
    settings_differences,
)
from pyrospatial.engine.device import module_device
from pyrospatial.errors import CheckpointError, FitError, InputError

__all__ = ["STEP_METRIC", "EPOCH_METRIC", "CKPT_KEY", "versions", "initialise", "find_nonfinite", "SVIModule", "FitResult", "fit", "load_checkpoint"]

pyro.settings.set(module_local_params=True)

#: Name of the per-step loss in Lightning's logs / progress bar, and of its epoch mean.
STEP_METRIC = "elbo"
EPOCH_METRIC = "elbo_epoch"


def versions() -> dict[str, str]:
    """Versions of pyrospatial and the libraries that shape its results (strings)."""
    out = {}
    for name, dist in [("pyrospatial", "pyrospatial"), ("torch", "torch"), ("pyro", "pyro-ppl"),
                       ("lightning", "lightning"), ("anndata", "anndata"), ("numpy", "numpy")]:
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # pragma: no cover - source checkout
            out[name] = "unknown"
    return out


def _step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A 63-bit torch seed that is a deterministic function of (seed, step, rank)."""
    state = np.random.SeedSequence([int(seed), int(step), int(rank)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def _reseed(seed: int) -> None:
    """Seed torch's CPU generator (and CUDA's when initialised) cheaply: ``torch.manual_seed``
    also seeds CUDA lazily, which captures a stack trace on every call."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


def _check_callables(model: Any, guide: Any) -> None:
    if not isinstance(guide, torch.nn.Module):
        raise InputError(
            f"guide must be a torch.nn.Module / PyroModule (e.g. an AutoNormal or a PyroModule "
            f"subclass), got {type(guide).__name__}. Guides written as functions with pyro.param "
            "keep their parameters in Pyro's global param store, which pyrospatial does not train: "
            "hold them as PyroParam / nn.Parameter attributes of a PyroModule."
        )
    if not callable(model):
        raise InputError(f"model must be callable as model(batch), got {type(model).__name__}.")
    for role, obj in (("model", model), ("guide", guide)):
        if isinstance(obj, pyro.nn.PyroModule):
            for name, sub in obj.named_modules():
                if isinstance(sub, pyro.nn.PyroModule) and not hasattr(sub._pyro_context, "param_state"):
                    raise InputError(
                        f"{role}{'.' + name if name else ''} was constructed before Pyro's "
                        "module_local_params setting was switched on: import pyrospatial (or call "
                        "pyro.settings.set(module_local_params=True)) before building the model and guide."
                    )


def _global_param_names() -> set[str]:
    return set(pyro.get_param_store().keys())


def initialise(model: Any, guide: Any, batch) -> None:
    """Run the guide and the model once on ``batch`` so lazily created parameters (e.g. an
    AutoGuide's) exist; reject parameters created in Pyro's global param store."""
    _check_callables(model, guide)
    batch = batch.to(module_device(model, guide))
    before = _global_param_names()
    try:
        with torch.no_grad():
            guide_trace = poutine.trace(guide).get_trace(batch)
            poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
    except ValueError as error:  # e.g. distribution validation on NaN parameters
        problems = find_nonfinite(model, guide, batch)
        raise FitError(
            f"the model/guide failed on the initialisation batch: {error}. "
            f"Offending: {'; '.join(problems) if problems else 'unknown'}."
        ) from error
    except NotImplementedError as error:
        if "global pyro.param" in str(error):
            raise InputError(
                "the model or guide calls pyro.param(...) inside a PyroModule; with module-local "
                "parameters, declare them as PyroParam / nn.Parameter attributes instead."
            ) from error
        raise
    created = sorted(_global_param_names() - before)
    if created:
        raise InputError(
            f"the model/guide created parameter(s) {created} in Pyro's global param store; "
            "functions using the global param store are not supported by pyrospatial's engine. "
            "Write the model/guide as a PyroModule holding PyroParam / nn.Parameter attributes "
            "(or use a pyro.infer.autoguide guide)."
        )


# ------------------------------------------------------------------------------------------
# NaN / inf diagnosis
# ------------------------------------------------------------------------------------------
def find_nonfinite(model: Any, guide: Any, batch, *, seed: int | None = None) -> list[str]:
    """Names of parameters and sample sites with non-finite values or log-densities.

    Traces the guide and replays the model against it on ``batch`` (with Pyro/torch argument
    validation off so that invalid distribution parameters reach the check instead of raising),
    and checks every sample site's value and ``log_prob`` and every parameter. ``seed`` reseeds
    torch first, so that the failing draw of a training step can be reproduced.
    """
    problems: list[str] = []
    for role, obj in (("model", model), ("guide", guide)):
        if isinstance(obj, torch.nn.Module):
            for name, p in obj.named_parameters():
                bad = ~torch.isfinite(p.detach())
                if bad.any():
                    problems.append(f"parameter {role}.{name} ({int(bad.sum())} non-finite entries)")
    if seed is not None:
        torch.manual_seed(seed)
    try:
        with torch.no_grad(), pyro.validation_enabled(False):
            guide_trace = poutine.trace(guide).get_trace(batch)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
    except Exception as error:  # noqa: BLE001 - the diagnosis must not hide the original failure
        problems.append(f"(re-running the guide/model raised {type(error).__name__}: {error})")
        return problems
    for role, trace in (("guide", guide_trace), ("model", model_trace)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            value = site["value"]
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                bad = ~torch.isfinite(value)
                if bad.any():
                    problems.append(f"{role} site '{name}': value has {int(bad.sum())} non-finite entries")
                    continue
            if role == "model" and site["infer"].get("_deterministic"):
                continue
            try:
                with pyro.validation_enabled(False), torch.no_grad():
                    log_prob = site["fn"].log_prob(value)
            except Exception as error:  # noqa: BLE001
                problems.append(f"{role} site '{name}': log_prob raised {type(error).__name__}: {error}")
                continue
            if isinstance(log_prob, torch.Tensor):
                bad = ~torch.isfinite(log_prob)
                if bad.any():
                    kind = "NaN" if torch.isnan(log_prob).any() else "inf"
                    problems.append(
                        f"{role} site '{name}': log_prob has {int(bad.sum())} non-finite ({kind}) entries"
                    )
            elif not math.isfinite(float(log_prob)):
                problems.append(f"{role} site '{name}': log_prob is {float(log_prob)}")
    return problems


# ------------------------------------------------------------------------------------------
# the LightningModule
# ------------------------------------------------------------------------------------------
class SVIModule(L.LightningModule):
    """Lightning wrapper of a model/guide pair trained by SVI (negative ELBO as the loss).

    Parameters
    ----------
    model, guide
        Callables ``f(batch)``; the guide must be an ``nn.Module`` (its parameters are
        optimised together with the model's).
    lr, lr_decay
        Adam learning rate and its per-step exponential decay factor (see module docstring).
    num_particles
        Monte Carlo particles of the ELBO estimate (not vectorised: models need no extra
        batch dimension).
    seed
        Base seed of the per-step RNG reseeding.
    betas
        Adam's betas.
    """

    def __init__(
        self,
        model: Callable,
        guide: torch.nn.Module,
        *,
        lr: float = 1e-2,
        lr_decay: float = 1.0,
        num_particles: int = 1,
        seed: int = 0,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        super().__init__()
        if not (lr > 0):
            raise InputError(f"lr must be > 0, got {lr}.")
        if not (0 < lr_decay <= 1):
            raise InputError(f"lr_decay is a per-step factor in (0, 1], got {lr_decay}.")
        if int(num_particles) < 1:
            raise InputError(f"num_particles must be >= 1, got {num_particles}.")
        self.model = model
        self.guide = guide
        self.lr = float(lr)
        self.lr_decay = float(lr_decay)
        self.num_particles = int(num_particles)
        self.seed = int(seed)
        self.betas = tuple(float(b) for b in betas)
        self.elbo = Trace_ELBO(num_particles=self.num_particles)
        self.elbo_history: list[float] = []
        #: settings the trajectory depends on beyond the module's own (e.g. batch_size), stored
        #: in checkpoints and compared on resume
        self.run_settings: dict[str, float | int] = {}
        # the running sum/count of the current epoch's losses (in checkpoints, so that an epoch
        # resumed mid-way logs the same epoch mean as an uninterrupted one)
        self._epoch_sum, self._epoch_count, self._epoch_index = 0.0, 0, -1

    # -- maths ---------------------------------------------------------------------------
    def loss(self, batch) -> torch.Tensor:
        """Differentiable negative ELBO of ``batch`` (an unbiased full-data estimate)."""
        if isinstance(batch, Batch):  # the ELBO needs the density only: no deterministic sites
            batch = replace(batch, density_only=True)
        return self.elbo.differentiable_loss(self.model, self.guide, batch)

    def forward(self, batch) -> torch.Tensor:  # noqa: D102
        return self.loss(batch)

    def _rank(self) -> int:
        return int(self.global_rank) if self._trainer is not None else 0

    def step_seed(self, step: int | None = None, batch_idx: int = 0) -> int:
        """The torch seed used before training step ``step`` (default: the current one) on
        the epoch's batch ``batch_idx`` (distinct micro-batches under gradient accumulation)."""
        step = self.global_step if step is None else step
        return _step_seed(self.seed, step * 1_000_003 + batch_idx, self._rank())

    # -- Lightning hooks -----------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx: int) -> None:  # noqa: D102
        _reseed(self.step_seed(batch_idx=batch_idx))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:  # noqa: D102
        step = self.global_step
        try:
            loss = self.loss(batch)
        except ValueError as error:  # distribution argument validation (NaN parameters, ...)
            self._raise_fit_error(batch, step, f"the loss raised {type(error).__name__}: {error}", error)
        value = float(loss.detach())
        if not math.isfinite(value):
            self._raise_fit_error(batch, step, f"the ELBO loss is {value}", None)
        self.elbo_history.append(value)
        if self._epoch_index != self.current_epoch:
            self._epoch_sum, self._epoch_count, self._epoch_index = 0.0, 0, int(self.current_epoch)
        self._epoch_sum += value
        self._epoch_count += 1
        self.log(STEP_METRIC, value, on_step=True, on_epoch=False, prog_bar=True, batch_size=1)
        return loss

    def on_train_epoch_end(self) -> None:
        if self._epoch_count > 0 and self._epoch_index == self.current_epoch:
            mean = torch.tensor(self._epoch_sum / self._epoch_count, dtype=torch.float32, device=self.device)
            self.log(EPOCH_METRIC, mean, on_step=False, on_epoch=True, batch_size=1, sync_dist=True)

    def _raise_fit_error(self, batch, step: int, what: str, cause: Exception | None) -> None:
        problems = find_nonfinite(self.model, self.guide, batch, seed=self.step_seed(step))
        sites = "; ".join(problems) if problems else (
            "no single site or parameter is non-finite on re-evaluation (the failure may depend on "
            "the random draw or on numerical overflow in a sum)"
        )
        raise FitError(
            f"training failed at step {step} (epoch {self.current_epoch}): {what}. Non-finite values: "
            f"{sites}. Try a smaller lr, a stronger gradient clip, or check the data and priors of "
            "those sites."
        ) from cause

    def configure_optimizers(self):  # noqa: D102
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise InputError(
                "the model and guide have no trainable parameters; functions using Pyro's global "
                "param store are not supported: hold parameters in a PyroModule."
            )
        optimizer = torch.optim.Adam(params, lr=self.lr, betas=self.betas)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=self.lr_decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:  # noqa: D102
        checkpoint[CKPT_KEY] = engine_state(self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:  # noqa: D102
        restore_engine_state(self, checkpoint.get(CKPT_KEY, {}))


# ------------------------------------------------------------------------------------------
# fit
# ------------------------------------------------------------------------------------------
@dataclass
class FitResult:
    """What :func:`fit` returns.

    ``elbo_history`` holds one loss (negative ELBO estimate, full-data scale) per optimiser
    step, including the steps before a resume. ``settings`` holds seed, lr, lr_decay,
    batch_size, num_particles, steps, epochs, device and library versions (strings/numbers).
    """

    model: Any
    guide: Any
    elbo_history: np.ndarray
    settings: dict = field(default_factory=dict)
    checkpoint_path: str | None = None
    fit_seconds: float = 0.0
    module: SVIModule | None = field(default=None, repr=False)


def _accelerator(device: str) -> str:
    device = str(device).lower()
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device in ("cuda", "gpu") or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(
                f"device={device!r} was requested but torch.cuda.is_available() is False (no GPU, or a "
                "CPU-only torch build); use device='cpu' or 'auto', or install a CUDA build of torch."
            )
        return "gpu"
    if device == "cpu":
        return "cpu"
    raise InputError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}.")


def _default_batch_size(dataset) -> int:
    return int(dataset.n_spots if dataset.n_spots > 0 else dataset.n_cells)


@contextlib.contextmanager
def _quiet_lightning(enabled: bool):
    """Silence Lightning's info banners (GPU available..., seed set...) unless ``enabled``."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    if not enabled:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*number of training batches.*")
        warnings.filterwarnings("ignore", message=".*`isinstance.*LeafSpec.*")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _deprecated_nonedge_ratio(dataset, nonedge_ratio: float | None):
    """``fit(nonedge_ratio=...)``, kept for one release: a copy of ``dataset`` with it set."""
    if nonedge_ratio is not None:
        warnings.warn("fit(nonedge_ratio=...) is deprecated: set it on the data set, e.g. "
                      "SpatialDataset.from_anndata(..., nonedge_ratio=...).", DeprecationWarning, stacklevel=3)
        if hasattr(dataset, "with_nonedge_ratio"):
            dataset = dataset.with_nonedge_ratio(nonedge_ratio)
    return dataset


def fit(
    model: Callable,
    guide: torch.nn.Module,
    dataset,
    *,
    max_epochs: int | None = None,
    max_steps: int | None = None,
    batch_size: int | None = None,
    lr: float = 1e-2,
    lr_decay: float = 1.0,
    num_particles: int = 1,
    device: str = "auto",
    seed: int = 0,
    early_stopping: bool | dict = False,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    checkpoint_every_n_steps: int | None = None,
    checkpoint_every_n_epochs: int | None = 1,
    checkpoint_every_seconds: float | None = 120.0,
    progress: bool = True,
    gradient_clip_val: float | None = 10.0,
    nonedge_ratio: float | None = None,
    **trainer_kwargs: Any,
) -> FitResult:
    """Train ``model``/``guide`` on ``dataset`` by minibatch SVI with a Lightning ``Trainer``.

    Parameters
    ----------
    model, guide
        Callables ``f(batch)`` honouring the batch protocol; the guide an ``nn.Module``.
        Trained in place (and also returned in the result).
    dataset
        A :class:`~pyrospatial.data.dataset.SpatialDataset` (anything with ``dataloader``/``chunks``).
    max_epochs, max_steps
        Stopping budget; an epoch visits every spot (cell) once. With neither given,
        ``max_epochs=100``.
    batch_size
        Spots per minibatch (cells when the dataset has no spots); ``None`` = full batch.
    lr, lr_decay
        Adam learning rate; per-step exponential decay ``lr_t = lr * lr_decay**t``.
    num_particles
        ELBO particles per step.
    device
        ``"auto"`` (cuda if available, else cpu), ``"cpu"`` or ``"cuda"``. An explicit
        ``accelerator=``/``devices=`` in ``trainer_kwargs`` overrides it.
    seed
        Seeds everything; see the module docstring for the per-step reseeding.
    early_stopping
        ``True`` stops when the epoch mean loss (``"elbo_epoch"``) has not improved for 10
        epochs; a dict is passed to ``lightning.pytorch.callbacks.EarlyStopping`` (over these
        defaults: ``monitor="elbo_epoch", mode="min", patience=10, min_delta=0.0``).
    checkpoint_dir
        Folder where ``last.ckpt`` is written *during* training, atomically (temporary file,
        fsync, rename), at the intervals below and at the end (``None``: no checkpoints); see
        :mod:`pyrospatial.engine.checkpoint`.
    resume
        A checkpoint path, or ``"last"`` for ``checkpoint_dir/last.ckpt``; training continues
        from its epoch/step (also from the middle of an epoch, with the batches of that epoch
        not yet seen) with its optimiser state, up to ``max_epochs``/``max_steps``. The seed,
        lr, lr_decay, num_particles and batch_size must equal the checkpoint's. A run that had
        already finished is restored and returned as it was.
    checkpoint_every_n_steps, checkpoint_every_n_epochs, checkpoint_every_seconds
        Write intervals of ``last.ckpt`` (each ``None``/0 turns that trigger off): every ``n``
        optimiser steps (default off), every ``n`` epochs (default 1), and after the first step
        ending at least this many seconds of wall time after the previous write (default 120).
    progress
        Lightning's progress bar (the per-step ``elbo`` is shown on it) and info messages.
    gradient_clip_val
        Element-wise gradient clip (``None``/0 turns it off).
    nonedge_ratio
        Deprecated: set it on the data set (``SpatialDataset(nonedge_ratio=...)``). Given,
        it is set on a copy of ``dataset`` (``with_nonedge_ratio``) with a ``DeprecationWarning``.
    trainer_kwargs
        Passed to ``lightning.Trainer`` (e.g. ``strategy="ddp"``, ``devices=2``,
        ``precision``, ``logger=...``, ``accumulate_grad_batches``). Lightning's logger is off
        unless given (no ``lightning_logs`` directory is written).

    Returns
    -------
    FitResult

    Raises
    ------
    FitError
        The loss became NaN/inf (the message names the step and the offending sites/parameters).
    CheckpointError
        ``resume`` points to a missing, unsafe or mismatching checkpoint.
    InputError
        Bad arguments, a guide that is not an ``nn.Module``, parameters in the global store.
    """
    if seed is None or int(seed) < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}.")
    seed = int(seed)
    if max_epochs is None and max_steps is None:
        max_epochs = 100
    accelerator = _accelerator(device)
    batch_size = _default_batch_size(dataset) if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}.")
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    ckpt_path: Path | None = None
    if resume is not None:
        if str(resume) == "last":
            if ckpt_dir is None:
                raise CheckpointError("resume='last' needs checkpoint_dir (where last.ckpt was written).")
            ckpt_path = ckpt_dir / CHECKPOINT_NAME
        else:
            ckpt_path = Path(resume)
    # the checkpoint is read before any work so that a bad file fails fast
    resume_state = read_checkpoint(ckpt_path, for_resume=True) if ckpt_path is not None else None

    dataset = _deprecated_nonedge_ratio(dataset, nonedge_ratio)
    _check_callables(model, guide)
    L.seed_everything(seed, workers=True, verbose=False)
    # lazily created parameters (AutoGuides) must exist before the optimiser is built
    warmup = next(iter(dataset.chunks(batch_size)))
    initialise(model, guide, warmup)
    module = SVIModule(model, guide, lr=lr, lr_decay=lr_decay, num_particles=num_particles, seed=seed)
    module.run_settings = {"batch_size": batch_size}
    if ckpt_path is not None and resume_state is not None:
        check_matches(ckpt_path, resume_state, module)
        differences = settings_differences(module, resume_state)
        if differences:
            raise CheckpointError(
                f"checkpoint {str(ckpt_path)!r} was written by a fit with other settings ({'; '.join(differences)}): "
                "resume with the settings of that fit, or start without --resume (resume=None)."
            )
        del resume_state  # Lightning reads the file again itself

    loader = resumable_loader(dataset.dataloader(batch_size, seed=seed, shuffle=True))
    callbacks = list(trainer_kwargs.pop("callbacks", []) or [])
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        callbacks.append(PeriodicCheckpoint(
            ckpt_dir, every_n_steps=checkpoint_every_n_steps, every_n_epochs=checkpoint_every_n_epochs,
            every_seconds=checkpoint_every_seconds, sampler=getattr(loader, "sampler", None),
        ))
    if early_stopping:
        options = dict(monitor=EPOCH_METRIC, mode="min", patience=10, min_delta=0.0, check_on_train_epoch_end=True)
        if isinstance(early_stopping, dict):
            options.update(early_stopping)
        callbacks.append(EarlyStopping(**options))

    kwargs: dict[str, Any] = dict(
        accelerator=accelerator,
        devices=1,
        max_epochs=-1 if max_epochs is None else int(max_epochs),
        max_steps=-1 if max_steps is None else int(max_steps),
        gradient_clip_val=gradient_clip_val or None,
        gradient_clip_algorithm="value",
        enable_progress_bar=progress,
        enable_model_summary=False,
        enable_checkpointing=ckpt_dir is not None,
        logger=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        deterministic=False,
        default_root_dir=str(ckpt_dir) if ckpt_dir is not None else None,
    )
    if "accelerator" in trainer_kwargs and "devices" not in trainer_kwargs:
        kwargs["devices"] = "auto"
    kwargs.update(trainer_kwargs)
    if kwargs.get("default_root_dir") is None:
        kwargs.pop("default_root_dir")

    start = time.perf_counter()
    with _quiet_lightning(progress):
        trainer = L.Trainer(callbacks=callbacks, **kwargs)
        trainer.fit(
            module,
            train_dataloaders=loader,
            ckpt_path=str(ckpt_path) if ckpt_path is not None else None,
            weights_only=True,
        )
    seconds = time.perf_counter() - start
    # Lightning's teardown moves the module back to the CPU: keep the trained pair on the device
    # it was trained on, so that sampling and export run there too
    root = trainer.strategy.root_device
    if root.type != "cpu":
        module.to(root)

    last = None
    if ckpt_dir is not None and (ckpt_dir / CHECKPOINT_NAME).exists():
        last = str(ckpt_dir / CHECKPOINT_NAME)
    settings = {
        "seed": seed,
        "lr": float(lr),
        "lr_decay": float(lr_decay),
        "batch_size": batch_size,
        "num_particles": int(num_particles),
        "nonedge_ratio": float(getattr(dataset, "nonedge_ratio", 0.0)),
        "max_epochs": -1 if max_epochs is None else int(max_epochs),
        "max_steps": -1 if max_steps is None else int(max_steps),
        "steps": int(trainer.global_step),
        "epochs": int(trainer.current_epoch),
        "device": str(trainer.strategy.root_device),
        "accelerator": str(accelerator),
        "gradient_clip_val": float(gradient_clip_val or 0.0),
        "stopped_early": any(isinstance(cb, EarlyStopping) and cb.stopped_epoch > 0 for cb in trainer.callbacks),
        "resumed_from": str(ckpt_path) if ckpt_path is not None else "",
        "versions": versions(),
    }
    return FitResult(
        model=model,
        guide=guide,
        elbo_history=np.asarray(module.elbo_history, dtype=np.float64),
        settings=settings,
        checkpoint_path=last,
        fit_seconds=seconds,
        module=module,
    )


def load_checkpoint(model: Callable, guide: torch.nn.Module, dataset, path: str | os.PathLike, *, chunk_size: int | None = None):
    """Load the parameters of a :func:`fit` checkpoint into ``model`` and ``guide``.

    Lazily created parameters are first initialised by running the pair on one chunk of
    ``dataset`` (``chunk_size`` units, default: a small chunk), then the state dict is read with
    ``torch.load(path, weights_only=True)`` (no pickled objects are executed) and loaded
    strictly. Returns ``(model, guide)``.

    Raises
    ------
    CheckpointError
        Missing file, non-tensor content, or missing/unexpected keys or shapes (named).
    """
    size = chunk_size or max(1, min(64, _default_batch_size(dataset)))
    initialise(model, guide, next(iter(dataset.chunks(size))))
    holder = SVIModule(model, guide)
    checkpoint = read_checkpoint(path)
    check_matches(Path(path), checkpoint, holder)
    state = checkpoint.get("state_dict", checkpoint)
    holder.load_state_dict(state, strict=True)
    return model, guide
