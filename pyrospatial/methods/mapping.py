"""Map dissociated cells (no coordinates) onto a spatial atlas: a posterior per cell over atlas locations.

::

    res = pyrospatial.map_cells(cells, atlas, label_keys=["cell_type"])
    res.cells.obsm["spatial_mapped"]      # posterior mean location (atlas units)
    res.cells.obs["map_radius_90"]        # radius of the 90% credible disc around it
    res.projected.layers["mean"]          # expected single-cell profile at every atlas location
    res.write("mapping_out")              # cells_mapped.h5ad, atlas_projected.h5ad, report.md, figure

The model is :class:`pyrospatial.models.MappingModel` (the alignment's coupling with one side's
coordinates missing; its docstring is the generative story), the guide
:class:`pyrospatial.guides.MappingGuide`. Fitting is variational EM: the plan over each cell's
``k`` candidate locations (E-step, exact), the expression noise by the alignment's closed-form
M-step, candidates re-found under the fitted noise; then the common noise multiplier (the
temperature that sets every cell's posterior entropy) gets its posterior from the atlas's own
held-out locations (:func:`temperature_posterior`), and the reported plan averages over
temperature draws. Nothing is tuned on scored data: the noise is
fitted on the cells being mapped (their depth), the temperature on the atlas alone.

Keys written into a copy of ``cells`` (``res.cells``; ``n`` cells, ``m`` atlas locations)
-------------------------------------------------------------------------------------
=====================================  ==============================================================
``obsm["map_prob"]``                    scipy CSR ``(n, m)``, rows sum to 1: posterior probability
                                        that the cell comes from each atlas location (given it comes
                                        from the atlas); columns in ``atlas.obs_names`` order
``obsm["spatial_mapped"]``              posterior mean location ``(n, 2)``, atlas units
``obsm["spatial_mapped_sd"]``           posterior sd per axis (includes ``location_sd``)
``obs["map_radius_90"]``                radius around ``spatial_mapped`` holding 90% of the
                                        posterior mass (the mixture of Normal(s_j, h^2 I) over
                                        locations; Monte Carlo, 400 draws per cell)
``obs["map_entropy"]``                  entropy (nats) of the cell's posterior over locations
``obs["map_p_unmatched"]``              posterior probability that the cell has no location in
                                        the atlas (its expression fits none)
``obs["map_best_location"]``            name of the most probable atlas location, with
``obs["map_best_prob"]``                its probability
``obs["{L}_mapped"]``                   label ``L`` of ``atlas.obs``: most probable label
                                        (categorical); a numeric column: its posterior mean
``obsm["{L}_prob"]``                    DataFrame ``(n, labels)``: posterior probability of each
                                        label (categorical ``L``); numeric: ``obs["{L}_mapped_sd"]``
``uns["pyrospatial"]["map"]``           ``settings``, ``diagnostics`` (fitted noise ``tau``, ``nu``,
                                        ``slope``; ``temperature`` mean and sd; mean entropy, radius,
                                        candidate truncation bound; seconds), ``genes``
=====================================  ==============================================================

The reverse direction (as Tangram projects cells onto space) is ``res.projected``: an AnnData
over the atlas locations (``atlas.obs`` and ``obsm["spatial"]`` kept) and all the cells'
genes, whose ``layers["mean"]`` (also ``X``) and ``layers["sd"]`` are the mean and sd of the
cells' log1p-normalised expression (counts per 10^4) weighted by the posterior mass each cell
puts on the location: the expected single-cell profile there; ``obs["map_cell_mass"]`` (also
on ``res.atlas``) is the expected number of cells mapped to the location.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from pyrospatial.engine.export import h5ad_safe
from pyrospatial.engine.infer import versions
from pyrospatial.errors import InputError
from pyrospatial.guides.mapping import mapping_plan
from pyrospatial.methods.mapping_inputs import (
    Embedding,
    candidate_locations,
    check_mapping_inputs,
    is_counts,
    mapping_features,
    normalised_expression,
    raw_matrix,
    simulate_mapping,
)
from pyrospatial.methods.mapping_inputs import (
    location_sd as default_location_sd,
)
from pyrospatial.models.mapping import (
    MappingBatch,
    MappingModel,
)

__all__ = ["MappingResult", "map_cells", "simulate_mapping", "temperature_posterior"]

#: Monte Carlo draws per cell for the 90% credible radius
RADIUS_DRAWS = 400


@dataclass
class MappingResult:
    """What :func:`map_cells` returns: ``cells`` (a copy of the cells with the keys of the module
    docstring), ``atlas`` (a copy of the atlas with ``obs["map_cell_mass"]``), ``projected``
    (the expected single-cell profile per atlas location, or None with ``project=False``),
    ``settings`` and ``diagnostics`` (as in ``uns["pyrospatial"]["map"]``)."""

    cells: ad.AnnData
    atlas: ad.AnnData
    projected: ad.AnnData | None
    settings: dict[str, Any]
    diagnostics: dict[str, Any]
    model: Any = field(default=None, repr=False)

    def write(self, folder: str, *, label_key: str | None = None) -> dict[str, str]:
        """Write ``cells_mapped.h5ad``, ``atlas_projected.h5ad`` (the projected AnnData, else the
        atlas copy), ``report.md`` and ``figures/mapping.png`` (mapped locations on the atlas
        coloured by ``label_key``, the first label key by default, with credible radii) into
        ``folder`` (created). Returns the written paths by name."""
        from pyrospatial.methods.mapping_report import write_mapping

        return write_mapping(self, folder, label_key=label_key)


def _location_probs(plan: np.ndarray) -> np.ndarray:
    """The plan's candidate columns renormalised (given a location in the atlas); a row whose
    candidate mass underflowed to 0 (all on "no location") goes to its first, most similar
    candidate."""
    matched = plan[:, :-1]
    total = matched.sum(1, keepdims=True)
    probs = matched / np.maximum(total, 1e-300)
    empty = total[:, 0] <= 0
    probs[empty] = 0.0
    probs[empty, 0] = 1.0
    return probs


def temperature_posterior(u_atlas: torch.Tensor, xy: np.ndarray, held: np.ndarray, u_heldout: torch.Tensor, *,
                          k: int, em_iter: int, em_rounds: int, h_init: float, level: float = 0.9,
                          bounds: tuple[float, float] = (-1.0, 2.0), n_bisect: int = 12) -> dict[str, Any]:
    r"""Posterior of the temperature ``t`` (log multiplier of the expression noise scales), from the
    atlas's own held-out locations.

    The mapping posterior is ``p(s | u) = sum_j pi_j(u) Normal(s | s_j, h^2 I)``: ``pi_j(u)`` the
    model's plan at scales ``exp(t) tau``, ``h`` the spread of a position within one atlas
    location's share of the tissue (``h_init``, from the area per location). Fitted by maximum
    marginal likelihood of the expression alone (EM, ``t = 0``), the expression kernel is too
    sharp for the conditional in many dimensions (each cell's mass piles on the few atlas
    locations whose noise happens to match; on simulations the 90% regions then cover ~0.7),
    and the maximum of the held-out log density in ``t`` is too broad for it (~0.97 at 10^4
    locations). So ``t`` is calibrated where locations are known and nothing is scored: each of
    the atlas locations ``held`` is left out and its location predicted from its expression
    ``u_heldout`` by the rest (the model's EM fitted on this leave-one-out problem first;
    :func:`map_cells` thins the held-out counts to the cells' depth, so that the problem has the
    cells' noise; atlas rows identical in expression to a held-out location, i.e. duplicated
    records, leave with it: a cell is never a copy of an atlas row, and twins at distance 0
    collapse the leave-one-out noise to 0), and ``t`` is the value at which the discs holding
    ``level`` of each held-out posterior cover a fraction ``level`` of the held-out locations
    (bisection, common random numbers; ``bounds`` is the first bracket, widened by 1.5 at a time,
    up to 4 past either end, until the coverage crosses ``level`` or turns back: at extreme ``t``
    the kernel underflows). Its sd is the binomial sd of that coverage carried to
    ``t`` through the coverage's slope (a normal approximation of ``t``'s posterior). The cells'
    own EM scale absorbs their depth, and the mapping uses ``exp(t) tau_cells``.

    Returns ``{"mode", "sd", "h", "heldout_coverage_90", "heldout_mean_distance", "tau_atlas",
    "n_heldout", "n_heldout_with_twins"}``.
    """
    m = len(u_atlas)
    ua, uh = u_atlas.cpu().numpy(), u_heldout.cpu().numpy()
    model = MappingModel(u_atlas.shape[1]).to(u_atlas.device)

    # a held-out location's twins: atlas rows whose embedding equals its own (a duplicated record,
    # or counts too low to tell apart). A cell being mapped is a measurement of its own, never a
    # copy of an atlas row, so twins leave the held-out problem with the location itself;
    # otherwise every twin sits at distance 0, the kernel's maximum likelihood scale collapses to
    # 0 and no temperature can widen it.
    _, group, size = np.unique(np.round(ua, 9), axis=0, return_inverse=True, return_counts=True)
    group = np.asarray(group).ravel()
    n_twins = size[group[held]] - 1  # twins of each held-out location, itself excluded
    k_fetch = min(m, k + 1 + int(n_twins.max(initial=0)))

    def loo_batch() -> tuple[np.ndarray, MappingBatch]:
        cand = candidate_locations(uh, ua, model.scales().cpu().numpy(), model.slope.cpu().numpy(), k_fetch)
        # drop each held-out location itself and its twins; keep the k nearest others
        drop = (cand == held[:, None]) | (group[cand] == group[held][:, None])
        keep_n = min(k, m - 1 - int(n_twins.max(initial=0))) if m > 1 else 1
        keep_n = max(1, keep_n)
        order = np.argsort(drop, axis=1, kind="stable")[:, :keep_n]  # the kept ones first, in order
        cand = np.take_along_axis(cand, order, axis=1)
        valid = ~np.take_along_axis(drop, order, axis=1)
        ct = torch.as_tensor(cand, device=u_atlas.device)
        return cand, MappingBatch(u_heldout, u_atlas, ct, torch.as_tensor(valid, device=u_atlas.device))

    for _ in range(int(em_rounds)):
        _, batch = loo_batch()
        g = None
        for _ in range(int(em_iter)):
            previous = model.scales().clone()
            T, g = mapping_plan(model, batch, g_init=g)
            model.update_noise(T, batch)
            if float((torch.log(model.scales()) - torch.log(previous)).abs().max()) < 1e-3:
                break
    cand, batch = loo_batch()
    locations = xy[cand]

    def coverage(t: float) -> tuple[float, float]:  # common random numbers: the same draws for every t
        model.log_temperature.fill_(float(t))
        probs = _location_probs(mapping_plan(model, batch)[0].double().cpu().numpy())
        mean = (probs[:, :, None] * locations).sum(1)
        err = np.sqrt(((mean - xy[held]) ** 2).sum(1))
        radius = _radius(probs, locations, mean, h, np.random.default_rng(0), level=level)
        return float((err <= radius).mean()), float(err.mean())

    h = float(h_init)
    # bracket the level (the coverage rises with t), widening the bounds by 1.5 at a time, to at
    # most 4 past them; a step against that monotonicity (at extreme t the kernel underflows and
    # every posterior falls on one candidate) ends the widening. Then bisection.
    low, high = float(bounds[0]), float(bounds[1])
    c_low, c_high = coverage(low)[0], coverage(high)[0]
    while c_low >= level and low > bounds[0] - 4.0:
        c = coverage(low - 1.5)[0]
        if c > c_low:
            break
        high, c_high, low, c_low = low, c_low, low - 1.5, c
    while c_high < level and high < bounds[1] + 4.0:
        c = coverage(high + 1.5)[0]
        if c < c_high:
            break
        low, c_low, high, c_high = high, c_high, high + 1.5, c
    if c_low >= level:
        mode = low
    elif c_high < level:
        mode = high
    else:
        for _ in range(int(n_bisect)):
            mid = 0.5 * (low + high)
            low, high = (mid, high) if coverage(mid)[0] < level else (low, mid)
        mode = 0.5 * (low + high)
    # sd: the binomial sd of the held-out coverage, carried to t through the slope of coverage in t
    step = 0.1
    slope = (coverage(mode + step)[0] - coverage(mode - step)[0]) / (2 * step)
    sd = float(min(1.0, math.sqrt(level * (1 - level) / len(held)) / max(slope, 1e-3)))
    achieved, distance = coverage(mode)
    return {"mode": float(mode), "sd": sd, "h": h, "heldout_coverage_90": achieved,
            "heldout_mean_distance": distance, "tau_atlas": model.tau.cpu().tolist(), "n_heldout": len(held),
            "n_heldout_with_twins": int((n_twins > 0).sum())}


def _heldout_embedding(cells: ad.AnnData, atlas: ad.AnnData, shared: Sequence[str], held: np.ndarray,
                       embedding: Embedding, layer_cells: str | None, layer_atlas: str | None,
                       rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Embedding of the held-out atlas rows, their counts binomially thinned to the cells' median
    library (over the shared genes) when the cells are shallower and both sides hold counts;
    returns it and the thinning ratio (1: none)."""
    xa = raw_matrix(atlas, layer_atlas, shared, side="atlas")
    xc = raw_matrix(cells, layer_cells, shared)
    ratio = 1.0
    if is_counts(xa) and is_counts(xc):
        lib_a = float(np.median(np.asarray(xa.sum(1)).ravel()))
        lib_c = float(np.median(np.asarray(xc.sum(1)).ravel()))
        ratio = min(1.0, lib_c / lib_a) if lib_a > 0 else 1.0
    rows = xa[held]
    if ratio < 0.95:
        if sp.issparse(rows):
            rows = rows.tocsr().copy()
            rows.data = rng.binomial(np.round(rows.data).astype(np.int64), ratio).astype(np.float64)
            rows.eliminate_zeros()
        else:
            rows = rng.binomial(np.round(np.asarray(rows)).astype(np.int64), ratio).astype(np.float64)
    else:
        ratio = 1.0
    return embedding.rows(rows), ratio


def _fit_noise(model: MappingModel, u_c: torch.Tensor, u_a: torch.Tensor, k: int, em_iter: int, em_rounds: int,
               tol: float = 1e-3) -> list[int]:
    """Variational EM of the expression noise on the cells ``u_c``: ``em_rounds`` rounds of
    (candidates under the current noise, then up to ``em_iter`` E/M steps). Returns the steps
    per round."""
    steps = []
    for _ in range(int(em_rounds)):
        cand = candidate_locations(u_c.cpu().numpy(), u_a.cpu().numpy(), model.scales().cpu().numpy(),
                                   model.slope.cpu().numpy(), k)
        cand_t = torch.as_tensor(cand, device=u_c.device)
        batch = MappingBatch(u_c, u_a, cand_t, torch.ones_like(cand_t, dtype=torch.bool))
        g = None
        for it in range(int(em_iter)):
            previous = model.scales().clone()
            T, g = mapping_plan(model, batch, g_init=g)
            model.update_noise(T, batch)
            if float((torch.log(model.scales()) - torch.log(previous)).abs().max()) < tol:
                break
        steps.append(it + 1)
    return steps


def _radius(probs: np.ndarray, locations: np.ndarray, mean: np.ndarray, sd: float, rng: np.random.Generator,
            level: float = 0.9, chunk: int = 2048) -> np.ndarray:
    """Radius around ``mean`` holding ``level`` of each cell's posterior: the mixture of
    ``Normal(location, sd^2 I)`` with weights ``probs`` (``(n, k)``, locations ``(n, k, 2)``),
    by :data:`RADIUS_DRAWS` Monte Carlo draws per cell."""
    n, k = probs.shape
    out = np.empty(n)
    for start in range(0, n, chunk):
        p = probs[start:start + chunk]
        rows = len(p)
        cum = np.cumsum(p, axis=1)
        cum /= cum[:, -1:]
        offset = np.arange(rows)[:, None]
        u = rng.random((rows, RADIUS_DRAWS))
        flat = np.searchsorted((cum + offset).ravel(), (u + offset).ravel(), side="right")
        comp = np.minimum(flat.reshape(rows, RADIUS_DRAWS) - offset * k, k - 1)
        pos = np.take_along_axis(locations[start:start + chunk], comp[:, :, None], axis=1)
        pos = pos + rng.normal(0.0, sd, size=pos.shape) if sd > 0 else pos
        dist = np.sqrt(((pos - mean[start:start + chunk, None, :]) ** 2).sum(-1))
        out[start:start + chunk] = np.quantile(dist, level, axis=1)
    return out


def _transfer_labels(out: ad.AnnData, prob: sp.csr_matrix, atlas: ad.AnnData, key: str) -> None:
    column = atlas.obs[key]
    if pd.api.types.is_numeric_dtype(column) and not isinstance(column.dtype, pd.CategoricalDtype) \
            and column.nunique() > 20:
        values = column.to_numpy(dtype=np.float64)
        ok = np.isfinite(values)
        weight = prob @ ok.astype(np.float64)
        mean = (prob @ np.where(ok, values, 0.0)) / np.maximum(weight, 1e-12)
        second = (prob @ np.where(ok, values**2, 0.0)) / np.maximum(weight, 1e-12)
        out.obs[f"{key}_mapped"] = mean
        out.obs[f"{key}_mapped_sd"] = np.sqrt(np.maximum(second - mean**2, 0.0))
        return
    cat = pd.Categorical(column.astype(str).where(column.notna(), None) if not isinstance(
        column.dtype, pd.CategoricalDtype) else column)
    cats = list(map(str, cat.categories))
    codes = np.asarray(cat.codes)
    ok = codes >= 0
    onehot = sp.csr_matrix((np.ones(int(ok.sum())), (np.nonzero(ok)[0], codes[ok])), shape=(len(codes), len(cats)))
    pm = np.asarray((prob @ onehot).todense())
    pm = pm / np.maximum(pm.sum(1, keepdims=True), 1e-12)
    out.obsm[f"{key}_prob"] = pd.DataFrame(pm, index=out.obs_names, columns=cats)
    out.obs[f"{key}_mapped"] = pd.Categorical(np.asarray(cats)[pm.argmax(1)], categories=cats)


def _project(prob: sp.csr_matrix, cells: ad.AnnData, atlas: ad.AnnData, layer: str | None,
             genes: Sequence[str] | None, spatial_key: str) -> ad.AnnData:
    """Expected single-cell profile per atlas location (module docstring)."""
    X = normalised_expression(cells, layer, None)
    names = cells.var_names
    if genes is not None:
        missing = [g for g in genes if g not in cells.var_names]
        if missing:
            raise InputError(f"projected_genes {missing[:5]} are not in cells.var_names.")
        idx = cells.var_names.get_indexer(list(genes))
        X, names = X[:, idx], cells.var_names[idx]
    pt = prob.T.tocsr()
    mass = np.asarray(prob.sum(0)).ravel()
    first = pt @ X
    second = pt @ (X.multiply(X) if sp.issparse(X) else X**2)
    first = first.toarray() if sp.issparse(first) else np.asarray(first)
    second = second.toarray() if sp.issparse(second) else np.asarray(second)
    inv = np.where(mass > 0, 1.0 / np.maximum(mass, 1e-12), 0.0)[:, None]
    mean = (first * inv).astype(np.float32)
    sd = np.sqrt(np.maximum(second * inv - mean.astype(np.float64) ** 2, 0.0)).astype(np.float32)
    proj = ad.AnnData(mean, obs=atlas.obs.copy(), var=pd.DataFrame(index=pd.Index(names, dtype=str)),
                      layers={"mean": mean, "sd": sd})
    proj.obs["map_cell_mass"] = mass
    proj.obsm["spatial"] = np.asarray(atlas.obsm[spatial_key], dtype=np.float64)
    return proj


def map_cells(
    cells: ad.AnnData,
    atlas: ad.AnnData,
    *,
    label_keys: Sequence[str] | str | None = None,
    layer_cells: str | None = None,
    layer_atlas: str | None = None,
    n_components: int = 30,
    k: int = 100,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    spatial_key: str = "spatial",
    rho: float = 0.01,
    lam: float = 0.0,
    location_sd: float | None = None,
    n_top: int = 2000,
    em_cells: int = 4000,
    em_iter: int = 50,
    em_rounds: int = 3,
    num_samples: int = 8,
    project: bool = True,
    projected_genes: Sequence[str] | None = None,
) -> MappingResult:
    """Map cells without coordinates onto an atlas with coordinates, by expression over shared genes.

    Parameters
    ----------
    cells
        AnnData of dissociated cells (e.g. scRNA-seq): counts in ``X`` (or ``layer_cells``).
    atlas
        AnnData with ``obsm[spatial_key]`` ``(m, 2)`` and counts in ``X`` (or ``layer_atlas``):
        single cells or spots; genes matched by ``var_names``.
    label_keys
        ``atlas.obs`` columns carried to the cells with their posterior probabilities.
    n_components
        Principal components of the shared genes (the embedding both sides are compared in).
    k
        Candidate locations per cell (the most similar ``k`` by expression likelihood; the
        posterior is exact over them, and ``diagnostics["truncation_bound_mean"]`` bounds the
        mass left outside). Memory O(n k), never O(n m).
    seed, device, progress
        Seed of the PCA, the EM subsample and the draws; torch device (``"auto"``: a GPU when
        present); stage messages on stderr.
    rho, lam
        Prior probability that a cell has no location in the atlas; strength of the soft
        marginal constraint that every location receives its share of the cells (0, the
        default: cells are independent draws from the tissue and each posterior is Bayes' rule;
        > 0: the OT column constraint of the alignment, as Tangram's density prior).
    location_sd
        Per-axis sd ``h`` of a cell's position around its atlas location (None: from the atlas's
        area per location, :func:`~pyrospatial.methods.mapping_inputs.location_sd`; 0: the
        posterior sits on the atlas locations).
    n_top
        Shared genes of highest mean used for the embedding.
    em_cells, em_iter, em_rounds
        Cells subsampled to fit the noise (an unbiased estimate of the M-step's statistics) and
        atlas locations held out for the temperature, EM steps per round, rounds of candidate
        search.
    num_samples
        Draws of the temperature from its Laplace posterior; the plan is their average.
    project, projected_genes
        Compute ``res.projected`` (all cells' genes, or these).

    Raises
    ------
    InputError
        (and its subclasses) for an atlas without ``obsm[spatial_key]``, no shared gene, a
        missing label key or layer, NaN/inf counts, bad settings; each names the field and the fix.
    """
    started = time.perf_counter()
    label_keys = [label_keys] if isinstance(label_keys, str) else list(label_keys or [])
    for name, value, low in (("k", k, 1), ("n_components", n_components, 1), ("em_cells", em_cells, 2),
                             ("em_iter", em_iter, 1), ("em_rounds", em_rounds, 1), ("num_samples", num_samples, 1)):
        if int(value) < low:
            raise InputError(f"{name} must be >= {low}, got {value}.")
    if not 0 < rho < 1:
        raise InputError(f"rho (prior probability of no location) must lie in (0, 1), got {rho}.")
    if lam < 0:
        raise InputError(f"lam (strength of the marginal constraint) must be >= 0, got {lam}.")
    if location_sd is not None and not location_sd >= 0:
        raise InputError(f"location_sd must be >= 0 (atlas units) or None, got {location_sd}.")
    say = (lambda msg: print(f"map_cells: {msg}", file=sys.stderr)) if progress else (lambda msg: None)
    xy, shared = check_mapping_inputs(cells, atlas, spatial_key=spatial_key, label_keys=label_keys,
                                      layer_cells=layer_cells, layer_atlas=layer_atlas)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    say(f"{cells.n_obs} cells, {atlas.n_obs} atlas locations, {len(shared)} shared genes")
    u_c, u_a, genes, embedding = mapping_features(cells, atlas, shared, layer_cells=layer_cells,
                                                  layer_atlas=layer_atlas, n_components=n_components, n_top=n_top,
                                                  seed=seed)
    n, m, d = len(u_c), len(u_a), u_c.shape[1]
    k = min(int(k), m)
    uc_t = torch.tensor(u_c, dtype=torch.float32, device=dev)
    ua_t = torch.tensor(u_a, dtype=torch.float32, device=dev)
    features_seconds = time.perf_counter() - started

    # 1. variational EM of the expression noise on a subsample of the cells
    sub = np.sort(rng.choice(n, size=min(n, int(em_cells)), replace=False))
    model = MappingModel(d, rho=rho, lam=lam, beta=len(sub) / m).to(dev)
    say(f"fitting the expression noise by EM on {len(sub)} cells (k={k}, d={d})")
    em_steps = _fit_noise(model, uc_t[sub], ua_t, k, em_iter, em_rounds)
    # 2. the temperature latent and the spatial bandwidth, from held-out atlas locations whose
    #    counts are thinned to the cells' depth (so the held-out problem has the cells' noise)
    held = np.sort(rng.choice(m, size=min(m, int(em_cells)), replace=False))
    u_held, depth_ratio = _heldout_embedding(cells, atlas, shared, held, embedding, layer_cells, layer_atlas, rng)
    say(f"temperature from {len(held)} held-out atlas locations (depth ratio {depth_ratio:.3g})")
    sd_loc = default_location_sd(xy) if location_sd is None else float(location_sd)
    calib = temperature_posterior(ua_t, xy, held, torch.tensor(u_held, dtype=torch.float32, device=dev), k=k,
                                  em_iter=em_iter, em_rounds=em_rounds, h_init=sd_loc)
    t_mode, t_sd = calib["mode"], calib["sd"]
    # 3. the plan over every cell's candidates, averaged over temperature draws
    say("posterior over the candidate locations of every cell")
    cand = candidate_locations(u_c, u_a, model.scales().cpu().numpy(), model.slope.cpu().numpy(), k)
    cand_t = torch.as_tensor(cand, device=dev)
    batch = MappingBatch(uc_t, ua_t, cand_t, torch.ones_like(cand_t, dtype=torch.bool))
    model.beta = n / m
    plan = torch.zeros(n, k + 1, dtype=torch.float64, device=dev)
    for t in t_mode + t_sd * rng.standard_normal(int(num_samples)):
        model.log_temperature.fill_(float(t))
        plan += mapping_plan(model, batch)[0].double()
    plan /= int(num_samples)
    model.log_temperature.fill_(t_mode)
    fit_seconds = time.perf_counter() - started - features_seconds

    # 4. summaries
    plan = plan.cpu().numpy()
    p_unmatched = plan[:, k]
    probs = _location_probs(plan)
    # copies: sort_indices() permutes the CSR's arrays in place, which must not be views of probs/cand
    prob = sp.csr_matrix((probs.ravel().copy(), cand.ravel().copy(), np.arange(0, n * k + 1, k)), shape=(n, m))
    prob.sort_indices()
    locations = xy[cand]  # (n, k, 2)
    mean = (probs[:, :, None] * locations).sum(1)
    var = (probs[:, :, None] * (locations - mean[:, None, :]) ** 2).sum(1) + sd_loc**2
    radius = _radius(probs, locations, mean, sd_loc, rng)
    entropy = -(probs * np.log(np.maximum(probs, 1e-300))).sum(1)
    best = probs.argmax(1)
    truncation = np.minimum(1.0, (m - k) * probs[:, -1]) if m > k else np.zeros(n)

    out = cells.copy()
    out.obsm["map_prob"] = prob
    out.obsm["spatial_mapped"] = mean
    out.obsm["spatial_mapped_sd"] = np.sqrt(var)
    out.obs["map_radius_90"] = radius
    out.obs["map_entropy"] = entropy
    out.obs["map_p_unmatched"] = p_unmatched
    out.obs["map_best_location"] = np.asarray(atlas.obs_names)[cand[np.arange(n), best]]
    out.obs["map_best_prob"] = probs[np.arange(n), best]
    for key in label_keys:
        _transfer_labels(out, prob, atlas, key)
    atlas_out = atlas.copy()
    atlas_out.obs["map_cell_mass"] = np.asarray(prob.sum(0)).ravel()
    projected = _project(prob, cells, atlas, layer_cells, projected_genes, spatial_key) if project else None

    settings = {"label_keys": label_keys, "layer_cells": layer_cells, "layer_atlas": layer_atlas,
                "n_components": int(d), "k": int(k), "seed": int(seed), "device": str(dev), "spatial_key": spatial_key,
                "rho": float(rho), "lam": float(lam), "location_sd": sd_loc, "n_top": int(n_top),
                "em_cells": len(sub), "em_iter": int(em_iter), "em_rounds": int(em_rounds),
                "num_samples": int(num_samples), "n_cells": int(n), "n_atlas": int(m), "n_shared_genes": len(shared)}
    diagnostics = {
        "tau": model.tau.cpu().tolist(), "nu": float(model.nu), "slope": model.slope.cpu().tolist(),
        "log_temperature": {"mean": t_mode, "sd": t_sd},
        "temperature": {"mean": math.exp(t_mode + 0.5 * t_sd**2), "sd": math.exp(t_mode) * t_sd},
        "tau_atlas": calib["tau_atlas"], "spatial_bandwidth": sd_loc,
        "heldout_coverage_90": calib["heldout_coverage_90"], "heldout_mean_distance": calib["heldout_mean_distance"],
        "n_heldout": calib["n_heldout"], "n_heldout_with_twins": calib["n_heldout_with_twins"],
        "heldout_depth_ratio": depth_ratio,
        "em_steps": em_steps, "mean_entropy": float(entropy.mean()), "mean_p_unmatched": float(p_unmatched.mean()),
        "mean_radius_90": float(radius.mean()), "mean_best_prob": float(out.obs["map_best_prob"].mean()),
        "truncation_bound_mean": float(truncation.mean()),
        "truncation_frac_over_0.05": float((truncation > 0.05).mean()),
        "seconds_features": features_seconds, "seconds_fit": fit_seconds,
    }
    diagnostics["seconds"] = time.perf_counter() - started
    out.uns["pyrospatial"] = dict(out.uns.get("pyrospatial", {}))
    out.uns["pyrospatial"]["map"] = h5ad_safe({"settings": settings, "diagnostics": diagnostics, "genes": genes,
                                               "versions": versions()})
    say(f"done in {diagnostics['seconds']:.1f} s: temperature {diagnostics['temperature']['mean']:.3f}, "
        f"mean 90% radius {diagnostics['mean_radius_90']:.3g}")
    return MappingResult(cells=out, atlas=atlas_out, projected=projected, settings=settings,
                         diagnostics=diagnostics, model=model)
