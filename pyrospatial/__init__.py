"""pyrospatial: probabilistic programming on Pyro for spatial multi-omics.

Data (:class:`SpatialDataset`), one SVI engine for any model/guide pair (:func:`fit`),
coherent posterior draws with summaries and AnnData export, simulators with ground truth.
Models live in :mod:`pyrospatial.models`, guides in :mod:`pyrospatial.guides`.
"""

from importlib.metadata import PackageNotFoundError, version

from pyrospatial import analysis, baselines, datasets, metrics, sim
from pyrospatial.batch import Batch, batch_plates, cell_plate, spot_plate
from pyrospatial.data import SpatialDataset
from pyrospatial.infer import FitResult, fit, load_checkpoint
from pyrospatial.posterior import export, sample_posterior, summarise, summarise_posterior

try:
    __version__ = version("pyrospatial")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = [
    "Batch",
    "FitResult",
    "SpatialDataset",
    "analysis",
    "baselines",
    "batch_plates",
    "cell_plate",
    "datasets",
    "export",
    "fit",
    "load_checkpoint",
    "metrics",
    "sample_posterior",
    "sim",
    "spot_plate",
    "summarise",
    "summarise_posterior",
]
