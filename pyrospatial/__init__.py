"""pyrospatial: probabilistic programming on Pyro for spatial multi-omics.

Data (:class:`SpatialDataset`), one SVI engine for any model/guide pair (:func:`fit`),
coherent posterior draws (:func:`sample_posterior`, :func:`refine_posterior`) with summaries
and AnnData export, simulators with ground truth; methods: CORAL (:mod:`pyrospatial.methods.coral`),
reference-based deconvolution (:func:`deconvolve`), alignment (:func:`align`), model
criticism (:mod:`pyrospatial.criticism`).
Models live in :mod:`pyrospatial.models`, guides in :mod:`pyrospatial.guides`.
"""

from importlib.metadata import PackageNotFoundError, version

import pyro

# Parameters live in their PyroModules (not Pyro's global param store), so that the
# Lightning engine optimises them and several models coexist in one process. Pyro reads
# this when a PyroModule is built, so it is set before any model can be created.
pyro.settings.set(module_local_params=True)

from pyrospatial import criticism, data, engine, methods
from pyrospatial.criticism import metrics, recalibration
from pyrospatial.data import SpatialDataset, datasets, sim
from pyrospatial.engine import (
    Batch,
    FitResult,
    batch_plates,
    cell_plate,
    export,
    fit,
    load_checkpoint,
    refine_posterior,
    sample_posterior,
    spot_plate,
    summarise,
    summarise_posterior,
)
from pyrospatial.methods import CORAL, Alignment, Deconvolution, align, align_slices, analysis, baselines, deconvolve

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
    "CORAL",
    "Alignment",
    "Deconvolution",
    "analysis",
    "baselines",
    "batch_plates",
    "cell_plate",
    "datasets",
    "deconvolve",
    "criticism",
    "data",
    "engine",
    "methods",
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
