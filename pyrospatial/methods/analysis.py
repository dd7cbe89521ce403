"""Posterior analysis shared by the models: spot-consistent count splits
(:func:`split_spot_counts`), cell-type interaction matrices with intervals, and spatial domains
with assignment confidence.

All functions take posterior *draws* (leading axis ``S``) and return summaries with their
spread; none of them returns a point estimate alone.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans

from pyrospatial.engine.summary import blockwise, linear_quantiles
from pyrospatial.methods.count_split import QUANTILES, CountSplit, split_spot_counts

__all__ = [
    "QUANTILES",
    "CountSplit",
    "deconvolve_counts",
    "interaction_matrix",
    "spatial_domains",
    "split_spot_counts",
    "summarise_draws",
]


def summarise_draws(draws: np.ndarray) -> dict[str, np.ndarray]:
    """Mean, sd, q05, q50, q95 over the leading (draw) axis, a block of rows at a time
    (:func:`~pyrospatial.engine.summary.blockwise`: same values, bounded working memory)."""
    return blockwise(_summarise_block, draws)


def _summarise_block(draws: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`summarise_draws` of one block of draws."""
    draws = np.asarray(draws)
    out = {"mean": draws.mean(0), "sd": draws.std(0, ddof=1) if draws.shape[0] > 1 else np.zeros(draws.shape[1:])}
    qs = linear_quantiles(draws, QUANTILES.values())
    out.update({name: q for name, q in zip(QUANTILES, qs)})
    return out


# ------------------------------------------------------------------------------------------
# spot-consistent per-cell counts (pyrospatial.methods.count_split)
# ------------------------------------------------------------------------------------------
def deconvolve_counts(*args: Any, **kwargs: Any) -> CountSplit:
    """Deprecated name of :func:`split_spot_counts` (same arguments and result); warns with a
    ``DeprecationWarning``."""
    warnings.warn(
        "pyrospatial.methods.analysis.deconvolve_counts is deprecated: call split_spot_counts (same arguments).",
        DeprecationWarning, stacklevel=2,
    )
    return split_spot_counts(*args, **kwargs)


# ------------------------------------------------------------------------------------------
# interactions
# ------------------------------------------------------------------------------------------
def interaction_matrix(
    edge_prob_draws: np.ndarray, edges: np.ndarray, cell_type: np.ndarray, n_types: int, *, keep_draws: bool = False
) -> dict[str, np.ndarray]:
    """Cell-type x cell-type interaction scores with posterior intervals.

    For draw ``s``, entry ``(a, b)`` is the mean edge probability over the graph's edges that
    join a type-``a`` cell and a type-``b`` cell (symmetric); the result summarises the
    draws: ``mean``, ``sd``, ``q05``, ``q50``, ``q95`` (T, T) and ``n_edges`` (T, T); pairs
    with no edge are NaN. ``keep_draws``: also ``draws`` (S, T, T), one matrix per draw.
    """
    edge_prob_draws = np.asarray(edge_prob_draws)
    a, b = cell_type[edges[0]], cell_type[edges[1]]
    pair = np.concatenate([a * n_types + b, b * n_types + a])  # both orientations
    n_edges = np.bincount(pair, minlength=n_types * n_types).astype(float)
    # one draw's probabilities in both orientations at a time (all draws at once: S x 2E floats)
    sums = np.stack([np.bincount(pair, weights=np.concatenate([row, row]), minlength=n_types * n_types)
                     for row in edge_prob_draws])
    with np.errstate(invalid="ignore", divide="ignore"):
        per_draw = (sums / n_edges).reshape(-1, n_types, n_types)
    out = summarise_draws(per_draw)
    if keep_draws:
        out["draws"] = per_draw
    out["n_edges"] = (n_edges / 2).reshape(n_types, n_types) + np.diag(np.diag((n_edges / 2).reshape(n_types, n_types)))
    return out


# ------------------------------------------------------------------------------------------
# domains
# ------------------------------------------------------------------------------------------
def spatial_domains(
    z_draws: np.ndarray,
    edges: np.ndarray | None,
    n_domains: int,
    *,
    smooth: int = 1,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Spatial domains from posterior z with a per-cell assignment confidence.

    Each draw ``z^s`` is averaged over each cell's graph neighbourhood (``smooth`` rounds of
    neighbour averaging, so domains are spatial), then clustered with k-means. The consensus
    labels come from the posterior mean; each draw's labels are matched to them with the
    Hungarian algorithm, and a cell's confidence is the fraction of draws whose label agrees
    with its consensus label (co-clustering across draws).

    Returns ``labels`` (N,), ``confidence`` (N,), ``draw_labels`` (S, N).
    """
    z_draws = np.asarray(z_draws, dtype=np.float64)
    S, N, _ = z_draws.shape
    op = _neighbour_average(edges, N) if edges is not None and smooth > 0 else None

    def features(z):
        for _ in range(smooth if op is not None else 0):
            z = op @ z
        return z

    mean_features = features(z_draws.mean(0))
    consensus = KMeans(n_domains, n_init=10, random_state=seed).fit(mean_features)
    labels = consensus.labels_
    draw_labels = np.zeros((S, N), dtype=np.int64)
    for s in range(S):
        fitted = KMeans(n_domains, init=consensus.cluster_centers_, n_init=1, random_state=seed).fit(features(z_draws[s]))
        overlap = np.zeros((n_domains, n_domains))
        np.add.at(overlap, (fitted.labels_, labels), 1)
        rows, cols = linear_sum_assignment(-overlap)
        mapping = np.empty(n_domains, dtype=np.int64)
        mapping[rows] = cols
        draw_labels[s] = mapping[fitted.labels_]
    confidence = (draw_labels == labels[None]).mean(0)
    return {"labels": labels, "confidence": confidence, "draw_labels": draw_labels}


def _neighbour_average(edges: np.ndarray, n: int) -> sp.csr_matrix:
    """Row-normalised (A + I): each cell's value becomes the mean over itself and neighbours."""
    rows = np.concatenate([edges[0], edges[1], np.arange(n)])
    cols = np.concatenate([edges[1], edges[0], np.arange(n)])
    adjacency = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(n, n))
    degree = np.asarray(adjacency.sum(1)).ravel()
    return sp.diags(1.0 / degree) @ adjacency
