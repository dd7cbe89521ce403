"""Refine an amortised posterior by MCMC: calibrated per-cell uncertainty for spot models.

Why
---
A mean-field (amortised) guide is over-confident exactly where CORAL needs it most: the
cells of one spot share its counts, so their latents are strongly coupled (raise one cell's
expression of a gene and another's must fall), and a factorised ``q`` sets each marginal to
the *conditional* spread along those constraints -- the more cells per spot, the narrower.
Global point estimates learned with such a ``q`` are biased the same way (e.g. the spread of
cell sizes shrinks). :func:`refine_posterior` starts from the trained guide and runs MCMC
on the model's own joint density, so the draws it returns follow the model's posterior.

What is sampled
---------------
Given the model's global point estimates (decoders, prior networks, ...), the joint density
of the latents splits into independent parts once the cell graph is left out:

- **spot part**: the latents of every cell inside a spot, the spots' own latents (e.g. a
  capture efficiency) and the global latents of the model (e.g. CORAL's RNA read-out
  ``"rna_weight"``, which all spots share). These are sampled jointly by Hamiltonian Monte
  Carlo, one accept/reject per chain;
- **outside part**: each cell outside every spot is independent of everything else; its
  latents are sampled by HMC with one accept/reject per cell (``refine_outside``).

The graph terms of the model (edge likelihood, Laplacian / contrastive factors) couple all
cells and are *not* part of the default target: the guide's graph-informed draws are the
starting point, and the refined posterior conditions on each cell's own features and its
spot. (In the default simulation the graph carries no information about the cell states.)

With ``graph=True`` they are: every cell, spot and global latent forms one part, sampled
jointly on the full batch with the graph's edges and its non-adjacent pairs (all of them up
to ``max_nonedges``, else a fixed uniform sample of that many, weighted to stand for all).
Quantities that are read *on the graph* need this: an interaction-matrix entry averages the
edge probability over the observed edges, which were drawn because their probability was
high; a posterior that ignores the edges reports those probabilities too low (5-6% on the
all-pair simulations of ``benchmarks/interaction_calibration.py``). A point-estimated edge
decoder is then re-estimated by EM with the other parameters (:data:`GRAPH_EM_PARAMS`); a
Bayesian one (CORAL's ``bayesian_edge_decoder``) is sampled jointly with the cells. Latents that
only the graph informs (the model's ``graph_sites``, e.g. that decoder) are held at the guide's
draws, one per chain, when the graph is left out: otherwise nothing in the target would hold
them and they would drift to their prior.
Cost: each leapfrog step evaluates ``num_chains x`` (edges + non-edges) pairs, a dense
``num_chains x n^2`` product while the pairs are many. Measured for the pair terms alone (20
chains, one CPU core, forward and gradient; ``benchmarks/results/graph_cost.md``): 0.03 s at 400
cells, 0.8 s at 1500 and 2.3 s at 3000 (2M sampled non-edges), times
``num_steps x (num_warmup + kept x thin)`` evaluations (about two hours at 3000 cells with the
defaults); beyond a few hundred cells, use a GPU. Convergence is the harder limit: on data drawn from a trained
CORAL with a Bayesian decoder (``benchmarks/results/interaction_oracle*.md``, 400 cells), the
default run left every site's split-R-hat far above 1 (z 1.6-1.8, ``edge_weight`` 2.5-3.3 with
``thin=5``; 1.2-1.6 and 1.9-2.6 with ``thin=20``), and 13 times the work (40 steps, 400 warm-up
transitions) still leaves z at 1.2-1.5; check ``diagnostics["rhat_max"]`` before trusting
graph-conditioned intervals. :meth:`pyrospatial.methods.coral.CORAL.interactions` widens the interaction
matrix's intervals under this posterior by a factor fitted on held-apart simulations
(:mod:`pyrospatial.criticism.recalibration`).

Monte Carlo EM
--------------
Some global point estimates (``em_params``; by default CORAL's ``size_scale`` and
``rna_inverse_dispersion``) are re-estimated during warm-up by stochastic-approximation EM:
after each MCMC transition one Adam step increases the mean over chains of the log joint
density at the current states (Fisher's identity: its gradient is an unbiased estimate of the
marginal likelihood's gradient). These are variance-type parameters that a mean-field guide
biases: the spread of cell sizes, and the count dispersion (SVI puts CORAL's ``theta_g`` at
about 3 where the simulator's is about 10, because a too-narrow ``q`` leaves residual spread
that only the likelihood can absorb). They are chosen by maximum marginal likelihood, never by
looking at a truth. The model is updated **in place** (pass ``em_params=()`` to leave it
untouched).

Caveat on ``theta_g``: EM runs for the warm-up only (default 100 transitions), and ``theta_g``
has not settled by then. On simulations it passes the simulator's value near step 100 and
keeps rising with a longer warm-up: 29 and 46 after 400 steps, against 11 and 10. The spot
sums cannot tell per-cell count noise from per-cell variation of the expected expression, so
its marginal likelihood is flat or rising in ``theta_g``. The default warm-up therefore acts
as early stopping. Over-long warm-ups cost coverage on small data: 90% PIT coverage of
per-cell RNA 0.866 against 0.898, and of counts 0.884 against 0.924, on 300 cells. On 600
cells the cost is 0.935 against 0.937, and 0.924 against 0.936
(``benchmarks/results/refine_em_trace.md``).

Not re-estimated by default: the prior scales of the RNA read-out (``rna_weight_scale``,
``rna_type_scale``, ``rna_slope_scale``). Their marginal-likelihood estimate shrinks the
read-out: on 300-600 simulated cells, ``tau`` halves and ``tau_c`` falls 3-4 fold within 100
EM steps, and both keep falling (``benchmarks/results/refine_em_trace_readout_scales.md``).
The per-cell RNA posterior then becomes biased towards the gene baseline and too narrow. With
that earlier default, 90% intervals covered 0.834 of the simulated truth, pooled, and 0.72-0.87
per simulation (the calibration benchmark at stop 10, in git history). With the ELBO's
estimates kept they cover 0.937 pooled, and 0.91-0.96 per simulation
(``benchmarks/results/calibration.md``). A few hundred spot sums identify the read-out's
scale poorly, and empirical Bayes then under-states the read-out's uncertainty. Pass the
scales in ``em_params`` to re-estimate them anyway.

Sampler details
---------------
Every latent site is sampled in its unconstrained space (``biject_to(support)``, with the
log-Jacobian). HMC uses ``num_steps`` leapfrog steps; during warm-up the step size is
adapted by dual averaging to an acceptance of ``target_accept`` and a diagonal mass matrix
(the variance of each coordinate across chains and recent iterations) is re-estimated in
windows. After warm-up the kernel is fixed, and ``num_samples / num_chains`` draws per
chain are kept, ``thin`` transitions apart. The chains run in parallel as a leading batch
dimension of one model evaluation (an outer ``pyro.plate`` at ``dim=-2``), so the model's
own plates must use ``dim=-1`` (as CORAL's do).

Why not :class:`pyro.infer.MCMC`: it runs chains one per process and gives no hook to update
model parameters between transitions; here ``C`` chains are one vectorised model evaluation
(one batched gradient per leapfrog step for all chains) and EM steps interleave with the
transitions. The scheme itself (dual averaging, windowed diagonal mass) is the standard one
of Stan and Pyro's HMC.

The returned :class:`~pyrospatial.engine.posterior.PosteriorSamples` has the layout of
:func:`~pyrospatial.engine.posterior.sample_posterior`: ``(S, N_cells, ...)`` rows in dataset
order, ``(S, N_spots, ...)``, global sites ``(S, ...)``; deterministic sites (e.g.
``"expected_rna"``) are recomputed from the refined latents. Diagnostics are attached as
``samples.diagnostics`` (acceptance rates, step sizes, EM traces, seconds, and per returned
site the largest split-R-hat over its coordinates ``"rhat_max"`` and the smallest bulk effective
sample size ``"ess_bulk_min"``, by ArviZ across the chains' kept draws
(:func:`~pyrospatial.criticism.convergence.chain_convergence`); R-hat above about 1.05 means the chains
disagree: lengthen ``num_warmup`` or ``num_steps``). Judge it on the quantities used: CORAL's
latents have symmetries (``z -> A z`` with the read-out ``W -> W A^-1`` leaves the expected RNA
unchanged), so ``"rna_weight"`` or ``"z"`` can wander while ``"expected_rna"`` has converged.
The kept states are ``thin=20`` transitions apart. On 400 simulated cells, 2% of z's
coordinates then have R-hat > 1.1 (22% with ``thin=5``, whose kept window was short of the
chains' autocorrelation); the warm-up stays at 100 transitions, the Monte Carlo EM's early
stop (below).

Example
-------
>>> fit(model, guide, dataset, max_epochs=400, lr=0.01)                 # doctest: +SKIP
>>> draws = refine_posterior(model, guide, dataset, num_samples=100)     # doctest: +SKIP
>>> draws["expected_rna"].shape                                         # doctest: +SKIP
(100, n_cells, n_genes)
"""

from __future__ import annotations

import math
import time
from operator import attrgetter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import numpy as np
import pyro
from tqdm.auto import tqdm
import pyro.poutine as poutine
import torch
import pyro.distributions as dist
from pyro.distributions.transforms import biject_to
from pyro.infer.reparam import LocScaleReparam, TransformReparam
from pyro.poutine.util import site_is_subsample

from pyrospatial.engine.batch import Batch
from pyrospatial.criticism.convergence import chain_convergence
from pyrospatial.errors import InputError
from pyrospatial.engine.posterior import PosteriorSamples, _EvalMode, _module_device, site_plate

__all__ = ["DEFAULT_EM_PARAMS", "GRAPH_EM_PARAMS", "refine_posterior"]

#: CORAL's variance-type global parameters re-estimated by Monte Carlo EM by default.
DEFAULT_EM_PARAMS = ("size_scale", "rna_inverse_dispersion")
#: Also re-estimated by default when the refinement conditions on the graph (``graph=True``):
#: CORAL's edge decoder, fitted under the guide, whose draws ignore the selection of edges.
GRAPH_EM_PARAMS = ("edge_decoder.weight", "edge_decoder.bias")

_CHAIN_DIM = -2


# ------------------------------------------------------------------------------------------
# sub-batches
# ------------------------------------------------------------------------------------------
def _sub_batch(full: Batch, cells: torch.Tensor, with_spots: bool) -> Batch:
    """The cells ``cells`` (local indices into ``full``) without any graph; all spots of
    ``full`` when ``with_spots`` (then every member cell must be in ``cells``), else none.
    Scales are 1: one evaluation is the full log density of these cells (and spots)."""
    n = int(cells.numel())
    empty_pairs = torch.zeros(2, 0, dtype=torch.long, device=full.device)
    cell_spot = full.cell_spot[cells]
    if with_spots:
        m = full.n_spots
        members = torch.nonzero(cell_spot >= 0).squeeze(-1)
        membership = torch.sparse_coo_tensor(
            torch.stack([cell_spot[members], members]), torch.ones(members.numel(), device=full.device), (m, n),
            check_invariants=False,
        ).coalesce()
        spot_fields = dict(
            spot_index=full.spot_index, spot_counts=full.spot_counts, spot_library=full.spot_library,
            membership=membership, spot_scale=1.0,
        )
    else:
        G = full.spot_counts.shape[-1]
        membership = torch.sparse_coo_tensor(
            torch.zeros(2, 0, dtype=torch.long, device=full.device), torch.zeros(0, device=full.device), (0, n),
            check_invariants=False,
        )
        spot_fields = dict(
            spot_index=full.spot_index[:0], spot_counts=full.spot_counts.new_zeros(0, G),
            spot_library=full.spot_library[:0], membership=membership, spot_scale=1.0,
        )
        cell_spot = torch.full_like(cell_spot, -1)
    return replace(
        full,
        cell_index=full.cell_index[cells], cell_type=full.cell_type[cells], cell_features=full.cell_features[cells],
        cell_library=full.cell_library[cells], cell_coords=full.cell_coords[cells], cell_spot=cell_spot,
        edge_index=empty_pairs, nonedge_index=empty_pairs, n_edges_total=0,
        # ScaledPlate makes the effective scale exactly cell_scale / spot_scale: 1 here
        cell_scale=1.0, edge_scale=0.0, nonedge_scale=0.0,
        **spot_fields,
    )


# ------------------------------------------------------------------------------------------
# the target: the model's log density, vectorised over chains
# ------------------------------------------------------------------------------------------
@dataclass
class _Site:
    name: str
    plate: str  # "cells", "spots" or "global"
    event_dim: int
    transform: Any
    shape: tuple[int, ...] = ()  # value shape of one draw

    @property
    def pad(self) -> int:
        """Singleton dims between the chain dim (at -2 of the batch shape) and a value's
        batch dims: 1 for a site outside every plate, 0 inside a plate at dim -1."""
        return max(0, 1 - (len(self.shape) - self.event_dim))

    def chain_shape(self, C: int) -> tuple[int, ...]:
        return (C,) + (1,) * self.pad + self.shape


@dataclass
class _Part:
    """One independent part of the posterior: a sub-batch, the sites moved on it, and the
    sites it conditions on (values owned by another part)."""

    label: str
    batch: Batch
    cells: torch.Tensor  # local indices of these cells in the full batch
    moving: list[_Site]
    per_cell: bool  # True: one accept/reject per cell (cells independent); False: per chain
    graph: bool = False  # the batch's edge and non-edge terms are part of the target
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # unconstrained (C, ...)
    conditioned: dict[str, torch.Tensor] = field(default_factory=dict)  # constrained (C, ...)

    @property
    def n_blocks(self) -> int:
        return self.batch.n_cells if self.per_cell else 1

    def block_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``(C, ...)`` -> ``(C, B)``: per chain, or per cell (the cell axis follows the chain)."""
        C = x.shape[0]
        if self.per_cell:
            return x.reshape(C, self.batch.n_cells, -1).sum(-1)
        return x.reshape(C, -1).sum(-1, keepdim=True)

    def block_mask(self, mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``(C, B)`` -> broadcastable to ``like (C, ...)``."""
        if self.per_cell:
            return mask.reshape(mask.shape + (1,) * (like.dim() - 2))
        return mask.reshape((mask.shape[0],) + (1,) * (like.dim() - 1))


def _run_model(model: Callable, batch: Batch, values: dict[str, torch.Tensor], C: int):
    # no argument validation: a divergent leapfrog step may give non-finite values, which
    # give a non-finite density and are rejected
    with pyro.validation_enabled(False), poutine.trace() as tracer, pyro.plate("refine_chains", C, dim=_CHAIN_DIM):
        poutine.condition(model, data=values)(batch)
    return tracer.trace


def _log_density(model: Callable, part: _Part, state: dict[str, torch.Tensor], C: int) -> torch.Tensor:
    """``(C, B)`` log density of ``part`` at the unconstrained ``state`` (with Jacobians).

    Per-cell parts keep only the cells-plate terms (the others do not depend on the cells
    moved)."""
    values = dict(part.conditioned)
    total = torch.zeros(C, part.n_blocks, device=part.batch.device)
    for site in part.moving:
        u = state[site.name]
        x = site.transform(u)
        values[site.name] = x
        lj = site.transform.log_abs_det_jacobian(u, x)
        if lj.dim() > u.dim() - site.event_dim:  # element-wise Jacobian: sum the event dims
            lj = lj.reshape(lj.shape[: u.dim() - site.event_dim] + (-1,)).sum(-1)
        total = total + part.block_sum(lj)
    trace = _run_model(model, part.batch, values, C)
    for name, node in trace.nodes.items():
        if node["type"] != "sample" or site_is_subsample(node) or node["infer"].get("_deterministic"):
            continue
        if name == "refine_chains":
            continue
        plate = site_plate(node)
        if (plate == "edge" and not part.graph) or (part.per_cell and plate != "cells"):
            continue
        lp = node["fn"].log_prob(node["value"])
        scale = node["scale"]
        if not (isinstance(scale, (int, float)) and scale == 1.0):
            lp = lp * scale
        lp = lp.expand(torch.broadcast_shapes(lp.shape, (C, 1))) if lp.dim() >= 1 else lp.expand(C, 1)
        total = total + part.block_sum(lp)
    return total


def _with_grad(model, part: _Part, state: dict[str, torch.Tensor], C: int):
    """Block log densities and their gradients w.r.t. the state."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in state.items()}
    with torch.enable_grad():
        lp = _log_density(model, part, leaves, C)
        grads = torch.autograd.grad(lp.sum(), list(leaves.values()), allow_unused=True)
    g = {k: (torch.nan_to_num(gr, nan=0.0, posinf=0.0, neginf=0.0) if gr is not None else torch.zeros_like(leaves[k]))
         for k, gr in zip(leaves, grads)}
    lp = torch.nan_to_num(lp.detach(), nan=-math.inf, posinf=-math.inf)
    return lp, g


# ------------------------------------------------------------------------------------------
# HMC with per-block accept/reject
# ------------------------------------------------------------------------------------------
class _DualAveraging:
    """Nesterov dual averaging of the log step size (Hoffman & Gelman 2014)."""

    def __init__(self, step: float, target: float):
        self.target = float(target)
        self.reset(step)

    def reset(self, step: float) -> None:
        self.mu, self.log_avg, self.h, self.t = math.log(10.0 * step), math.log(step), 0.0, 0

    def update(self, accept: float) -> float:
        self.t += 1
        eta = 1.0 / (self.t + 10.0)
        self.h = (1.0 - eta) * self.h + eta * (self.target - accept)
        log_step = self.mu - math.sqrt(self.t) / 0.05 * self.h
        w = self.t**-0.75
        self.log_avg = w * log_step + (1.0 - w) * self.log_avg
        return math.exp(log_step)

    @property
    def final(self) -> float:
        return math.exp(self.log_avg)


class _HMC:
    """Vectorised HMC on one part: ``C`` chains, diagonal mass, one accept per block."""

    def __init__(self, model, part: _Part, C: int, num_steps: int, step_size: float, target_accept: float):
        self.model, self.part, self.C, self.L = model, part, C, int(num_steps)
        self.mass = {
            k: (v.var(0, keepdim=True) if C > 2 else torch.ones_like(v[:1])).clamp(min=1e-4)
            for k, v in part.state.items()
        }
        self.step = float(step_size)
        self.dual = _DualAveraging(self.step, target_accept)
        self.window: dict[str, list[torch.Tensor]] = {k: [] for k in part.state}
        self.accept_history: list[float] = []
        self.refresh()

    def refresh(self) -> None:
        """Recompute the cached density and gradient (after the target changed)."""
        self.lp, self.grad = _with_grad(self.model, self.part, self.part.state, self.C)

    def kinetic(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.part.block_sum(0.5 * p[k] ** 2 * self.mass[k]) for k in p)

    def transition(self) -> float:
        part, C = self.part, self.C
        # jittered step size: trajectory lengths vary, so no direction is stuck at a multiple
        # of its period (a Gaussian direction with unit scale has period 2 pi)
        step = self.step * float(torch.empty(()).uniform_(0.5, 1.5))
        x = dict(part.state)
        p = {k: torch.randn_like(v) / self.mass[k].sqrt() for k, v in x.items()}
        k0 = self.kinetic(p)
        g = self.grad
        p = {k: p[k] + 0.5 * step * g[k] for k in p}
        lp_new = self.lp
        for leap in range(self.L):
            x = {k: x[k] + step * self.mass[k] * p[k] for k in x}
            lp_new, g = _with_grad(self.model, part, x, C)
            if leap < self.L - 1:
                p = {k: p[k] + step * g[k] for k in p}
        p = {k: p[k] + 0.5 * step * g[k] for k in p}
        log_ratio = lp_new - self.kinetic(p) - self.lp + k0
        log_ratio = torch.nan_to_num(log_ratio, nan=-math.inf, posinf=-math.inf)
        accept = torch.log(torch.rand_like(log_ratio)) < log_ratio  # (C, B)
        for k in part.state:
            mask = part.block_mask(accept, x[k])
            part.state[k] = torch.where(mask, x[k].detach(), part.state[k])
            self.grad[k] = torch.where(mask, g[k], self.grad[k])
        self.lp = torch.where(accept, lp_new, self.lp)
        rate = float(torch.clamp(log_ratio, max=0.0).exp().mean())
        self.accept_history.append(rate)
        return rate

    # -- warm-up adaptation ---------------------------------------------------------------
    def adapt(self, rate: float) -> None:
        self.step = self.dual.update(rate)
        for k, v in self.part.state.items():
            self.window[k].append(v.detach())

    def update_mass(self) -> None:
        """Diagonal mass = variance over chains and the window's iterations (regularised)."""
        for k, values in self.window.items():
            if not values:
                return
            stack = torch.stack(values)  # (T, C, ...)
            n = stack.shape[0] * stack.shape[1]
            var = stack.reshape((n,) + tuple(stack.shape[2:])).var(0, keepdim=True)
            self.mass[k] = ((n / (n + 5.0)) * var + 1e-3 * (5.0 / (n + 5.0))).clamp(min=1e-6)
            self.window[k] = []
        self.dual.reset(self.step)
        self.refresh()

    def finish_warmup(self) -> None:
        self.step = self.dual.final


def _mass_windows(num_warmup: int) -> set[int]:
    """Iterations after which the mass matrix is re-estimated (doubling windows)."""
    if num_warmup < 20:
        return set()
    ends, width = set(), max(10, num_warmup // 10)
    end = width
    while end + 2 * width <= num_warmup:
        ends.add(end)
        width *= 2
        end += width
    ends.add(int(0.9 * num_warmup))
    return ends


# ------------------------------------------------------------------------------------------
# non-centred coordinates
# ------------------------------------------------------------------------------------------
def _base_normal(fn) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """``(loc, scale, log)`` of a Normal / LogNormal site distribution (None otherwise)."""
    base = fn.base_dist if isinstance(fn, dist.Independent) else fn
    if isinstance(base, dist.LogNormal):
        return base.loc, base.scale, True
    if isinstance(base, dist.Normal):
        return base.loc, base.scale, False
    return None


def _noncentre(model: Callable, trace, names: Iterable[str]) -> tuple[Callable, dict[str, str]]:
    """``model`` with the sites ``names`` (Normal or LogNormal) sampled in non-centred
    coordinates ``u = (x - loc) / scale`` (of ``log x`` for a LogNormal), ``u ~ Normal(0, 1)``;
    returns the wrapped model and ``{site: its non-centred site}``. In these coordinates a
    scale parameter's EM gradient comes through the likelihood, and weakly identified
    latents (a cell's size within its spot) have unit prior scale for the sampler."""
    log_config, loc_config, renamed = {}, {}, {}
    for name in names:
        node = trace.nodes.get(name)
        if node is None or node["type"] != "sample" or node["is_observed"]:
            continue
        found = _base_normal(node["fn"])
        if found is None:
            raise InputError(f"noncentred: site '{name}' is not Normal or LogNormal.")
        if found[2]:
            log_config[name] = TransformReparam()
            loc_config[f"{name}_base"] = LocScaleReparam(0.0)
            renamed[name] = f"{name}_base_decentered"
        else:
            loc_config[name] = LocScaleReparam(0.0)
            renamed[name] = f"{name}_decentered"
    if not renamed:
        return model, {}
    wrapped = poutine.reparam(poutine.reparam(model, config=log_config), config=loc_config) if log_config else poutine.reparam(model, config=loc_config)
    return wrapped, renamed


def _decentred_value(fn, value: torch.Tensor) -> torch.Tensor:
    loc, scale, log = _base_normal(fn)
    x = value.log() if log else value
    return (x - loc) / scale


# ------------------------------------------------------------------------------------------
# set-up
# ------------------------------------------------------------------------------------------
def _latent_sites(model, guide, batch: Batch, renamed: dict[str, str] | None = None) -> list[_Site]:
    """The model's latent sites (from one guide draw) with their supports' bijections;
    ``renamed``: non-centred sites (absent from the guide) and their original names."""
    renamed = renamed or {}
    originals = {new: old for old, new in renamed.items()}
    guide_trace = poutine.trace(guide).get_trace(batch)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
    sites = []
    for name, node in model_trace.nodes.items():
        if node["type"] != "sample" or site_is_subsample(node) or node["is_observed"]:
            continue
        if node["infer"].get("_deterministic"):
            continue
        plate = site_plate(node)
        if plate == "edge":
            raise InputError(f"latent site '{name}' lies in an edge plate; refine_posterior cannot sample it.")
        if originals.get(name, name) not in guide_trace.nodes:
            raise InputError(f"the guide has no site '{originals.get(name, name)}' that the model samples.")
        sites.append(_Site(name, plate, int(node["fn"].event_dim), biject_to(node["fn"].support), tuple(node["value"].shape)))
    return sites


def _rows(value: torch.Tensor, site: _Site, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of a single-draw cells-plate value (the plate axis is left of the event)."""
    return value.index_select(value.dim() - site.event_dim - 1, index)


def _em_parameters(model: torch.nn.Module, names: Iterable[str]) -> list[tuple[str, torch.Tensor]]:
    params = dict(model.named_parameters())
    found = []
    for name in names:
        key = name if name in params else f"{name}_unconstrained"
        if key not in params:
            raise InputError(f"em_params: the model has no parameter '{name}'.")
        found.append((name, params[key]))
    return found


# ------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------
def refine_posterior(
    model: Callable,
    guide: Callable,
    dataset,
    num_samples: int = 100,
    *,
    sites: Iterable[str] | None = None,
    num_chains: int = 20,
    num_warmup: int = 100,
    thin: int = 20,
    num_steps: int = 10,
    step_size: float = 0.05,
    target_accept: float = 0.7,
    em_params: Iterable[str] | None = None,
    em_lr: float = 0.02,
    refine_outside: bool = True,
    noncentred: Iterable[str] = ("cell_size",),
    graph: bool = False,
    max_nonedges: int = 2_000_000,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> PosteriorSamples:
    """Posterior draws by HMC started from the guide (see the module docstring).

    Parameters
    ----------
    model, guide
        A trained model/guide pair (e.g. ``CoralModel`` / ``CoralGuide``) following the batch
        protocol, with all model plates at ``dim=-1``.
    dataset
        The :class:`~pyrospatial.data.dataset.SpatialDataset` it was trained on (evaluated as one
        batch: ``num_chains`` x cells x genes tensors must fit in memory).
    num_samples
        Draws returned: ``num_chains`` chains x ``ceil(num_samples / num_chains)`` kept
        states (truncated to ``num_samples``).
    sites
        Sites to return (default: every latent site and every deterministic site of the
        cells/spots plates, e.g. ``"expected_rna"``; global latents such as ``"rna_weight"``).
    num_chains, num_warmup, thin
        Parallel chains; warm-up transitions (adaptation and EM); transitions between kept
        states.
    num_steps, step_size, target_accept
        Leapfrog steps per transition; initial step size; warm-up acceptance target.
    em_params
        Names of model parameters re-estimated by Monte Carlo EM during warm-up (updated in
        place). None (default): those of :data:`DEFAULT_EM_PARAMS` that the model has;
        ``()``: none.
    em_lr
        Adam learning rate of the EM steps.
    refine_outside
        Also refine the cells outside every spot (each one independently, given the refined
        global latents). False keeps the guide's initial draws for their own latents.
    noncentred
        Normal / LogNormal latent sites sampled in non-centred coordinates (default CORAL's
        ``"cell_size"``: fast EM of its spread ``sigma_s`` and a well-scaled sampler for
        sizes that the spot totals barely separate). Their values are returned as usual.
    graph
        Condition on the cell graph too (see the module docstring): one joint part with every
        cell and the edge likelihood; the default ``em_params`` then also include
        :data:`GRAPH_EM_PARAMS`. ``refine_outside`` does not apply.
    max_nonedges
        With ``graph``: the most non-adjacent pairs evaluated (all of them when there are
        fewer; else a fixed uniform sample, weighted to stand for all).
    seed
        Seeds the initial guide draws and the chains.
    device
        Where to compute (default: the parameters' device).
    progress
        Show a progress bar (with the recent acceptance rate per part).

    Returns
    -------
    PosteriorSamples
        As :func:`~pyrospatial.engine.posterior.sample_posterior` (``.plates``), plus
        ``.diagnostics``: mean acceptance and step size per part, EM traces, seconds, and
        per returned site ``"rhat_max"`` (largest split-R-hat over its coordinates) and
        ``"ess_bulk_min"`` (smallest bulk ESS), by ArviZ over the chains' kept draws.
    """
    if int(num_samples) < 1 or int(num_chains) < 1:
        raise InputError(f"num_samples and num_chains must be >= 1, got {num_samples}, {num_chains}.")
    if int(num_warmup) < 0 or int(thin) < 1 or int(num_steps) < 1:
        raise InputError("num_warmup must be >= 0, and thin and num_steps >= 1.")
    t_start = time.perf_counter()
    device = torch.device(device) if device is not None else _module_device(model, guide)
    C, S = int(num_chains), int(num_samples)
    num_warmup, thin = int(num_warmup), int(thin)
    per_chain = int(math.ceil(S / C))
    full = dataset.full_batch().to(device)
    torch.manual_seed(int(seed))

    with _EvalMode(model, guide):
        # sites and initial states: C guide draws on the full batch (graph included, as trained)
        with torch.no_grad():
            guide_trace = poutine.trace(guide).get_trace(full)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(full)
            base_model = model
            model, renamed = _noncentre(base_model, model_trace, noncentred or ())
            site_list = _latent_sites(model, guide, full, renamed)
            originals = {new: old for old, new in renamed.items()}
            inits: dict[str, list[torch.Tensor]] = {s.name: [] for s in site_list}
            for _ in range(C):
                guide_trace = poutine.trace(guide).get_trace(full)
                if renamed:
                    model_trace = poutine.trace(poutine.replay(base_model, trace=guide_trace)).get_trace(full)
                for s in site_list:
                    if s.name in originals:
                        node = model_trace.nodes[originals[s.name]]
                        inits[s.name].append(_decentred_value(node["fn"], node["value"]))
                    else:
                        inits[s.name].append(guide_trace.nodes[s.name]["value"])
        inside = torch.nonzero(full.cell_spot >= 0).squeeze(-1)
        outside = torch.nonzero(full.cell_spot < 0).squeeze(-1)
        # latents that enter only the graph terms (e.g. a Bayesian edge decoder): without the
        # graph in the target they would drift to their prior, so they keep the guide's draws
        held = [] if graph else [s for s in site_list if s.name in set(getattr(base_model, "graph_sites", ()))]
        moving = [s for s in site_list if s not in held]
        parts: list[_Part] = []
        if graph:
            if int(dataset.n_edges) == 0:
                raise InputError("graph=True needs a cell graph: the dataset has no edges (see SpatialDataset.with_edges).")
            n = full.n_cells
            n_pairs = n * (n - 1) // 2 - int(dataset.n_edges)
            # full_batch samples nonedge_ratio non-edges per edge: ask for min(all, max_nonedges)
            ratio = min(n_pairs, max(1, int(max_nonedges))) / int(dataset.n_edges)
            graph_batch = dataset.full_batch(nonedge_ratio=ratio).to(device)
            parts.append(_Part("all", graph_batch, torch.arange(n, device=device), list(moving), per_cell=False,
                               graph=True))
        elif full.n_spots > 0 and inside.numel() > 0:
            parts.append(_Part("spots", _sub_batch(full, inside, True), inside, list(moving), per_cell=False))
        if not graph and (outside.numel() > 0 or not parts):
            cell_sites = [s for s in site_list if s.plate == "cells"]
            parts.append(_Part("outside", _sub_batch(full, outside, False), outside, cell_sites, per_cell=True))
        for part in parts:
            for s in part.moving:
                rows = [(_rows(v, s, part.cells) if s.plate == "cells" else v) for v in inits[s.name]]
                u = torch.stack([s.transform.inv(v) for v in rows]).detach()
                part.state[s.name] = u if s.plate == "cells" else u.reshape(s.chain_shape(C))
            for s in held:  # one guide draw per chain, fixed
                part.conditioned[s.name] = torch.stack(inits[s.name]).reshape(s.chain_shape(C)).detach()
        joint_part = parts[0] if parts[0].label in ("spots", "all") else None
        outside_part = parts[-1] if parts[-1].label == "outside" else None
        shared = [s for s in site_list if s.plate != "cells"]  # globals (and spot latents)

        def share_globals() -> None:
            """The outside cells condition on the global latents' current values."""
            if outside_part is None:
                return
            for s in shared:
                if s.plate == "global" and s not in held:
                    source = joint_part.state[s.name] if joint_part is not None else torch.stack(
                        [s.transform.inv(v) for v in inits[s.name]]).reshape(s.chain_shape(C))
                    outside_part.conditioned[s.name] = s.transform(source).detach()

        share_globals()
        # one cell's few latents need shorter trajectories than the coupled spot part
        kernels = [
            (part, _HMC(model, part, C, num_steps if part.label != "outside" else max(3, num_steps // 2), step_size, target_accept))
            for part in parts
            if part.label != "outside" or refine_outside
        ]
        # does the outside cells' density depend on the global latents? (CORAL's does not: the
        # read-out only enters the spots) If not, their cached density survives global moves.
        outside_needs_globals = False
        if outside_part is not None and refine_outside and outside_part.conditioned:
            probe = {k: v.detach().requires_grad_(True) for k, v in outside_part.conditioned.items()}
            saved, outside_part.conditioned = outside_part.conditioned, probe
            with torch.enable_grad():
                lp = _log_density(model, outside_part, outside_part.state, C).sum()
                grads = torch.autograd.grad(lp, list(probe.values()), allow_unused=True) if lp.requires_grad else []
            outside_part.conditioned = saved
            outside_needs_globals = any(g is not None and bool(g.abs().sum() > 0) for g in grads)
        if em_params is None:
            present = {name.removesuffix("_unconstrained") for name, _ in base_model.named_parameters()}
            defaults = DEFAULT_EM_PARAMS + (GRAPH_EM_PARAMS if graph else ())
            em_params = [name for name in defaults if name in present]
        em = _em_parameters(base_model, em_params)
        optimiser = torch.optim.Adam([p for _, p in em], lr=float(em_lr)) if em else None
        em_trace: dict[str, list[float]] = {name: [] for name, _ in em}
        windows = _mass_windows(num_warmup)
        em_start = min(10, num_warmup // 4)

        kept: dict[str, list[dict[str, torch.Tensor]]] = {part.label: [] for part in parts}
        total = num_warmup + per_chain * thin
        bar = tqdm(total=total, desc="refine (HMC)", disable=not progress, leave=False)
        for it in range(total):
            warm = it < num_warmup
            for part, kernel in kernels:
                rate = kernel.transition()
                if warm:
                    kernel.adapt(rate)
                    if it + 1 in windows:
                        kernel.update_mass()
            em_step = warm and optimiser is not None and joint_part is not None and it >= em_start
            if em_step:
                # Fisher's identity: the gradient of the log joint at posterior states estimates
                # that of the marginal likelihood. Only the joint part enters (the spots', or
                # with graph=True every cell's): the outside cells carry no information on the
                # spot parameters beyond their prior (their term is neutral at the EM fixed
                # point) and would only slow EM down.
                optimiser.zero_grad()
                state = {k: v.detach() for k, v in joint_part.state.items()}
                loss = -_log_density(model, joint_part, state, C).sum() / C
                loss.backward()
                optimiser.step()
                for name, _ in em:
                    em_trace[name].append(float(attrgetter(name)(base_model).detach().float().mean()))
            share_globals()
            for part, kernel in kernels:  # the cached densities changed with the parameters
                if em_step or (part.label == "outside" and outside_needs_globals):
                    kernel.refresh()
            if it + 1 == num_warmup:
                for _, kernel in kernels:
                    kernel.finish_warmup()
            if not warm and (it + 1 - num_warmup) % thin == 0:
                for part in parts:
                    kept[part.label].append({k: v.detach().clone() for k, v in part.state.items()})
            bar.update(1)
            if progress and (it + 1) % 25 == 0:
                rates = {p.label: round(float(np.mean(k.accept_history[-25:])), 2) for p, k in kernels}
                bar.set_postfix(acceptance=rates, refresh=False)
        bar.close()

        out = _assemble(model, parts, kept, site_list, sites, dataset, C, S, also=set(renamed))
    out.diagnostics = {
        "acceptance": {p.label: float(np.mean(k.accept_history[num_warmup:] or [float("nan")])) for p, k in kernels},
        "step_size": {p.label: k.step for p, k in kernels},
        "em": em_trace,
        "num_chains": C,
        "num_warmup": num_warmup,
        "thin": thin,
        "num_steps": int(num_steps),
        "graph": bool(graph),
    }
    # convergence of every returned site (deterministic ones too, e.g. "expected_rna": latents
    # that a symmetry leaves unidentified may wander while what they determine has converged)
    checks = {name: chain_convergence(value, C) for name, value in out.items()}
    out.diagnostics["rhat_max"] = {name: r for name, (r, _) in checks.items()}
    out.diagnostics["ess_bulk_min"] = {name: e for name, (_, e) in checks.items()}
    out.diagnostics["seconds"] = time.perf_counter() - t_start
    return out


def _assemble(model, parts: list[_Part], kept, site_list: list[_Site], sites, dataset, C: int, S: int,
              also: set[str] = frozenset()) -> PosteriorSamples:
    """Recompute deterministic sites at the kept states; lay draws out like sample_posterior.
    ``also``: sites recorded although the (non-centred) model marks them observed."""
    keep = None if sites is None else set([sites] if isinstance(sites, str) else sites)
    hidden = {s.name for s in site_list if s.name.endswith("_decentered")}
    totals = {"cells": int(dataset.n_cells), "spots": int(dataset.n_spots)}
    latent = {s.name: s for s in site_list}
    out = PosteriorSamples()
    with torch.no_grad():
        for part in parts:
            for k, state in enumerate(kept[part.label]):
                values = dict(part.conditioned)
                values.update({s.name: s.transform(state[s.name]) for s in part.moving})
                if part.label == "outside" and any(s.plate == "global" for s in site_list):
                    # the globals of the same kept transition (kept in step with the spot part)
                    spot = next((p for p in parts if p.label == "spots"), None)
                    if spot is not None:
                        for s in site_list:
                            if s.plate == "global" and s.name in kept["spots"][k]:
                                values[s.name] = s.transform(kept["spots"][k][s.name])
                trace = _run_model(model, part.batch, values, C)
                lo = k * C
                n_rows = min(C, S - lo)
                if n_rows <= 0:
                    break
                for name, node in trace.nodes.items():
                    if node["type"] != "sample" or site_is_subsample(node) or name == "refine_chains":
                        continue
                    if not (node["infer"].get("_deterministic") or name in latent or name in also):
                        continue
                    if name in hidden and (keep is None or name not in keep):
                        continue  # internal coordinates: the original site is returned
                    plate = site_plate(node)
                    if keep is not None and name not in keep:
                        continue
                    if plate in ("edge",):
                        continue
                    value = node["value"]
                    if plate == "global":
                        if part.label != parts[0].label or name not in latent:
                            continue  # batch-dependent deterministic globals are not returned
                        value = value.reshape((C,) + latent[name].shape)
                        if name not in out:
                            out[name] = np.zeros((S,) + latent[name].shape, dtype=np.float32)
                            out.plates[name] = "global"
                        out[name][lo : lo + n_rows] = value[:n_rows].cpu().numpy()
                        continue
                    if plate == "spots" and part.batch.n_spots == 0:
                        continue
                    index = (part.batch.cell_index if plate == "cells" else part.batch.spot_index).cpu().numpy()
                    value = value.expand((C,) + tuple(value.shape[1:])) if value.shape[0] == 1 else value
                    if name not in out:
                        out[name] = np.zeros((S, totals[plate]) + tuple(value.shape[2:]), dtype=np.float32)
                        out.plates[name] = plate
                    out[name][lo : lo + n_rows, index] = value[:n_rows].cpu().numpy()
    if keep is not None:
        missing = keep - set(out)
        if missing:
            raise InputError(f"site(s) {sorted(missing)} not found; available: {sorted(latent)} and deterministic sites.")
    return out
