"""Posterior analysis shared by the models: spot-consistent count splits
(:func:`split_spot_counts`), cell-type interaction matrices with intervals, and spatial domains
with assignment confidence.

All functions take posterior *draws* (leading axis ``S``) and return summaries with their
spread; none of them returns a point estimate alone.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans

from pyrospatial.engine.summary import blockwise
from pyrospatial.errors import InputError

__all__ = [
    "QUANTILES",
    "CountSplit",
    "deconvolve_counts",
    "interaction_matrix",
    "spatial_domains",
    "split_spot_counts",
    "summarise_draws",
]

QUANTILES = {"q05": 0.05, "q50": 0.5, "q95": 0.95}


def summarise_draws(draws: np.ndarray) -> dict[str, np.ndarray]:
    """Mean, sd, q05, q50, q95 over the leading (draw) axis, a block of rows at a time
    (:func:`~pyrospatial.engine.summary.blockwise`: same values, bounded working memory)."""
    return blockwise(_summarise_block, draws)


def _summarise_block(draws: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`summarise_draws` of one block of draws."""
    draws = np.asarray(draws)
    out = {"mean": draws.mean(0), "sd": draws.std(0, ddof=1) if draws.shape[0] > 1 else np.zeros(draws.shape[1:])}
    qs = np.quantile(draws, list(QUANTILES.values()), axis=0)
    out.update({name: q for name, q in zip(QUANTILES, qs)})
    return out


# ------------------------------------------------------------------------------------------
# spot-consistent per-cell counts
# ------------------------------------------------------------------------------------------
@dataclass
class CountSplit:
    """Summaries of per-cell counts split from the spot counts over posterior draws.

    ``mean``, ``sd``, ``q05``, ``q50``, ``q95``: (N, G) arrays (NaN for cells outside every
    spot, which receive no observed counts); ``max_abs_spot_error``: max over draws, spots
    and genes of |sum of the cells' counts - spot count| (0 by construction);
    ``draws``: the (S, N, G) integer draws when ``keep_draws=True``.
    """

    mean: np.ndarray
    sd: np.ndarray
    q05: np.ndarray
    q50: np.ndarray
    q95: np.ndarray
    max_abs_spot_error: float
    draws: np.ndarray | None = None


def split_spot_counts(
    spot_counts,
    cell_spot: np.ndarray,
    rate_draws: np.ndarray,
    *,
    method: Literal["multinomial", "dirichlet_multinomial"] = "dirichlet_multinomial",
    inverse_dispersion: np.ndarray | None = None,
    dispersion: Literal["spot", "cell"] = "spot",
    seed: int = 0,
    keep_draws: bool = False,
    draws_per_chunk: int = 16,
) -> CountSplit:
    """Split each spot's observed counts among its cells under posterior draws of their rates.

    For draw ``s``, spot ``j`` and gene ``g`` the counts ``X_jg`` are divided among the cells
    ``i in U(j)`` in proportion to their expected expression ``mu^s_ig``:

    - ``multinomial``: ``x_{.g} ~ Multinomial(X_jg, mu_ig / sum_i' mu_i'g)`` (Poisson cells);
    - ``dirichlet_multinomial`` (default, matches the NB spot likelihood): weights
      ``w ~ Dirichlet(theta_g * mu_ig / sum_i' mu_i'g)`` then a multinomial with ``w``. With cell
      rates ``lambda_ig ~ Gamma(theta_g mu_ig / M_jg, theta_g / M_jg)`` their sum is the spot's
      ``Gamma(theta_g, theta_g / M_jg)`` rate of ``NB(M_jg, theta_g)``, so this is the exact
      conditional of the cells' counts given the spot total.

    ``dispersion`` says which NB ``theta_g`` belongs to:

    - ``"spot"`` (default): the spot's counts are ``NB(M_jg, theta_g)`` (above);
    - ``"cell"``: ``theta_g`` is each *cell's* inverse dispersion, ``x_ig ~ NB(mu_ig, theta_g)``,
      and the spot is the moment-matched ``NB(M_jg, theta_g M_jg^2 / sum_i mu_ig^2)`` (CORAL's
      default ``spot_dispersion="sum"``). The Dirichlet weights are then
      ``theta_g mu_ig M_jg / sum_i' mu_i'g^2``: they sum to that spot-level inverse dispersion, so
      the split is the exact conditional of Gamma rates that add up to the model's spot NB, and
      a cell among ``n`` equal ones keeps its own shape ``theta_g`` (not ``theta_g / n``).

    Every draw's cell counts add up exactly to the observed spot counts.

    Parameters
    ----------
    spot_counts
        (M, G) observed counts (dense or scipy sparse).
    cell_spot
        (N,) spot of each cell, -1 for none.
    rate_draws
        (S, N, G) posterior draws of per-cell expected expression.
    inverse_dispersion
        (G,) ``theta_g`` (or (S, G) draws); required for ``dirichlet_multinomial``.
    """
    counts = spot_counts.toarray() if sp.issparse(spot_counts) else np.asarray(spot_counts)
    rate_draws = np.asarray(rate_draws)
    S, N, G = rate_draws.shape
    if counts.shape[1] != G or cell_spot.shape[0] != N:
        raise InputError(
            f"shapes disagree: spot_counts {counts.shape}, cell_spot {cell_spot.shape}, rate_draws {rate_draws.shape}."
        )
    if method == "dirichlet_multinomial" and inverse_dispersion is None:
        raise InputError("inverse_dispersion (theta_g) is required for method='dirichlet_multinomial'.")
    if method not in ("multinomial", "dirichlet_multinomial"):
        raise InputError(f"method must be 'multinomial' or 'dirichlet_multinomial', got {method!r}.")
    if dispersion not in ("spot", "cell"):
        raise InputError(f"dispersion must be 'spot' (theta_g of the spot NB) or 'cell' (theta_g of each cell's NB), got {dispersion!r}.")
    rng = np.random.default_rng(seed)

    covered = np.flatnonzero(cell_spot >= 0)
    order = covered[np.argsort(cell_spot[covered], kind="stable")]  # cells grouped by spot
    spot_of = cell_spot[order]
    # position of each cell within its spot, and the spots' sizes
    starts = np.r_[0, np.flatnonzero(np.diff(spot_of)) + 1]
    sizes = np.diff(np.r_[starts, order.size])
    position = np.arange(order.size) - np.repeat(starts, sizes)
    max_size = int(sizes.max()) if sizes.size else 0
    spots_used = spot_of[starts]
    # (n_spots_used, max_size) table of cell indices, -1 padding
    table = np.full((spots_used.size, max_size), -1, dtype=np.int64)
    table[np.repeat(np.arange(spots_used.size), sizes), position] = order
    valid = table >= 0
    totals = np.round(counts[spots_used]).astype(np.int64)  # (J, G)

    all_draws = np.zeros((S, N, G), dtype=np.int64) if keep_draws else None
    total_sum = np.zeros((N, G))
    total_sq = np.zeros((N, G))
    quantile_store = np.zeros((S, order.size, G), dtype=np.int32)
    max_error = 0.0
    for lo in range(0, S, draws_per_chunk):
        hi = min(S, lo + draws_per_chunk)
        weights = _rate_shares(rate_draws[lo:hi], table, valid)  # (s, J, K, G)
        if method == "dirichlet_multinomial":
            theta = np.asarray(inverse_dispersion, dtype=np.float64)
            theta = theta[lo:hi] if theta.ndim == 2 else np.broadcast_to(theta, (hi - lo, G))
            weights = _dirichlet_weights(weights, theta, valid, dispersion, rng)
        split = _multinomial_split(totals, weights, rng)  # (s, J, K, G)
        del weights
        error = float(np.abs(split.sum(2) - totals[None]).max()) if split.size else 0.0
        max_error = max(max_error, error)
        cell_counts = split[:, valid]  # (s, n_covered_in_table_order, G)
        del split
        flat_cells = table[table >= 0]
        quantile_store[lo:hi] = cell_counts
        total_sum[flat_cells] += cell_counts.sum(0)
        squares = cell_counts.astype(np.float64)
        total_sq[flat_cells] += np.square(squares, out=squares).sum(0)
        if keep_draws:
            all_draws[lo:hi][:, flat_cells] = cell_counts

    flat_cells = table[table >= 0]
    mean = np.full((N, G), np.nan)
    sd = np.full((N, G), np.nan)
    mean[flat_cells] = total_sum[flat_cells] / S
    var = total_sq[flat_cells] / S - mean[flat_cells] ** 2
    sd[flat_cells] = np.sqrt(np.clip(var * S / max(S - 1, 1), 0, None))
    # quantiles a block of cells at a time: np.quantile sorts a copy of what it is given
    qs = blockwise(lambda block: dict(zip(QUANTILES, np.quantile(block, list(QUANTILES.values()), axis=0))),
                   quantile_store)
    q = {name: np.full((N, G), np.nan) for name in QUANTILES}
    for name, values in qs.items():
        q[name][flat_cells] = values
    return CountSplit(mean=mean, sd=sd, max_abs_spot_error=float(max_error), draws=all_draws, **q)


def deconvolve_counts(*args: Any, **kwargs: Any) -> CountSplit:
    """Deprecated name of :func:`split_spot_counts` (same arguments and result); warns with a
    ``DeprecationWarning``."""
    warnings.warn(
        "pyrospatial.methods.analysis.deconvolve_counts is deprecated: call split_spot_counts (same arguments).",
        DeprecationWarning, stacklevel=2,
    )
    return split_spot_counts(*args, **kwargs)


def _rate_shares(rate_draws: np.ndarray, table: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Each cell's share of its spot's summed rate, ``(s, J, K, G)`` float64 laid out as
    ``table`` (``(J, K)`` cell indices, ``valid`` marking the real ones; 0 at the padding).

    Computed in place: these ``s x J x K x G`` float64 arrays are the largest of a split."""
    shares = rate_draws[:, np.maximum(table, 0)].astype(np.float64)
    shares *= valid[None, :, :, None]
    shares /= np.maximum(shares.sum(2, keepdims=True), 1e-300)
    return shares


def _dirichlet_weights(shares: np.ndarray, theta: np.ndarray, valid: np.ndarray, dispersion: str,
                       rng: np.random.Generator) -> np.ndarray:
    """Dirichlet weights ``w ~ Dirichlet(theta_g * share)`` per spot and gene (see
    :func:`split_spot_counts`), ``(s, J, K, G)``; ``theta`` is ``(s, G)``.

    ``shares`` is overwritten (it becomes the Dirichlet's concentration): the only new array
    of this size is then the Gamma draws."""
    if dispersion == "cell":  # theta M / sum mu^2 = theta / sum w^2: the spot's own theta
        theta = theta[:, None, None, :] / np.maximum((shares**2).sum(2, keepdims=True), 1e-300)
    else:
        theta = theta[:, None, None, :]
    alpha = np.multiply(theta, shares, out=shares)
    np.maximum(alpha, 1e-8, out=alpha)
    gam = rng.gamma(alpha)
    gam *= valid[None, :, :, None]
    gam /= np.maximum(gam.sum(2, keepdims=True), 1e-300)
    return gam


def _multinomial_split(totals: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Multinomial split of totals (J, G) with per-position weights (s, J, K, G) by the
    conditional-binomial method: loop over the K positions, vectorised over the rest."""
    s, J, K, G = weights.shape
    remaining = np.broadcast_to(totals, (s, J, G)).astype(np.int64)
    mass_left = np.ones((s, J, G))
    out = np.zeros((s, J, K, G), dtype=np.int64)
    for k in range(K):
        if k == K - 1:
            take = remaining
        else:
            p = np.clip(weights[:, :, k] / np.maximum(mass_left, 1e-300), 0.0, 1.0)
            take = rng.binomial(remaining, p)
        out[:, :, k] = take
        remaining = remaining - take
        mass_left = np.maximum(mass_left - weights[:, :, k], 0.0)
    return out


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
