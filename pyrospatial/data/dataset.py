"""Validated multi-resolution spatial data and its spot-complete minibatch sampler.

:class:`SpatialDataset` is built from a cells AnnData (per-cell features such as proteins,
``obs[cell_type_key]``, ``obsm['spatial']``) and, optionally, a spots AnnData (raw integer
counts, ``obsm['spatial']``). It holds

- the cell -> spot membership (a sparse ``spots x cells`` 0/1 matrix, ``U(j)`` in the paper),
- library sizes ``l^y_i`` (cells) and ``l_j`` (spots),
- the spatial cell graph as a torch-geometric ``edge_index`` (built with scipy's cKDTree),

and yields :class:`~pyrospatial.engine.batch.Batch` objects: spatially compact groups of spots with
all their member cells, the edges among those cells and sampled non-edges, scaled so the
minibatch ELBO is an unbiased estimate of the full one (see :mod:`pyrospatial.engine.batch`).

Membership rules
----------------
``assignment="radius"``: a cell belongs to a spot when it lies within ``spot_diameter / 2``
of the spot centre; cells outside every spot are kept, with no spot (``cell_spot == -1``).
Where spots overlap (rare: array spots are spaced apart), a cell within reach of several
centres belongs to the nearest one, so that the membership is a partition of the covered
cells. ``assignment="nearest"``: every cell belongs to its nearest spot.

Every cell also has a *home* spot, the nearest spot at any distance; minibatches are formed
from spots and each cell travels with its home spot, so one epoch visits every spot and every
cell exactly once.
"""


from __future__ import annotations

import copy
import warnings
from typing import Iterator, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from pyrospatial.engine.batch import Batch
from pyrospatial.errors import AssignmentError, CoordinateError, CountsError, DuplicateNamesError, InputError
from pyrospatial.data.batching import BatchSpec, SpotBatchSampler, _BatchBuilder, _identity
from pyrospatial.data.geometry_checks import check_overlap, check_spot_geometry, checked_diameter
from pyrospatial.data.graph import _unique_pairs, assign_cells_to_spots, knn_pairs, radius_pairs, sample_nonadjacent_pairs


__all__ = ["SpatialDataset"]


# ------------------------------------------------------------------------------------------
# validation helpers
# ------------------------------------------------------------------------------------------
def _dense_float(matrix, field: str) -> np.ndarray:
    """Dense float64 copy of a (possibly sparse) matrix, rejecting NaN/inf."""
    array = matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)
    if array.dtype.kind not in "biuf":
        raise InputError(f"{field} must be numeric, got dtype {array.dtype}.")
    array = np.array(array, dtype=np.float64, copy=True)
    bad = ~np.isfinite(array)
    if bad.any():
        raise InputError(
            f"{field} contains {int(bad.sum())} NaN/inf value(s) (first at row {np.argwhere(bad)[0][0]}); "
            "remove or impute them before building the dataset."
        )
    return array


def _coordinates(adata: AnnData, spatial_key: str, what: str) -> np.ndarray:
    if spatial_key not in adata.obsm:
        raise CoordinateError(
            f"{what}.obsm['{spatial_key}'] is missing: store the (n, 2) x/y coordinates of each "
            f"{what[:-1]} there (e.g. {what}.obsm['{spatial_key}'] = xy), or pass spatial_key=... "
            f"(available obsm keys: {sorted(adata.obsm.keys())})."
        )
    coords = np.asarray(adata.obsm[spatial_key])
    if coords.ndim != 2 or coords.shape[0] != adata.n_obs or coords.shape[1] != 2:
        raise CoordinateError(
            f"{what}.obsm['{spatial_key}'] must have shape ({adata.n_obs}, 2) (x, y per {what[:-1]}), "
            f"got {coords.shape}; for 3-D coordinates pass the two in-plane columns, e.g. xyz[:, :2]."
        )
    return _dense_float(coords, f"{what}.obsm['{spatial_key}']")


def _check_unique_names(adata: AnnData, what: str) -> None:
    for axis, names, fix in (("obs", adata.obs_names, "obs_names_make_unique"),
                             ("var", adata.var_names, "var_names_make_unique")):
        if not names.is_unique:
            dup = names[names.duplicated()].unique()[:5].tolist()
            raise DuplicateNamesError(
                f"{what}.{axis}_names has duplicated names (e.g. {dup}); call {what}.{fix}() first."
            )


# ------------------------------------------------------------------------------------------
# the dataset
# ------------------------------------------------------------------------------------------
class SpatialDataset:
    """Cells (and optionally spots) of one tissue, validated and indexed for minibatch SVI.

    Build it with :meth:`from_anndata`. Arrays are float32/int64 numpy copies; the input
    AnnData objects are never modified.

    Attributes
    ----------
    cell_features : (N, P) float32
        Per-cell features ``y_i`` (proteins / intensities / counts).
    cell_library : (N,) float32
        ``l^y_i = sum_p y_ip``.
    cell_type : (N,) int64
        Codes into :attr:`cell_types`.
    cell_coords : (N, 2) float32
    cell_spot : (N,) int64
        Spot of each cell, -1 when the cell lies outside every spot.
    spot_counts : scipy.sparse.csr_matrix (M, G) float32
        Raw counts ``X_jg`` (integers).
    spot_library : (M,) float32
        ``l_j = sum_g X_jg``.
    membership : scipy.sparse.csr_matrix (M, N)
        1 where cell ``i`` belongs to spot ``j``.
    edges : (2, E) int64
        Undirected cell-graph edges, each once with ``i < j``; :attr:`edge_index` gives both
        directions as a torch tensor (torch-geometric convention).
    nonedge_ratio : float
        Non-adjacent pairs sampled per observed edge in every batch (default 1.0).
    """

    def __init__(
        self,
        *,
        cell_features: np.ndarray,
        cell_type: np.ndarray,
        cell_types: list[str],
        cell_coords: np.ndarray,
        cell_names: pd.Index,
        feature_names: pd.Index,
        edges: np.ndarray,
        spot_counts: sp.csr_matrix | None = None,
        spot_coords: np.ndarray | None = None,
        spot_names: pd.Index | None = None,
        gene_names: pd.Index | None = None,
        cell_spot: np.ndarray | None = None,
        cell_home: np.ndarray | None = None,
        settings: dict | None = None,
        nonedge_ratio: float = 1.0,
    ) -> None:
        n = cell_features.shape[0]
        self.nonedge_ratio = _checked_ratio(nonedge_ratio)
        self.cell_features = cell_features.astype(np.float32)
        self.cell_library = _floored_library(self.cell_features)
        self.cell_type = cell_type.astype(np.int64)
        self.cell_types = list(cell_types)
        self.cell_coords = cell_coords.astype(np.float32)
        self.cell_names = cell_names
        self.feature_names = feature_names
        self.edges = edges.astype(np.int64)
        self.settings = dict(settings or {})
        if spot_counts is None:
            self.spot_counts = sp.csr_matrix((0, 0), dtype=np.float32)
            self.spot_coords = np.zeros((0, 2), dtype=np.float32)
            self.spot_names = pd.Index([])
            self.gene_names = pd.Index([])
            self.cell_spot = np.full(n, -1, dtype=np.int64)
            self.cell_home = np.arange(n, dtype=np.int64)
        else:
            self.spot_counts = sp.csr_matrix(spot_counts, dtype=np.float32)
            self.spot_coords = spot_coords.astype(np.float32)
            self.spot_names = spot_names
            self.gene_names = gene_names
            self.cell_spot = cell_spot.astype(np.int64)
            self.cell_home = cell_home.astype(np.int64)
        self.spot_library = np.asarray(self.spot_counts.sum(1)).reshape(-1).astype(np.float32)
        covered = np.flatnonzero(self.cell_spot >= 0)
        self.membership = sp.csr_matrix(
            (np.ones(covered.size, np.float32), (self.cell_spot[covered], covered)),
            shape=(self.n_spots, n),
        )
        # unit -> cells (each cell once): spots own their home cells; without spots a cell is its own unit
        self._unit_cells = sp.csr_matrix(
            (np.ones(n, np.float32), (self.cell_home, np.arange(n))), shape=(self.n_units, n)
        )
        self._adjacency = _symmetric_adjacency(self.edges, n)
        self._static_cache: tuple[bytes, dict] | None = None

    def with_edges(self, edges: np.ndarray) -> "SpatialDataset":
        """A copy that shares every array but uses ``edges`` (2, E) as the cell graph, e.g. a
        precomputed graph or the training graph with held-out edges removed. Pairs are
        symmetrised and deduplicated; self loops are dropped."""
        edges = np.asarray(edges)
        if edges.ndim != 2 or edges.shape[0] != 2 or edges.dtype.kind not in "iu":
            raise InputError(f"edges must be an integer array of shape (2, E), got {edges.dtype} {edges.shape}.")
        if edges.size and (edges.min() < 0 or edges.max() >= self.n_cells):
            raise InputError(f"edges index cells outside [0, {self.n_cells}); pass dataset cell indices.")
        new = copy.copy(self)
        new.edges = _unique_pairs(edges[0].astype(np.int64), edges[1].astype(np.int64), self.n_cells)
        new._adjacency = _symmetric_adjacency(new.edges, self.n_cells)
        new._static_cache = None
        new.settings = {**self.settings, "graph": "precomputed"}
        return new

    def with_nonedge_ratio(self, nonedge_ratio: float) -> "SpatialDataset":
        """A copy that shares every array but samples ``nonedge_ratio`` non-edges per edge."""
        new = copy.copy(self)
        new.nonedge_ratio = _checked_ratio(nonedge_ratio)
        return new

    # ---- sizes --------------------------------------------------------------------------
    @property
    def n_cells(self) -> int:
        return int(self.cell_features.shape[0])

    @property
    def n_spots(self) -> int:
        return int(self.spot_counts.shape[0])

    @property
    def n_types(self) -> int:
        return len(self.cell_types)

    @property
    def n_features(self) -> int:
        return int(self.cell_features.shape[1])

    @property
    def n_genes(self) -> int:
        return int(self.spot_counts.shape[1])

    @property
    def n_edges(self) -> int:
        return int(self.edges.shape[1])

    @property
    def n_nonedges(self) -> int:
        return self.n_cells * (self.n_cells - 1) // 2 - self.n_edges

    def sample_nonedges(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """``(2, size)`` uniformly random non-adjacent pairs ``i < j`` of the tissue's cells, drawn
        independently (:func:`pyrospatial.data.graph.sample_nonadjacent_pairs`)."""
        if self.n_nonedges < 1:
            raise InputError(f"sample_nonedges: the {self.n_cells} cells have no non-adjacent pair to draw.")
        cached = getattr(self, "_edge_keys", None)
        if cached is None or cached[0] is not self._adjacency:  # copies with other edges build their own
            coo = self._adjacency.tocoo()
            cached = (self._adjacency, np.unique(coo.row.astype(np.int64) * self.n_cells + coo.col))
            self._edge_keys = cached
        return sample_nonadjacent_pairs(self.n_cells, cached[1], size, rng)

    @property
    def protein_names(self) -> pd.Index:
        """Labels of the ``protein`` dimension in criticism (the per-cell feature names)."""
        return self.feature_names

    @property
    def n_units(self) -> int:
        """Units of the batch partition: spots when there are any, cells otherwise."""
        return self.n_spots if self.n_spots > 0 else self.n_cells

    @property
    def unit_coords(self) -> np.ndarray:
        return self.spot_coords if self.n_spots > 0 else self.cell_coords

    @property
    def edge_index(self) -> torch.Tensor:
        """(2, 2E) long tensor with both directions of every edge."""
        both = np.concatenate([self.edges, self.edges[::-1]], axis=1)
        return torch.from_numpy(both.copy())

    def __repr__(self) -> str:
        return (
            f"SpatialDataset({self.n_cells} cells x {self.n_features} features, {self.n_types} types; "
            f"{self.n_spots} spots x {self.n_genes} genes; {self.n_edges} edges; "
            f"{int((self.cell_spot >= 0).sum())} cells in spots)"
        )

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_anndata(
        cls,
        cells: AnnData,
        spots: AnnData | None = None,
        *,
        cell_type_key: str,
        protein_layer: str | None = None,
        spot_layer: str | None = None,
        spot_diameter: float | None = None,
        assignment: Literal["radius", "nearest"] = "radius",
        graph: Literal["knn", "radius"] = "knn",
        k: int = 6,
        graph_radius: float | None = None,
        spatial_key: str = "spatial",
        nonedge_ratio: float = 1.0,
        check_geometry: bool = True,
    ) -> "SpatialDataset":
        """Validate AnnData inputs and build the dataset.

        Parameters
        ----------
        cells
            Per-cell features in ``.X`` (or ``layers[protein_layer]``), non-negative;
            ``obs[cell_type_key]``; ``obsm[spatial_key]`` of shape (n_cells, 2).
        spots
            Raw integer counts in ``.X`` (or ``layers[spot_layer]``) and ``obsm[spatial_key]``
            in the same frame and unit as the cells. ``None`` for cells only.
        spot_diameter
            Spot diameter in coordinate units; required for ``assignment="radius"``.
        assignment
            ``"radius"`` (within ``spot_diameter/2``) or ``"nearest"``.
        graph, k, graph_radius
            Cell graph: kNN with ``k`` neighbours (symmetrised) or all pairs within
            ``graph_radius``.
        nonedge_ratio
            Non-adjacent pairs sampled per observed edge in each batch (:attr:`nonedge_ratio`).
        check_geometry
            Run the statistical unit and layout checks of
            :mod:`pyrospatial.data.geometry_checks` (False: only the extent check, for the rare
            real case the checks reject).

        Raises
        ------
        InputError, CountsError, CoordinateError, AssignmentError
            With a message naming the field and the fix. Spots with zero counts or with no
            member cell are dropped with a warning that says how many.
        """
        if not isinstance(cells, AnnData):
            raise InputError(f"cells must be an AnnData, got {type(cells).__name__}.")
        if cells.n_obs == 0 or cells.n_vars == 0:
            raise InputError(f"cells has no observations or no features (shape {cells.shape}); pass cells x proteins.")
        _check_unique_names(cells, "cells")

        # --- cell types ---
        if cell_type_key not in cells.obs:
            raise InputError(
                f"cells.obs['{cell_type_key}'] is missing: pass cell_type_key= one of "
                f"{list(cells.obs.columns)} or add the coarse cell-type labels there."
            )
        labels = cells.obs[cell_type_key]
        if labels.isna().any():
            raise InputError(
                f"cells.obs['{cell_type_key}'] has {int(labels.isna().sum())} missing label(s); "
                "label every cell (e.g. 'unknown') or drop the unlabelled cells."
            )
        if isinstance(labels.dtype, pd.CategoricalDtype):
            counts = labels.value_counts()
            empty = counts.index[counts.to_numpy() == 0].tolist()
            if empty:
                raise InputError(
                    f"cells.obs['{cell_type_key}'] has cell type(s) with zero cells: {empty}; "
                    f"call cells.obs['{cell_type_key}'] = cells.obs['{cell_type_key}'].cat.remove_unused_categories()."
                )
            categories = [str(c) for c in labels.cat.categories]
            codes = labels.cat.codes.to_numpy().astype(np.int64)
        else:
            uniques, codes = np.unique(labels.astype(str).to_numpy(), return_inverse=True)
            categories = [str(c) for c in uniques]
            codes = codes.astype(np.int64)

        # --- features ---
        if protein_layer is None:
            feature_matrix, feature_field = cells.X, "cells.X"
        else:
            if protein_layer not in cells.layers:
                raise InputError(
                    f"cells.layers['{protein_layer}'] is missing (available layers: {list(cells.layers.keys())}); "
                    "pass protein_layer=None to use cells.X."
                )
            feature_matrix, feature_field = cells.layers[protein_layer], f"cells.layers['{protein_layer}']"
        if feature_matrix is None:
            raise InputError(f"{feature_field} is empty: store per-cell features (e.g. proteins) there.")
        features = _dense_float(feature_matrix, feature_field)
        if (features < 0).any():
            raise InputError(
                f"{feature_field} has {int((features < 0).sum())} negative value(s); the Gamma likelihood needs "
                "non-negative intensities: pass raw (not z-scored) intensities, or clip at 0."
            )
        cell_xy = _coordinates(cells, spatial_key, "cells")

        # --- graph ---
        if graph == "knn":
            edges = knn_pairs(cell_xy, k)
        elif graph == "radius":
            if graph_radius is None or graph_radius <= 0:
                raise InputError("graph='radius' needs graph_radius > 0 (in coordinate units).")
            edges = radius_pairs(cell_xy, graph_radius)
        else:
            raise InputError(f"graph must be 'knn' or 'radius', got {graph!r}.")

        settings = {
            "cell_type_key": cell_type_key,
            "protein_layer": protein_layer or "X",
            "spot_layer": spot_layer or "X",
            "assignment": assignment,
            "graph": graph,
            "k": int(k),
            "spatial_key": spatial_key,
        }
        common = dict(
            cell_features=features,
            cell_type=codes,
            cell_types=categories,
            cell_coords=cell_xy,
            cell_names=cells.obs_names.copy(),
            feature_names=cells.var_names.copy(),
            edges=edges,
            nonedge_ratio=nonedge_ratio,
        )
        if spots is None:
            return cls(**common, settings=settings)

        # --- spots ---
        if not isinstance(spots, AnnData):
            raise InputError(f"spots must be an AnnData or None, got {type(spots).__name__}.")
        if spots.n_obs == 0 or spots.n_vars == 0:
            raise InputError(f"spots has no observations or no genes (shape {spots.shape}); pass spots x genes.")
        _check_unique_names(spots, "spots")
        if spot_layer is None:
            count_matrix, count_field = spots.X, "spots.X"
        else:
            if spot_layer not in spots.layers:
                raise InputError(
                    f"spots.layers['{spot_layer}'] is missing (available: {list(spots.layers.keys())})."
                )
            count_matrix, count_field = spots.layers[spot_layer], f"spots.layers['{spot_layer}']"
        counts = _validated_counts(count_matrix, count_field)
        spot_xy = _coordinates(spots, spatial_key, "spots")
        spot_diameter = checked_diameter(spot_diameter)
        if assignment not in ("radius", "nearest"):
            raise InputError(f"assignment must be 'radius' or 'nearest', got {assignment!r}.")
        check_overlap(cell_xy, spot_xy)
        if assignment == "radius" and (spot_diameter is None or spot_diameter <= 0):
            raise InputError(
                "spot_diameter (> 0, in the coordinate unit) is required for assignment='radius'; "
                "e.g. 55.0 for Visium in µm, or use assignment='nearest'."
            )

        # drop spots with zero counts
        check_spot_geometry(cell_xy, spot_xy, spot_diameter, assignment, check_geometry=check_geometry)
        library = np.asarray(counts.sum(1)).reshape(-1)
        keep = library > 0
        if not keep.all():
            warnings.warn(
                f"dropping {int((~keep).sum())} of {spots.n_obs} spots with zero total counts "
                "(they carry no information for the spot likelihood).",
                stacklevel=2,
            )
        cell_spot, cell_home = assign_cells_to_spots(cell_xy, spot_xy[keep], spot_diameter, assignment)
        if (cell_spot < 0).all():
            raise AssignmentError(
                f"every cell lies outside every spot (spot_diameter={spot_diameter}): check that "
                "spot_diameter is in the coordinate unit (e.g. µm, not pixels), that cells and spots "
                "come from the same registered section, or use assignment='nearest'."
            )
        # drop spots with no member cell: their counts cannot be explained by any cell
        kept_index = np.flatnonzero(keep)
        occupied = np.bincount(cell_spot[cell_spot >= 0], minlength=kept_index.size) > 0
        if not occupied.all():
            warnings.warn(
                f"dropping {int((~occupied).sum())} of {spots.n_obs} spots that contain no cell "
                f"(radius {None if spot_diameter is None else spot_diameter / 2}).",
                stacklevel=2,
            )
            kept_index = kept_index[occupied]
            cell_spot, cell_home = assign_cells_to_spots(
                cell_xy, spot_xy[kept_index], spot_diameter, assignment
            )
        settings.update(spot_diameter=float(spot_diameter or 0.0))
        return cls(
            **common,
            spot_counts=counts[kept_index],
            spot_coords=spot_xy[kept_index],
            spot_names=spots.obs_names[kept_index].copy(),
            gene_names=spots.var_names.copy(),
            cell_spot=cell_spot,
            cell_home=cell_home,
            settings=settings,
        )

    # ---- batches ------------------------------------------------------------------------
    def batch_specs(self, groups: list[np.ndarray], seed: int) -> list[BatchSpec]:
        """Scale factors of a partition of the units into ``groups``."""
        n_batches = len(groups)
        unit_label = np.empty(self.n_units, dtype=np.int64)
        for b, units in enumerate(groups):
            unit_label[units] = b
        cell_label = unit_label[self.cell_home]
        cells_per_batch = np.bincount(cell_label, minlength=n_batches)
        same = cell_label[self.edges[0]] == cell_label[self.edges[1]]
        within_edges = np.bincount(cell_label[self.edges[0]][same], minlength=n_batches)
        within_pairs = cells_per_batch * (cells_per_batch - 1) // 2 - within_edges
        total_within_edges = int(within_edges.sum())
        edge_scale = n_batches * self.n_edges / total_within_edges if total_within_edges else 0.0
        total_within_pairs = int(within_pairs.sum())
        nonedge_factor = self.n_nonedges / total_within_pairs if total_within_pairs else 0.0
        return [
            BatchSpec(units=np.asarray(units), n_batches=n_batches, edge_scale=edge_scale,
                      nonedge_factor=nonedge_factor, seed=int(seed) * 7919 + b)
            for b, units in enumerate(groups)
        ]

    def make_batch(self, spec: BatchSpec, nonedge_ratio: float | None = None) -> Batch:
        """Build the :class:`Batch` of one partition element.

        ``nonedge_ratio`` (default :attr:`nonedge_ratio`) non-edges are sampled per observed
        edge of the batch (at least one when the batch has a non-adjacent pair), uniformly
        among its non-adjacent pairs.
        """
        nonedge_ratio = self.nonedge_ratio if nonedge_ratio is None else _checked_ratio(nonedge_ratio)
        units = np.sort(np.asarray(spec.units, dtype=np.int64))
        static = self._static_batch_part(units)
        n, n_within_edges = static["n"], static["n_within_edges"]
        n_pairs = n * (n - 1) // 2 - n_within_edges
        rng = np.random.default_rng(spec.seed)
        n_nonedges = min(n_pairs, max(1, int(round(nonedge_ratio * n_within_edges)))) if n_pairs > 0 else 0
        nonedges = _sample_nonedges(rng, n, static["edge_keys"], n_nonedges)
        nonedge_scale = (
            spec.n_batches * spec.nonedge_factor * n_pairs / n_nonedges if n_nonedges > 0 else 0.0
        )
        return Batch(
            **static["tensors"],
            nonedge_index=torch.from_numpy(nonedges),
            n_types=self.n_types,
            n_cells_total=self.n_cells,
            n_spots_total=self.n_spots,
            n_edges_total=self.n_edges,
            n_batches=spec.n_batches,
            cell_scale=float(spec.n_batches),
            spot_scale=float(spec.n_batches),
            edge_scale=float(spec.edge_scale),
            nonedge_scale=float(nonedge_scale),
        )

    def _static_batch_part(self, units: np.ndarray) -> dict:
        """Everything of a batch except its sampled non-edges; the last one is cached, so a
        full-batch fit (one batch per epoch) builds it once."""
        key = units.tobytes()
        if self._static_cache is not None and self._static_cache[0] == key:
            return self._static_cache[1]
        cells = np.sort(self._unit_cells[units].indices.astype(np.int64))
        n = cells.size
        # spots of the batch and the local membership (cells of those spots are all in `cells`)
        spots = units if self.n_spots > 0 else np.zeros(0, dtype=np.int64)
        global_spot = self.cell_spot[cells]
        local_spot = np.full(n, -1, dtype=np.int64)
        has_spot = global_spot >= 0
        local_spot[has_spot] = np.searchsorted(spots, global_spot[has_spot])
        member_cells = np.flatnonzero(has_spot)
        membership = torch.sparse_coo_tensor(
            torch.from_numpy(np.stack([local_spot[member_cells], member_cells])),
            torch.ones(member_cells.size),
            size=(spots.size, n),
            check_invariants=False,
        ).coalesce()
        # graph among the batch's cells
        sub = self._adjacency[cells][:, cells].tocoo()
        counts = self.spot_counts[spots].toarray() if self.n_spots > 0 else np.zeros((0, 0), np.float32)
        static = {
            "n": n,
            "sub": sub,
            "n_within_edges": int(sub.nnz // 2),
            "edge_keys": np.unique(sub.row.astype(np.int64) * n + sub.col),  # sorted, for non-edge sampling
            "tensors": dict(
                cell_index=torch.from_numpy(cells),
                cell_type=torch.from_numpy(self.cell_type[cells]),
                cell_features=torch.from_numpy(self.cell_features[cells]),
                cell_library=torch.from_numpy(self.cell_library[cells]),
                cell_coords=torch.from_numpy(self.cell_coords[cells]),
                cell_spot=torch.from_numpy(local_spot),
                spot_index=torch.from_numpy(spots),
                spot_counts=torch.from_numpy(counts.astype(np.float32)),
                spot_library=torch.from_numpy(self.spot_library[spots]),
                membership=membership,
                edge_index=torch.from_numpy(np.stack([sub.row, sub.col]).astype(np.int64)),
            ),
        }
        self._static_cache = (key, static)
        return static

    def sampler(self, batch_size: int, *, seed: int = 0, shuffle: bool = True) -> SpotBatchSampler:
        """The epoch partition sampler (see :class:`SpotBatchSampler`)."""
        return SpotBatchSampler(self, batch_size, seed=seed, shuffle=shuffle)

    def dataloader(
        self,
        batch_size: int | None = None,
        *,
        seed: int = 0,
        shuffle: bool = True,
    ) -> torch.utils.data.DataLoader:
        """A DataLoader of :class:`Batch` objects; ``batch_size`` counts spots (cells when there
        are no spots); ``None`` means one batch with everything. Each batch samples
        :attr:`nonedge_ratio` non-edges per edge."""
        batch_size = self.n_units if batch_size is None else int(batch_size)
        return torch.utils.data.DataLoader(
            _BatchBuilder(self),
            sampler=self.sampler(batch_size, seed=seed, shuffle=shuffle),
            batch_size=None,
            collate_fn=_identity,
        )

    def chunks(self, chunk_size: int | None = None, *, nonedge_ratio: float | None = None) -> Iterator[Batch]:
        """A fixed, deterministic spatial partition covering every cell once (for posterior
        sampling); ``chunk_size`` counts spots (cells when there are no spots), ``None`` = all;
        ``nonedge_ratio`` overrides :attr:`nonedge_ratio`."""
        size = self.n_units if chunk_size is None else int(chunk_size)
        sampler = SpotBatchSampler(self, size, seed=0, shuffle=False, rank=0, world_size=1)
        for spec in sampler.partition():
            yield self.make_batch(spec, nonedge_ratio=nonedge_ratio)

    def full_batch(self, *, nonedge_ratio: float | None = None) -> Batch:
        """Everything in one batch (scales 1 for cells, spots and edges); ``nonedge_ratio``
        overrides :attr:`nonedge_ratio` (e.g. every non-adjacent pair for a graph check)."""
        return next(self.chunks(None, nonedge_ratio=nonedge_ratio))


def _validated_counts(matrix, field: str) -> sp.csr_matrix:
    """Raw counts as csr float32, rejecting NaN/inf, negative and non-integer values."""
    csr = sp.csr_matrix(matrix, dtype=np.float64) if sp.issparse(matrix) else sp.csr_matrix(np.asarray(matrix, dtype=np.float64))
    data = csr.data
    if not np.isfinite(data).all():
        raise CountsError(
            f"{field} contains {int((~np.isfinite(data)).sum())} NaN/inf value(s); spot counts must be raw integers."
        )
    if (data < 0).any():
        raise CountsError(
            f"{field} has {int((data < 0).sum())} negative value(s); pass raw UMI counts "
            "(e.g. from spots.layers['counts'] or spots.raw), not normalised or scaled data."
        )
    fractional = np.abs(data - np.round(data)) > 1e-6
    if fractional.any():
        raise CountsError(
            f"{field} has {int(fractional.sum())} non-integer value(s) (e.g. {data[fractional][0]:.4g}); "
            "the negative-binomial likelihood needs raw integer counts: pass raw counts "
            "(spots.layers['counts'] or spots.raw.X) via spot_layer=..., not log-normalised data."
        )
    csr.data = np.round(data)
    return csr.astype(np.float32)


def _checked_ratio(nonedge_ratio: float) -> float:
    ratio = float(nonedge_ratio)
    if not ratio >= 0.0:
        raise InputError(f"nonedge_ratio must be a number >= 0 (non-edges sampled per edge), got {nonedge_ratio!r}.")
    return ratio


def _floored_library(features: np.ndarray) -> np.ndarray:
    """``l^y_i = sum_p y_ip``, floored at 1e-3 x the median positive library so that a cell
    whose panel is all zero (possible for count panels) has a small positive library instead
    of 0 (which would make normalised inputs and ``log l^y_i`` undefined)."""
    library = features.sum(1).astype(np.float32)
    positive = library[library > 0]
    floor = np.float32(1e-3 * np.median(positive)) if positive.size else np.float32(1e-3)
    n_zero = int((library <= 0).sum())
    if n_zero:
        warnings.warn(
            f"{n_zero} cell(s) have an all-zero feature panel; their library l^y is set to {floor:.3g} "
            "(1e-3 x the median) so that they can still be modelled.",
            stacklevel=3,
        )
    return np.maximum(library, floor)


def _symmetric_adjacency(edges: np.ndarray, n: int) -> sp.csr_matrix:
    """(n, n) 0/1 adjacency with both directions of every undirected edge."""
    upper = sp.csr_matrix((np.ones(edges.shape[1], np.int8), (edges[0], edges[1])), shape=(n, n))
    return (upper + upper.T).tocsr()


def _sample_nonedges(rng: np.random.Generator, n: int, edge_keys: np.ndarray, size: int) -> np.ndarray:
    """``size`` distinct uniformly random pairs (i < j) of the ``n`` cells that are not edges
    (``edge_keys``: sorted ``i * n + j`` of both directions of every edge)."""
    if size <= 0:
        return np.zeros((2, 0), dtype=np.int64)
    if size >= n * (n - 1) // 2 - edge_keys.size // 2:  # every non-adjacent pair: enumerate them
        lo, hi = np.triu_indices(n, 1)
        key = lo.astype(np.int64) * n + hi
        key = key[~np.isin(key, edge_keys)] if edge_keys.size else key
        return np.stack([key // n, key % n]).astype(np.int64)
    chosen = np.zeros(0, dtype=np.int64)
    while chosen.size < size:
        draw = 2 * (size - chosen.size) + 16
        i = rng.integers(0, n, draw)
        j = rng.integers(0, n, draw)
        lo, hi = np.minimum(i, j), np.maximum(i, j)
        key = lo * n + hi
        if edge_keys.size:
            at = np.minimum(np.searchsorted(edge_keys, key), edge_keys.size - 1)
            is_edge = edge_keys[at] == key
        else:
            is_edge = np.zeros(key.size, dtype=bool)
        key = key[(lo != hi) & ~is_edge]
        chosen = np.unique(np.concatenate([chosen, key]))
        if chosen.size > size:
            chosen = rng.permutation(chosen)[:size]
    return np.stack([chosen // n, chosen % n]).astype(np.int64)
