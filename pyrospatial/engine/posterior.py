"""Posterior draws and summaries of any model/guide pair, in memory-bounded chunks.

Coherent joint draws
--------------------
A posterior draw ``s`` is one joint sample of *all* latents. Sites outside the subsampled
``cells``/``spots`` plates (the **global** sites: priors' hyper-parameters, decoder weights,
dispersions, ...) are drawn once per draw, by running the guide on the first chunk. The guide
is then run on every chunk of the fixed spatial partition ``dataset.chunks(chunk_size)`` with
those global values held fixed, so the **local** sites (per cell, per spot) of all chunks are
conditioned on the same globals, and the model is replayed against that guide trace to record
``pyro.deterministic`` sites (and, if asked, observed sites). Amortised guides whose local
``q`` depends on a global latent therefore give consistent draws across chunks. (A guide site
outside the local plates whose distribution depends on the batch is taken from the first
chunk.) The torch RNG is reseeded from ``(seed, s, chunk)`` for every guide run, so
:func:`sample_posterior` and :func:`summarise_posterior` with the same seed see the same draws.

Returned sites and shapes (``S`` draws)
---------------------------------------
- latent and deterministic sites of the model in the ``cells`` plate: ``(S, N_cells, ...)``,
  rows in dataset cell order (``batch.cell_index``); in the ``spots`` plate:
  ``(S, N_spots, ...)`` (``batch.spot_index``); global sites: ``(S, *site_shape)``.
- with ``return_observed=True``, each observed site ``x`` also gives ``x`` (a posterior
  predictive replicate drawn from its likelihood) and ``x_mean`` (the likelihood mean under
  the draw), e.g. replicated spot counts ``(S, N_spots, G)``.
- auxiliary guide sites (e.g. AutoNormal's ``*_unconstrained``) and ``pyro.factor`` terms are
  not returned.
- **edge-level sites** (inside a plate whose name contains ``"edge"``, e.g. per-edge
  probabilities or the observed adjacency) depend on the batch's edges and are not assembled:
  compute per-edge quantities from the returned per-cell draws (e.g. ``z``) in model-specific
  analysis code.

The dictionaries returned carry ``.plates`` (site -> ``"cells" | "spots" | "global"``),
which :func:`export` uses to route each site.

AnnData export key scheme (:func:`export`)
------------------------------------------
For a site ``x`` and a statistic ``stat`` in ``mean, sd, q05, q50, q95`` (``q<percent>`` for
other quantiles):

- per-cell (per-spot) site, scalar per cell: ``adata.obs[f"{x}_{stat}"]``;
- per-cell site of shape ``(N, D)`` with ``D == adata.n_vars``: ``adata.layers[f"{x}_{stat}"]``
  (e.g. deconvolved expression over the spots' genes in the spots AnnData);
- any other per-cell shape ``(N, D, ...)``: ``adata.obsm[f"{x}_{stat}"]`` (e.g. ``obsm["z_mean"]``;
  a scalar site forced into obsm with ``locations=`` becomes ``(N, 1)``);
- global site: ``adata.uns[prefix]["globals"][x][stat]`` (numpy arrays, in both AnnDatas);
- ``adata.uns[prefix]["sites"][x]`` = ``{"plate", "location", "keys"}`` says where each went;
  ``adata.uns[prefix]["settings"]`` the run settings and ``adata.uns[prefix]["versions"]``
  the versions of pyrospatial, torch, pyro, lightning, anndata, numpy: all h5ad-writable
  (``None`` is written as ``"None"``, mixed lists as strings).
"""


from __future__ import annotations

import contextlib
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyrospatial.engine.device import module_device
from pyrospatial.errors import InputError, PyrospatialError


__all__ = ["LOCAL_PLATES", "DEFAULT_QUANTILES", "PosteriorSamples", "PosteriorSummary", "site_plate", "sample_posterior"]


LOCAL_PLATES = ("cells", "spots")


DEFAULT_QUANTILES = (0.05, 0.5, 0.95)


class PosteriorSamples(dict):
    """``dict[site, np.ndarray]`` of draws (first axis = draw), with ``.plates``:
    site -> ``"cells"``, ``"spots"`` or ``"global"``."""

    def __init__(self, *args, plates: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.plates: dict[str, str] = dict(plates or {})


class PosteriorSummary(dict):
    """``dict[site, dict[stat, np.ndarray]]`` with ``.plates`` as in :class:`PosteriorSamples`."""

    def __init__(self, *args, plates: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.plates: dict[str, str] = dict(plates or {})


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def site_plate(site: dict) -> str:
    """``"cells"``, ``"spots"``, ``"edge"`` or ``"global"`` for a trace site."""
    names = [frame.name for frame in site["cond_indep_stack"]]
    for plate in LOCAL_PLATES:
        if plate in names:
            return plate
    if any("edge" in name for name in names):
        return "edge"
    return "global"


def _plate_axis(site: dict, plate: str) -> int:
    frame = next(f for f in site["cond_indep_stack"] if f.name == plate)
    event_dim = int(getattr(site["fn"], "event_dim", 0))
    return int(frame.dim) - event_dim


def _seed(seed: int, draw: int, chunk: int) -> int:
    state = np.random.SeedSequence([int(seed), int(draw), int(chunk)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


class _FixValues(Messenger):
    """Give sample sites fixed values *without* marking them observed (unlike
    ``poutine.condition``), so that ``poutine.replay`` treats them as ordinary draws."""

    def __init__(self, values: dict[str, torch.Tensor]):
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg) -> None:
        if msg["name"] in self.values and not msg["is_observed"]:
            msg["value"] = self.values[msg["name"]]


def _repeated_draws(guide: Any):
    """The guide's optional ``repeated_draws()`` context (it may compute what no draw changes,
    e.g. an encoder's output, once per batch: :meth:`pyrospatial.guides.CoralGuide.repeated_draws`);
    a context that does nothing for a guide without one."""
    hook = getattr(guide, "repeated_draws", None)
    return hook() if callable(hook) else contextlib.nullcontext()


class _EvalMode:
    """Put nn.Modules in eval mode (dropout off) for sampling, restoring their flags after."""

    def __init__(self, *modules: Any):
        self.modules = [m for m in modules if isinstance(m, torch.nn.Module)]

    def __enter__(self):
        self.flags = [[(sub, sub.training) for sub in m.modules()] for m in self.modules]
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc):
        for flags in self.flags:
            for sub, flag in flags:
                sub.training = flag


def _numpy(value: torch.Tensor) -> np.ndarray:
    return value.detach().cpu().numpy()


def _local_rows(value: torch.Tensor, site: dict, plate: str, n_local: int, name: str) -> np.ndarray:
    """Move the plate axis of a local site's value to the front: ``(n_local, ...)``.

    The axis is the plate's ``dim`` counted left of the site's event dims. ``pyro.deterministic``
    sites default to ``event_dim = value.ndim`` (the plate then lies inside the "event"); for
    those, and whenever the computed axis does not have the batch's size, the leftmost axis of
    size ``n_local`` is taken.
    """
    value = torch.as_tensor(value)
    axis = _plate_axis(site, plate)
    if not (-value.dim() <= axis < 0 and value.shape[axis] == n_local):
        sizes = list(value.shape)
        if n_local not in sizes:
            raise PyrospatialError(
                f"site '{name}' has shape {tuple(value.shape)}; none of its axes has the {n_local} "
                f"entries of its '{plate}' plate."
            )
        axis = sizes.index(n_local) - value.dim()
    while value.dim() > -axis and value.shape[0] == 1:  # drop broadcast dims left of the plate
        value = value[0]
    return _numpy(torch.movedim(value, axis, 0))


def _record(model_trace, chunk, keep: set[str] | None, return_observed: bool) -> tuple[dict, dict, set]:
    """Values (numpy) and plates of the returned sites of one replayed model trace."""
    values: dict[str, np.ndarray] = {}
    plates: dict[str, str] = {}
    edge_sites: set[str] = set()
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["infer"].get("is_auxiliary") or site_is_subsample(site):
            continue
        deterministic = bool(site["infer"].get("_deterministic"))
        observed = site["is_observed"] and not deterministic
        if observed and not return_observed:
            continue
        plate = site_plate(site)
        if observed:
            entries = [(name, site["fn"].sample())]
            try:
                entries.append((f"{name}_mean", site["fn"].mean))
            except (NotImplementedError, AttributeError):
                pass
        else:
            entries = [(name, site["value"])]
        for key, value in entries:
            if plate == "edge":
                edge_sites.add(key)
                continue
            if keep is not None and key not in keep:
                continue
            if plate == "cells":
                values[key] = _local_rows(value, site, plate, chunk.n_cells, key)
            elif plate == "spots":
                values[key] = _local_rows(value, site, plate, chunk.n_spots, key)
            else:
                values[key] = _numpy(torch.as_tensor(value))
            plates[key] = plate
    return values, plates, edge_sites


class _Globals:
    """Global sites collected by :func:`_draw_chunks`: ``values[key]`` is ``(S, ...)``."""

    def __init__(self) -> None:
        self.values: dict[str, np.ndarray] = {}
        self.plates: dict[str, str] = {}
        self.dropped: set[str] = set()


def _draw_chunks(
    model: Callable,
    guide: Callable,
    dataset,
    num_samples: int,
    globals_out: _Globals,
    *,
    sites: Iterable[str] | None,
    chunk_size: int | None,
    seed: int,
    return_observed: bool,
    device: str | torch.device | None,
) -> Iterator[tuple[Any, dict[str, np.ndarray], dict[str, str]]]:
    """Yield ``(chunk, {site: (S, n_chunk, ...)}, plates)`` for the local sites of each chunk.

    Global sites are recorded from the first chunk into ``globals_out``. A non-local site that
    is not a global latent of the guide (e.g. a ``pyro.deterministic`` outside any plate) must
    take the same value in every chunk of a draw; one that does not (it depends on the batch,
    e.g. per-edge probabilities outside an edge plate) is dropped with a warning.
    """
    if int(num_samples) < 1:
        raise InputError(f"num_samples must be >= 1, got {num_samples}.")
    keep = None if sites is None else set([sites] if isinstance(sites, str) else sites)
    device = torch.device(device) if device is not None else module_device(model, guide)
    S = int(num_samples)
    with torch.no_grad(), _EvalMode(model, guide), _repeated_draws(guide):
        first = next(iter(dataset.chunks(chunk_size))).to(device)
        global_values: list[dict[str, torch.Tensor]] = []
        for s in range(S):
            torch.manual_seed(_seed(seed, s, 0))
            trace = poutine.trace(guide).get_trace(first)
            global_values.append(
                {
                    name: site["value"]
                    for name, site in trace.nodes.items()
                    if site["type"] == "sample"
                    and not site["is_observed"]
                    and not site_is_subsample(site)  # plates' subsample indices are sample sites too
                    and site_plate(site) == "global"
                }
            )
        del first
        fixed = set(global_values[0]) if global_values else set()
        reference: dict[str, list[np.ndarray]] = defaultdict(list)  # chunk-0 globals, per draw
        for c, chunk in enumerate(dataset.chunks(chunk_size)):
            chunk = chunk.to(device)
            stacked: dict[str, np.ndarray] = {}  # (S, rows, ...) per site, filled draw by draw
            filled: dict[str, int] = defaultdict(int)
            plates: dict[str, str] = {}
            edge_sites: set[str] = set()
            for s in range(S):
                torch.manual_seed(_seed(seed, s, c + 1))
                guide_trace = poutine.trace(_FixValues(global_values[s])(guide)).get_trace(chunk)
                model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(chunk)
                values, site_plates, edges = _record(model_trace, chunk, keep, return_observed)
                edge_sites |= edges
                plates.update(site_plates)
                for key, value in values.items():
                    if plates[key] != "global":
                        if key not in stacked:
                            stacked[key] = np.empty((S,) + value.shape, dtype=value.dtype)
                        if value.shape != stacked[key].shape[1:]:
                            raise PyrospatialError(
                                f"site '{key}' has shape {value.shape} in draw {s} of chunk {c} but "
                                f"{stacked[key].shape[1:]} in the draws before: its shape must not depend on the draw.")
                        stacked[key][s] = value
                        filled[key] += 1
                    elif c == 0:
                        reference[key].append(value)
                    elif key not in fixed and key not in globals_out.dropped:
                        ref = reference[key][s]
                        if ref.shape != value.shape or not np.allclose(ref, value, rtol=1e-5, atol=1e-6, equal_nan=True):
                            globals_out.dropped.add(key)
            if c == 0 and keep is not None:
                missing = keep - set(plates)
                if missing:
                    hint = (
                        f" ({sorted(missing & edge_sites)} are edge-level: compute them from per-cell draws)"
                        if missing & edge_sites
                        else ""
                    )
                    raise InputError(
                        f"site(s) {sorted(missing)} not found{hint}; available: {sorted(plates)}"
                        + ("" if return_observed else " (observed sites need return_observed=True)")
                    )
            if c == 0:
                for key, plate in plates.items():
                    if plate == "global":
                        globals_out.plates[key] = plate
            partial = {key: n for key, n in filled.items() if n != S}
            if partial:
                raise PyrospatialError(
                    f"site(s) {sorted(partial)} appeared in only {sorted(set(partial.values()))} of the {S} draws of "
                    f"chunk {c}: a returned site must be sampled in every draw (keep it out with sites=[...]).")
            yield chunk, stacked, plates
        for key in globals_out.plates:
            if key not in globals_out.dropped:
                globals_out.values[key] = np.stack(reference[key])
        for key in globals_out.dropped:
            globals_out.plates.pop(key, None)
        if globals_out.dropped:
            warnings.warn(
                f"site(s) {sorted(globals_out.dropped)} lie outside the cells/spots plates but change "
                "from chunk to chunk within a draw (they depend on the batch, e.g. per-edge values); "
                "they are not returned. Put such sites inside a plate whose name contains 'edge', "
                "or compute them from the per-cell draws.",
                stacklevel=3,
            )


def _ordered(out):
    """Globals first, then local sites, each group in name order (stable output)."""
    order = sorted(out, key=lambda k: (out.plates.get(k) != "global", k))
    items = [(k, out[k]) for k in order]
    out.clear()
    out.update(items)
    return out


def _totals(dataset) -> dict[str, int]:
    return {"cells": int(dataset.n_cells), "spots": int(dataset.n_spots)}


def _chunk_index(chunk, plate: str) -> np.ndarray:
    return _numpy(chunk.cell_index if plate == "cells" else chunk.spot_index).astype(np.int64)


def _check_coverage(seen: dict[str, np.ndarray]) -> None:
    for plate, counts in seen.items():
        if counts.size and not (counts == 1).all():
            bad = np.flatnonzero(counts != 1)
            raise PyrospatialError(
                f"dataset.chunks() covered {bad.size} {plate} not exactly once (e.g. index {int(bad[0])}, "
                f"{int(counts[bad[0]])} times); posterior assembly needs a partition."
            )


# ------------------------------------------------------------------------------------------
# public API
# ------------------------------------------------------------------------------------------
def local_draws(model: Callable, guide: Callable, dataset, num_samples: int, globals_: "_Globals", **kwargs: Any):
    """The local draws of every chunk, one site at a time: ``(site, plate, dataset rows, draws
    (S, len(rows), ...), plate size)``; the ``S`` global draws land in ``globals_``. Once the
    generator is exhausted it checks that every cell and spot was drawn exactly once. The one
    assembly loop behind :func:`sample_posterior` and the streaming summaries."""
    totals = _totals(dataset)
    seen = {plate: np.zeros(n, dtype=np.int64) for plate, n in totals.items()}
    for chunk, values, plates in _draw_chunks(model, guide, dataset, num_samples, globals_, **kwargs):
        for plate in LOCAL_PLATES:
            if totals[plate]:
                np.add.at(seen[plate], _chunk_index(chunk, plate), 1)
        for key, value in values.items():
            plate = plates[key]
            yield key, plate, _chunk_index(chunk, plate), value, totals[plate]
    _check_coverage(seen)


def sample_posterior(
    model: Callable,
    guide: Callable,
    dataset,
    num_samples: int = 100,
    *,
    sites: Iterable[str] | None = None,
    chunk_size: int | None = None,
    seed: int = 0,
    return_observed: bool = False,
    device: str | torch.device | None = None,
) -> PosteriorSamples:
    """Coherent joint posterior draws, assembled over the chunks of ``dataset``.

    Parameters
    ----------
    num_samples
        Number of joint draws ``S``.
    sites
        Names to keep (default: every latent and deterministic site of the model, plus
        observed replicates/means with ``return_observed``). Keep only what you need: local
        sites cost ``S x N x D`` floats.
    chunk_size
        Spots (cells when there are no spots) per chunk: bounds the working memory of one
        guide/model evaluation. ``None`` = one chunk.
    seed
        Draw ``s`` of chunk ``c`` is made under a torch seed derived from ``(seed, s, c)``.
    return_observed
        Also return, per observed site ``x``, a posterior predictive replicate ``x`` and the
        likelihood mean ``x_mean``.
    device
        Where to evaluate (default: the device of the guide's/model's parameters).

    Returns
    -------
    PosteriorSamples
        ``{site: array}`` with shapes ``(S, N_cells, ...)``, ``(S, N_spots, ...)`` or
        ``(S, ...)`` (globals); ``.plates`` gives each site's plate.
    """
    out = PosteriorSamples()
    globals_ = _Globals()
    for key, plate, rows, value, total in local_draws(
        model, guide, dataset, num_samples, globals_, sites=sites, chunk_size=chunk_size, seed=seed,
        return_observed=return_observed, device=device,
    ):
        out.plates[key] = plate
        if key not in out and rows.size == total and np.array_equal(rows, np.arange(total)):
            out[key] = value  # one chunk holds the whole plate in order: no copy
            continue
        if key not in out:
            out[key] = np.zeros((value.shape[0], total) + value.shape[2:], dtype=value.dtype)
        out[key][:, rows] = value
    out.update(globals_.values)
    out.plates.update(globals_.plates)
    return _ordered(out)
