"""Vectorised HMC on parts of a model's joint density, with one accept/reject per block.

The machinery behind :func:`pyrospatial.engine.refine.refine_posterior` (one global target)
and :func:`pyrospatial.engine.local.local_posterior` (independent blocks: one per spot, with
its cells, and one per cell outside every spot). A :class:`_Part` is a sub-batch with the
latent sites moved on it; its log density is evaluated for ``C`` chains at once (an outer
plate at ``dim=-2``) and summed per *block*; each block accepts or rejects its own proposal,
so independent blocks mix as if each had its own sampler while sharing one vectorised
gradient evaluation. Step size: dual averaging of the mean acceptance, or (``block_steps``)
one step size per block, each adapted to its own acceptance; mass: diagonal, from the chains'
spread in doubling windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from pyrospatial.engine.batch import Batch
from pyrospatial.engine.posterior import site_plate

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
    sites it conditions on (values owned by another part).

    Blocks (one accept/reject each): the whole part (``per_cell`` and ``per_spot`` False);
    each cell (``per_cell``: cells independent, no spots); or each spot with its member
    cells, plus each cell outside every spot on its own (``per_spot``: spots independent
    given the conditioned global latents)."""

    label: str
    batch: Batch
    cells: torch.Tensor  # local indices of these cells in the full batch
    moving: list[_Site]
    per_cell: bool  # True: one accept/reject per cell (cells independent); False: per chain
    graph: bool = False  # the batch's edge and non-edge terms are part of the target
    per_spot: bool = False  # one accept/reject per spot (with its cells) and per outside cell
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # unconstrained (C, ...)
    conditioned: dict[str, torch.Tensor] = field(default_factory=dict)  # constrained (C, ...)
    # only the cells- and spots-plate terms of the model count (no prior or Jacobian of the
    # moving sites): one chunk of a target summed over chunks, whose first chunk counts those
    local_terms_only: bool = False
    # a piece of another part's target: which of that part's cells (its local rows) it holds
    rows: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.plates = {s.name: s.plate for s in self.moving}
        # what every density evaluation runs the model on: only the density is wanted, so a
        # model may skip its deterministic sites (Batch.density_only); made once per part
        self.density_batch = replace(self.batch, density_only=True) if isinstance(self.batch, Batch) else self.batch
        n, device = self.batch.n_cells, self.batch.device
        self.cell_block: torch.Tensor | None = None
        self.spot_block: torch.Tensor | None = None
        self._n_blocks = 1
        if self.per_cell:
            self.cell_block = torch.arange(n, device=device)
            self._n_blocks = n
        elif self.per_spot:
            m = self.batch.n_spots
            cell_spot = self.batch.cell_spot.long()
            outside = cell_spot < 0
            block = cell_spot.clone()
            block[outside] = m + torch.arange(int(outside.sum()), device=device)
            self.cell_block = block
            self.spot_block = torch.arange(m, device=device)
            self._n_blocks = m + int(outside.sum())

    @property
    def blocked(self) -> bool:
        return self.per_cell or self.per_spot

    @property
    def n_blocks(self) -> int:
        return self._n_blocks

    def block_sum(self, x: torch.Tensor, plate: str = "cells") -> torch.Tensor:
        """``(C, ...)`` -> ``(C, B)``: the sum per block. In a blocked part a term of the
        cells or spots plate goes to its rows' blocks (the row axis follows the chain);
        other terms are constant there (their latents are conditioned) and count zero."""
        C = x.shape[0]
        if not self.blocked:
            return x.reshape(C, -1).sum(-1, keepdim=True)
        index = self.cell_block if plate == "cells" else self.spot_block if plate == "spots" else None
        if index is None:
            return x.new_zeros(C, self.n_blocks)
        rows = x.reshape(C, index.numel(), -1).sum(-1)
        if self.per_cell:
            return rows
        return rows.new_zeros(C, self.n_blocks).index_add_(1, index, rows)

    def block_mask(self, mask: torch.Tensor, like: torch.Tensor, plate: str = "cells") -> torch.Tensor:
        """``(C, B)`` -> broadcastable to ``like (C, ...)`` (a value of ``plate``)."""
        if not self.blocked:
            return mask.reshape((mask.shape[0],) + (1,) * (like.dim() - 1))
        rows = mask if self.per_cell else mask[:, self.cell_block if plate == "cells" else self.spot_block]
        return rows.reshape(rows.shape + (1,) * (like.dim() - 2))


def _run_model(model: Callable, batch: Batch, values: dict[str, torch.Tensor], C: int):
    # no argument validation: a divergent leapfrog step may give non-finite values, which
    # give a non-finite density and are rejected
    with pyro.validation_enabled(False), poutine.trace() as tracer, pyro.plate("refine_chains", C, dim=_CHAIN_DIM):
        poutine.condition(model, data=values)(batch)
    return tracer.trace


def _log_density(model: Callable, part: _Part, state: dict[str, torch.Tensor], C: int) -> torch.Tensor:
    """``(C, B)`` log density of ``part`` at the unconstrained ``state`` (with Jacobians).

    Blocked parts keep only the cells- and spots-plate terms (the others do not depend on
    the latents moved); so does a ``local_terms_only`` part (another part counts the rest)."""
    values = dict(part.conditioned)
    total = torch.zeros(C, part.n_blocks, device=part.batch.device)
    for site in part.moving:
        u = state[site.name]
        x = site.transform(u)
        values[site.name] = x
        if part.local_terms_only:
            continue
        lj = site.transform.log_abs_det_jacobian(u, x)
        if lj.dim() > u.dim() - site.event_dim:  # element-wise Jacobian: sum the event dims
            lj = lj.reshape(lj.shape[: u.dim() - site.event_dim] + (-1,)).sum(-1)
        total = total + part.block_sum(lj, site.plate)
    trace = _run_model(model, part.density_batch, values, C)
    for name, node in trace.nodes.items():
        if node["type"] != "sample" or site_is_subsample(node) or node["infer"].get("_deterministic"):
            continue
        if name == "refine_chains":
            continue
        plate = site_plate(node)
        if (plate == "edge" and not part.graph) or (
            (part.blocked or part.local_terms_only) and plate not in ("cells", "spots")
        ):
            continue
        lp = node["fn"].log_prob(node["value"])
        scale = node["scale"]
        if not (isinstance(scale, (int, float)) and scale == 1.0):
            lp = lp * scale
        lp = lp.expand(torch.broadcast_shapes(lp.shape, (C, 1))) if lp.dim() >= 1 else lp.expand(C, 1)
        total = total + part.block_sum(lp, plate)
    return total


def _with_grad(model, part: _Part, state: dict[str, torch.Tensor], C: int):
    """Block log densities and their gradients w.r.t. the state."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in state.items()}
    with torch.enable_grad():
        lp = _log_density(model, part, leaves, C)
        grads = torch.autograd.grad(lp.sum(), list(leaves.values()), allow_unused=True)
    g = {k: (torch.nan_to_num(gr, nan=0.0, posinf=0.0, neginf=0.0) if gr is not None else torch.zeros_like(leaves[k]))
         for k, gr in zip(leaves, grads)}
    # a non-finite density is -inf, never a finite number: torch.nan_to_num's default turns -inf
    # into the lowest float (-3.4e38 in float32), which a proposal could then be accepted at
    # (with a uniform draw of exactly 0) and from which every other such proposal was accepted
    lp = torch.nan_to_num(lp.detach(), nan=-math.inf, posinf=-math.inf, neginf=-math.inf)
    return lp, g


# ------------------------------------------------------------------------------------------
# HMC with per-block accept/reject
# ------------------------------------------------------------------------------------------
#: floor of the eigenvalues of a dense per-row mass (a unit-Normal prior's precision is 1)
DENSE_MIN_PRECISION = 1.0


class _DualAveraging:
    """Nesterov dual averaging of the log step size (Hoffman & Gelman 2014)."""

    _log, _exp = staticmethod(math.log), staticmethod(math.exp)

    def __init__(self, step, target: float):
        self.target = float(target)
        self.reset(step)

    def reset(self, step) -> None:
        self.mu, self.log_avg, self.h, self.t = self._log(10.0 * step), self._log(step), 0.0, 0

    def update(self, accept):
        self.t += 1
        eta = 1.0 / (self.t + 10.0)
        self.h = (1.0 - eta) * self.h + eta * (self.target - accept)
        log_step = self.mu - math.sqrt(self.t) / 0.05 * self.h
        w = self.t**-0.75
        self.log_avg = w * log_step + (1.0 - w) * self.log_avg
        return self._exp(log_step)

    @property
    def final(self):
        return self._exp(self.log_avg)


class _BlockDualAveraging(_DualAveraging):
    """The same, of one log step size per block (tensors ``(B,)``, float64), from each block's
    acceptance rate averaged over the chains."""

    _log, _exp = staticmethod(torch.log), staticmethod(torch.exp)

    def reset(self, step: torch.Tensor) -> None:
        super().reset(step.detach().double())

    def update(self, accept: torch.Tensor) -> torch.Tensor:
        return super().update(accept.double())


class _HMC:
    """Vectorised HMC on one part: ``C`` chains, one accept per block.

    The mass is diagonal (the inverse mass is the variance over chains and warm-up
    iterations), except for the sites named in ``dense``: a state ``(C, R, K)`` (e.g. the RNA
    read-out, one row of ``K`` coefficients per gene) there gets one dense ``K x K`` inverse
    mass per row, the inverse of that row's block of the negative Hessian of the log density
    (averaged over chains, eigenvalues floored at :data:`DENSE_MIN_PRECISION`), computed at the
    start and at every mass update. Within a row the coefficients can be strongly correlated
    (e.g. read-out columns of features that move together), which a diagonal mass cannot
    undo; rows are nearly independent, so the cross-row blocks are left out.

    ``pieces``: the target is the sum of these parts' log densities at the one state of
    ``part`` (each piece moves the same sites and conditions on its own values, e.g. on the
    cells of one chunk of spots; all but one are ``local_terms_only``). They are evaluated one
    after the other and their gradients added, so memory holds one piece's graph at a time.
    Default: ``[part]``.

    ``block_steps``: in a blocked part, one step size per block, each adapted by dual averaging
    to its own acceptance rate (blocks are independent samplers, so each may take its own
    step: a spot whose counts pin its cells' sum and a lone cell held only by its proteins
    need step sizes that differ by far more than one shared step can serve). False: one step
    size for the part, adapted to the mean acceptance over blocks."""

    def __init__(self, model, part: _Part, C: int, num_steps: int, step_size: float, target_accept: float,
                 dense: tuple[str, ...] = (), pieces: list[_Part] | None = None, block_steps: bool = False):
        self.model, self.part, self.C, self.L = model, part, C, int(num_steps)
        self.pieces = list(pieces) if pieces is not None else [part]
        self.mass = {
            k: (v.var(0, keepdim=True) if C > 2 else torch.ones_like(v[:1])).clamp(min=1e-4)
            for k, v in part.state.items()
        }
        self.dense = tuple(k for k in dense if k in part.state and part.state[k].dim() == 3)
        self.dense_cov: dict[str, torch.Tensor] = {}  # (R, K, K) inverse mass per row
        self.dense_chol: dict[str, torch.Tensor] = {}  # (R, K, K) Cholesky factor of the mass
        self.block_steps = bool(block_steps) and part.blocked
        if self.block_steps:
            self.step: float | torch.Tensor = torch.full((part.n_blocks,), float(step_size), dtype=torch.float64,
                                                         device=part.batch.device)
            self.dual: _DualAveraging | _BlockDualAveraging = _BlockDualAveraging(self.step, target_accept)
        else:
            self.step = float(step_size)
            self.dual = _DualAveraging(self.step, target_accept)
        # running sums over the current window's iterations and chains (float64): memory of
        # one state, however long the window
        self.window_n = 0
        self.window_sum: dict[str, torch.Tensor] = {}
        self.window_sumsq: dict[str, torch.Tensor] = {}
        self.accept_history: list[float] = []
        self._update_dense()
        self.refresh()

    def _update_dense(self) -> None:
        """Per-row dense mass of the ``dense`` sites from the Hessian's diagonal blocks: one
        Hessian-vector product per column ``k``, the probe being a random sign at column ``k``
        of every row (independent per chain), so each row receives its own block's column
        plus cross-row terms of random sign that cancel on average over the chains."""
        if not self.dense:
            return
        # random signs per (chain, row): the cross-row terms (e.g. through a softmax over genes,
        # large in the all-rows direction) cancel on average; the row's own block keeps
        signs = {}
        for name in self.dense:
            x = self.part.state[name]
            signs[name] = torch.randint(0, 2, x.shape[:-1] + (1,), device=x.device).to(x.dtype) * 2.0 - 1.0
        hessians: dict[str, torch.Tensor] = {}
        for piece in self.pieces:  # one piece's graph at a time; the Hessian is their sum
            leaves = {k: v.detach().requires_grad_(True) for k, v in self.part.state.items()}
            with torch.enable_grad():
                lp = _log_density(self.model, piece, leaves, self.C).sum()
                for name in self.dense:
                    x = leaves[name]
                    (grad,) = torch.autograd.grad(lp, x, create_graph=True)
                    columns = []
                    for k in range(x.shape[-1]):
                        probe = torch.zeros_like(x)
                        probe[..., k] = 1.0
                        (hv,) = torch.autograd.grad((grad * probe * signs[name]).sum(), x, retain_graph=True)
                        columns.append((hv * signs[name]).detach())
                    block = torch.stack(columns, -1).mean(0)  # (R, K, K), averaged over chains
                    hessians[name] = block if name not in hessians else hessians[name] + block
        for name, hessian in hessians.items():
            precision = -0.5 * (hessian + hessian.transpose(-1, -2))
            precision = torch.nan_to_num(precision, nan=0.0, posinf=0.0, neginf=0.0)
            values, vectors = torch.linalg.eigh(precision)
            values = values.clamp(min=DENSE_MIN_PRECISION)
            self.dense_cov[name] = (vectors / values.unsqueeze(-2)) @ vectors.transpose(-1, -2)
            self.dense_chol[name] = vectors * values.sqrt().unsqueeze(-2)  # L L^T = precision

    def _evaluate(self, state: dict[str, torch.Tensor]):
        """Log density and gradient at ``state``: the sum over the pieces."""
        lp, grad = _with_grad(self.model, self.pieces[0], state, self.C)
        for piece in self.pieces[1:]:
            lp_piece, grad_piece = _with_grad(self.model, piece, state, self.C)
            lp = lp + lp_piece
            grad = {k: grad[k] + grad_piece[k] for k in grad}
        return lp, grad

    def refresh(self) -> None:
        """Recompute the cached density and gradient (after the target changed)."""
        self.lp, self.grad = self._evaluate(self.part.state)

    def kinetic(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.part.block_sum(self._half_p_minv_p(k, p[k]), self.part.plates[k]) for k in p)

    def _half_p_minv_p(self, name: str, p: torch.Tensor) -> torch.Tensor:
        if name in self.dense_cov:
            return 0.5 * torch.einsum("crk,rkl,crl->cr", p, self.dense_cov[name], p)
        return 0.5 * p**2 * self.mass[name]

    def _momentum(self, name: str, like: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(like)
        if name in self.dense_chol:
            return torch.einsum("rkl,crl->crk", self.dense_chol[name], noise)
        return noise / self.mass[name].sqrt()

    def _velocity(self, name: str, p: torch.Tensor) -> torch.Tensor:
        if name in self.dense_cov:
            return torch.einsum("rkl,crl->crk", self.dense_cov[name], p)
        return self.mass[name] * p

    def mean_step(self) -> float:
        """The step size (the mean over blocks with ``block_steps``)."""
        return float(self.step.mean()) if isinstance(self.step, torch.Tensor) else self.step

    def _site_steps(self, jitter: float, x: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The step size of every coordinate of each site: a number, or with ``block_steps``
        each row's block's step, broadcastable to the site's ``(C, ...)`` state."""
        if not self.block_steps:
            return {k: self.step * jitter for k in x}
        per_block = (self.step * jitter).to(next(iter(x.values())).dtype).expand(self.C, -1)
        return {k: self.part.block_mask(per_block, v, self.part.plates[k]) for k, v in x.items()}

    def transition(self) -> float:
        part, C = self.part, self.C
        # jittered step size: trajectory lengths vary, so no direction is stuck at a multiple
        # of its period (a Gaussian direction with unit scale has period 2 pi)
        x = dict(part.state)
        step = self._site_steps(float(torch.empty(()).uniform_(0.5, 1.5)), x)
        p = {k: self._momentum(k, v) for k, v in x.items()}
        k0 = self.kinetic(p)
        g = self.grad
        p = {k: p[k] + 0.5 * step[k] * g[k] for k in p}
        lp_new = self.lp
        for leap in range(self.L):
            x = {k: x[k] + step[k] * self._velocity(k, p[k]) for k in x}
            lp_new, g = self._evaluate(x)
            if leap < self.L - 1:
                p = {k: p[k] + step[k] * g[k] for k in p}
        p = {k: p[k] + 0.5 * step[k] * g[k] for k in p}
        log_ratio = lp_new - self.kinetic(p) - self.lp + k0
        log_ratio = torch.nan_to_num(log_ratio, nan=-math.inf, posinf=-math.inf, neginf=-math.inf)
        # a proposal of density -inf is never accepted, even with a uniform draw of exactly 0
        accept = (torch.log(torch.rand_like(log_ratio)) < log_ratio) & torch.isfinite(lp_new)  # (C, B)
        for k in part.state:
            mask = part.block_mask(accept, x[k], part.plates[k])
            part.state[k] = torch.where(mask, x[k].detach(), part.state[k])
            self.grad[k] = torch.where(mask, g[k], self.grad[k])
        self.lp = torch.where(accept, lp_new, self.lp)
        rates = torch.clamp(log_ratio, max=0.0).exp()  # (C, B)
        self.block_rates = rates.mean(0)  # each block's acceptance rate, averaged over the chains
        rate = float(rates.mean())
        self.accept_history.append(rate)
        return rate

    # -- warm-up adaptation ---------------------------------------------------------------
    def adapt(self, rate: float) -> None:
        self.step = self.dual.update(self.block_rates if self.block_steps else rate)
        for k, v in self.part.state.items():
            v = v.detach().double()
            if k not in self.window_sum:
                self.window_sum[k] = torch.zeros_like(v[:1])
                self.window_sumsq[k] = torch.zeros_like(v[:1])
            self.window_sum[k] += v.sum(0, keepdim=True)
            self.window_sumsq[k] += (v * v).sum(0, keepdim=True)
        self.window_n += self.C

    def update_mass(self) -> None:
        """Diagonal mass = variance over chains and the window's iterations (regularised)."""
        n = self.window_n
        if n < 2:
            return
        for k in self.part.state:
            mean = self.window_sum[k] / n
            var = ((self.window_sumsq[k] - n * mean * mean) / (n - 1)).clamp(min=0.0)
            var = var.to(self.part.state[k].dtype)
            self.mass[k] = ((n / (n + 5.0)) * var + 1e-3 * (5.0 / (n + 5.0))).clamp(min=1e-6)
        self.window_n, self.window_sum, self.window_sumsq = 0, {}, {}
        self._update_dense()
        self.dual.reset(self.step)
        self.refresh()

    def finish_warmup(self) -> None:
        self.step = self.dual.final

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the next transitions depend on: the part's state, the cached density and
        gradient, the mass, the step size and its dual averaging, the open warm-up window, the
        acceptance history (tensors, numbers and dicts only: loadable with ``weights_only``)."""
        return {
            "part_state": dict(self.part.state), "lp": self.lp, "grad": dict(self.grad), "mass": dict(self.mass),
            "dense_cov": dict(self.dense_cov), "dense_chol": dict(self.dense_chol), "step": self.step,
            "dual": {"target": self.dual.target, "mu": self.dual.mu, "log_avg": self.dual.log_avg,
                     "h": self.dual.h, "t": self.dual.t},
            "window_n": self.window_n, "window_sum": dict(self.window_sum), "window_sumsq": dict(self.window_sumsq),
            "accept_history": torch.tensor(self.accept_history, dtype=torch.float64),
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (of a kernel built on the same part and settings)."""
        device = self.part.batch.device
        on = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        self.part.state.update(on(saved["part_state"]))
        self.lp, self.grad = saved["lp"].to(device), on(saved["grad"])
        self.mass, self.dense_cov, self.dense_chol = on(saved["mass"]), on(saved["dense_cov"]), on(saved["dense_chol"])
        self.step = saved["step"].to(device) if isinstance(saved["step"], torch.Tensor) else float(saved["step"])
        for key, value in saved["dual"].items():
            setattr(self.dual, key, value.to(device) if isinstance(value, torch.Tensor) else value)
        self.window_n = int(saved["window_n"])
        self.window_sum, self.window_sumsq = on(saved["window_sum"]), on(saved["window_sumsq"])
        self.accept_history = [float(a) for a in saved["accept_history"]]


def _mass_windows(num_warmup: int, step_window: int | None = None) -> set[int]:
    """Iterations after which the mass matrix is re-estimated (doubling windows).

    ``step_window``: warm-up iterations after the last mass update, in which only the step size
    adapts (its dual averaging restarts at every update). None: the last update is at 90% of
    the warm-up (4 iterations of a 40-iteration warm-up)."""
    if num_warmup < 20:
        return set()
    last = int(0.9 * num_warmup) if step_window is None else num_warmup - int(step_window)
    ends, width = set(), max(10, num_warmup // 10)
    end = width
    while end + 2 * width <= num_warmup:
        ends.add(end)
        width *= 2
        end += width
    ends.add(last)
    return {e for e in ends if 0 < e <= last}
