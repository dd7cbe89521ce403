"""Model criticism: posterior predictive checks in ArviZ, calibration, and their figures.

The question this module answers is "could the fitted model have produced the data, and how
far can each number be trusted?". It works for any model/guide pair that follows the batch
protocol and accepts ``model(batch, predictive=True)`` (every observation dropped, so the
observed sites are *drawn*), e.g. :class:`~pyrospatial.models.CoralModel` and its variants.

InferenceData layout (:func:`to_inference_data`)
------------------------------------------------
Dimensions: ``chain`` (1), ``draw`` (S), ``cell``, ``spot``, ``gene``, ``protein``, ``edge``
(observed undirected edges of the dataset's graph, ``i < j``), ``nonedge`` (a fixed, seeded
sample of non-adjacent pairs), ``svi_step``; other trailing axes are named ``{site}_dim_{k}``.

- ``posterior``: every latent site of the model, global and local (CORAL: ``rna_weight``
  ``(gene, rna_weight_dim_1)``, ``z`` ``(cell, z_dim_1)``, ``v``, ``cell_size`` ``(cell,)``),
  the per-cell deterministic ``expected_rna`` ``(cell, gene)``, and the Bernoulli means
  ``edge_prob`` ``(edge,)`` / ``nonedge_prob`` ``(nonedge,)``, and the likelihood's moments
  ``spot_counts_lik_mean`` / ``spot_counts_lik_variance`` ``(spot, gene)`` and
  ``proteins_lik_mean`` / ``proteins_lik_variance`` ``(cell, protein)``; coherent joint draws.
- ``posterior_predictive``: ``proteins`` ``(cell, protein)``, ``spot_counts`` ``(spot, gene)``,
  ``edges`` ``(edge,)`` and ``nonedges`` ``(nonedge,)``, drawn by running the model with
  ``predictive=True`` under each posterior draw; with ``mixed_sites`` (the demo and
  ``pyrospatial fit`` use ``("z",)`` for CORAL) the variables that depend on those sites are
  replicated with them redrawn from their prior (attribute ``mixed_replicates``).
- ``observed_data``: the same four variables as observed (edges are 1, non-edges 0).
- ``sample_stats``: ``loss`` ``(svi_step,)`` -- the training loss (negative ELBO, full-data
  scale) per optimiser step -- and ``elbo = -loss``. (SVI has no per-draw statistics; the
  history has its own dimension.)
- ``constant_data``: ``cell_type`` ``(cell,)``, ``cell_spot`` ``(cell,)``, ``edge_pairs``
  ``(edge, pair_end)``, ``nonedge_pairs`` ``(nonedge, pair_end)``, ``nonedge_weight`` (how
  many non-adjacent pairs of the full graph each sampled one stands for).
- ``attrs``: ``method`` ("refine" or "guide"), ``seed``, ``n_nonedges_total``.

Bayesian p-values (:func:`ppc_summary`)
---------------------------------------
For a feature (a gene over spots, a protein over cells) and a statistic ``T`` (mean,
variance, zero fraction across rows, and the *dispersion* ``mean_rows (y - E[y|theta])^2 /
Var[y|theta]``, a discrepancy that depends on the draw ``theta`` and is about 1 under the
model), ``p = P(T(y_rep) > T(y)) + 0.5 P(T(y_rep) = T(y))``
over the posterior draws (a mid p-value, so ties -- e.g. zero fractions of a continuous
feature -- give 0.5). ``p`` near 0 or 1 means the observed statistic is in a tail of what the
model replicates. Posterior predictive p-values of a well-specified model concentrate around
0.5 (they re-use the data), so their histogram is not uniform; a pile-up at 0 or 1 flags a
misfit (e.g. ``p(variance) ~ 1`` for a Poisson model of over-dispersed counts).
"""


from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from pyrospatial.errors import InputError
from pyrospatial.criticism.ppc import OBSERVED_SITES, _observed, _pairs, posterior_predictive

__all__ = ["to_inference_data", "load_inference_data"]




def _dims(name: str, value: np.ndarray, plate: str, dataset) -> list[str]:
    """ArviZ dims (after chain, draw) for a posterior site."""
    trailing = value.ndim - 2  # minus (chain, draw)
    dims: list[str] = []
    if plate == "cells":
        dims.append("cell")
    elif plate == "spots":
        dims.append("spot")
    rest = trailing - len(dims)
    for k in range(rest):
        axis = len(dims)
        size = value.shape[2 + axis]
        if name in ("expected_rna",) and size == dataset.n_genes:
            dims.append("gene")
        elif name == "rna_weight" and axis == 0 and size == dataset.n_genes:
            dims.append("gene")
        else:
            dims.append(f"{name}_dim_{axis}")
    return dims


def _names(index: Any, n: int, prefix: str) -> list[str]:
    if index is None or len(index) != n:
        return [f"{prefix}{i}" for i in range(n)]
    return [str(x) for x in index]


def to_inference_data(
    fit_result: Any,
    dataset: Any,
    num_samples: int = 100,
    *,
    method: str = "guide",
    samples: Mapping[str, np.ndarray] | None = None,
    seed: int = 0,
    nonedge_ratio: float = 1.0,
    prior_sites: Iterable[str] = (),
    mixed_sites: Iterable[str] = (),
    path: str | Path | None = None,
    progress: bool = False,
    **refine_kwargs: Any,
):
    """Posterior, posterior predictive, observed data and ELBO history as ``arviz.InferenceData``.

    Parameters
    ----------
    fit_result
        What :func:`pyrospatial.fit` returned (``model``, ``guide``, ``elbo_history``), or a
        :class:`~pyrospatial.CORAL` object after training (its ``fit_result`` is used).
    dataset
        The :class:`~pyrospatial.SpatialDataset` the model was trained on.
    num_samples
        Posterior draws ``S``.
    method
        ``"guide"`` (default here: the guide's coherent draws,
        :func:`~pyrospatial.engine.posterior.sample_posterior`) or ``"refine"`` (HMC refinement,
        :func:`~pyrospatial.engine.refine.refine_posterior`, calibrated but slower; ``refine_kwargs``
        pass through). Ignored when ``samples`` is given.
    samples
        Precomputed draws (a ``PosteriorSamples`` or any dict with ``.plates``) of every latent
        site, e.g. ``refine_posterior(..., sites=None)``. Deterministic sites among them are
        conditioned on as well.
    prior_sites
        Latent sites that may be absent from ``samples`` because the model uses them only
        through a deterministic site that ``samples`` holds (CORAL: ``("rna_weight",)`` with
        ``expected_rna``, as in ``CORAL.posterior.samples``); they are then drawn from the prior
        and do not enter the replicates.
    mixed_sites
        Local latent sites redrawn from their prior (given the other draws) for the replicates
        of the observed sites that depend on them ("mixed" replication; CORAL: ``("z",)``).
        Posterior replication conditions on each cell's own ``z``, which was fitted to that
        cell's proteins (8 state dimensions for 10-20 proteins), so replicated proteins scatter
        around a mean already pulled towards the observation and the checks flag a
        well-specified model; mixed replicates ask instead whether the population of cells
        could come from the model. Which observed sites are replicated this way is found by
        comparing their likelihood means with and without the redraw, and listed in the
        ``posterior_predictive`` attribute ``mixed_replicates`` (comma-separated). The
        ``posterior`` group (``edge_prob``, likelihood moments) always comes from posterior
        replication.
    seed
        Seeds the posterior draws, the replicates and the fixed non-edge sample.
    nonedge_ratio
        Non-adjacent pairs sampled per observed edge for the ``nonedge`` dimension.
    path
        If given, the InferenceData is also written there as netcdf.
    progress
        Progress bars.

    Returns
    -------
    arviz.InferenceData
        Groups and dims as in the module docstring.
    """
    import arviz as az
    import xarray as xr

    model, guide, history = _unpack(fit_result)
    if int(num_samples) < 2:
        raise InputError(f"num_samples must be >= 2 for posterior predictive checks, got {num_samples}.")
    if samples is None:
        samples = _draw(model, guide, dataset, int(num_samples), method, seed, progress, refine_kwargs)
    plates = dict(getattr(samples, "plates", {}) or {})
    batch = dataset.full_batch(nonedge_ratio=nonedge_ratio)
    batch = batch.to(_device(model))
    reps = posterior_predictive(model, batch, samples, plates, seed=seed, prior_sites=prior_sites, progress=progress)
    mixed_replicates: list[str] = []
    if tuple(mixed_sites):
        mixed = posterior_predictive(model, batch, samples, plates, seed=seed + 1, prior_sites=prior_sites,
                                     mixed_sites=mixed_sites, progress=progress)
        for name in OBSERVED_SITES:
            key = f"{name}_mean"
            if name in reps and key in reps and key in mixed and not np.allclose(reps[key], mixed[key]):
                reps[name] = mixed[name]
                mixed_replicates.append(name)

    cell_names = _names(getattr(dataset, "cell_names", None), dataset.n_cells, "cell")
    coords: dict[str, Any] = {"cell": cell_names}
    if dataset.n_spots > 0:
        coords["spot"] = _names(getattr(dataset, "spot_names", None), dataset.n_spots, "spot")
        coords["gene"] = _names(getattr(dataset, "gene_names", None), dataset.n_genes, "gene")
    coords["protein"] = _names(getattr(dataset, "feature_names", None), dataset.n_features, "protein")

    posterior: dict[str, Any] = {}
    for name, value in samples.items():
        value = np.asarray(value)[None]
        dims = _dims(name, value, plates.get(name, "global"), dataset)
        posterior[name] = (("chain", "draw", *dims), value)
    edge_pairs = _pairs(batch.edge_pairs, batch)
    nonedge_pairs = _pairs(batch.nonedge_index, batch)
    if "edges_mean" in reps:
        posterior["edge_prob"] = (("chain", "draw", "edge"), reps.pop("edges_mean")[None])
    if "nonedges_mean" in reps:
        posterior["nonedge_prob"] = (("chain", "draw", "nonedge"), reps.pop("nonedges_mean")[None])

    for name in ("proteins", "spot_counts"):  # the likelihood's moments under each draw
        for moment in ("mean", "variance"):
            key = f"{name}_{moment}"
            if key in reps:
                posterior[f"{name}_lik_{moment}"] = (("chain", "draw", *OBSERVED_SITES[name]), reps.pop(key)[None])

    observed = _observed(dataset, batch)
    predictive = {k: (("chain", "draw", *OBSERVED_SITES[k]), v[None]) for k, v in reps.items()}
    observed = {k: (OBSERVED_SITES[k], v) for k, v in observed.items() if k in reps}

    history = np.asarray(history if history is not None else [], dtype=np.float64)
    n_pairs = dataset.n_cells * (dataset.n_cells - 1) // 2 - dataset.n_edges
    k = nonedge_pairs.shape[0]
    attrs = {"method": str(getattr(samples, "method", method)), "seed": int(seed),
             "n_nonedges_total": int(n_pairs), "num_samples": int(next(iter(samples.values())).shape[0])}
    predictive_attrs = dict(attrs, mixed_sites=",".join(mixed_sites), mixed_replicates=",".join(mixed_replicates))
    groups = {
        "posterior": xr.Dataset(posterior, coords=_coords_for(coords, posterior), attrs=attrs),
        "posterior_predictive": xr.Dataset(predictive, coords=_coords_for(coords, predictive), attrs=predictive_attrs),
        "observed_data": xr.Dataset(observed, coords=_coords_for(coords, observed), attrs=attrs),
        "sample_stats": xr.Dataset({"loss": (("svi_step",), history), "elbo": (("svi_step",), -history)}, attrs=attrs),
        "constant_data": xr.Dataset(
            {
                "cell_type": (("cell",), np.asarray(dataset.cell_type)),
                "cell_spot": (("cell",), np.asarray(dataset.cell_spot)),
                "edge_pairs": (("edge", "pair_end"), edge_pairs),
                "nonedge_pairs": (("nonedge", "pair_end"), nonedge_pairs),
                "nonedge_weight": ((), float(n_pairs / k) if k else 0.0),
            },
            coords={"cell": cell_names},
            attrs=attrs,
        ),
    }
    idata = az.InferenceData(**groups)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        idata.to_netcdf(str(path))
    return idata


def load_inference_data(path: str | Path):
    """Read an InferenceData written by :func:`to_inference_data` (netcdf)."""
    import arviz as az

    path = Path(path)
    if not path.exists():
        raise InputError(f"no InferenceData at {path}; write it with to_inference_data(..., path=...).")
    return az.from_netcdf(str(path))


def _coords_for(coords: dict[str, Any], variables: Mapping[str, tuple]) -> dict[str, Any]:
    used = {d for dims, _ in variables.values() for d in dims}
    return {k: v for k, v in coords.items() if k in used}


def _unpack(fit_result: Any) -> tuple[Any, Any, np.ndarray | None]:
    """(model, guide, elbo_history) of a FitResult or a trained CORAL."""
    if hasattr(fit_result, "fit_result") and hasattr(fit_result, "model"):  # CORAL
        history = None if fit_result.fit_result is None else fit_result.fit_result.elbo_history
        return fit_result.model, fit_result.guide, history
    for attr in ("model", "guide"):
        if not hasattr(fit_result, attr):
            raise InputError(
                f"fit_result has no '{attr}'; pass what pyrospatial.fit(...) returned (a FitResult) or a trained CORAL."
            )
    return fit_result.model, fit_result.guide, getattr(fit_result, "elbo_history", None)


def _device(model: Any) -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _draw(model, guide, dataset, num_samples: int, method: str, seed: int, progress: bool, refine_kwargs: dict):
    """Coherent draws of every latent site (and ``expected_rna`` when the model has it)."""
    if method == "guide":
        from pyrospatial.engine.posterior import sample_posterior

        draws = sample_posterior(model, guide, dataset, num_samples, seed=seed)
    elif method == "refine":
        from pyrospatial.engine.refine import refine_posterior

        draws = refine_posterior(model, guide, dataset, num_samples, seed=seed, progress=progress, **refine_kwargs)
    else:
        raise InputError(f"method must be 'guide' or 'refine', got {method!r}.")
    draws.method = method
    return draws
