"""Inputs of an alignment: checked coordinates and matrices, shared or per-side PCA features, a robust rigid pre-registration (ICP with Kabsch steps), and a simulated pair with known truth.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from pyrospatial.data.geometry_checks import check_section_spacing, geometry_checks_enabled
from pyrospatial.errors import CoordinateError, DuplicateNamesError, InputError

__all__ = ["check_alignment_units", "prepare_features", "preregister", "simulate_pair"]


_FEATURE_MODES = ("auto", "shared", "separate")


# ------------------------------------------------------------------------------------------
# input checks and features
# ------------------------------------------------------------------------------------------
def _coords(adata: ad.AnnData, key: str, side: str) -> np.ndarray:
    if not isinstance(adata, ad.AnnData):
        raise InputError(f"{side} must be an AnnData, got {type(adata).__name__}.")
    if adata.n_obs == 0:
        raise InputError(f"{side} is empty (0 cells): an alignment needs cells on both sides.")
    if adata.n_obs < 3:
        raise InputError(f"{side} has {adata.n_obs} cells; an alignment needs at least 3 per side.")
    for axis, names in (("obs_names", adata.obs_names), ("var_names", adata.var_names)):
        if not names.is_unique:
            raise DuplicateNamesError(f"{side}.{axis} has duplicated names (e.g. {list(names[names.duplicated()][:3])}); "
                                      f"call {side}.{axis}_make_unique() first.")
    if key not in adata.obsm:
        raise CoordinateError(f"{side}.obsm[{key!r}] is missing: store the (n, 2) spatial coordinates there "
                              f"or pass spatial_key=... (found obsm keys {list(adata.obsm.keys())}).")
    xy = np.asarray(adata.obsm[key], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise CoordinateError(f"{side}.obsm[{key!r}] must have shape (n_obs, 2), got {xy.shape}.")
    if xy.shape[1] > 2:
        raise CoordinateError(f"{side}.obsm[{key!r}] has {xy.shape[1]} columns; pass 2-D coordinates (x, y) "
                              "(slice a 3-D stack into sections first).")
    bad = ~np.isfinite(xy).all(1)
    if bad.any():
        raise CoordinateError(f"{side}.obsm[{key!r}] has {int(bad.sum())} cell(s) with NaN/inf coordinates "
                              f"(first: {list(adata.obs_names[bad][:3])}); drop or fix them before aligning.")
    return xy


def _matrix(adata: ad.AnnData, layer: str | None, side: str) -> np.ndarray:
    if layer is not None and layer not in adata.layers:
        raise InputError(f"{side}.layers[{layer!r}] is missing (layers: {list(adata.layers.keys())}).")
    X = adata.layers[layer] if layer is not None else adata.X
    if X is None:
        raise InputError(f"{side}.X is empty: store features (counts or intensities) in X or pass a layer.")
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    if X.ndim != 2 or X.shape[1] == 0:
        raise InputError(f"{side}.{'X' if layer is None else f'layers[{layer!r}]'} has no feature column "
                         f"(shape {X.shape}): store at least one feature (gene or protein) per cell.")
    X = X.astype(np.float64)
    if not np.isfinite(X).all():
        raise InputError(f"{side}.{'X' if layer is None else f'layers[{layer!r}]'} has NaN/inf entries; fix them first.")
    return X


def _normalise(X: np.ndarray) -> np.ndarray:
    """log1p of library-normalised counts (1e4 per cell) for integer counts, log1p for other
    non-negative features, unchanged otherwise."""
    if (X >= 0).all():
        if np.array_equal(X, np.rint(X)):  # integer counts (exact test: cheaper than allclose on wide matrices)
            lib = X.sum(1, keepdims=True)
            X = X / np.maximum(lib, 1.0) * 1e4
        return np.log1p(X)
    return X


def _pca(X: np.ndarray, d: int, seed: int, groups: np.ndarray | None = None, standardise: bool = True) -> np.ndarray:
    """Principal components of ``X``: centred per group (per slice, removing a slice's mean
    shift), genes standardised only when ``standardise``; scaled so that the average
    component has unit variance (components keep their relative variances)."""
    X = X.copy()
    if groups is None:
        groups = np.zeros(len(X), dtype=int)
    for g in np.unique(groups):
        X[groups == g] -= X[groups == g].mean(0)
    sd = X.std(0)
    X = X[:, sd > 0]
    if standardise:
        X = X / sd[sd > 0]
    d = max(1, min(d, X.shape[0] - 1, X.shape[1]))
    from sklearn.decomposition import PCA

    Z = PCA(n_components=d, svd_solver="randomized" if min(X.shape) > 200 else "full", random_state=seed).fit_transform(X)
    return Z / max(float(np.sqrt((Z**2).mean())), 1e-8)


def _top_genes(X: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` features with the highest mean (of log1p-normalised values)."""
    return np.sort(np.argsort(-X.mean(0))[: min(n, X.shape[1])])


def check_alignment_units(a: ad.AnnData, b: ad.AnnData, *, spatial_key: str = "spatial",
                          check_geometry: bool = True) -> float | None:
    """The two sections' median nearest-neighbour spacings agree within
    :data:`~pyrospatial.data.geometry_checks.MAX_SECTION_RATIO` (else a
    :class:`~pyrospatial.errors.GeometryError` saying by how much to rescale ``a``); returns
    ``spacing_a / spacing_b``, or None when not measured (checks off, key missing, < 4 cells)."""
    if not geometry_checks_enabled(check_geometry):
        return None
    if spatial_key not in a.obsm or spatial_key not in b.obsm:
        return None
    xy_a, xy_b = _coords(a, spatial_key, "a"), _coords(b, spatial_key, "b")
    return check_section_spacing(xy_a, xy_b, check_geometry=check_geometry)


def prepare_features(a: ad.AnnData, b: ad.AnnData, *, features: str = "auto", n_components: int = 20,
                     layer_a: str | None = None, layer_b: str | None = None, seed: int = 0,
                     n_top: int = 2000, spatial_key: str = "spatial",
                     check_geometry: bool = True) -> tuple[np.ndarray, np.ndarray, str, list[str]]:
    """Per-modality inputs of the alignment model: standardised principal components.

    ``features="shared"``: genes/features present in both (``var_names``), log1p-normalised,
    the ``n_top`` with the highest mean kept, each slice centred on its own mean (a shift
    between slices is not a difference between cells), one PCA of both slices together (a
    common space, used directly as the model's embedding: ``observed_embedding``); genes are
    not standardised, so that abundant,
    well-measured genes dominate over noisy rare ones. ``"separate"``: one PCA per side
    (features standardised; may differ completely; encoders learned). ``"auto"``: shared
    when at least 2 features are shared, else separate. Returns ``(x_a, x_b, mode,
    shared_names)``, scaled so that the average component has unit variance.

    First, when both sides hold ``obsm[spatial_key]``, the ratio of their median cell spacings
    is checked (:func:`check_alignment_units`): a section in pixels against one in microns is a
    :class:`~pyrospatial.errors.GeometryError` unless ``check_geometry=False`` (or within
    :func:`pyrospatial.data.geometry_checks.skip_geometry_checks`).
    """
    check_alignment_units(a, b, spatial_key=spatial_key, check_geometry=check_geometry)
    if features not in _FEATURE_MODES:
        raise InputError(f"features must be one of {_FEATURE_MODES}, got {features!r}.")
    in_b = set(b.var_names)
    shared = [g for g in a.var_names if g in in_b]
    if features == "shared" and len(shared) == 0:
        raise InputError("features='shared' was asked but a and b share no feature (var_names): use "
                         "features='separate' (modalities with different panels) or rename the features.")
    mode = features if features != "auto" else ("shared" if len(shared) >= 2 else "separate")
    Xa, Xb = _matrix(a, layer_a, "a"), _matrix(b, layer_b, "b")
    if mode == "shared":
        ia = a.var_names.get_indexer(shared)
        ib = b.var_names.get_indexer(shared)
        joint = np.vstack([_normalise(Xa[:, ia]), _normalise(Xb[:, ib])])
        joint = joint[:, _top_genes(joint, n_top)]
        groups = np.r_[np.zeros(a.n_obs, int), np.ones(b.n_obs, int)]
        Z = _pca(joint, n_components, seed, groups=groups, standardise=False)
        return Z[: a.n_obs], Z[a.n_obs:], mode, shared
    za, zb = _pca(_normalise(Xa), n_components, seed), _pca(_normalise(Xb), n_components, seed)
    d = min(za.shape[1], zb.shape[1])
    return za[:, :d], zb[:, :d], mode, shared


# ------------------------------------------------------------------------------------------
# pre-registration (numpy/scipy): angle grid search + ICP
# ------------------------------------------------------------------------------------------
def _rot(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def _kabsch(src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray]:
    """Weighted least-squares rotation angle and translation with ``dst ≈ R src + t``."""
    w = w / w.sum()
    ms, md = (w[:, None] * src).sum(0), (w[:, None] * dst).sum(0)
    H = ((src - ms) * w[:, None]).T @ (dst - md)
    angle = math.atan2(H[0, 1] - H[1, 0], H[0, 0] + H[1, 1])
    return angle, md - _rot(angle) @ ms


def preregister(xy_a: np.ndarray, xy_b: np.ndarray, emb_a: np.ndarray | None = None, emb_b: np.ndarray | None = None,
                *, n_angles: int = 72, icp_iter: int = 30, feature_weight: float = 1.0, unit: float | None = None
                ) -> dict[str, Any]:
    """A rigid initial alignment of a onto b without correspondences.

    1. Centroids on each other; for each of ``n_angles`` rotations about a's centroid, every
       a cell's best partner among its 8 nearest b cells by ``d_xy^2 / unit^2 + feature_weight
       * |e_a - e_b|^2 / dim`` (embeddings when given); the angle with the lowest trimmed mean
       cost (best 80%) wins.
    2. ICP: repeat best-partner search and a least-squares (Kabsch) rotation + translation
       on the best 80% of pairs, ``icp_iter`` times.

    Returns ``{"angle", "translation" (2,), "centre_a" (2,), "score"}`` in the convention of
    :func:`pyrospatial.models.alignment.rigid_transform` (rotation about a's centroid).
    """
    centre_a, centre_b = xy_a.mean(0), xy_b.mean(0)
    tree = cKDTree(xy_b)
    if unit is None:
        unit = float(np.median(tree.query(xy_b, k=2)[0][:, 1])) or 1.0
    use_emb = emb_a is not None and emb_b is not None and feature_weight > 0
    dim = emb_a.shape[1] if use_emb else 1
    kq = min(8, len(xy_b))

    def best_pairs(moved: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dist_, idx = tree.query(moved, k=kq)
        dist_, idx = dist_.reshape(len(moved), kq), idx.reshape(len(moved), kq)
        cost = (dist_ / unit) ** 2
        if use_emb:
            cost = cost + feature_weight * ((emb_a[:, None, :] - emb_b[idx]) ** 2).sum(-1) / dim
        c = cost.argmin(1)
        return idx[np.arange(len(moved)), c], cost[np.arange(len(moved)), c]

    def trimmed(cost: np.ndarray) -> np.ndarray:
        return cost <= np.quantile(cost, 0.8)

    best = (np.inf, 0.0)
    for angle in np.linspace(-math.pi, math.pi, n_angles, endpoint=False):
        moved = (xy_a - centre_a) @ _rot(angle).T + centre_b
        _, cost = best_pairs(moved)
        score = float(cost[trimmed(cost)].mean())
        if score < best[0]:
            best = (score, float(angle))
    angle, shift = best[1], centre_b - centre_a
    for _ in range(int(icp_iter)):
        moved = (xy_a - centre_a) @ _rot(angle).T + centre_a + shift
        j, cost = best_pairs(moved)
        keep = trimmed(cost)
        angle, t_full = _kabsch(xy_a[keep] - centre_a, xy_b[j[keep]], np.ones(int(keep.sum())))
        shift = t_full - centre_a
    moved = (xy_a - centre_a) @ _rot(angle).T + centre_a + shift
    _, cost = best_pairs(moved)
    return {"angle": float(angle), "translation": shift.astype(float), "centre_a": centre_a.astype(float),
            "score": float(cost[trimmed(cost)].mean()), "unit": float(unit)}


# ------------------------------------------------------------------------------------------
# a simulated pair with known truth
# ------------------------------------------------------------------------------------------
def simulate_pair(n_cells: int = 500, *, angle: float = 0.5, translation: Sequence[float] = (30.0, -20.0),
                  drop_fraction: float = 0.1, jitter: float = 0.1, feature_noise: float = 0.3, seed: int = 0,
                  **tissue_kwargs: Any) -> tuple[ad.AnnData, ad.AnnData, np.ndarray]:
    """Two views of one simulated tissue with a known rigid transform and known matches.

    ``a`` is :func:`pyrospatial.data.sim.simulate_tissue`'s cells (proteins in ``X``,
    ``obs["cell_type"]``); ``b`` keeps a random ``1 - drop_fraction`` of them, moved by
    ``phi(s) = R(angle)(s - centroid_a) + centroid_a + translation`` plus Normal jitter of sd
    ``jitter`` x the median cell spacing, with features multiplied by LogNormal(0,
    ``feature_noise``) noise, in shuffled order. Returns ``(a, b, truth)`` with ``truth[i]``
    the row of b holding a's cell ``i`` (-1 when dropped).
    """
    from pyrospatial.data.sim import simulate_tissue

    rng = np.random.default_rng(seed)
    tissue = simulate_tissue(n_cells=n_cells, seed=seed, **tissue_kwargs)
    a = ad.AnnData(np.asarray(tissue.cells.X, dtype=np.float32), obs=tissue.cells.obs[["cell_type"]].copy(),
                   var=tissue.cells.var.copy())
    a.obsm["spatial"] = np.asarray(tissue.cells.obsm["spatial"], dtype=np.float64)
    n = a.n_obs
    keep = np.sort(rng.choice(n, size=int(round(n * (1 - drop_fraction))), replace=False))
    order = rng.permutation(len(keep))
    src = keep[order]
    xy = a.obsm["spatial"]
    spacing = float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1]))
    centre = xy.mean(0)
    moved = (xy[src] - centre) @ _rot(angle).T + centre + np.asarray(translation, float)
    moved += rng.normal(0.0, jitter * spacing, size=moved.shape)
    Xb = np.asarray(a.X[src], dtype=np.float64) * rng.lognormal(0.0, feature_noise, size=(len(src), a.n_vars))
    b = ad.AnnData(Xb.astype(np.float32), obs=a.obs.iloc[src].copy(), var=a.var.copy())
    b.obs_names = [f"b{i}" for i in range(len(src))]
    b.obsm["spatial"] = moved
    truth = -np.ones(n, dtype=np.int64)
    truth[src] = np.arange(len(src))
    return a, b, truth
