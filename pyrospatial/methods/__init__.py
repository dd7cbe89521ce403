"""Methods: one module per job, each composing engine, data and criticism behind a user class
(``train``, ``sample``, ``export``, ``to_inference_data``, ``save``, ``load``): :class:`CORAL`,
:class:`Deconvolution` (one call: :func:`deconvolve`), :class:`Alignment` (one call:
:func:`align`) and :class:`Domains` (one call: :func:`domains`)."""

from pyrospatial.methods import analysis, baselines
from pyrospatial.methods.alignment import Alignment, AlignmentResult, align, align_slices
from pyrospatial.methods.coral import CORAL
from pyrospatial.methods.deconvolution import Deconvolution, deconvolve
from pyrospatial.methods.domains import Domains, domains

__all__ = ["CORAL", "Alignment", "AlignmentResult", "Deconvolution", "Domains", "align", "align_slices", "analysis",
           "baselines", "deconvolve", "domains"]
