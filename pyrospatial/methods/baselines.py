"""Simple deconvolution baselines every method must be read against.

- spot broadcast: each cell gets its spot's counts divided by the number of cells in it;
- type split: per-type mean signatures by non-negative least squares of spot counts on
  per-spot cell-type counts, then each spot's counts split among its cells in proportion to
  their type's signature.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.optimize import nnls

__all__ = ["spot_broadcast", "type_signatures_nnls", "type_split"]


def _dense(x) -> np.ndarray:
    return x.toarray() if sp.issparse(x) else np.asarray(x, dtype=np.float64)


def spot_broadcast(spot_counts, cell_spot: np.ndarray) -> np.ndarray:
    """(N, G): each cell in a spot receives the spot's mean per cell; NaN outside spots."""
    counts = _dense(spot_counts)
    n_spots = counts.shape[0]
    inside = cell_spot >= 0
    cells_per_spot = np.bincount(cell_spot[inside], minlength=n_spots).astype(float)
    out = np.full((cell_spot.size, counts.shape[1]), np.nan)
    out[inside] = counts[cell_spot[inside]] / cells_per_spot[cell_spot[inside], None]
    return out


def type_signatures_nnls(spot_counts, cell_spot: np.ndarray, cell_type: np.ndarray, n_types: int) -> np.ndarray:
    """(T, G) per-type mean expression per cell: X_jg ~ sum_t n_jt s_tg, s >= 0, per gene."""
    counts = _dense(spot_counts)
    inside = cell_spot >= 0
    n_jt = np.zeros((counts.shape[0], n_types))
    np.add.at(n_jt, (cell_spot[inside], cell_type[inside]), 1.0)
    return np.stack([nnls(n_jt, counts[:, g])[0] for g in range(counts.shape[1])], axis=1)


def type_split(spot_counts, cell_spot: np.ndarray, cell_type: np.ndarray, n_types: int) -> np.ndarray:
    """(N, G): spot counts split among member cells in proportion to their type signature."""
    counts = _dense(spot_counts)
    signatures = type_signatures_nnls(counts, cell_spot, cell_type, n_types) + 1e-12
    inside = cell_spot >= 0
    weight = np.zeros((cell_spot.size, counts.shape[1]))
    weight[inside] = signatures[cell_type[inside]]
    spot_total = np.zeros_like(counts)
    np.add.at(spot_total, cell_spot[inside], weight[inside])
    out = np.full_like(weight, np.nan)
    out[inside] = counts[cell_spot[inside]] * weight[inside] / spot_total[cell_spot[inside]]
    return out
