"""Data: knows no model. Validated data sets and their minibatches, geometry (graphs, cell ->
spot assignment), simulators with ground truth, and loaders of public data sets."""

from pyrospatial.data import datasets, sim
from pyrospatial.data.alignment_data import AlignmentData
from pyrospatial.data.batching import BatchSpec, SpotBatchSampler, spatial_partition
from pyrospatial.data.dataset import SpatialDataset
from pyrospatial.data.graph import assign_cells_to_spots, knn_pairs, radius_pairs
from pyrospatial.data.spot_counts import SpotBatch, SpotCounts

__all__ = [
    "AlignmentData", "BatchSpec", "SpatialDataset", "SpotBatch", "SpotBatchSampler", "SpotCounts",
    "assign_cells_to_spots", "datasets", "knn_pairs", "radius_pairs", "sim", "spatial_partition",
]
