"""Spatial geometry: cell graphs (kNN / radius, scipy cKDTree) and the cell -> spot assignment.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy.spatial import cKDTree

from pyrospatial.errors import InputError

__all__ = ["knn_pairs", "radius_pairs", "assign_cells_to_spots", "sample_nonadjacent_pairs"]


# ------------------------------------------------------------------------------------------
# graph and membership builders (scipy cKDTree; no pyg-lib needed)
# ------------------------------------------------------------------------------------------
def knn_pairs(xy: np.ndarray, k: int) -> np.ndarray:
    """Undirected kNN graph as unique pairs (2, E) with i < j (union of both directions)."""
    n = xy.shape[0]
    if n < 2 or k < 1:
        return np.zeros((2, 0), dtype=np.int64)
    kk = min(k + 1, n)
    _, nbr = cKDTree(xy).query(xy, k=kk)
    src = np.repeat(np.arange(n), kk - 1)
    dst = nbr[:, 1:].reshape(-1)
    return _unique_pairs(src, dst, n)


def radius_pairs(xy: np.ndarray, radius: float) -> np.ndarray:
    """Undirected radius graph as unique pairs (2, E) with i < j."""
    pairs = cKDTree(xy).query_pairs(r=radius, output_type="ndarray")
    if pairs.size == 0:
        return np.zeros((2, 0), dtype=np.int64)
    return _unique_pairs(pairs[:, 0], pairs[:, 1], xy.shape[0])


def _unique_pairs(src: np.ndarray, dst: np.ndarray, n: int) -> np.ndarray:
    lo, hi = np.minimum(src, dst), np.maximum(src, dst)
    keep = lo != hi
    key = np.unique(lo[keep].astype(np.int64) * n + hi[keep])
    return np.stack([key // n, key % n]).astype(np.int64)


def assign_cells_to_spots(
    cell_xy: np.ndarray,
    spot_xy: np.ndarray,
    spot_diameter: float | None,
    assignment: Literal["radius", "nearest"] = "radius",
) -> tuple[np.ndarray, np.ndarray]:
    """Spot of each cell (-1 when none) and home spot (nearest at any distance).

    ``radius``: within ``spot_diameter / 2`` of the centre (nearest centre where spots overlap).
    ``nearest``: the nearest spot.
    """
    distance, nearest = cKDTree(spot_xy).query(cell_xy, k=1)
    nearest = nearest.astype(np.int64)
    if assignment == "nearest":
        return nearest.copy(), nearest
    if assignment != "radius":
        raise InputError(f"assignment must be 'radius' or 'nearest', got {assignment!r}.")
    inside = distance <= spot_diameter / 2.0
    return np.where(inside, nearest, -1), nearest


def sample_nonadjacent_pairs(n: int, edge_keys: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``(2, size)`` uniformly random pairs ``i < j`` of ``n`` cells that are not edges, drawn
    independently (with replacement: each stands for ``n_pairs / size`` non-adjacent pairs in an
    unbiased sum over all of them). ``edge_keys``: sorted ``i * n + j`` of the edges (either or
    both directions); at least one non-adjacent pair must exist."""
    size = int(size)
    out = np.empty(0, dtype=np.int64)
    while out.size < size:  # rejection of self-pairs and edges (a small fraction of all pairs)
        draw = int(1.2 * (size - out.size)) + 16
        i, j = rng.integers(0, n, draw), rng.integers(0, n, draw)
        key = np.minimum(i, j) * n + np.maximum(i, j)
        keep = i != j
        if edge_keys.size:
            at = np.minimum(np.searchsorted(edge_keys, key), edge_keys.size - 1)
            keep &= edge_keys[at] != key
        out = np.concatenate([out, key[keep]])
    out = out[:size]
    return np.stack([out // n, out % n])
