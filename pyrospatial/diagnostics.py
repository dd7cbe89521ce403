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

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyro.poutine as poutine
from pyro.poutine.util import site_is_subsample
import torch
from tqdm.auto import tqdm

from pyrospatial.errors import InputError

__all__ = [
    "OBSERVED_SITES",
    "PPCSummary",
    "to_inference_data",
    "posterior_predictive",
    "ppc_summary",
    "bayesian_pvalue",
    "expected_calibration_error",
    "reliability_curve",
    "interval_coverage_by_level",
    "pit_coverage_by_level",
    "align_sign",
    "sbc_ranks",
    "sbc_ks_pvalue",
    "sbc_toy",
    "chain_convergence",
    "SBCResult",
    "check_results",
    "plot_ppc",
    "plot_pvalues",
    "plot_reliability",
    "plot_coverage",
    "load_inference_data",
]

#: observed sites of CORAL-family models and the row/feature dimensions they take
OBSERVED_SITES: dict[str, tuple[str, ...]] = {
    "proteins": ("cell", "protein"),
    "spot_counts": ("spot", "gene"),
    "edges": ("edge",),
    "nonedges": ("nonedge",),
}
#: ppc statistics, in table order
STATISTICS = ("mean", "var", "zero_frac", "dispersion")


# ------------------------------------------------------------------------------------------
# posterior predictive draws
# ------------------------------------------------------------------------------------------
def _row_values(draws: Mapping[str, np.ndarray], plates: Mapping[str, str], s: int, batch) -> dict[str, torch.Tensor]:
    """Draw ``s`` of every latent site, rows reordered into the batch's cell/spot order."""
    cells = batch.cell_index.cpu().numpy()
    spots = batch.spot_index.cpu().numpy()
    out = {}
    for name, value in draws.items():
        plate = plates.get(name, "global")
        v = value[s]
        if plate == "cells":
            v = v[cells]
        elif plate == "spots":
            v = v[spots]
        out[name] = torch.as_tensor(np.asarray(v), dtype=torch.float32)
    return out


def _conditioned_names(model: Callable, batch, draws: Mapping[str, np.ndarray],
                       prior_sites: Iterable[str] = ()) -> list[str]:
    """Sites of ``model`` to condition on: its latent sites and the deterministic sites that
    ``draws`` holds (conditioning a ``pyro.deterministic`` site replaces its value downstream).

    A latent site without draws is an error unless it is named in ``prior_sites`` (it is then
    drawn from its prior, which is exact when the model uses it only through a deterministic
    site that is conditioned, e.g. CORAL's ``rna_weight`` through ``expected_rna``).
    """
    with torch.no_grad():
        trace = poutine.trace(model).get_trace(batch, predictive=True)
    names, missing = [], []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or name in OBSERVED_SITES or site_is_subsample(site):
            continue
        if site["infer"].get("is_auxiliary"):
            continue
        if site["infer"].get("_deterministic"):
            if name in draws:
                names.append(name)
            continue
        if site["is_observed"]:
            continue
        if name in draws:
            names.append(name)
        elif name not in set(prior_sites):
            missing.append(name)
    if missing:
        raise InputError(
            f"posterior draws lack the latent site(s) {missing}; draw them too (e.g. sample_posterior("
            f"..., sites=None) or refine_posterior(..., sites=None)), or name them in prior_sites if the model "
            "uses them only through a deterministic site that the draws hold."
        )
    return names


def posterior_predictive(
    model: Callable,
    batch,
    draws: Mapping[str, np.ndarray],
    plates: Mapping[str, str],
    *,
    seed: int = 0,
    prior_sites: Iterable[str] = (),
    mixed_sites: Iterable[str] = (),
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Replicated data: run ``model(batch, predictive=True)`` under each posterior draw.

    Parameters
    ----------
    model
        A model following the batch protocol with a ``predictive`` flag.
    batch
        The full-data batch (``dataset.full_batch()``); its fixed non-edges are used.
    draws, plates
        Posterior draws (site -> ``(S, ...)``, rows in dataset order) and their plates
        (site -> ``"cells" | "spots" | "global"``), as returned by
        :func:`~pyrospatial.posterior.sample_posterior` / :func:`~pyrospatial.refine.refine_posterior`.
        Deterministic sites present in ``draws`` (e.g. ``expected_rna``) are conditioned too.
    prior_sites
        Latent sites allowed to be missing from ``draws`` (see :func:`_conditioned_names`).
    mixed_sites
        Latent sites *not* conditioned on: redrawn from their prior given the other draws
        ("mixed" replication, Gelman, Meng & Stern 1996), e.g. CORAL's per-cell ``z`` given
        ``v`` and the cell type.

    Returns
    -------
    dict
        ``{site: (S, ...)}`` for each observed site present (``proteins`` ``(S, N, P)``,
        ``spot_counts`` ``(S, M, G)``, ``edges`` ``(S, E)``, ``nonedges`` ``(S, K)``) with rows
        in *dataset* order; ``{site}_mean`` and ``{site}_variance`` of the likelihood under
        each draw (edge sites: ``{site}_mean`` only, the Bernoulli probabilities).
    """
    mixed = set(mixed_sites)
    latent = [name for name in _conditioned_names(model, batch, draws, tuple(prior_sites) + tuple(mixed)) if name not in mixed]
    S = int(next(iter(draws.values())).shape[0])
    cell_order = np.argsort(batch.cell_index.cpu().numpy())
    spot_order = np.argsort(batch.spot_index.cpu().numpy())
    out: dict[str, list[np.ndarray]] = {}
    torch.manual_seed(int(seed))
    iterator = tqdm(range(S), desc="posterior predictive", disable=not progress, leave=False)
    with torch.no_grad():
        for s in iterator:
            values = _row_values({k: draws[k] for k in latent}, plates, s, batch)
            conditioned = poutine.condition(model, data=values)
            trace = poutine.trace(conditioned).get_trace(batch, predictive=True)
            for name in OBSERVED_SITES:
                if name not in trace.nodes:
                    continue
                site = trace.nodes[name]
                value = site["value"].detach().cpu().numpy()
                if name == "proteins":
                    value = value[cell_order]
                elif name == "spot_counts":
                    value = value[spot_order]
                out.setdefault(name, []).append(value)
                if name in ("edges", "nonedges"):
                    out.setdefault(f"{name}_mean", []).append(site["fn"].mean.detach().cpu().numpy())
                    continue
                for moment in ("mean", "variance"):  # of the likelihood under this draw
                    m = getattr(site["fn"], moment).detach().cpu().numpy()
                    m = np.broadcast_to(m, value.shape)
                    m = m[cell_order] if name == "proteins" else m[spot_order]
                    out.setdefault(f"{name}_{moment}", []).append(np.ascontiguousarray(m))
    return {k: np.stack(v) for k, v in out.items()}


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
        :func:`~pyrospatial.posterior.sample_posterior`) or ``"refine"`` (HMC refinement,
        :func:`~pyrospatial.refine.refine_posterior`, calibrated but slower; ``refine_kwargs``
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
        from pyrospatial.posterior import sample_posterior

        draws = sample_posterior(model, guide, dataset, num_samples, seed=seed)
    elif method == "refine":
        from pyrospatial.refine import refine_posterior

        draws = refine_posterior(model, guide, dataset, num_samples, seed=seed, progress=progress, **refine_kwargs)
    else:
        raise InputError(f"method must be 'guide' or 'refine', got {method!r}.")
    draws.method = method
    return draws


def _pairs(pairs: torch.Tensor, batch) -> np.ndarray:
    """(K, 2) pairs in dataset cell indices."""
    cell_index = batch.cell_index.cpu().numpy()
    p = pairs.cpu().numpy()
    return np.stack([cell_index[p[0]], cell_index[p[1]]], axis=1).astype(np.int64) if p.size else np.zeros((0, 2), np.int64)


def _observed(dataset, batch) -> dict[str, np.ndarray]:
    X = dataset.spot_counts
    X = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
    return {
        "proteins": np.asarray(dataset.cell_features, dtype=np.float32),
        "spot_counts": np.asarray(X, dtype=np.float32),
        "edges": np.ones(batch.edge_pairs.shape[1], dtype=np.float32),
        "nonedges": np.zeros(batch.nonedge_index.shape[1], dtype=np.float32),
    }


# ------------------------------------------------------------------------------------------
# posterior predictive summaries
# ------------------------------------------------------------------------------------------
def _statistics(y: np.ndarray) -> dict[str, np.ndarray]:
    """Per-feature mean, variance and zero fraction over the row axis (-2)."""
    return {
        "mean": y.mean(axis=-2),
        "var": y.var(axis=-2),
        "zero_frac": (y == 0).mean(axis=-2),
    }


def bayesian_pvalue(replicated: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Mid p-value ``P(T_rep > T_obs) + 0.5 P(T_rep = T_obs)`` over the draws (axis 0)."""
    replicated = np.asarray(replicated, dtype=np.float64)
    observed = np.asarray(observed, dtype=np.float64)
    greater = (replicated > observed).mean(axis=0)
    equal = np.isclose(replicated, observed, rtol=1e-9, atol=0.0).mean(axis=0)
    return greater + 0.5 * equal


@dataclass
class PPCSummary:
    """What :func:`ppc_summary` returns.

    ``table``: one row per (group, feature) with ``observed_{stat}``, ``replicated_{stat}``
    (posterior predictive mean of the statistic; for ``dispersion`` both are averaged over the
    draws) and ``p_{stat}`` for ``stat`` in mean, var, zero_frac, dispersion, and ``extreme``
    (any p outside ``[alpha/2, 1 - alpha/2]``).
    ``extreme_fraction``: fraction of features flagged; ``by_group``: the same per group;
    ``alpha``: the two-sided level used.
    """

    table: pd.DataFrame
    extreme_fraction: float
    by_group: dict[str, float] = field(default_factory=dict)
    alpha: float = 0.05

    def pvalues(self) -> np.ndarray:
        """Every p-value of the table (features x statistics, flattened; NaN dropped)."""
        cols = [c for c in self.table.columns if c.startswith("p_")]
        p = self.table[cols].to_numpy(dtype=float).ravel()
        return p[np.isfinite(p)]


def ppc_summary(
    idata,
    *,
    groups: Sequence[str] = ("spot_counts", "proteins"),
    alpha: float = 0.05,
    statistics: Sequence[str] = STATISTICS,
) -> PPCSummary:
    """Per gene / protein: observed vs replicated mean, variance, zero fraction and p-values.

    Parameters
    ----------
    idata
        From :func:`to_inference_data` (or any InferenceData whose ``posterior_predictive``
        and ``observed_data`` hold ``groups`` with dims ``(chain, draw, row, feature)``).
    groups
        Observed variables to check; absent ones are skipped.
    alpha
        A feature is *extreme* when any of its p-values is below ``alpha/2`` or above
        ``1 - alpha/2``.
    statistics
        Subset of ``("mean", "var", "zero_frac", "dispersion")``; ``dispersion`` needs the
        likelihood moments ``{var}_lik_mean`` / ``{var}_lik_variance`` in ``idata.posterior``
        (written by :func:`to_inference_data`) and is NaN without them, and for variables
        with mixed replicates (``mixed_sites`` of :func:`to_inference_data`).

    Returns
    -------
    PPCSummary
    """
    if not 0 < alpha < 1:
        raise InputError(f"alpha must lie in (0, 1), got {alpha}.")
    unknown = set(statistics) - set(STATISTICS)
    if unknown:
        raise InputError(f"unknown statistics {sorted(unknown)}; choose from {STATISTICS}.")
    for group in ("posterior_predictive", "observed_data"):
        if group not in idata.groups():
            raise InputError(f"idata has no '{group}' group; build it with pyrospatial.diagnostics.to_inference_data.")
    frames = []
    for name in groups:
        if name not in idata.posterior_predictive or name not in idata.observed_data:
            continue
        rep = idata.posterior_predictive[name]
        obs = idata.observed_data[name].to_numpy()
        rep = rep.stack(sample=("chain", "draw")).transpose("sample", ...).to_numpy()
        feature_dim = idata.observed_data[name].dims[-1]
        features = idata.observed_data[name][feature_dim].to_numpy()
        t_obs, t_rep = _statistics(obs), _statistics(rep)
        mixed = str(idata.posterior_predictive.attrs.get("mixed_replicates", "")).split(",")
        if "dispersion" in statistics:
            mean_key, var_key = f"{name}_lik_mean", f"{name}_lik_variance"
            if name in mixed:  # the realised discrepancy needs replicates drawn around the same mean
                t_obs["dispersion"] = t_rep["dispersion"] = None
            elif "posterior" in idata.groups() and mean_key in idata.posterior and var_key in idata.posterior:
                mu = idata.posterior[mean_key].stack(sample=("chain", "draw")).transpose("sample", ...).to_numpy()
                var = np.maximum(idata.posterior[var_key].stack(sample=("chain", "draw")).transpose("sample", ...).to_numpy(), 1e-12)
                t_rep["dispersion"] = ((rep - mu) ** 2 / var).mean(axis=-2)
                t_obs["dispersion"] = ((obs[None] - mu) ** 2 / var).mean(axis=-2)  # per draw: realised discrepancy
            else:
                t_obs["dispersion"] = t_rep["dispersion"] = None
        frame = pd.DataFrame({"group": name, "feature": features.astype(str)})
        for stat in statistics:
            if t_obs.get(stat) is None:  # dispersion needs the likelihood's moments
                frame[f"observed_{stat}"] = frame[f"replicated_{stat}"] = frame[f"p_{stat}"] = np.nan
                continue
            o = t_obs[stat]
            frame[f"observed_{stat}"] = o.mean(axis=0) if o.ndim == 2 else o
            frame[f"replicated_{stat}"] = t_rep[stat].mean(axis=0)
            frame[f"p_{stat}"] = bayesian_pvalue(t_rep[stat], o)
        frames.append(frame)
    if not frames:
        raise InputError(f"none of {list(groups)} is in both posterior_predictive and observed_data.")
    table = pd.DataFrame({column: np.concatenate([f[column].to_numpy() for f in frames]) for column in frames[0].columns})
    p = table[[f"p_{s}" for s in statistics]].to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore"):
        table["extreme"] = ((p < alpha / 2) | (p > 1 - alpha / 2)).any(axis=1)
    by_group = {g: float(t["extreme"].mean()) for g, t in table.groupby("group")}
    return PPCSummary(table=table, extreme_fraction=float(table["extreme"].mean()), by_group=by_group, alpha=alpha)


# ------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------
def reliability_curve(
    prob: np.ndarray, outcome: np.ndarray, *, weights: np.ndarray | None = None, n_bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Binned predicted probability vs observed frequency.

    Returns ``(mean_predicted, observed_frequency, weight)`` per non-empty bin (equal-width
    bins on [0, 1]); ``weights`` weight each pair (e.g. how many non-edges a sampled one
    stands for).
    """
    prob = np.asarray(prob, dtype=np.float64).ravel()
    outcome = np.asarray(outcome, dtype=np.float64).ravel()
    if prob.shape != outcome.shape:
        raise InputError(f"prob {prob.shape} and outcome {outcome.shape} must have the same length.")
    w = np.ones_like(prob) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    bins = np.clip((prob * n_bins).astype(int), 0, n_bins - 1)
    tot = np.bincount(bins, weights=w, minlength=n_bins)
    pred = np.bincount(bins, weights=w * prob, minlength=n_bins)
    freq = np.bincount(bins, weights=w * outcome, minlength=n_bins)
    keep = tot > 0
    return pred[keep] / tot[keep], freq[keep] / tot[keep], tot[keep]


def expected_calibration_error(
    prob: np.ndarray, outcome: np.ndarray, *, weights: np.ndarray | None = None, n_bins: int = 10
) -> float:
    """ECE: bin-weight-averaged ``|mean predicted - observed frequency|`` (equal-width bins)."""
    pred, freq, tot = reliability_curve(prob, outcome, weights=weights, n_bins=n_bins)
    if tot.sum() == 0:
        return float("nan")
    return float(np.sum(tot * np.abs(pred - freq)) / tot.sum())


def interval_coverage_by_level(draws: np.ndarray, truth: np.ndarray, levels: Iterable[float]) -> np.ndarray:
    """Empirical coverage of central posterior intervals of ``draws`` (axis 0) at each level;
    NaN truth entries are ignored."""
    draws = np.asarray(draws, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if draws.shape[1:] != truth.shape:
        raise InputError(f"draws {draws.shape} must be (S, *truth.shape) with truth {truth.shape}.")
    ok = np.isfinite(truth)
    out = []
    for level in levels:
        lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2], axis=0)
        out.append(float(np.mean(((truth >= lo) & (truth <= hi))[ok])))
    return np.asarray(out)


def pit_coverage_by_level(draws: np.ndarray, truth: np.ndarray, levels: Iterable[float]) -> np.ndarray:
    """Coverage at each level measured by the randomised probability integral transform.

    :func:`interval_coverage_by_level` scores the interval a user reads off ``S`` draws, and
    that interval is biased in two ways that have nothing to do with the posterior itself:
    with few draws the empirical 5% / 95% quantiles sit inside the true ones (with 40 exact
    draws of a continuous posterior the "90%" interval covers about 0.86, with 200 about
    0.89), and for integer quantities the closed interval ``[q05, q95]`` holds its endpoints'
    whole probability mass, so it over-covers (at a spot with 5 cells, most per-cell counts
    are 0 or 1). This score has neither bias: the rank of the truth among the draws,
    ``r = #(draws < truth) + U{0..#(draws == truth)}``, is uniform on ``{0, ..., S}`` when the
    truth behaves like one more posterior draw, so the randomised PIT
    ``u = (r + V) / (S + 1)``, ``V ~ U(0, 1)``, is uniform on ``(0, 1)`` (Czado, Gneiting &
    Held 2009, for count data). The value returned per level is the expected fraction of
    entries with ``u`` inside ``[(1 - level) / 2, (1 + level) / 2]``, computed exactly (no
    random numbers): a calibrated posterior scores ``level`` for any ``S`` and for counts.

    Parameters
    ----------
    draws
        ``(S, ...)`` posterior draws.
    truth
        The true values, shape ``draws.shape[1:]``; NaN entries are ignored.
    levels
        Central levels, e.g. ``(0.5, 0.9)``.
    """
    draws = np.asarray(draws, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if draws.shape[1:] != truth.shape:
        raise InputError(f"draws {draws.shape} must be (S, *truth.shape) with truth {truth.shape}.")
    ok = np.isfinite(truth)
    n_draws = draws.shape[0]
    below = (draws < truth).sum(axis=0)[ok].astype(np.float64)
    ties = (draws == truth).sum(axis=0)[ok].astype(np.float64)
    start, stop = below / (n_draws + 1), (below + ties + 1) / (n_draws + 1)  # u ~ U(start, stop)
    out = []
    for level in levels:
        lo, hi = (1 - level) / 2, (1 + level) / 2
        overlap = np.clip(np.minimum(stop, hi) - np.maximum(start, lo), 0.0, None)
        out.append(float(np.mean(overlap / (stop - start))))
    return np.asarray(out)


def align_sign(draws: np.ndarray, truth: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Flip, per group (e.g. cell type) and dimension, the sign of draws ``(S, N, D)`` whose
    posterior mean correlates negatively with ``truth`` ``(N, D)``: for latents such as CORAL's
    ``v`` whose sign is not identified, so that coverage of the truth is meaningful."""
    draws = np.array(draws, dtype=np.float64, copy=True)
    truth = np.asarray(truth, dtype=np.float64).reshape(draws.shape[1], -1)
    draws = draws.reshape(draws.shape[0], draws.shape[1], -1)
    mean = draws.mean(0)
    for g in np.unique(groups):
        rows = np.asarray(groups) == g
        if rows.sum() < 3:
            continue
        for d in range(truth.shape[1]):
            r = np.corrcoef(mean[rows, d], truth[rows, d])[0, 1]
            if np.isfinite(r) and r < 0:
                draws[:, rows, d] *= -1
    return draws


def chain_convergence(draws: np.ndarray, num_chains: int, *, max_coords: int = 2000) -> tuple[float, float]:
    """Largest split-R-hat and smallest bulk ESS over the coordinates of ``draws``, by ArviZ
    (rank-normalised, Vehtari et al. 2021).

    ``draws`` ``(S, ...)`` interleave the chains as :func:`pyrospatial.refine.refine_posterior`
    returns them: row ``k * num_chains + c`` is the ``k``-th kept state of chain ``c``. NaN with
    fewer than 4 kept per chain (too few to split). A quantity with more than ``max_coords``
    coordinates is checked on ``max_coords`` evenly spaced ones (ArviZ loops over coordinates);
    constant or non-finite coordinates are skipped. R-hat above about 1.05 means the chains
    disagree: the draws are not yet from the posterior.
    """
    import arviz as az

    C = int(num_chains)
    draws = np.asarray(draws, dtype=float)
    per_chain = draws.shape[0] // max(C, 1)
    if C < 2 or per_chain < 4:
        return float("nan"), float("nan")
    x = draws[: per_chain * C].reshape(per_chain, C, -1).transpose(1, 0, 2)  # (chain, draw, coordinate)
    if x.shape[2] > max_coords:
        x = x[:, :, np.linspace(0, x.shape[2] - 1, int(max_coords)).round().astype(int)]
    x = x[:, :, np.isfinite(x).all(axis=(0, 1)) & (np.ptp(x, axis=(0, 1)) > 0)]
    if x.shape[2] == 0:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "more chains than draws" is the intended layout here
        data = az.convert_to_dataset({"x": x})
        rhat = az.rhat(data)["x"].values
        ess = az.ess(data, method="bulk")["x"].values
    return float(np.nanmax(rhat)), float(np.nanmin(ess))


def sbc_ranks(draws: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Simulation-based calibration ranks: per replicate, how many of its ``L`` posterior
    draws (axis 1 of ``draws`` ``(R, L)``) fall below the true value ``truth`` ``(R,)``."""
    draws = np.asarray(draws)
    truth = np.asarray(truth)
    return (draws < truth[:, None]).sum(axis=1)


def sbc_ks_pvalue(ranks: np.ndarray, num_draws: int, *, seed: int = 0) -> float:
    """Kolmogorov-Smirnov p-value of the uniformity of SBC ranks in ``{0, ..., L}``.

    The discrete ranks are made continuous with uniform jitter, ``u = (rank + U) / (L + 1)``,
    which is exactly Uniform(0, 1) under calibration, so the KS test applies as is.
    """
    from scipy import stats

    rng = np.random.default_rng(seed)
    ranks = np.asarray(ranks, dtype=np.float64)
    u = (ranks + rng.random(ranks.shape)) / (int(num_draws) + 1)
    return float(stats.kstest(u, "uniform").pvalue)


# ------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def plot_ppc(idata, var_name: str, features: Sequence[str], path: str | Path, *, num_pp_samples: int = 50) -> Path:
    """ArviZ posterior predictive density plots (``az.plot_ppc``), one panel per feature."""
    import arviz as az

    plt = _plt()
    if var_name not in idata.observed_data:
        raise InputError(f"'{var_name}' is not in idata.observed_data (have {list(idata.observed_data.data_vars)}).")
    dim = idata.observed_data[var_name].dims[-1]
    features = [str(f) for f in features]
    fig, axes = plt.subplots(1, len(features), figsize=(3.2 * len(features), 2.8), squeeze=False)
    n_draws = idata.posterior_predictive.sizes["draw"] * idata.posterior_predictive.sizes["chain"]
    for ax, feature in zip(axes[0], features):
        az.plot_ppc(
            idata, var_names=[var_name], coords={dim: [feature]}, ax=ax,
            num_pp_samples=min(num_pp_samples, n_draws), random_seed=0, legend=False,
        )
        ax.set_title(f"{var_name}: {feature}", fontsize=9)
    return _save(fig, path)


def plot_pvalues(summary: PPCSummary, path: str | Path, *, title: str = "") -> Path:
    """Histogram of the Bayesian p-values per statistic, and their QQ plot against Uniform(0, 1)."""
    plt = _plt()
    fig, (ax_h, ax_q) = plt.subplots(1, 2, figsize=(8, 3.2))
    bins = np.linspace(0, 1, 21)
    for stat in STATISTICS:
        col = f"p_{stat}"
        if col not in summary.table:
            continue
        p = summary.table[col].to_numpy(dtype=float)
        p = p[np.isfinite(p)]
        if not len(p):
            continue
        ax_h.hist(p, bins=bins, histtype="step", lw=1.5, label=stat)
        q = np.sort(p)
        ax_q.plot((np.arange(len(q)) + 0.5) / len(q), q, marker=".", lw=0.8, label=stat)
    a = summary.alpha
    for x in (a / 2, 1 - a / 2):
        ax_h.axvline(x, color="grey", ls=":", lw=1)
    ax_h.set_xlabel("Bayesian p-value")
    ax_h.set_ylabel("features")
    ax_h.set_title(title or f"extreme fraction {summary.extreme_fraction:.2f}", fontsize=9)
    ax_h.legend(frameon=False, fontsize=8)
    ax_q.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
    ax_q.set_xlabel("Uniform quantile")
    ax_q.set_ylabel("p-value quantile")
    ax_q.set_title("QQ against Uniform(0, 1)", fontsize=9)
    return _save(fig, path)


def plot_reliability(
    prob: np.ndarray, outcome: np.ndarray, path: str | Path, *, weights: np.ndarray | None = None,
    n_bins: int = 10, title: str = "edge probabilities",
) -> Path:
    """Reliability diagram: observed frequency vs mean predicted probability per bin, with the ECE."""
    plt = _plt()
    pred, freq, tot = reliability_curve(prob, outcome, weights=weights, n_bins=n_bins)
    ece = expected_calibration_error(prob, outcome, weights=weights, n_bins=n_bins)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="ideal")
    size = 20 + 200 * np.sqrt(tot / tot.max()) if len(tot) else 20
    ax.scatter(pred, freq, s=size, zorder=3, label="bins (area ~ weight)")
    ax.plot(pred, freq, lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted probability (posterior mean)")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"{title}: ECE {ece:.3f}", fontsize=9)
    ax.legend(frameon=False, fontsize=8)
    return _save(fig, path)


def plot_coverage(levels: Sequence[float], coverage: Mapping[str, np.ndarray], path: str | Path, *,
                  title: str = "interval coverage") -> Path:
    """Empirical vs nominal coverage of central intervals, one line per quantity."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="ideal")
    ax.fill_between([0, 1], [-0.05, 0.95], [0.05, 1.05], color="grey", alpha=0.12, lw=0)
    for name, values in coverage.items():
        ax.plot(levels, values, marker="o", ms=3, label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("nominal level of the central interval")
    ax.set_ylabel("empirical coverage")
    ax.set_title(title, fontsize=9)
    ax.legend(frameon=False, fontsize=7)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------
# a check of a results directory (used by ``pyrospatial check``)
# ------------------------------------------------------------------------------------------
def edge_reliability_inputs(idata) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(posterior-mean probability, outcome, weight) over the graph's edges and the sampled
    non-edges; each sampled non-edge weighs as many non-adjacent pairs as it stands for."""
    post = idata.posterior
    probs, outcomes, weights = [], [], []
    if "edge_prob" in post:
        p = post["edge_prob"].mean(("chain", "draw")).to_numpy()
        probs.append(p), outcomes.append(np.ones_like(p)), weights.append(np.ones_like(p))
    if "nonedge_prob" in post:
        p = post["nonedge_prob"].mean(("chain", "draw")).to_numpy()
        w = float(idata.constant_data["nonedge_weight"]) if "constant_data" in idata.groups() else 1.0
        probs.append(p), outcomes.append(np.zeros_like(p)), weights.append(np.full_like(p, w))
    if not probs:
        raise InputError("idata.posterior has neither 'edge_prob' nor 'nonedge_prob' (a model without edges).")
    return np.concatenate(probs), np.concatenate(outcomes), np.concatenate(weights)


def _top_features(summary: PPCSummary, group: str, k: int) -> list[str]:
    """The ``k`` features of ``group`` with the most extreme p-values (ties: table order)."""
    t = summary.table[summary.table["group"] == group]
    if t.empty:
        return []
    p = t[[c for c in t.columns if c.startswith("p_")]].to_numpy(dtype=float)
    dist = np.nanmax(np.abs(np.nan_to_num(p, nan=0.5) - 0.5), axis=1)
    return t["feature"].to_numpy()[np.argsort(-dist, kind="stable")[:k]].tolist()


def check_results(results: str | Path, *, out: str | Path | None = None, n_features: int = 3,
                  alpha: float = 0.05) -> dict[str, Any]:
    """Criticise a demo / fit output directory holding ``inference_data.nc``.

    Writes ``figures/ppc_{spot_counts,proteins}.png``, ``figures/ppc_pvalues.png``,
    ``figures/edge_reliability.png`` (when the model has edges), ``ppc_summary.csv`` and
    ``check.md`` into ``out`` (default: ``results``); returns the headline numbers
    (``ppc_extreme_pvalue_fraction``, per-group fractions, ``edge_ece``).
    """
    results = Path(results)
    out = Path(out) if out is not None else results
    path = results / "inference_data.nc"
    if not path.exists():
        raise InputError(
            f"{path} does not exist: --results must be a folder written by `pyrospatial demo` or "
            "`pyrospatial fit` (they write inference_data.nc)."
        )
    idata = load_inference_data(path)
    figures = out / "figures"
    summary = ppc_summary(idata, alpha=alpha)
    summary.table.to_csv(out / "ppc_summary.csv", index=False)
    written = {"pvalues": plot_pvalues(summary, figures / "ppc_pvalues.png")}
    for group in ("spot_counts", "proteins"):
        feats = _top_features(summary, group, n_features)
        if feats:
            written[group] = plot_ppc(idata, group, feats, figures / f"ppc_{group}.png")
    result: dict[str, Any] = {
        "ppc_extreme_pvalue_fraction": summary.extreme_fraction,
        "ppc_extreme_pvalue_fraction_by_group": summary.by_group,
        "edge_ece": None,
    }
    try:
        prob, outcome, weight = edge_reliability_inputs(idata)
        result["edge_ece"] = expected_calibration_error(prob, outcome, weights=weight)
        written["edges"] = plot_reliability(prob, outcome, figures / "edge_reliability.png", weights=weight)
    except InputError:
        pass
    _check_report(out / "check.md", idata, summary, result, written, out)
    result["figures"] = {k: str(Path(v).relative_to(out)) for k, v in written.items()}
    return result


def _check_report(path: Path, idata, summary: PPCSummary, result: dict, figures: dict, root: Path) -> None:
    t = summary.table
    worst = t.assign(_d=(t[[c for c in t.columns if c.startswith("p_")]].fillna(0.5) - 0.5).abs().max(axis=1))
    worst = worst.sort_values("_d", ascending=False).head(10)
    method = idata.posterior.attrs.get("method", "?")
    lines = [
        "# Model check: posterior predictive checks",
        "",
        f"Posterior draws: {idata.posterior.sizes['draw']} ({method}). For every gene (over spots) and",
        "protein (over cells) the observed mean, variance, zero fraction and dispersion (mean squared residual",
        "over the likelihood variance, per draw) are compared with the same",
        "statistics of data replicated from the fitted model (Bayesian p-value = P(T_rep > T_obs); near 0 or 1",
        f"is a misfit). A feature is *extreme* when any p-value lies outside [{summary.alpha / 2:g}, {1 - summary.alpha / 2:g}].",
        "",
        f"- fraction of features with an extreme p-value: **{summary.extreme_fraction:.3f}**",
    ]
    lines += [f"  - {g}: {v:.3f}" for g, v in summary.by_group.items()]
    mixed = [m for m in str(idata.posterior_predictive.attrs.get("mixed_replicates", "")).split(",") if m]
    if mixed:
        lines.append(
            f"- {', '.join(mixed)}: *mixed* replicates, with {idata.posterior_predictive.attrs.get('mixed_sites')} "
            "redrawn from its prior given the other draws (each cell's own posterior state was fitted to its "
            "proteins, so posterior replicates would hug the data). They check the population model "
            "(learned prior of the cell states, decoder, likelihood); the dispersion statistic needs replicates "
            "around the posterior mean and is not computed for them."
        )
    if result.get("edge_ece") is not None:
        lines.append(f"- edge probabilities, expected calibration error (graph edges + weighted non-edges): "
                     f"**{result['edge_ece']:.4f}**")
    lines += [
        "",
        "How to read it: a well-specified model gives few extreme features (posterior predictive p-values",
        "cluster around 0.5). p = P(T_rep > T_obs), so p near 0 means the data exceed the replicates and p near",
        "1 means the replicates exceed the data. p(var) near 0: the data are more variable than the model",
        "allows; near 1, the model is noisier than the data (for proteins, typically a Gamma concentration",
        "estimated too low). p(zero_frac) near 0: more zeros than the model predicts. p(dispersion) near 0:",
        "residuals larger than the likelihood's variance (e.g. a Poisson model of over-dispersed counts).",
        "",
        "## Most extreme features",
        "",
        "| group | feature | obs mean | rep mean | p mean | obs var | rep var | p var | obs zeros | rep zeros | p zeros "
        "| obs dispersion | rep dispersion | p dispersion |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in worst.iterrows():
        lines.append(
            f"| {r['group']} | {r['feature']} | {r['observed_mean']:.3g} | {r['replicated_mean']:.3g} | {r['p_mean']:.3f} "
            f"| {r['observed_var']:.3g} | {r['replicated_var']:.3g} | {r['p_var']:.3f} "
            f"| {r['observed_zero_frac']:.3f} | {r['replicated_zero_frac']:.3f} | {r['p_zero_frac']:.3f} "
            f"| {r.get('observed_dispersion', np.nan):.3g} | {r.get('replicated_dispersion', np.nan):.3g} "
            f"| {r.get('p_dispersion', np.nan):.3f} |"
        )
    lines += ["", "## Figures", ""]
    for name, fig in figures.items():
        lines.append(f"![{name}]({Path(fig).relative_to(root).as_posix()})")
    lines += ["", "Full table: `ppc_summary.csv`.", ""]
    path.write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------
# simulation-based calibration of SVI on small models with a known answer
# ------------------------------------------------------------------------------------------
#: toy models for :func:`sbc_toy`: prior (loc, scale) of the parameter and the likelihood
SBC_TOYS = {
    # y_i ~ Normal(mu, 1), mu ~ Normal(0, 1): conjugate, the posterior is a Normal, so the
    # mean-field Normal guide contains it exactly
    "normal_mean": (0.0, 1.0),
    # y_i ~ Poisson(exp(eta)), eta ~ Normal(1, 0.5): not conjugate, posterior close to Normal
    "poisson_log_rate": (1.0, 0.5),
}


@dataclass
class SBCResult:
    """Ranks (``R``,) of the true parameter among ``num_draws`` guide draws per replicate,
    and the KS p-value of their uniformity (:func:`sbc_ks_pvalue`)."""

    ranks: np.ndarray
    num_draws: int
    ks_pvalue: float


def sbc_toy(
    toy: str = "normal_mean",
    *,
    num_replicates: int = 200,
    num_draws: int = 99,
    n_obs: int = 10,
    fixed_scale: float | None = None,
    steps: int = 1500,
    lr: float = 0.05,
    seed: int = 0,
) -> SBCResult:
    """Simulation-based calibration of SVI with a Normal guide on a one-parameter toy model.

    ``num_replicates`` data sets are simulated from the prior predictive (parameter from its
    prior, ``n_obs`` observations); one vectorised SVI run (Pyro ``Trace_ELBO``, Adam, the
    learning rate divided by 10 for the last third) fits a Normal guide per replicate; the
    rank of the true parameter among ``num_draws`` guide draws is uniform on
    ``{0..num_draws}`` if and only if the fitted posteriors are calibrated (Talts et al. 2018).

    Parameters
    ----------
    toy
        A key of :data:`SBC_TOYS`.
    fixed_scale
        None: the guide's scale is learned. A float: the scale is fixed there -- a
        deliberately broken, over-confident guide (e.g. 0.01) that the check must reject.
    """
    import pyro
    import pyro.distributions as dist
    from pyro.infer import Trace_ELBO

    if toy not in SBC_TOYS:
        raise InputError(f"toy must be one of {sorted(SBC_TOYS)}, got {toy!r}.")
    if num_replicates < 10 or num_draws < 9:
        raise InputError("num_replicates must be >= 10 and num_draws >= 9 for a meaningful rank test.")
    prior_loc, prior_scale = SBC_TOYS[toy]
    gen = torch.Generator().manual_seed(int(seed))
    R = int(num_replicates)
    theta = prior_loc + prior_scale * torch.randn(R, generator=gen)
    if toy == "normal_mean":
        y = theta[:, None] + torch.randn(R, n_obs, generator=gen)
    else:
        y = torch.poisson(torch.exp(theta)[:, None].expand(R, n_obs), generator=gen)

    def model(y):
        t = pyro.sample("theta", dist.Normal(torch.full((R,), prior_loc), prior_scale).to_event(1))
        t = t.unsqueeze(-1)  # (..., R, 1): leading dims are vectorised ELBO particles
        like = dist.Normal(t, 1.0) if toy == "normal_mean" else dist.Poisson(torch.exp(t))
        pyro.sample("y", like.expand(t.shape[:-1] + (n_obs,)).to_event(2), obs=y)

    loc = torch.full((R,), float(prior_loc), requires_grad=True)
    log_scale = torch.full((R,), math.log(prior_scale) - 1.0, requires_grad=True)

    def scale():
        return torch.full((R,), float(fixed_scale)) if fixed_scale is not None else log_scale.exp()

    def guide(y):
        pyro.sample("theta", dist.Normal(loc, scale()).to_event(1))

    params = [loc] if fixed_scale is not None else [loc, log_scale]
    optim = torch.optim.Adam(params, lr=lr)
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    torch.manual_seed(int(seed))
    for step in range(int(steps)):
        if step == (2 * steps) // 3:
            for group in optim.param_groups:
                group["lr"] = lr / 10
        optim.zero_grad()
        elbo.differentiable_loss(model, guide, y).backward()
        optim.step()
    with torch.no_grad():
        draws = loc[None] + scale()[None] * torch.randn(num_draws, R, generator=gen)
    ranks = sbc_ranks(draws.T.numpy(), theta.numpy())
    return SBCResult(ranks=ranks, num_draws=int(num_draws), ks_pvalue=sbc_ks_pvalue(ranks, num_draws, seed=seed))
