"""Methods: one module per job, each composing engine, data and criticism behind a user class
(``train``, ``sample``, ``export``, ``to_inference_data``, ``save``, ``load``)."""

from pyrospatial.methods import analysis, baselines
from pyrospatial.methods.alignment import AlignmentResult, align, align_slices
from pyrospatial.methods.coral import CORAL
from pyrospatial.methods.deconvolution import deconvolve

__all__ = ["AlignmentResult", "CORAL", "align", "align_slices", "analysis", "baselines", "deconvolve"]
