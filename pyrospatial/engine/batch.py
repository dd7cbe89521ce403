"""The minibatch protocol shared by every model, guide and the engine.

A :class:`Batch` holds a spatially compact group of spots with *all* of their member cells
(spot-complete), the graph edges among those cells, sampled non-edges, and the scale factors
that make the minibatch ELBO an unbiased estimate of the full-data ELBO.

Every model and guide in pyrospatial is a callable ``f(batch)``. Use :func:`cell_plate` and
:func:`spot_plate` in both model and guide (and pass :func:`batch_plates` as ``create_plates``
to a ``pyro.infer.autoguide`` guide) so that local latents are scaled identically.

Scaling
-------
One epoch partitions the spots (and the cells) into ``n_batches`` disjoint batches, each cell
appearing exactly once. A batch drawn uniformly from that partition, with its per-cell and
per-spot log-densities multiplied by ``n_batches``, is an unbiased estimate of the full sum;
``cell_scale`` and ``spot_scale`` carry that factor. Graph edges are counted among the
batch's cells only; ``edge_scale`` multiplies them so that, over one epoch, the edge terms
stand for all ``n_edges_total`` edges of the graph. Non-edges are sampled uniformly among the
batch's non-adjacent pairs; ``nonedge_scale`` makes them stand for all
``n_nonedges_total = n*(n-1)/2 - n_edges_total`` non-adjacent pairs of the full graph.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import cached_property

import pyro
import torch

__all__ = ["Batch", "ScaledPlate", "cell_plate", "spot_plate", "batch_plates"]


@dataclass
class Batch:
    """A minibatch of cells and spots (all tensors on one device).

    Shapes use ``n`` = cells in the batch, ``m`` = spots in the batch, ``P`` = cell features
    (proteins / intensities), ``G`` = spot genes, ``E`` = directed edges, ``K`` = non-edges.
    """

    # --- cells -------------------------------------------------------------------------
    cell_index: torch.Tensor  # (n,) long, index of each cell in the dataset
    cell_type: torch.Tensor  # (n,) long, coarse cell-type code c_i in [0, n_types)
    cell_features: torch.Tensor  # (n, P) float, raw positive features y_i (e.g. proteins)
    cell_library: torch.Tensor  # (n,) float, l^y_i = sum_p y_ip
    cell_coords: torch.Tensor  # (n, 2) float, spatial coordinates
    cell_spot: torch.Tensor  # (n,) long, local index of the cell's spot, -1 when none
    # --- spots -------------------------------------------------------------------------
    spot_index: torch.Tensor  # (m,) long, index of each spot in the dataset
    spot_counts: torch.Tensor  # (m, G) float, raw counts X_j
    spot_library: torch.Tensor  # (m,) float, l_j = sum_g X_jg
    membership: torch.Tensor  # (m, n) sparse COO, 1 where cell i is in spot j (U(j))
    # --- graph -------------------------------------------------------------------------
    edge_index: torch.Tensor  # (2, E) long, local, both directions (PyG convention)
    nonedge_index: torch.Tensor  # (2, K) long, local sampled non-adjacent pairs, i < i'
    # --- plate sizes and scales --------------------------------------------------------
    n_types: int
    n_cells_total: int
    n_spots_total: int
    n_edges_total: int  # undirected edges of the full graph
    n_batches: int  # batches in this epoch's partition
    cell_scale: float = 1.0
    spot_scale: float = 1.0
    edge_scale: float = 1.0
    nonedge_scale: float = 1.0
    # --- what the caller needs -----------------------------------------------------------
    #: True when only the log density is wanted (training, MCMC): a model may then skip its
    #: deterministic sites and any per-cell quantity that no likelihood term uses (CORAL
    #: computes per-cell RNA for the cells inside a spot only). The density is the same.
    density_only: bool = False

    # ------------------------------------------------------------------------------------
    @property
    def n_cells(self) -> int:
        """Cells in this batch."""
        return int(self.cell_index.shape[0])

    @property
    def n_spots(self) -> int:
        """Spots in this batch."""
        return int(self.spot_index.shape[0])

    @property
    def edge_pairs(self) -> torch.Tensor:
        """(2, E/2) undirected observed edges, each once with i < i'."""
        src, dst = self.edge_index
        keep = src < dst
        return self.edge_index[:, keep]

    @cached_property
    def spot_members(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cells, U)``: local indices of the cells inside a spot (ascending) and the
        ``(m, len(cells))`` membership restricted to those cells (its weights kept). Computed
        once per batch object (an MCMC part evaluates the same batch thousands of times)."""
        cells = torch.nonzero(self.cell_spot >= 0).squeeze(-1)
        return cells, self.membership.index_select(1, cells)

    @property
    def device(self) -> torch.device:
        return self.cell_features.device

    def to(self, device: torch.device | str) -> "Batch":
        """A copy with every tensor on ``device`` (Lightning calls this to move batches)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return replace(self, **moved)


class ScaledPlate(pyro.plate):
    """``pyro.plate`` over ``subsample`` whose log-densities are multiplied by exactly ``scale``.

    ``pyro.plate`` alone scales by ``size / len(subsample)``; spot-complete batches vary in
    size, so the unbiased factor is the number of batches per epoch. A constant correction
    turns the plate's own factor into ``scale``.
    """

    def __init__(  # noqa: D107
        self, name: str, size: int, subsample: torch.Tensor, scale: float, dim: int | None = None
    ):
        super().__init__(name, size, subsample=subsample, dim=dim)
        n = int(self.subsample_size)
        self._correction = float(scale) * n / size if n > 0 and size > 0 else 1.0

    def _process_message(self, msg):
        super()._process_message(msg)
        if self._correction != 1.0:
            msg["scale"] = msg["scale"] * self._correction


def cell_plate(batch: Batch, dim: int = -1) -> pyro.plate:
    """The ``cells`` plate of a batch, scaled for an unbiased full-data ELBO."""
    return ScaledPlate("cells", batch.n_cells_total, batch.cell_index, batch.cell_scale, dim)


def spot_plate(batch: Batch, dim: int = -1) -> pyro.plate:
    """The ``spots`` plate of a batch, scaled for an unbiased full-data ELBO."""
    return ScaledPlate("spots", batch.n_spots_total, batch.spot_index, batch.spot_scale, dim)


def batch_plates(batch: Batch) -> list[pyro.plate]:
    """Plates for ``AutoGuide(create_plates=batch_plates)``: cells and spots, subsampled."""
    plates = [cell_plate(batch)]
    if batch.n_spots_total > 0:
        plates.append(spot_plate(batch))
    return plates
