"""Spots of one or more sections as a data source for the domains model: spatially compact
minibatches with every modality of the spots, their section and the spot graph among them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace

import numpy as np
import scipy.sparse as sp
import torch
from scipy.special import gammaln
from scipy.spatial import cKDTree

from pyrospatial.data.batching import spatial_partition
from pyrospatial.errors import InputError

__all__ = ["DomainBatch", "DomainData", "knn_edges"]


@dataclass
class DomainBatch:
    """A minibatch of spots for :class:`~pyrospatial.models.domains.DomainModel`.

    Shapes: ``m`` spots in the batch, ``G`` genes, ``P`` proteins, ``F`` morphology features,
    ``D`` encoder inputs, ``E`` edges of the spot graph inside the batch. A modality the model
    does not use has zero columns. The fields read by
    :func:`~pyrospatial.engine.batch.spot_plate` (``spot_index``, ``n_spots_total``,
    ``spot_scale``) have the engine's names.
    """

    spot_index: torch.Tensor  # (m,) long, index of each spot in the data set
    section: torch.Tensor  # (m,) long, section s(i) of each spot
    counts: torch.Tensor  # (m, G) float, raw counts x_i
    library: torch.Tensor  # (m,) float, l_i = sum_g x_ig
    proteins: torch.Tensor  # (m, P) float, positive protein values y_i
    morphology: torch.Tensor  # (m, F) float, standardised image features m_i
    features: torch.Tensor  # (m, D) float, encoder input (own and neighbour-averaged features)
    edge_index: torch.Tensor  # (2, E) long, local indices, each undirected edge once
    n_sections: int  # sections in the data set (size of the sections plate)
    n_spots_total: int  # spots in the data set (size of the spots plate)
    n_batches: int  # batches in this epoch's partition
    spot_scale: float = 1.0  # multiplies every per-spot log-density (unbiased minibatch ELBO)
    edge_scale: float = 1.0  # (sum of the batch's spots' degrees / 2) / E: the graph term's share, times spot_scale
    count_rows: torch.Tensor | None = None  # (N,) long, local spot of each non-zero count
    count_cols: torch.Tensor | None = None  # (N,) long, gene of each non-zero count
    count_values: torch.Tensor | None = None  # (N,) float, the non-zero counts
    count_log_factorial: torch.Tensor | None = None  # (m,) float, sum_g lgamma(x_ig + 1)

    @property
    def n_spots(self) -> int:
        """Spots in this batch."""
        return int(self.spot_index.shape[0])

    @property
    def n_cells(self) -> int:
        """0: a domain batch has no cells plate."""
        return 0

    @property
    def cell_index(self) -> torch.Tensor:
        """An empty index (no cells plate)."""
        return self.spot_index[:0]

    @property
    def device(self) -> torch.device:
        return self.features.device

    def to(self, device: torch.device | str) -> DomainBatch:
        """A copy with every tensor on ``device``."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return replace(self, **moved)


def knn_edges(coords: np.ndarray, section: np.ndarray, k: int) -> np.ndarray:
    """``(2, E)`` undirected k-nearest-neighbour edges (each once, ``i < j``), built inside each
    section only (sections share no edge)."""
    pieces = []
    for s in np.unique(section):
        idx = np.flatnonzero(section == s)
        kk = min(int(k), idx.size - 1)
        if kk < 1:
            continue
        _, nbr = cKDTree(coords[idx]).query(coords[idx], k=kk + 1)
        src = np.repeat(idx, kk)
        dst = idx[nbr[:, 1:].reshape(-1)]
        pieces.append(np.stack([np.minimum(src, dst), np.maximum(src, dst)]))
    if not pieces:
        return np.zeros((2, 0), dtype=np.int64)
    return np.unique(np.concatenate(pieces, axis=1), axis=1).astype(np.int64)


class _Spec:
    def __init__(self, units: np.ndarray, n_batches: int):
        self.units, self.n_batches = units, n_batches


class _Sampler(torch.utils.data.Sampler):
    def __init__(self, data: DomainData, batch_size: int, seed: int, shuffle: bool):
        self.data, self.batch_size, self.seed, self.shuffle, self.epoch = data, batch_size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return min(self.data.n_spots, max(1, math.ceil(self.data.n_spots / self.batch_size)))

    def __iter__(self):
        n = len(self)
        rng = np.random.default_rng([self.seed, self.epoch]) if self.shuffle else None
        groups = spatial_partition(self.data.layout, n, rng)
        order = np.arange(n)
        if self.shuffle:
            np.random.default_rng([self.seed, self.epoch, 1]).shuffle(order)
        for i in order:
            yield _Spec(groups[i], n)


class _Builder(torch.utils.data.Dataset):
    def __init__(self, data: DomainData):
        self.data = data

    def __getitem__(self, spec: _Spec) -> DomainBatch:
        return self.data.make_batch(spec.units, spec.n_batches)

    def __len__(self) -> int:
        return self.data.n_spots


def _float_matrix(value: np.ndarray | None, n: int, name: str) -> np.ndarray:
    if value is None:
        return np.zeros((n, 0), dtype=np.float32)
    out = np.asarray(value, dtype=np.float32)
    if out.ndim != 2 or out.shape[0] != n:
        raise InputError(f"{name} must be a ({n}, k) matrix, got shape {out.shape}.")
    if not np.isfinite(out).all():
        raise InputError(f"{name} has NaN or infinite values: fill or drop them first.")
    return out


class DomainData:
    """Validated spots of one or more sections that the engine can batch (:func:`pyrospatial.fit`
    and :func:`pyrospatial.sample_posterior` accept it like any data source).

    Parameters
    ----------
    features
        ``(n, D)`` encoder input.
    coords
        ``(n, 2)`` coordinates, in each section's own frame.
    section
        ``(n,)`` integer section codes ``0..S-1``.
    counts, proteins, morphology
        ``(n, G)``, ``(n, P)``, ``(n, F)`` matrices, or ``None`` for a modality not modelled.
    n_neighbours
        Degree of the k-nearest-neighbour spot graph (built per section).
    """

    #: The engine sizes its plates from ``n_cells`` and ``n_spots``: no cells plate here.
    n_cells = 0

    def __init__(self, features: np.ndarray, coords: np.ndarray, section: np.ndarray, *,
                 counts: np.ndarray | None = None, proteins: np.ndarray | None = None,
                 morphology: np.ndarray | None = None, n_neighbours: int = 6) -> None:
        self.features = _float_matrix(features, len(features), "features")
        n = self.features.shape[0]
        self.coords = np.asarray(coords, dtype=np.float64)
        self.section = np.asarray(section, dtype=np.int64)
        if self.coords.shape != (n, 2) or self.section.shape != (n,):
            raise InputError(f"coords must be ({n}, 2) and section ({n},); got {self.coords.shape}, "
                             f"{self.section.shape}.")
        self.n_sections = int(self.section.max()) + 1 if n else 0
        self.counts = _float_matrix(counts, n, "counts")
        self.library = self.counts.sum(1)
        # the non-zero counts, row by row (the likelihood's lgamma terms need only these)
        self.count_csr = sp.csr_matrix(self.counts)
        self.count_log_factorial = np.asarray(
            sp.csr_matrix((gammaln(self.count_csr.data.astype(np.float64) + 1.0), self.count_csr.indices,
                           self.count_csr.indptr), shape=self.counts.shape).sum(1)).ravel().astype(np.float32)
        self._full: DomainBatch | None = None
        self.proteins = _float_matrix(proteins, n, "proteins")
        self.morphology = _float_matrix(morphology, n, "morphology")
        self.edges = knn_edges(self.coords, self.section, n_neighbours) if n_neighbours > 0 else np.zeros(
            (2, 0), dtype=np.int64)
        self.degree = np.bincount(self.edges.reshape(-1), minlength=n).astype(np.float64)
        # sections side by side, so that spatially compact minibatches never mix sections
        layout = self.coords - self.coords.min(0)
        width = float(np.ptp(layout[:, 0])) + 1.0 if n else 1.0
        self.layout = layout + np.stack([self.section * 1.5 * width, np.zeros(n)], 1)

    @property
    def n_spots(self) -> int:
        return int(self.features.shape[0])

    def make_batch(self, units: np.ndarray, n_batches: int = 1) -> DomainBatch:
        """The :class:`DomainBatch` of spots ``units`` (scaled by ``n_batches``)."""
        units = np.sort(np.asarray(units, dtype=np.int64))
        full = units.size == self.n_spots and int(n_batches) == 1
        if full and self._full is not None:
            return self._full
        local = np.full(self.n_spots, -1, dtype=np.int64)
        local[units] = np.arange(units.size)
        e = local[self.edges]
        e = e[:, (e >= 0).all(0)] if e.size else e
        nz = self.count_csr[units].tocoo()
        # the batch's edges stand for every edge of its spots (half of each spot's degree, so that
        # the batches of a partition add up to the whole graph; 1 for the full batch): cut edges
        # of a spatially compact minibatch do not weaken the spatial prior
        edge_scale = 1.0 if full or e.shape[1] == 0 else float(self.degree[units].sum() / 2.0 / e.shape[1])
        batch = DomainBatch(
            spot_index=torch.from_numpy(units),
            section=torch.from_numpy(self.section[units]),
            counts=torch.from_numpy(self.counts[units]),
            library=torch.from_numpy(self.library[units]),
            proteins=torch.from_numpy(self.proteins[units]),
            morphology=torch.from_numpy(self.morphology[units]),
            features=torch.from_numpy(self.features[units]),
            edge_index=torch.from_numpy(np.ascontiguousarray(e)),
            n_sections=self.n_sections,
            n_spots_total=self.n_spots,
            n_batches=int(n_batches),
            spot_scale=float(n_batches),
            edge_scale=edge_scale,
            count_rows=torch.from_numpy(nz.row.astype(np.int64)),
            count_cols=torch.from_numpy(nz.col.astype(np.int64)),
            count_values=torch.from_numpy(nz.data.astype(np.float32)),
            count_log_factorial=torch.from_numpy(self.count_log_factorial[units]),
        )
        if full:
            self._full = batch
        return batch

    def dataloader(self, batch_size: int | None = None, *, seed: int = 0,
                   shuffle: bool = True) -> torch.utils.data.DataLoader:
        """Spatially compact minibatches of ``batch_size`` spots (``None``: all spots)."""
        size = self.n_spots if batch_size is None else int(batch_size)
        return torch.utils.data.DataLoader(
            _Builder(self), sampler=_Sampler(self, size, seed, shuffle), batch_size=None, collate_fn=lambda x: x
        )

    def full_batch(self) -> DomainBatch:
        """Every spot in one batch with scale 1."""
        return self.make_batch(np.arange(self.n_spots), 1)

    def chunks(self, chunk_size: int | None = None) -> Iterator[DomainBatch]:
        """A fixed partition of the spots into chunks (posterior sampling)."""
        size = self.n_spots if chunk_size is None else int(chunk_size)
        for spec in _Sampler(self, size, 0, False):
            yield self.make_batch(spec.units, spec.n_batches)
