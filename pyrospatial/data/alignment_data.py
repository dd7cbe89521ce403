"""A section pair as a data source for the alignment model: the whole pair is one batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

__all__ = ["AlignmentBatch", "AlignmentData"]


@dataclass
class AlignmentBatch:
    """Everything the alignment model and guide read (the whole pair; tensors on one device).

    ``features_*`` are the per-modality inputs (standardised principal components, see
    :func:`pyrospatial.methods.alignment.align`), ``coords_*`` the spatial coordinates in each slice's
    own frame, ``centre_a`` the point of *a* about which the transform rotates (its centroid).
    The pair has no spots and no minibatch scaling: nothing else is carried.
    """

    features_a: torch.Tensor  # (n, P_a)
    features_b: torch.Tensor  # (m, P_b)
    coords_a: torch.Tensor  # (n, 2)
    coords_b: torch.Tensor  # (m, 2)
    centre_a: torch.Tensor  # (2,)
    log_area_b: float  # log of the area of b's bounding box (background density of positions)
    tree_b: Any = field(default=None, repr=False)  # scipy cKDTree of coords_b (candidate search)

    @property
    def n_a(self) -> int:
        """Cells of slice *a*."""
        return int(self.coords_a.shape[0])

    @property
    def n_b(self) -> int:
        """Cells of slice *b*."""
        return int(self.coords_b.shape[0])

    @property
    def device(self) -> torch.device:
        return self.coords_a.device

    def to(self, device: torch.device | str) -> AlignmentBatch:
        """A copy with every tensor on ``device``."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return replace(self, **moved)


# ------------------------------------------------------------------------------------------
# the engine's view of the pair
# ------------------------------------------------------------------------------------------
class AlignmentData:
    """The pair as a one-batch dataset for :func:`pyrospatial.fit`.

    ``fit`` draws batches from ``dataloader``/``chunks``; the whole pair is one
    :class:`AlignmentBatch` (its coupling is O(n k)), repeated ``steps_per_epoch`` times per
    epoch. There is no minibatching, so ``batch_size``/``chunk_size`` are accepted and ignored:
    pass ``fit(..., batch_size=data.batch_size)``.
    """

    def __init__(self, batch: AlignmentBatch, steps_per_epoch: int = 50) -> None:
        self.batch = batch
        self.steps_per_epoch = int(steps_per_epoch)

    @property
    def batch_size(self) -> int:
        """Cells of *a* in the one batch (what ``fit`` records as its batch size)."""
        return self.batch.n_a

    def full_batch(self) -> AlignmentBatch:
        """The one batch (the whole pair)."""
        return self.batch

    def chunks(self, chunk_size: int | None = None):
        """The one batch (the whole pair)."""
        yield self.batch

    def dataloader(self, batch_size: int | None = None, *, seed: int = 0,
                   shuffle: bool = True) -> torch.utils.data.DataLoader:
        """``steps_per_epoch`` copies of the one batch per epoch."""
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
