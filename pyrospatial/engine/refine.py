"""Refine an amortised posterior by MCMC: calibrated per-cell uncertainty for spot models.

:func:`refine_posterior` starts ``C`` chains from guide draws and runs Hamiltonian Monte Carlo
on the model's own joint density ``log p(x, theta)`` (latents in their unconstrained space,
with the log-Jacobian), so the draws follow the model's posterior where a mean-field guide is
over-confident (coupled latents, e.g. the cells of one spot).

The target splits into independent parts when the graph is left out: the *spot part* (cells
inside spots, the spots' latents and the global latents; one accept/reject per chain) and
the *outside part* (each cell outside every spot on its own; one accept/reject per cell).
With ``graph=True`` every latent forms one part, with the edge and non-edge terms. Chains are
a leading batch dimension (an outer plate at ``dim=-2``); the step size is adapted by dual
averaging, a diagonal mass matrix in doubling windows. During warm-up, the model's
``contract.em_parameters`` (:class:`~pyrospatial.protocols.ModelContract`) are re-estimated
by stochastic-approximation Monte Carlo EM: one Adam step on
``mean_chains log p(x, theta_c; phi)`` after each transition (Fisher's identity), in place.
Latents in ``contract.graph_sites`` are held at the guide's draws when the graph is left out;
``contract.noncentred`` sites are sampled in coordinates ``(x - loc) / scale``.

The reasons, measurements and benchmark figures behind these choices (EM as early stopping,
the read-out scales kept, ``thin=20``, the cost of ``graph=True``) are in ``docs/refine.md``.

Example
-------
>>> fit(model, guide, dataset, max_epochs=400, lr=0.01)                 # doctest: +SKIP
>>> draws = refine_posterior(model, guide, dataset, num_samples=100)     # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from operator import attrgetter
from typing import Callable, Iterable

import numpy as np
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import biject_to
from pyro.poutine.util import site_is_subsample
from tqdm.auto import tqdm

from pyrospatial.criticism.convergence import convergence_detail
from pyrospatial.engine.batch import Batch
from pyrospatial.engine.device import module_device
from pyrospatial.engine.hmc import _HMC, _log_density, _mass_windows, _Part, _run_model, _Site, _sub_batch
from pyrospatial.engine.posterior import PosteriorSamples, _EvalMode, _repeated_draws, site_plate
from pyrospatial.engine.reparam import decentred_value, noncentre
from pyrospatial.errors import InputError
from pyrospatial.protocols import contract_of

__all__ = ["refine_posterior"]


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


def _guide_starts(model, guide, full, noncentred: Iterable[str], C: int):
    """The sampled model (``noncentred`` sites in non-centred coordinates), its renamed sites,
    its latent sites and ``C`` guide draws of each as starting states (one per chain),
    evaluated on the full batch (graph included, as trained; the guide's encoding computed once,
    :func:`~pyrospatial.engine.posterior._repeated_draws`)."""
    with torch.no_grad(), _repeated_draws(guide):
        guide_trace = poutine.trace(guide).get_trace(full)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(full)
        sampled, renamed = noncentre(model, model_trace, noncentred)
        site_list = _latent_sites(sampled, guide, full, renamed)
        originals = {new: old for old, new in renamed.items()}
        inits: dict[str, list[torch.Tensor]] = {s.name: [] for s in site_list}
        for _ in range(C):
            guide_trace = poutine.trace(guide).get_trace(full)
            if renamed:
                model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(full)
            for s in site_list:
                if s.name in originals:
                    node = model_trace.nodes[originals[s.name]]
                    inits[s.name].append(decentred_value(node["fn"], node["value"]).detach())
                else:
                    inits[s.name].append(guide_trace.nodes[s.name]["value"].detach())
    return sampled, renamed, site_list, inits


def _rows(value: torch.Tensor, site: _Site, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of a single-draw cells-plate value (the plate axis is left of the event)."""
    return value.index_select(value.dim() - site.event_dim - 1, index)


def _parts(dataset, full, site_list: list[_Site], moving: list[_Site], graph: bool, max_nonedges: int,
           device: torch.device) -> list[_Part]:
    """The independent parts of the target: one joint part with the graph (or for a batch
    type other than :class:`Batch`), else the spot part and the per-cell outside part."""
    every_cell = torch.arange(full.n_cells, device=device)
    if graph:
        n_edges = int(getattr(dataset, "n_edges", 0))
        if n_edges == 0:
            raise InputError("graph=True needs a cell graph: the dataset has no edges (see SpatialDataset.with_edges).")
        n_pairs = full.n_cells * (full.n_cells - 1) // 2 - n_edges
        # full_batch samples nonedge_ratio non-edges per edge: ask for min(all, max_nonedges)
        graph_batch = dataset.full_batch(nonedge_ratio=min(n_pairs, max(1, int(max_nonedges))) / n_edges).to(device)
        return [_Part("all", graph_batch, every_cell, list(moving), per_cell=False, graph=True)]
    if not isinstance(full, Batch):
        return [_Part("all", full, every_cell, list(moving), per_cell=False)]
    inside = torch.nonzero(full.cell_spot >= 0).squeeze(-1)
    outside = torch.nonzero(full.cell_spot < 0).squeeze(-1)
    parts: list[_Part] = []
    if full.n_spots > 0 and inside.numel() > 0:
        parts.append(_Part("spots", _sub_batch(full, inside, True), inside, list(moving), per_cell=False))
    if outside.numel() > 0 or not parts:
        cell_sites = [s for s in site_list if s.plate == "cells"]
        parts.append(_Part("outside", _sub_batch(full, outside, False), outside, cell_sites, per_cell=True))
    return parts


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
    noncentred: Iterable[str] | None = None,
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
        A trained model/guide pair following the batch protocol, with all model plates at
        ``dim=-1``; the model's ``contract`` (:class:`~pyrospatial.protocols.ModelContract`)
        gives the defaults below (none without one).
    dataset
        The data source it was trained on (:class:`~pyrospatial.protocols.DataSource`),
        evaluated as one batch (``num_chains`` x its tensors must fit in memory). A
        :class:`~pyrospatial.engine.batch.Batch` is split into the spot and outside parts;
        any other batch type is one joint part.
    num_samples
        Draws returned: ``num_chains`` chains x ``ceil(num_samples / num_chains)`` kept
        states (truncated to ``num_samples``).
    sites
        Sites to return (default: every latent site, and every deterministic site of the
        cells/spots plates).
    num_chains, num_warmup, thin
        Parallel chains; warm-up transitions (adaptation and EM); transitions between kept
        states.
    num_steps, step_size, target_accept
        Leapfrog steps per transition; initial step size; warm-up acceptance target.
    em_params
        Names of model parameters re-estimated by Monte Carlo EM during warm-up (updated in
        place). None (default): those of ``contract.em_parameters`` that the model has;
        ``()``: none.
    em_lr
        Adam learning rate of the EM steps.
    refine_outside
        Also refine the cells outside every spot (each one independently, given the refined
        global latents). False keeps the guide's initial draws for their own latents.
    noncentred
        Normal / LogNormal latent sites sampled in non-centred coordinates (None: the
        contract's ``noncentred``, e.g. a weakly identified size factor whose spread is
        re-estimated by EM). Their values are returned as usual.
    graph
        Condition on the cell graph too (see the module docstring): one joint part with every
        cell and the edge likelihood; the default ``em_params`` then also include
        ``contract.graph_em_parameters``. ``refine_outside`` does not apply.
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
    device = torch.device(device) if device is not None else module_device(model, guide)
    contract = contract_of(model)
    if noncentred is None:
        noncentred = contract.noncentred if contract is not None else ()
    C, S = int(num_chains), int(num_samples)
    num_warmup, thin = int(num_warmup), int(thin)
    per_chain = int(math.ceil(S / C))
    full = dataset.full_batch().to(device)
    torch.manual_seed(int(seed))

    with _EvalMode(model, guide):
        # sites and initial states: C guide draws on the full batch (graph included, as trained)
        base_model = model
        model, renamed, site_list, inits = _guide_starts(base_model, guide, full, noncentred, C)
        # latents that enter only the graph terms (e.g. a Bayesian edge decoder): without the
        # graph in the target they would drift to their prior, so they keep the guide's draws
        graph_only = set(contract.graph_sites) if contract is not None else set()
        held = [] if graph else [s for s in site_list if s.name in graph_only]
        moving = [s for s in site_list if s not in held]
        parts = _parts(dataset, full, site_list, moving, graph, max_nonedges, device)
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
            defaults = () if contract is None else contract.em_parameters + (contract.graph_em_parameters if graph else ())
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
    checks = {name: convergence_detail(value, C) for name, value in out.items()}
    for key in ("rhat_max", "ess_bulk_min", "rhat_above"):
        out.diagnostics[key] = {name: detail[key] for name, detail in checks.items()}
    out.diagnostics["seconds"] = time.perf_counter() - t_start
    return out


def _assemble(model, parts: list[_Part], kept, site_list: list[_Site], sites, dataset, C: int, S: int,
              also: set[str] = frozenset(), out: PosteriorSamples | None = None) -> PosteriorSamples:
    """Recompute deterministic sites at the kept states; lay draws out like sample_posterior.
    ``also``: sites recorded although the (non-centred) model marks them observed; ``out``:
    draws to fill in (the parts' rows), e.g. from other chunks."""
    keep = None if sites is None else set([sites] if isinstance(sites, str) else sites)
    hidden = {s.name for s in site_list if s.name.endswith("_decentered")}
    totals = {"cells": int(dataset.n_cells), "spots": int(dataset.n_spots)}
    latent = {s.name: s for s in site_list}
    out = PosteriorSamples() if out is None else out
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
