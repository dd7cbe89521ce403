"""Local posterior: HMC per spot, all spots at once, the global latents sampled in turn.

:func:`local_posterior` is the default calibrated posterior of spot models (CORAL). Given the
global latents (e.g. the RNA read-out weights) the spots are conditionally independent: the
cells of one spot share that spot's counts and nothing else, and a cell outside every spot
depends on nothing but its own data. So the sampler runs HMC on *blocks*, one per spot (its
cells' latents and its own) and one per cell outside every spot, each with its own
accept/reject and its own step size (a spot whose counts pin its cells' sum needs far
smaller steps than a lone cell), vectorised over every block and
every chain at once (:class:`pyrospatial.engine.hmc._Part` with ``per_spot``). The cost of
one iteration is linear in cells; the whole run costs about the SVI fit on the 3,000-cell demo
tissue and 8-14x a fit stopped early on minibatches at 10k-100k cells (``benchmarks/scaling.py``,
``docs/posterior.md``).

What it corrects is what a mean-field guide gets wrong: the coupling of the cells that share
a spot's counts (their per-cell RNA and sizes), the spread of the global read-out, and the
variance-type parameters (``contract.em_parameters``: re-estimated by Monte Carlo EM during
warm-up).

The global latents are sampled in turn (Gibbs): after the spots' step, one HMC step on the
globals given every cell (a dense per-gene mass for the read-out), then the spots again.
Latents that only the cell graph informs (``contract.graph_sites``, e.g. a Bayesian edge
decoder) keep their guide draws: the graph is not part of this target, so sampled they would
drift to their prior. With ``sample_globals=False`` every chain keeps one guide draw of the
global latents instead.

Large tissues are sampled in chunks of spots (``max_cells_per_chunk``), so memory is bounded
by the chunk's autograd graph, never by the tissue's: every chunk runs in the same sweep, each
with its own step size and mass, and the globals' step sums the log density and its gradient
chunk by chunk (the globals' prior counted once), so the target is the whole tissue's
(``tests/test_chunked_globals.py``, ``benchmarks/results/chunked_readout.md``). Only the
chunks' states (chains x cells x latent size) are held at once. With the globals held
(``sample_globals=False``) the chunks run one after the other.

Example
-------
>>> fit(model, guide, dataset, max_epochs=400, lr=0.01)                 # doctest: +SKIP
>>> draws = local_posterior(model, guide, dataset, num_samples=100)      # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from operator import attrgetter

import numpy as np
import torch
from tqdm.auto import tqdm

from pyrospatial.criticism.convergence import convergence_detail, unconverged_sites
from pyrospatial.engine.batch import Batch
from pyrospatial.engine.device import module_device
from pyrospatial.engine.hmc import _HMC, _log_density, _mass_windows, _Part, _Site, _sub_batch
from pyrospatial.engine.local_checkpoint import SamplerCheckpoint, parameter_fingerprint
from pyrospatial.engine.posterior import PosteriorSamples, _EvalMode
from pyrospatial.engine.refine import _assemble, _em_parameters, _guide_starts, _rows
from pyrospatial.errors import InputError
from pyrospatial.protocols import contract_of

__all__ = ["CHUNK_CELLS_CPU", "CHUNK_CELLS_GPU", "local_posterior", "spot_chunks"]

#: Default cells per chunk on a CPU. Smaller chunks cost less CPU, not more: on 5,000
#: simulated cells one chunk took 169 CPU s, chunks of 2,500 cells 106 s and of 1,000 cells
#: 104 s for the same draws (tensors that fit the caches), at the same coverage; at 30k cells
#: 12 chunks took 2058 CPU s and 1.8 GB against 3127 s and 3.7 GB in two
#: (``benchmarks/results/chunk_size.md``, ``benchmarks/results/scaling*.json``).
CHUNK_CELLS_CPU = 2_500
#: Default cells per chunk on a GPU, where larger tensors keep the device busy (bounded by
#: the device's memory; not yet measured).
CHUNK_CELLS_GPU = 20_000


def spot_chunks(cell_spot: np.ndarray, n_spots: int, max_cells: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(cells, spots)`` index pairs in chunks of whole spots (a spot's cells never split),
    each chunk holding at most about ``max_cells`` cells; spots are interleaved (chunks alike
    in space) and the cells outside every spot spread over the chunks."""
    cell_spot = np.asarray(cell_spot)
    n_cells = cell_spot.size
    n_chunks = max(1, min(max(n_spots, 1), math.ceil(n_cells / max(1, int(max_cells)))))
    spot_chunk = np.arange(n_spots) % n_chunks
    chunk_of_cell = np.empty(n_cells, dtype=np.int64)
    inside = cell_spot >= 0
    chunk_of_cell[inside] = spot_chunk[cell_spot[inside]]
    chunk_of_cell[~inside] = np.arange(int((~inside).sum())) % n_chunks
    return [(np.flatnonzero(chunk_of_cell == c), np.flatnonzero(spot_chunk == c)) for c in range(n_chunks)]


def _chunk_batch(full: Batch, cells: torch.Tensor, spots: torch.Tensor) -> Batch:
    """The sub-batch of ``cells`` and ``spots`` (rows of ``full``; every member cell of these
    spots among ``cells``), spots renumbered 0..m-1, no graph."""
    if spots.numel() == full.n_spots:
        return _sub_batch(full, cells, True)
    remap = torch.full((full.n_spots,), -1, dtype=torch.long, device=full.device)
    remap[spots] = torch.arange(spots.numel(), device=full.device)
    cell_spot = torch.where(full.cell_spot >= 0, remap[full.cell_spot.clamp(min=0)], full.cell_spot)
    sub_full = replace(
        full, cell_spot=cell_spot, spot_index=full.spot_index[spots], spot_counts=full.spot_counts[spots],
        spot_library=full.spot_library[spots],
    )
    return _sub_batch(sub_full, cells, True)


def _chunk_part(full: Batch, chunk: tuple[np.ndarray, np.ndarray], moving: list[_Site], held: list[_Site],
                inits: dict[str, list[torch.Tensor]], C: int, device: torch.device) -> _Part:
    """The per-spot part of one chunk ``(cells, spots)``: its cells' and spots' latents moved,
    started at the chains' guide draws; the global latents conditioned on them."""
    cells = torch.as_tensor(chunk[0], device=device)
    spot_rows = torch.as_tensor(chunk[1], device=device)
    part = _Part("local", _chunk_batch(full, cells, spot_rows), cells, moving, per_cell=False, per_spot=True)
    for s in moving:
        rows = [_rows(v, s, cells if s.plate == "cells" else spot_rows) for v in inits[s.name]]
        part.state[s.name] = torch.stack([s.transform.inv(v) for v in rows]).detach()
    for s in held:  # one guide draw per chain (fixed unless sampled in turn)
        part.conditioned[s.name] = torch.stack(inits[s.name]).reshape(s.chain_shape(C))
    return part


def _global_pieces(parts: list[_Part], sampled: list[_Site]) -> list[_Part]:
    """The target of the global latents ``sampled`` given the cells of every chunk in
    ``parts``, one piece per chunk (the globals' prior and Jacobian counted by the first only),
    sharing one state started at the chains' guide draws. A piece holds its chunk's spots and
    their member cells only (``_Part.rows``): the cells outside every spot share no term with
    the globals, so their terms are constant in this step and are left out (most cells of a
    tissue lie between spots). The sampled globals leave the chunks' conditioned values (the
    sweep hands them over); the other held globals stay there and are conditioned in the
    pieces too."""
    pieces = []
    for i, part in enumerate(parts):
        members = part.batch.spot_members[0]
        if members.numel() == 0:  # no spots in this chunk: keep its cells (a target needs rows)
            members = torch.arange(part.batch.n_cells, device=part.batch.device)
        piece = _Part("globals", _sub_batch(part.batch, members, True), part.cells[members], sampled,
                      per_cell=False, local_terms_only=i > 0, rows=members)
        pieces.append(piece)
    for s in sampled:
        pieces[0].state[s.name] = s.transform.inv(parts[0].conditioned[s.name])
    for piece in pieces[1:]:
        piece.state = pieces[0].state
    for part, piece in zip(parts, pieces):
        for s in sampled:
            part.conditioned.pop(s.name)
        piece.conditioned.update(part.conditioned)  # held global latents (the cells come by _hand_over)
    return pieces


def _hand_over(source: _Part, target: _Part) -> None:
    """Condition ``target`` on ``source``'s current values (constrained) of the sites it moves;
    a piece holding some of the source's cells (``target.rows``) gets those cells' rows."""
    for site in source.moving:
        value = site.transform(source.state[site.name]).detach()
        if target.rows is not None and site.plate == "cells":
            value = value[:, target.rows]
        target.conditioned[site.name] = value


def local_posterior(
    model: Callable,
    guide: Callable,
    dataset,
    num_samples: int = 100,
    *,
    sites: Iterable[str] | None = None,
    num_chains: int = 4,
    num_warmup: int = 40,
    thin: int = 1,
    num_steps: int = 6,
    step_size: float = 0.05,
    target_accept: float = 0.7,
    em_params: Iterable[str] | None = None,
    em_lr: float = 0.02,
    noncentred: Iterable[str] | None = None,
    max_cells_per_chunk: int | None = None,
    sample_globals: bool = True,
    dense_globals: bool = True,
    block_steps: bool = True,
    step_window: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = False,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every_s: float = 300.0,
) -> PosteriorSamples:
    """Posterior draws by per-spot HMC started from the guide (see the module docstring).

    Parameters
    ----------
    model, guide
        A trained model/guide pair following the batch protocol (a
        :class:`~pyrospatial.engine.batch.Batch` with spots), all model plates at ``dim=-1``;
        the model's ``contract`` gives the EM and non-centred defaults.
    dataset
        The data source it was trained on (its ``full_batch()``; chunks of it are evaluated).
    num_samples
        Draws returned: ``num_chains`` chains x ``ceil(num_samples / num_chains)`` kept states.
    sites
        Sites to return (default: every latent and deterministic site of the cells and spots
        plates, and the global latents as held).
    num_chains, num_warmup, thin, num_steps, step_size, target_accept
        HMC settings: chains (each with its own draw of the global latents), warm-up
        iterations (step size by dual averaging, diagonal mass in doubling windows, EM),
        iterations between kept states, leapfrog steps per iteration, initial step size, the
        mean acceptance rate the step size is adapted to. The default budget, 4 chains x (40
        warm-up + 25 kept) iterations for 100 draws, costs half of the former 10 chains with
        thin 3 at expected-RNA coverage 0.007-0.011 lower on the tuning tissues
        (``benchmarks/results/sampler_budget.md``, ``docs/posterior.md``).
    dense_globals
        Give the global latents' HMC step a dense ``K x K`` mass per row of a ``(rows, K)``
        site (each gene's read-out), from the Hessian's diagonal blocks
        (:class:`pyrospatial.engine.hmc._HMC`); False: the diagonal mass of the other sites.
        With it the read-out's chains mix (``benchmarks/results/readout_mixing.md``).
    block_steps
        One step size per block (spot with its cells, or lone cell), each adapted to its own
        acceptance rate (default; :class:`pyrospatial.engine.hmc._HMC`). False: one step size
        per chunk, adapted to the blocks' mean acceptance, which the many lone cells dominate
        while the spots reject most proposals.
    step_window
        Warm-up iterations after the last mass update in which only the step sizes adapt (the
        dual averaging restarts at every mass update). None (default): a quarter of the
        warm-up (10 of the default 40 iterations). The defaults were chosen on the tuning
        tissues of ``benchmarks/results/block_step_sizes.md``: split-R-hat of the cells'
        latents 1.3-1.6 where the former defaults (``block_steps=False, step_window=4``) left
        7-76, at the same cost (``docs/posterior.md``).
    em_params, em_lr
        Model parameters re-estimated by Monte Carlo EM during the first chunk's warm-up
        (None: the contract's ``em_parameters``; ``()``: none) and the Adam learning rate.
    noncentred
        Sites sampled in non-centred coordinates (None: the contract's ``noncentred``).
    max_cells_per_chunk
        Cells evaluated at once (whole spots): bounds the autograd memory at about
        ``num_chains`` x this x the model's per-cell tensors. None: :data:`CHUNK_CELLS_CPU`
        on a CPU, :data:`CHUNK_CELLS_GPU` on a GPU.
    sample_globals
        Sample the global latents in turn (default); False: each chain keeps its guide draw.
    seed, device, progress
        Seed of the initial guide draws and of the chains; where to compute (default: the
        parameters' device); a progress bar.
    checkpoint, resume, checkpoint_every_s
        A file the sampler's whole state is written to (atomically) every
        ``checkpoint_every_s`` seconds of wall time and after the last iteration; with
        ``resume``, a run continues from that file when it exists (else starts afresh), and
        ends with the draws of an uninterrupted run (bit for bit on a CPU). The file must come
        from the same data, trained parameters and settings
        (:mod:`pyrospatial.engine.local_checkpoint`). Needs ``sample_globals=True``.

    Returns
    -------
    PosteriorSamples
        Draws laid out as :func:`~pyrospatial.engine.posterior.sample_posterior` (``.plates``)
        with ``.diagnostics``: acceptance, step size, EM traces, seconds, chunks, and per
        returned site ``rhat_max`` and ``ess_bulk_min`` (ArviZ, over the chains' kept draws).
    """
    if int(num_samples) < 1 or int(num_chains) < 1:
        raise InputError(f"num_samples and num_chains must be >= 1, got {num_samples}, {num_chains}.")
    if max_cells_per_chunk is not None and int(max_cells_per_chunk) < 1:
        raise InputError(f"max_cells_per_chunk must be >= 1 (or None for the default), got {max_cells_per_chunk}.")
    if int(num_warmup) < 0 or int(thin) < 1 or int(num_steps) < 1:
        raise InputError("num_warmup must be >= 0, and thin and num_steps >= 1.")
    if step_window is None:
        step_window = max(1, int(num_warmup) // 4)
    elif not 1 <= int(step_window) < int(num_warmup):
        raise InputError(f"step_window must be None or between 1 and num_warmup - 1 ({int(num_warmup) - 1}), "
                         f"got {step_window!r}.")
    step_window = int(step_window)
    if resume and checkpoint is None:
        raise InputError("resume=True needs checkpoint=PATH (the file a killed run wrote).")
    if checkpoint is not None and not sample_globals:
        raise InputError("checkpoint needs sample_globals=True (the default): with the globals held, chunks run "
                         "one after the other and are not checkpointed.")
    t_start = time.perf_counter()
    device = torch.device(device) if device is not None else module_device(model, guide)
    if max_cells_per_chunk is None:
        max_cells_per_chunk = CHUNK_CELLS_CPU if device.type == "cpu" else CHUNK_CELLS_GPU
    contract = contract_of(model)
    if noncentred is None:
        noncentred = contract.noncentred if contract is not None else ()
    C, S = int(num_chains), int(num_samples)
    per_chain = math.ceil(S / C)
    full = dataset.full_batch().to(device)
    if not isinstance(full, Batch):
        raise InputError("local_posterior needs a spot model's Batch (cells, spots); use refine_posterior "
                         "for other data sources.")
    torch.manual_seed(int(seed))
    keep = None if sites is None else ({sites} if isinstance(sites, str) else set(sites))

    fingerprint = parameter_fingerprint(model, guide) if checkpoint is not None else None  # before any EM step
    with _EvalMode(model, guide):
        base_model = model
        model, renamed, site_list, inits = _guide_starts(base_model, guide, full, noncentred, C)
        moving = [s for s in site_list if s.plate in ("cells", "spots")]
        held = [s for s in site_list if s.plate not in ("cells", "spots")]
        # latents that enter only the graph terms (e.g. a Bayesian edge decoder): the graph is
        # left out here, so sampled they would drift to their prior; they keep the guide's draws
        graph_only = set(contract.graph_sites) if contract is not None else set()
        sampled = [s for s in held if s.name not in graph_only] if sample_globals else []
        sampled_names = {s.name for s in sampled}
        if em_params is None:
            present = {name.removesuffix("_unconstrained") for name, _ in base_model.named_parameters()}
            em_params = [n for n in (contract.em_parameters if contract is not None else ()) if n in present]
        em = _em_parameters(base_model, em_params)
        em_trace: dict[str, list[float]] = {name: [] for name, _ in em}

        chunks = spot_chunks(full.cell_spot.cpu().numpy(), full.n_spots, max_cells_per_chunk)
        sampled_globals = bool(sampled)
        # with the global latents sampled, every chunk runs in the same Gibbs sweep (the globals'
        # step sums the density over the chunks); with them held, chunks run one after the other
        groups = [list(range(len(chunks)))] if sampled_globals else [[c] for c in range(len(chunks))]
        saver, saved = None, None
        if checkpoint is not None:
            if len(groups) != 1:
                raise InputError("checkpoint: this model has no global latents to sample, so its chunks run one "
                                 "after the other and are not checkpointed; pass max_cells_per_chunk >= the "
                                 f"number of cells ({full.n_cells}) or no checkpoint.")
            identity = {
                "num_samples": S, "num_chains": C, "num_warmup": int(num_warmup), "thin": int(thin),
                "num_steps": int(num_steps), "step_size": float(step_size), "target_accept": float(target_accept),
                "em_params": [name for name, _ in em], "em_lr": float(em_lr), "noncentred": sorted(noncentred),
                "dense_globals": bool(dense_globals), "block_steps": bool(block_steps), "step_window": step_window,
                "seed": int(seed), "n_cells": int(full.n_cells),
                "n_spots": int(full.n_spots), "chunk_cells": [int(c[0].size) for c in chunks],
                "sites": [site.name for site in site_list], "fingerprint": fingerprint,
            }
            saver = SamplerCheckpoint(checkpoint, identity, every_seconds=checkpoint_every_s)
            if resume and saver.path.is_file():
                saved = saver.read()
        out = PosteriorSamples()
        stats: dict[str, list[float]] = {"acceptance": [], "step_size": []}
        bar = tqdm(total=len(chunks) * (num_warmup + per_chain * thin), desc="posterior (local HMC)",
                   disable=not progress, leave=False)
        for group in groups:
            parts = [_chunk_part(full, chunks[index], moving, held, inits, C, device) for index in group]
            group_em = em if group[0] == 0 else []  # EM in the first chunk's (or the sweep's) warm-up
            pieces = _global_pieces(parts, sampled) if sampled_globals else None
            kept, kernels = _run_chain(model, parts, C, per_chain, num_warmup, thin, num_steps, step_size,
                                       target_accept, group_em, em_lr, em_trace, bar, base_model, pieces,
                                       dense_globals, saver, saved, block_steps, step_window)
            for part, part_kept, kernel in zip(parts, kept, kernels):
                stats["acceptance"].append(float(np.mean(kernel.accept_history[num_warmup:] or [float("nan")])))
                stats["step_size"].append(kernel.mean_step())
                if pieces is not None:  # each kept state carries its own global latents
                    fixed = {k: v for k, v in part.conditioned.items() if k not in sampled_names}
                    part = _Part("local", part.batch, part.cells, moving + sampled, per_cell=False, per_spot=True,
                                 conditioned=fixed)
                _assemble(model, [part], {"local": part_kept}, site_list, keep, dataset, C, S,
                          also=set(renamed), out=out)
        bar.close()
    out.diagnostics = {
        "method": "local",
        "acceptance": {"local": float(np.nanmean(stats["acceptance"]))},
        "step_size": {"local": float(np.mean(stats["step_size"]))},
        "em": em_trace,
        "num_chains": C,
        "num_warmup": int(num_warmup),
        "thin": int(thin),
        "num_steps": int(num_steps),
        "block_steps": bool(block_steps),
        "step_window": step_window,
        "chunks": len(chunks),
        "graph": False,
        "resumed_at": int(saved["iteration"]) if saved is not None else None,
    }
    # global latents held at guide draws differ between chains by design: not a convergence check
    checks = {name: convergence_detail(value, C) for name, value in out.items()
              if out.plates.get(name) != "global" or name in sampled_names}
    for key in ("rhat_max", "ess_bulk_min", "rhat_above"):
        out.diagnostics[key] = {name: detail[key] for name, detail in checks.items()}
    out.diagnostics["seconds"] = time.perf_counter() - t_start
    out.diagnostics["unconverged"] = unconverged_sites(out.diagnostics)
    return out


def _run_chain(model, parts: list[_Part], C: int, per_chain: int, num_warmup: int, thin: int, num_steps: int,
               step_size: float, target_accept: float, em, em_lr: float, em_trace, bar, model_of_em,
               pieces: list[_Part] | None = None, dense_globals: bool = True,
               saver: SamplerCheckpoint | None = None, saved: dict | None = None, block_steps: bool = True,
               step_window: int | None = None):
    """Warm-up (step size, mass, EM) and sampling of the chunks ``parts`` in one sweep: each
    chunk's HMC in turn, then (with ``pieces``, one per chunk) the global latents' HMC given
    every chunk's cells. Returns the kept unconstrained states of each chunk and its kernel.
    ``saver`` writes checkpoints; ``saved`` (a checkpoint read back) is continued."""
    if pieces is not None:
        for part, piece in zip(parts, pieces):
            _hand_over(pieces[0], part)
            _hand_over(part, piece)
        global_kernel = _HMC(model, pieces[0], C, num_steps, step_size, target_accept,
                             dense=tuple(site.name for site in pieces[0].moving) if dense_globals else (),
                             pieces=pieces)
    else:
        global_kernel = None
    kernels = [_HMC(model, part, C, num_steps, step_size, target_accept, block_steps=block_steps) for part in parts]
    optimiser = torch.optim.Adam([p for _, p in em], lr=float(em_lr)) if em else None
    windows = _mass_windows(num_warmup, step_window)
    em_start = min(10, num_warmup // 4)
    kept: list[list[dict[str, torch.Tensor]]] = [[] for _ in parts]
    total, start = num_warmup + per_chain * thin, 0
    if saved is not None:  # continue a killed run: its states, adaptation, EM, kept draws and RNG
        start = SamplerCheckpoint.restore(saved, kernels, global_kernel, em, optimiser, em_trace, kept)
        if pieces is not None:
            for part, piece in zip(parts, pieces):
                _hand_over(pieces[0], part)
                _hand_over(part, piece)
        bar.update(start * len(parts))
    for it in range(start, total):
        warm = it < num_warmup
        rates = [kernel.transition() for kernel in kernels]
        if pieces is not None:
            for part, piece in zip(parts, pieces):
                _hand_over(part, piece)
            global_kernel.refresh()
            global_rate = global_kernel.transition()
            for part, kernel in zip(parts, kernels):
                _hand_over(pieces[0], part)
                kernel.refresh()
            if warm:
                global_kernel.adapt(global_rate)
                if it + 1 in windows:
                    global_kernel.update_mass()
                if it + 1 == num_warmup:
                    global_kernel.finish_warmup()
        if warm:
            for kernel, rate in zip(kernels, rates):
                kernel.adapt(rate)
                if it + 1 in windows:
                    kernel.update_mass()
            if optimiser is not None and it >= em_start:
                # Fisher's identity: the gradient of the log joint at posterior states
                # estimates that of the marginal likelihood (one Adam step, in place; the
                # gradient summed chunk by chunk)
                optimiser.zero_grad()
                for part in parts:
                    state = {k: v.detach() for k, v in part.state.items()}
                    loss = -_log_density(model, part, state, C).sum() / C
                    loss.backward()
                optimiser.step()
                if pieces is not None:
                    global_kernel.refresh()
                for name, _ in em:
                    em_trace[name].append(float(attrgetter(name)(model_of_em).detach().float().mean()))
                for kernel in kernels:
                    kernel.refresh()
            if it + 1 == num_warmup:
                for kernel in kernels:
                    kernel.finish_warmup()
        elif (it + 1 - num_warmup) % thin == 0:
            for part, part_kept in zip(parts, kept):
                part_kept.append({k: v.detach().clone() for k, v in part.state.items()})
                if pieces is not None:  # the global latents of the same state
                    part_kept[-1].update({k: v.detach().clone() for k, v in pieces[0].state.items()})
        bar.update(len(parts))
        if saver is not None and (saver.due() or it + 1 == total):
            saver.write(it + 1, kernels, global_kernel, em, optimiser, em_trace, kept)
    return kept, kernels
