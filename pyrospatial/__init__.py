"""pyrospatial: probabilistic programming on Pyro for spatial multi-omics.

Data (:class:`SpatialDataset`), one SVI engine for any model/guide pair (:func:`fit`),
coherent posterior draws (:func:`sample_posterior`, :func:`refine_posterior`) with summaries
and AnnData export, simulators with ground truth; methods: CORAL (:mod:`pyrospatial.coral`),
reference-based deconvolution (:func:`deconvolve`), alignment (:func:`align`), model
criticism (:mod:`pyrospatial.diagnostics`).
Models live in :mod:`pyrospatial.models`, guides in :mod:`pyrospatial.guides`.
"""

from importlib.metadata import PackageNotFoundError, version

import pyro

# Parameters live in their PyroModules (not Pyro's global param store), so that the
# Lightning engine optimises them and several models coexist in one process. Pyro reads
# this when a PyroModule is built, so it is set before any model can be created.
pyro.settings.set(module_local_params=True)

from pyrospatial import analysis, baselines, datasets, diagnostics, metrics, recalibration, sim
from pyrospatial.alignment import align, align_slices
from pyrospatial.batch import Batch, batch_plates, cell_plate, spot_plate
from pyrospatial.data import SpatialDataset
from pyrospatial.deconvolution import deconvolve
from pyrospatial.infer import FitResult, fit, load_checkpoint
from pyrospatial.posterior import export, sample_posterior, summarise, summarise_posterior
from pyrospatial.refine import refine_posterior

try:
    __version__ = version("pyrospatial")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = [
    "Batch",
    "FitResult",
    "SpatialDataset",
    "align",
    "align_slices",
    "analysis",
    "baselines",
    "batch_plates",
    "cell_plate",
    "datasets",
    "deconvolve",
    "diagnostics",
    "export",
    "fit",
    "load_checkpoint",
    "metrics",
    "recalibration",
    "refine_posterior",
    "sample_posterior",
    "sim",
    "spot_plate",
    "summarise",
    "summarise_posterior",
]
