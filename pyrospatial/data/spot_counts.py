"""Spot counts as a data source for spot-level models: spatially partitioned minibatches of spots.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from scipy.spatial import cKDTree

from pyrospatial.data.batching import spatial_partition
from pyrospatial.errors import InputError

__all__ = ["SpotBatch", "SpotCounts"]


# ------------------------------------------------------------------------------------------
# spots as a dataset for the engine
# ------------------------------------------------------------------------------------------
@dataclass
class SpotBatch:
    """A minibatch of spots (no cells): counts, the spot graph among them, plate size and scale.

    The fields :func:`~pyrospatial.engine.batch.spot_plate` reads (``spot_index``,
    ``n_spots_total``, ``spot_scale``) have the names of :class:`~pyrospatial.engine.batch.Batch`,
    so spot-level models use the same scaled ``spots`` plate; nothing about cells is carried
    (``cell_index``/``n_cells`` are read-only answers of the engine's
    :class:`~pyrospatial.protocols.BatchLike` protocol: no cells). Shapes: ``m`` spots in the
    batch, ``G`` genes, ``E`` spot-graph edges.
    """

    spot_index: torch.Tensor  # (m,) long, index of each spot in the dataset
    spot_counts: torch.Tensor  # (m, G) float, raw counts X_j
    spot_library: torch.Tensor  # (m,) float, l_j = sum_g X_jg
    spot_edge_index: torch.Tensor  # (2, E) long, local, each undirected edge once
    n_types: int  # cell types of the reference
    n_spots_total: int  # spots in the dataset (size of the spots plate)
    n_batches: int  # batches in this epoch's partition
    spot_scale: float = 1.0  # multiplies every per-spot log-density (unbiased minibatch ELBO)

    @property
    def n_spots(self) -> int:
        """Spots in this batch."""
        return int(self.spot_index.shape[0])

    @property
    def n_cells(self) -> int:
        """0: a spot batch has no cells plate."""
        return 0

    @property
    def cell_index(self) -> torch.Tensor:
        """An empty index (no cells plate), for code that reorders every local plate."""
        return self.spot_index[:0]

    @property
    def device(self) -> torch.device:
        return self.spot_counts.device

    def to(self, device: torch.device | str) -> SpotBatch:
        """A copy with every tensor on ``device`` (Lightning calls this to move batches)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return replace(self, **moved)


class _Spec:
    def __init__(self, units: np.ndarray, n_batches: int):
        self.units, self.n_batches = units, n_batches


class _Sampler(torch.utils.data.Sampler):
    def __init__(self, data: SpotCounts, batch_size: int, seed: int, shuffle: bool):
        self.data, self.batch_size, self.seed, self.shuffle, self.epoch = data, batch_size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return min(self.data.n_spots, max(1, math.ceil(self.data.n_spots / self.batch_size)))

    def __iter__(self):
        n = len(self)
        rng = np.random.default_rng([self.seed, self.epoch]) if self.shuffle else None
        groups = spatial_partition(self.data.coords, n, rng)
        order = np.arange(n)
        if self.shuffle:
            np.random.default_rng([self.seed, self.epoch, 1]).shuffle(order)
        for i in order:
            yield _Spec(groups[i], n)


class _Builder(torch.utils.data.Dataset):
    def __init__(self, data: SpotCounts):
        self.data = data

    def __getitem__(self, spec: _Spec) -> SpotBatch:
        return self.data.make_batch(spec.units, spec.n_batches)

    def __len__(self) -> int:
        return self.data.n_spots


class SpotCounts:
    """Validated spot counts (no cells) that the engine can batch: ``fit`` and
    ``sample_posterior`` accept it like a :class:`~pyrospatial.data.dataset.SpatialDataset`.

    Parameters
    ----------
    counts
        ``(n_spots, G)`` raw counts.
    coords
        ``(n_spots, 2)`` coordinates (used for spatially compact minibatches and the spot
        graph); ``None``: spots are batched in their order.
    n_types
        Number of cell types (recorded in every batch).
    n_neighbours
        Spot-graph degree (k nearest spots) for the smoothness term; 0 = no graph.
    gene_names
        Names of the count columns (labels the ``gene`` dimension in criticism); optional.
    """

    def __init__(self, counts: np.ndarray, coords: np.ndarray | None, n_types: int, *, n_neighbours: int = 6,
                 gene_names: Sequence[str] | None = None):
        self.counts = np.asarray(counts, dtype=np.float32)
        if gene_names is not None and len(gene_names) != self.counts.shape[1]:
            raise InputError(f"gene_names has {len(gene_names)} names for {self.counts.shape[1]} count columns.")
        self.gene_names = None if gene_names is None else [str(g) for g in gene_names]
        n = self.counts.shape[0]
        self.coords = (
            np.asarray(coords, dtype=np.float64) if coords is not None else np.stack([np.arange(n), np.zeros(n)], 1)
        )
        self.library = self.counts.sum(1)
        self._n_types = int(n_types)
        self.edges = np.zeros((2, 0), dtype=np.int64)
        if n_neighbours > 0 and coords is not None and n > 1:
            k = min(int(n_neighbours), n - 1)
            _, nbr = cKDTree(self.coords).query(self.coords, k=k + 1)
            src = np.repeat(np.arange(n), k)
            dst = nbr[:, 1:].reshape(-1)
            lo, hi = np.minimum(src, dst), np.maximum(src, dst)
            self.edges = np.unique(np.stack([lo, hi]), axis=1)

    #: The engine sizes its plates from ``n_cells`` and ``n_spots``: a spot dataset has no cells plate.
    n_cells = 0

    @property
    def n_spots(self) -> int:
        return int(self.counts.shape[0])

    @property
    def n_types(self) -> int:
        return self._n_types

    def make_batch(self, units: np.ndarray, n_batches: int = 1) -> SpotBatch:
        """The :class:`SpotBatch` of spots ``units`` (scaled by ``n_batches``)."""
        units = np.sort(np.asarray(units, dtype=np.int64))
        m = units.size
        local = np.full(self.n_spots, -1, dtype=np.int64)
        local[units] = np.arange(m)
        e = local[self.edges]
        e = e[:, (e >= 0).all(0)] if e.size else e
        return SpotBatch(
            spot_index=torch.from_numpy(units),
            spot_counts=torch.from_numpy(self.counts[units]),
            spot_library=torch.from_numpy(self.library[units]),
            spot_edge_index=torch.from_numpy(np.ascontiguousarray(e)),
            n_types=self._n_types,
            n_spots_total=self.n_spots,
            n_batches=int(n_batches),
            spot_scale=float(n_batches),
        )

    def dataloader(self, batch_size: int | None = None, *, seed: int = 0,
                   shuffle: bool = True) -> torch.utils.data.DataLoader:
        """Spatially compact minibatches of ``batch_size`` spots (``None``: all spots)."""
        size = self.n_spots if batch_size is None else int(batch_size)
        return torch.utils.data.DataLoader(
            _Builder(self), sampler=_Sampler(self, size, seed, shuffle), batch_size=None, collate_fn=lambda x: x
        )

    def full_batch(self) -> SpotBatch:
        """Every spot in one batch with scale 1 (criticism, refinement)."""
        return self.make_batch(np.arange(self.n_spots), 1)

    def chunks(self, chunk_size: int | None = None) -> Iterator[SpotBatch]:
        """A fixed partition of the spots into chunks (posterior sampling)."""
        size = self.n_spots if chunk_size is None else int(chunk_size)
        for spec in _Sampler(self, size, 0, False):
            yield self.make_batch(spec.units, spec.n_batches)
