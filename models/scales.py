"""Initial values of CORAL's scale parameters, read from the data (:func:`data_scales`).

Used by :meth:`pyrospatial.models.coral.CoralConfig.from_dataset`; re-exported from
:mod:`pyrospatial.models.coral`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["data_scales"]


def _as_2d_array(x: Any) -> Any:
    """Dense or scipy-sparse matrix, unchanged; anything else through ``np.asarray``."""
    return x if hasattr(x, "tocsr") else np.asarray(x, dtype=np.float64)


def data_scales(dataset: Any) -> dict[str, Any]:
    """Initial values of CORAL's scale parameters read from a ``SpatialDataset``-like object.

    Uses ``spot_counts`` (spots x genes), ``cell_library`` (cells), and, when present,
    ``cell_features`` (cells x features), ``cell_spot`` (spot index per cell, -1 for none) and
    the graph size (``n_edges_total`` / ``n_edges`` / ``edge_index``).

    Returns
    -------
    dict
        ``size_loc_init = log(median spot library / median cells per spot)`` (the log expected
        RNA total of one cell), ``cell_library_mean`` (mean protein library), ``gene_logits_init``
        (log mean gene proportions in the spots), ``protein_logits_init`` (log mean feature
        proportions, when features are available), ``edge_bias_init`` (logit of the graph's
        edge density, when its size is available).
    """
    out: dict[str, Any] = {}
    X = _as_2d_array(dataset.spot_counts)
    spot_lib = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    gene_tot = np.asarray(X.sum(axis=0), dtype=np.float64).ravel()
    lib_y = np.asarray(dataset.cell_library, dtype=np.float64).ravel()
    n_cells, n_spots = len(lib_y), max(len(spot_lib), 1)
    cell_spot = getattr(dataset, "cell_spot", None)
    if cell_spot is not None:
        cs = np.asarray(cell_spot).ravel()
        per_spot = np.bincount(cs[cs >= 0], minlength=len(spot_lib))
        per_spot = per_spot[per_spot > 0]
        cells_per_spot = float(np.median(per_spot)) if len(per_spot) else 1.0
    else:
        cells_per_spot = max(n_cells / n_spots, 1.0)
    med_lib = float(np.median(spot_lib)) if len(spot_lib) else 1.0
    out["size_loc_init"] = math.log(max(med_lib, 1.0) / max(cells_per_spot, 1.0))
    out["cell_library_mean"] = float(lib_y.mean()) if len(lib_y) else 1.0
    out["gene_logits_init"] = torch.as_tensor(np.log((gene_tot + 0.5) / (gene_tot + 0.5).sum()), dtype=torch.float32)
    feats = getattr(dataset, "cell_features", None)
    if feats is not None:
        Y = _as_2d_array(feats)
        prop = np.asarray(Y.sum(axis=0), dtype=np.float64).ravel()
        prop = prop / max(prop.sum(), 1e-12)
        out["protein_logits_init"] = torch.as_tensor(np.log(prop + 1e-6), dtype=torch.float32)
    n_edges = None
    for key in ("n_edges_total", "n_edges"):
        if getattr(dataset, key, None) is not None:
            n_edges = int(getattr(dataset, key))
            break
    if n_edges is None and getattr(dataset, "edge_index", None) is not None:
        n_edges = int(np.asarray(dataset.edge_index).shape[1]) // 2
    if n_edges is not None and n_cells > 1:
        density = min(max(n_edges / (n_cells * (n_cells - 1) / 2), 1e-6), 1 - 1e-6)
        out["edge_bias_init"] = math.log(density / (1 - density))
    return out
