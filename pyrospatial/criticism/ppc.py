"""Posterior predictive checks: replicated data under posterior draws and Bayesian p-values.

For a feature (a gene over spots, a protein over cells) and a statistic ``T`` (mean,
variance, zero fraction across rows, and the *dispersion* ``mean_rows (y - E[y|theta])^2 /
Var[y|theta]``, a discrepancy that depends on the draw ``theta`` and is about 1 under the
model), ``p = P(T(y_rep) > T(y)) + 0.5 P(T(y_rep) = T(y))`` over the posterior draws (a mid
p-value, so ties give 0.5). Posterior predictive p-values of a well-specified model
concentrate around 0.5 (they re-use the data); a pile-up at 0 or 1 flags a misfit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyro.poutine as poutine
from pyro.poutine.util import site_is_subsample
import torch
from tqdm.auto import tqdm

from pyrospatial.errors import InputError
from pyrospatial.protocols import require_contract

__all__ = ["STATISTICS", "posterior_predictive", "observed_data", "bayesian_pvalue", "PPCSummary", "ppc_summary"]


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


def _row_orders(batch) -> dict[str, np.ndarray]:
    """Per local plate, the permutation that puts the batch's rows into dataset order."""
    return {"cells": np.argsort(batch.cell_index.cpu().numpy()), "spots": np.argsort(batch.spot_index.cpu().numpy())}


def _conditioned_names(model: Callable, batch, draws: Mapping[str, np.ndarray],
                       prior_sites: Iterable[str] = (), observed: Iterable[str] = ()) -> list[str]:
    """Sites of ``model`` to condition on: its latent sites and the deterministic sites that
    ``draws`` holds (conditioning a ``pyro.deterministic`` site replaces its value downstream).

    A latent site without draws is an error unless it is named in ``prior_sites`` (it is then
    drawn from its prior, which is exact when the model uses it only through a deterministic
    site that is conditioned, e.g. a read-out used only through the expected expression).
    ``observed``: the model's observed sites (drawn, not conditioned, under ``predictive=True``).
    """
    observed = set(observed)
    with torch.no_grad():
        trace = poutine.trace(model).get_trace(batch, predictive=True)
    names, missing = [], []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or name in observed or site_is_subsample(site):
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
        A model following the batch protocol with a ``predictive`` flag and a ``contract``
        (:class:`~pyrospatial.protocols.ModelContract`) naming its observed sites.
    batch
        The full-data batch (``dataset.full_batch()``); its fixed non-edges are used.
    draws, plates
        Posterior draws (site -> ``(S, ...)``, rows in dataset order) and their plates
        (site -> ``"cells" | "spots" | "global"``), as returned by
        :func:`~pyrospatial.engine.posterior.sample_posterior` / :func:`~pyrospatial.engine.refine.refine_posterior`.
        Deterministic sites present in ``draws`` (e.g. ``expected_rna``) are conditioned too.
    prior_sites
        Latent sites allowed to be missing from ``draws`` (see :func:`_conditioned_names`).
    mixed_sites
        Latent sites *not* conditioned on: redrawn from their prior given the other draws
        ("mixed" replication, Gelman, Meng & Stern 1996), e.g. a per-cell state given its
        own prior's inputs.

    Returns
    -------
    dict
        ``{site: (S, ...)}`` for each declared observed site present in the trace, with rows
        of ``"cells"`` / ``"spots"`` sites in *dataset* order (pair and global sites in the
        batch's order); ``{site}_{moment}`` for each of the site's declared ``moments`` of the
        likelihood under each draw.
    """
    contract = require_contract(model, "posterior_predictive")
    mixed = set(mixed_sites)
    conditioned = _conditioned_names(model, batch, draws, tuple(prior_sites) + tuple(mixed), contract.observed_names)
    latent = [name for name in conditioned if name not in mixed]
    S = int(next(iter(draws.values())).shape[0])
    orders = _row_orders(batch)
    out: dict[str, list[np.ndarray]] = {}
    torch.manual_seed(int(seed))
    iterator = tqdm(range(S), desc="posterior predictive", disable=not progress, leave=False)
    with torch.no_grad():
        for s in iterator:
            values = _row_values({k: draws[k] for k in latent}, plates, s, batch)
            conditioned = poutine.condition(model, data=values)
            trace = poutine.trace(conditioned).get_trace(batch, predictive=True)
            for declared in contract.observed:
                if declared.name not in trace.nodes:
                    continue
                site = trace.nodes[declared.name]
                order = orders.get(declared.plate)  # None: pair or global rows, kept as they are
                value = site["value"].detach().cpu().numpy()
                value = value if order is None else value[order]
                out.setdefault(declared.name, []).append(value)
                for moment in declared.moments:  # of the likelihood under this draw
                    m = np.broadcast_to(getattr(site["fn"], moment).detach().cpu().numpy(), value.shape)
                    m = m if order is None else m[order]
                    out.setdefault(f"{declared.name}_{moment}", []).append(np.ascontiguousarray(m))
    return {k: np.stack(v) for k, v in out.items()}


def observed_data(
    model: Callable,
    batch,
    draws: Mapping[str, np.ndarray],
    plates: Mapping[str, str],
    *,
    prior_sites: Iterable[str] = (),
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The observations of the model's declared observed sites, read off its own trace.

    The model runs once on ``batch`` (observations kept) under the first posterior draw, so
    each observed site holds exactly what the model conditions on (e.g. transformed
    intensities, or 1 / 0 for observed edges / sampled non-edges).

    Returns
    -------
    values, scales
        ``{site: array}`` with rows of ``"cells"`` / ``"spots"`` sites in dataset order, and
        ``{site: scale}``: the log-likelihood scale of each site, i.e. how many units of the
        full data one entry stands for (e.g. the non-adjacent pairs a sampled non-edge
        represents).
    """
    contract = require_contract(model, "observed_data")
    names = _conditioned_names(model, batch, draws, prior_sites, contract.observed_names)
    orders = _row_orders(batch)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        values = _row_values({k: draws[k] for k in names}, plates, 0, batch)
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace(batch)
    out, scales = {}, {}
    for declared in contract.observed:
        site = trace.nodes.get(declared.name)
        if site is None or not site["is_observed"]:
            continue
        value = torch.as_tensor(site["value"]).detach().cpu().numpy().astype(np.float32)
        order = orders.get(declared.plate)
        out[declared.name] = value if order is None else value[order]
        scales[declared.name] = float(site["scale"])
    return out, scales


def _pairs(pairs: torch.Tensor, batch) -> np.ndarray:
    """(K, 2) pairs in dataset cell indices."""
    cell_index = batch.cell_index.cpu().numpy()
    p = pairs.cpu().numpy()
    return np.stack([cell_index[p[0]], cell_index[p[1]]], axis=1).astype(np.int64) if p.size else np.zeros((0, 2), np.int64)


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
    groups: Sequence[str] | None = None,
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
        Observed variables to check; absent ones are skipped. None: every variable of
        ``observed_data`` with a feature dimension (``(row, feature)``), in its order.
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
            raise InputError(f"idata has no '{group}' group; build it with pyrospatial.criticism.arviz.to_inference_data.")
    if groups is None:
        groups = [name for name, var in idata.observed_data.data_vars.items() if var.ndim >= 2]
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
