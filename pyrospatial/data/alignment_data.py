"""A section pair as a data source for the alignment model: the whole pair is one batch.
"""

from __future__ import annotations

from typing import Any

import torch

from pyrospatial.models.alignment import AlignmentBatch

__all__ = ["AlignmentData"]


# ------------------------------------------------------------------------------------------
# the engine's view of the pair
# ------------------------------------------------------------------------------------------
class AlignmentData:
    """The pair as a one-batch dataset for :func:`pyrospatial.fit`.

    ``fit`` draws batches from ``dataloader``/``chunks``; the whole pair is one
    :class:`~pyrospatial.models.alignment.AlignmentBatch` (its coupling is O(n k)), repeated
    ``steps_per_epoch`` times per epoch.
    """

    n_spots = 0

    def __init__(self, batch: AlignmentBatch, steps_per_epoch: int = 50) -> None:
        self.batch = batch
        self.steps_per_epoch = int(steps_per_epoch)

    @property
    def n_cells(self) -> int:
        return self.batch.n_a

    def chunks(self, chunk_size: int | None = None, **_: Any):
        yield self.batch

    def dataloader(self, batch_size: int | None = None, *, seed: int = 0, nonedge_ratio: float = 1.0,
                   shuffle: bool = True) -> torch.utils.data.DataLoader:
        batch = self.batch
        return torch.utils.data.DataLoader(_Repeat(batch, self.steps_per_epoch), batch_size=None,
                                           sampler=list(range(self.steps_per_epoch)), collate_fn=_identity)


def _identity(x):
    return x


class _Repeat(torch.utils.data.Dataset):
    def __init__(self, batch: AlignmentBatch, n: int) -> None:
        self.batch, self.n = batch, n

    def __getitem__(self, i: int) -> AlignmentBatch:
        return self.batch

    def __len__(self) -> int:
        return self.n
