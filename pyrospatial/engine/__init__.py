"""The engine: knows no method. Any model/guide pair that honours the batch protocol
(:mod:`~pyrospatial.engine.batch`) and the contracts of :mod:`pyrospatial.protocols` is
trained (:func:`fit`), sampled (:func:`sample_posterior`, :func:`refine_posterior`),
summarised (:func:`summarise`) and exported (:func:`export`) here.
"""

from pyrospatial.engine.batch import Batch, ScaledPlate, batch_plates, cell_plate, spot_plate
from pyrospatial.engine.export import export
from pyrospatial.engine.infer import FitResult, SVIModule, find_nonfinite, fit, load_checkpoint, versions
from pyrospatial.engine.posterior import PosteriorSamples, PosteriorSummary, sample_posterior, site_plate
from pyrospatial.engine.refine import refine_posterior
from pyrospatial.engine.summary import summarise, summarise_posterior

__all__ = [
    "Batch", "FitResult", "PosteriorSamples", "PosteriorSummary", "SVIModule", "ScaledPlate", "batch_plates",
    "cell_plate", "export", "find_nonfinite", "fit", "load_checkpoint", "refine_posterior", "sample_posterior",
    "site_plate", "spot_plate", "summarise", "summarise_posterior", "versions",
]
