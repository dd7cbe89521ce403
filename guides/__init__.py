"""Explicit Pyro guides (installed as ``pyrospatial.guides``), one per model of
:mod:`pyrospatial.models`."""

from .alignment import AlignmentGuide
from .celltype_deconvolution import CellTypeDeconvolutionGuide
from .celltype_states import CellTypeStateReferenceGuide, CellTypeStatesGuide
from .coral import CoralGuide
from .domains import DomainGuide
from .mapping import MappingGuide

__all__ = ["AlignmentGuide", "CellTypeDeconvolutionGuide", "CellTypeStateReferenceGuide", "CellTypeStatesGuide",
           "CoralGuide", "DomainGuide", "MappingGuide"]
