"""Explicit Pyro guides (installed as ``pyrospatial.guides``), one per model of
:mod:`pyrospatial.models`."""

from .alignment import AlignmentGuide
from .celltype_deconvolution import CellTypeDeconvolutionGuide
from .coral import CoralGuide
from .domains import DomainGuide

__all__ = ["AlignmentGuide", "CellTypeDeconvolutionGuide", "CoralGuide", "DomainGuide"]
