"""Spot-complete minibatches: a spatial partition of spots per epoch and its (DDP-aware) sampler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from pyrospatial.engine.batch import Batch
from pyrospatial.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from pyrospatial.data.dataset import SpatialDataset

__all__ = ["BatchSpec", "spatial_partition", "SpotBatchSampler"]


# ------------------------------------------------------------------------------------------
# minibatch partition
# ------------------------------------------------------------------------------------------
@dataclass
class BatchSpec:
    """One batch of an epoch's partition: which units (spots, or cells without spots) and
    the scale factors of that partition."""

    units: np.ndarray
    n_batches: int
    edge_scale: float
    nonedge_factor: float  # n_nonedges_total / sum_b (non-adjacent pairs inside batch b)
    seed: int


def spatial_partition(
    xy: np.ndarray, n_batches: int, rng: np.random.Generator | None
) -> list[np.ndarray]:
    """Split points into ``n_batches`` spatially compact groups of near-equal size.

    Points are ordered along a boustrophedon path over strips of a randomly rotated and
    shifted frame (``rng=None``: unrotated, unshifted) and the path is cut into equal pieces.
    """
    n = xy.shape[0]
    if n_batches <= 1:
        return [np.arange(n)]
    theta = rng.uniform(0, 2 * np.pi) if rng is not None else 0.0
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    uv = (xy - xy.mean(0)) @ rot.T
    span = np.ptp(uv, axis=0) + 1e-9
    area_per_point = span[0] * span[1] / n
    width = math.sqrt(area_per_point * n / n_batches)
    offset = rng.uniform(0, width) if rng is not None else 0.0
    strip = np.floor((uv[:, 1] - uv[:, 1].min() + offset) / width).astype(np.int64)
    along = np.where(strip % 2 == 0, uv[:, 0], -uv[:, 0])
    order = np.lexsort((along, strip))
    return [np.sort(part) for part in np.array_split(order, n_batches)]


class SpotBatchSampler(torch.utils.data.Sampler):
    """Yields one :class:`BatchSpec` per minibatch; every unit once per epoch.

    The partition of epoch ``e`` is a deterministic function of ``(seed, e)``. Under
    ``torch.distributed`` each process takes batches ``rank, rank + world_size, ...`` of the
    same partition (the number of batches is rounded up to a multiple of ``world_size``).
    Lightning calls :meth:`set_epoch` at the start of each epoch.
    """

    def __init__(
        self,
        dataset: "SpatialDataset",
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}.")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self._rank = rank
        self._world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _ranks(self) -> tuple[int, int]:
        if self._rank is not None and self._world_size is not None:
            return self._rank, self._world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def n_batches(self) -> int:
        _, world = self._ranks()
        n = max(1, math.ceil(self.dataset.n_units / self.batch_size))
        return int(math.ceil(n / world) * world)

    def partition(self) -> list[BatchSpec]:
        """This epoch's full partition (all ranks)."""
        n_batches = min(self.n_batches(), self.dataset.n_units)
        rng = np.random.default_rng([self.seed, self.epoch]) if self.shuffle else None
        groups = spatial_partition(self.dataset.unit_coords, n_batches, rng)
        return self.dataset.batch_specs(groups, seed=self.seed * 1_000_003 + self.epoch)

    def __iter__(self) -> Iterator[BatchSpec]:
        # a generator: the partition is drawn when the first batch is requested, i.e. after
        # Lightning's set_epoch (it creates the iterator before calling set_epoch)
        rank, world = self._ranks()
        specs = self.partition()
        order = np.arange(len(specs))
        if self.shuffle:
            np.random.default_rng([self.seed, self.epoch, 1]).shuffle(order)
        for i in order[rank::world]:
            yield specs[i]

    def __len__(self) -> int:
        _, world = self._ranks()
        return min(self.n_batches(), self.dataset.n_units) // world


class _BatchBuilder(torch.utils.data.Dataset):
    """Map-style dataset whose 'index' is a BatchSpec (used with ``batch_size=None``)."""

    def __init__(self, dataset: "SpatialDataset"):
        self.dataset = dataset

    def __getitem__(self, spec: BatchSpec) -> Batch:
        return self.dataset.make_batch(spec)

    def __len__(self) -> int:
        return self.dataset.n_units


def _identity(x):
    return x
