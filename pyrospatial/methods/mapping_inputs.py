"""Inputs of a mapping: checked matrices, the joint embedding of the shared genes, the candidate
locations of each cell, and a simulated tissue with known locations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pyrospatial.errors import CountsError, InputError
from pyrospatial.methods.alignment_features import _coords

__all__ = [
    "Embedding",
    "candidate_locations",
    "check_mapping_inputs",
    "is_counts",
    "location_sd",
    "log_normalise",
    "mapping_features",
    "normalised_expression",
    "raw_matrix",
    "simulate_mapping",
]


def _layer(adata: ad.AnnData, layer: str | None, side: str):
    if layer is not None and layer not in adata.layers:
        raise InputError(f"{side}.layers[{layer!r}] is missing (layers: {list(adata.layers.keys())}): pass "
                         f"layer_{side}=None to use {side}.X, or one of those layers.")
    X = adata.layers[layer] if layer is not None else adata.X
    field = "X" if layer is None else f"layers[{layer!r}]"
    if X is None or X.shape[1] == 0:
        raise InputError(f"{side}.{field} is empty: store the expression (counts) of every gene there.")
    return (X.tocsr() if sp.issparse(X) else np.asarray(X)), field


def _check_finite(X, adata: ad.AnnData, side: str, field: str) -> None:
    values = X.data if sp.issparse(X) else X
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        if sp.issparse(X):
            rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))[~np.isfinite(X.data)]
        else:
            rows = np.nonzero(~np.isfinite(X).all(1))[0]
        raise CountsError(f"{side}.{field} has {bad} NaN/inf entries (first cells: "
                          f"{list(adata.obs_names[np.unique(rows)[:3]])}): the counts must be finite; drop those "
                          f"cells (or genes) or fill the entries (e.g. {side}.X = np.nan_to_num({side}.X)) first.")


def check_mapping_inputs(cells: ad.AnnData, atlas: ad.AnnData, *, spatial_key: str = "spatial",
                         label_keys: Sequence[str] = (), layer_cells: str | None = None,
                         layer_atlas: str | None = None) -> tuple[np.ndarray, list[str]]:
    """Check the inputs of :func:`~pyrospatial.methods.mapping.map_cells`; return the atlas's
    coordinates ``(m, 2)`` and the shared genes (in ``cells.var_names`` order).

    Raises :class:`~pyrospatial.errors.InputError` (or a subclass) naming the field and the fix:
    not an AnnData, no cells, duplicated names, an atlas without ``obsm[spatial_key]`` or with
    NaN coordinates, a missing layer or label key, NaN/inf counts, no shared gene.
    """
    for side, adata in (("cells", cells), ("atlas", atlas)):
        if not isinstance(adata, ad.AnnData):
            raise InputError(f"{side} must be an AnnData, got {type(adata).__name__}.")
        if adata.n_obs == 0:
            raise InputError(f"{side} has no cell (0 rows): pass an AnnData with at least one {side[:-1] if side == 'cells' else 'location'}.")
        if not adata.var_names.is_unique:
            raise InputError(f"{side}.var_names has duplicated genes; call {side}.var_names_make_unique() first.")
        if not adata.obs_names.is_unique:
            raise InputError(f"{side}.obs_names has duplicated names; call {side}.obs_names_make_unique() first.")
    xy = _coords(atlas, spatial_key, "atlas")  # a CoordinateError naming atlas.obsm[spatial_key] and the fix
    for key in label_keys:
        if key not in atlas.obs:
            raise InputError(f"label key {key!r} is not a column of atlas.obs (columns: {list(atlas.obs.columns)}); "
                             "pass label_keys naming atlas.obs columns (or None).")
    for side, adata, layer in (("cells", cells, layer_cells), ("atlas", atlas, layer_atlas)):
        X, field = _layer(adata, layer, side)
        _check_finite(X, adata, side, field)
    in_atlas = set(atlas.var_names)
    shared = [g for g in cells.var_names if g in in_atlas]
    if not shared:
        raise InputError(
            "cells and atlas share no gene (var_names): mapping compares the cells' expression with the atlas's "
            f"over shared genes (cells has e.g. {list(cells.var_names[:3])}, atlas {list(atlas.var_names[:3])}); "
            "use one gene naming on both (symbols or Ensembl IDs, same case) first.")
    return xy, shared


def log_normalise(X):
    """log1p of counts per 10^4 for non-negative integer counts (library = the row sum), log1p for
    other non-negative values, the values otherwise; sparse stays sparse (CSR), float32."""
    values = X.data if sp.issparse(X) else X
    if values.size and (values >= 0).all():
        if np.allclose(values, np.round(values)):
            lib = np.asarray(X.sum(1)).ravel().astype(np.float64)
            factor = 1e4 / np.maximum(lib, 1.0)
            X = sp.diags(factor) @ X if sp.issparse(X) else X * factor[:, None]
        if sp.issparse(X):
            X = X.tocsr().astype(np.float32)
            X.data = np.log1p(X.data)
            return X
        return np.log1p(np.asarray(X, dtype=np.float32))
    return X.astype(np.float32)


def raw_matrix(adata: ad.AnnData, layer: str | None, genes: Sequence[str] | None = None, side: str = "cells"):
    """``adata``'s ``X`` (or ``layer``), restricted to ``genes`` (all when None); sparse stays CSR."""
    X, _ = _layer(adata, layer, side)
    return X if genes is None else X[:, adata.var_names.get_indexer(list(genes))]


def normalised_expression(adata: ad.AnnData, layer: str | None, genes: Sequence[str] | None = None,
                          side: str = "cells"):
    """:func:`log_normalise` of ``adata``'s matrix over ``genes`` (the library is over those genes)."""
    return log_normalise(raw_matrix(adata, layer, genes, side))


def is_counts(X) -> bool:
    """Non-negative integers (a matrix that binomial thinning applies to)."""
    values = X.data if sp.issparse(X) else np.asarray(X)
    return bool(values.size) and bool((values >= 0).all()) and bool(np.allclose(values, np.round(values)))


@dataclass
class Embedding:
    """The joint principal components of :func:`mapping_features`, kept to embed more rows
    later (:meth:`rows`)."""

    genes: np.ndarray        # columns of the shared genes used (indices into ``shared``)
    offset: np.ndarray       # the PCA's own mean (~0: each side was centred first)
    components: np.ndarray   # (d, genes)
    scale: float             # the components' common scaling

    def rows(self, counts) -> np.ndarray:
        """Embed rows of counts over the shared genes (library over all of them), centred on their
        own mean as each side is (so a set of rows at another depth is compared like the cells)."""
        X = log_normalise(counts)
        X = X[:, self.genes]
        X = np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64)
        return (X - X.mean(0) - self.offset) @ self.components.T / self.scale


def mapping_features(cells: ad.AnnData, atlas: ad.AnnData, shared: Sequence[str], *, layer_cells: str | None = None,
                     layer_atlas: str | None = None, n_components: int = 30, n_top: int = 2000,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str], Embedding]:
    """One embedding of both sides: principal components of the shared genes.

    Each side log1p-normalised over the shared genes (:func:`normalised_expression`: the
    library is that of the shared genes, so platforms of different depth and panel compare), the
    ``n_top`` genes of highest mean kept, each side centred on its own mean (a platform's shift
    is not a difference between cells), one PCA of both together (genes not standardised:
    abundant, well-measured genes dominate noisy rare ones), as the alignment's shared
    features. Returns ``(u_cells, u_atlas, genes_used, embedding)``, scaled so that the average
    component has unit variance; ``embedding`` embeds further atlas-like rows.
    """
    from sklearn.decomposition import PCA

    xc = normalised_expression(cells, layer_cells, shared)
    xa = normalised_expression(atlas, layer_atlas, shared, side="atlas")
    mean = (np.asarray(xc.mean(0)).ravel() * cells.n_obs + np.asarray(xa.mean(0)).ravel() * atlas.n_obs)
    top = np.sort(np.argsort(-mean)[: min(int(n_top), len(shared))])
    dense = [np.asarray(x[:, top].toarray() if sp.issparse(x) else x[:, top], dtype=np.float64) for x in (xc, xa)]
    means = [x.mean(0) for x in dense]
    joint = np.vstack([dense[0] - means[0], dense[1] - means[1]])
    keep = joint.std(0) > 0
    top, joint = top[keep], joint[:, keep]
    d = max(1, min(int(n_components), joint.shape[0] - 1, joint.shape[1]))
    pca = PCA(n_components=d, svd_solver="randomized" if min(joint.shape) > 200 else "full", random_state=seed)
    Z = pca.fit_transform(joint)
    scale = max(float(np.sqrt((Z**2).mean())), 1e-8)
    Z = Z / scale
    embedding = Embedding(top, pca.mean_, pca.components_, scale)
    return Z[: cells.n_obs], Z[cells.n_obs:], [shared[i] for i in top], embedding


def candidate_locations(u_cells: np.ndarray, u_atlas: np.ndarray, scales: np.ndarray, slope: np.ndarray,
                        k: int) -> np.ndarray:
    """The ``k`` atlas locations of highest expression likelihood for every cell: nearest
    neighbours of ``u_i / scales`` among ``slope * u_j / scales`` (the likelihood falls with this
    Mahalanobis distance, Normal or Student-t alike). ``(n, k)`` int64; memory O(n k)."""
    from sklearn.neighbors import NearestNeighbors

    k = min(int(k), len(u_atlas))
    scales = np.maximum(np.asarray(scales, np.float64), 1e-8)
    index = NearestNeighbors(n_neighbors=k).fit(np.asarray(slope, np.float64) * u_atlas / scales)
    return index.kneighbors(u_cells / scales, return_distance=False).astype(np.int64)


def location_sd(xy: np.ndarray) -> float:
    """Per-axis sd of a position within one atlas location's share of the tissue: ``sqrt(A /
    (4 pi))`` with ``A`` = convex-hull area / number of locations (a disc of area ``A``; a
    square tile gives ``sqrt(A / 12)``, within 3%)."""
    from scipy.spatial import ConvexHull

    try:
        area = float(ConvexHull(xy).volume)
    except Exception:  # noqa: BLE001 - collinear or too few points: fall back on the spacing
        from scipy.spatial import cKDTree

        nn = cKDTree(xy).query(xy, k=min(2, len(xy)))[0]
        spacing = float(np.median(nn[:, -1])) if nn.ndim == 2 else 0.0
        return spacing / np.sqrt(4 * np.pi) if spacing > 0 else 0.0
    return float(np.sqrt(area / max(len(xy), 1) / (4 * np.pi)))


def simulate_mapping(n_atlas: int = 1500, n_cells: int = 1000, *, n_genes: int = 60, n_types: int = 4,
                     n_layers: int = 4, depth: float = 300.0, lengthscale: float = 0.25, seed: int = 0,
                     ) -> tuple[ad.AnnData, ad.AnnData, dict[str, Any]]:
    """A tissue with known cell locations, split into an atlas and dissociated cells.

    ``n_atlas + n_cells`` cells uniform on the unit square scaled so that the spacing is about 1
    (side ``sqrt(n_atlas + n_cells)``); ``n_layers`` horizontal layers, each with its own
    cell-type mixture (70% one type); per gene a smooth Gaussian field over space (random
    Fourier features, ``lengthscale`` x the side) plus a cell-type effect; counts
    ``Poisson(depth * softmax(log rate))``. The atlas keeps ``obsm['spatial']``; the cells lose
    it (kept as ``obsm['spatial_true']`` for scoring). Both carry ``obs['cell_type']`` and
    ``obs['layer']``. Returns ``(cells, atlas, truth)`` with ``truth['xy']`` the cells' true
    locations.
    """
    rng = np.random.default_rng(seed)
    n = int(n_atlas) + int(n_cells)
    side = float(np.sqrt(n))
    xy = rng.uniform(0.0, side, size=(n, 2))
    layer = np.minimum((xy[:, 1] / side * n_layers).astype(int), n_layers - 1)
    mix = np.full((n_layers, n_types), 0.3 / max(n_types - 1, 1))
    mix[np.arange(n_layers), np.arange(n_layers) % n_types] = 0.7
    ctype = np.array([rng.choice(n_types, p=mix[layer_i]) for layer_i in layer])
    n_features = 20
    freq = rng.normal(0.0, 1.0 / (lengthscale * side), size=(n_features, 2))
    phase = rng.uniform(0, 2 * np.pi, size=n_features)
    basis = np.sqrt(2.0 / n_features) * np.cos(xy @ freq.T + phase)  # (n, F): a smooth field
    field = basis @ rng.normal(0.0, 1.0, size=(n_features, n_genes))
    type_effect = rng.normal(0.0, 1.0, size=(n_types, n_genes))
    log_rate = rng.normal(0.0, 0.5, size=n_genes) + field + type_effect[ctype]
    p = np.exp(log_rate - log_rate.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    counts = rng.poisson(depth * p).astype(np.float32)
    obs = pd.DataFrame({"cell_type": pd.Categorical([f"type{c}" for c in ctype]),
                        "layer": pd.Categorical([f"L{i + 1}" for i in layer])}, index=[f"c{i}" for i in range(n)])
    var = pd.DataFrame(index=[f"g{g}" for g in range(n_genes)])
    order = rng.permutation(n)
    ia, ic = np.sort(order[:n_atlas]), np.sort(order[n_atlas:])
    atlas = ad.AnnData(counts[ia], obs=obs.iloc[ia].copy(), var=var.copy())
    atlas.obsm["spatial"] = xy[ia]
    cells = ad.AnnData(counts[ic], obs=obs.iloc[ic].copy(), var=var.copy())
    cells.obsm["spatial_true"] = xy[ic]
    return cells, atlas, {"xy": xy[ic], "side": side}
