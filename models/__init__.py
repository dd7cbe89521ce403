"""Explicit Pyro models (installed as ``pyrospatial.models``).

Each model reads top to bottom as its generative story; the reusable pieces are in
:mod:`pyrospatial.models.blocks`. Every model here has its guide in
:mod:`pyrospatial.guides`:

=====================================  ==========================================
model                                  guide
=====================================  ==========================================
:class:`CoralModel` and its variants   :class:`~pyrospatial.guides.CoralGuide`
(:class:`CoralCountPanelModel`,        (both take one :class:`CoralConfig`)
:class:`CoralArcsinhModel`)
:class:`CellTypeDeconvolutionModel`    :class:`~pyrospatial.guides.CellTypeDeconvolutionGuide`
:class:`CellTypeStatesModel`           :class:`~pyrospatial.guides.CellTypeStatesGuide`
:class:`CellTypeStateReferenceModel`   :class:`~pyrospatial.guides.CellTypeStateReferenceGuide`
:class:`AlignmentModel`                :class:`~pyrospatial.guides.AlignmentGuide`
:class:`DomainModel`                   :class:`~pyrospatial.guides.DomainGuide`
:class:`MappingModel`                  :class:`~pyrospatial.guides.MappingGuide`
=====================================  ==========================================
"""

from . import blocks
from .alignment import AlignmentModel
from .blocks import (
    EdgeDecoder,
    HierarchicalPrior,
    bernoulli_edges,
    contrastive_factor,
    gamma_likelihood,
    laplacian_factor,
    negative_binomial,
    spot_sum,
)
from .celltype_deconvolution import CellTypeDeconvolutionModel
from .celltype_states import (
    CellTypeStateReferenceModel,
    CellTypeStatesModel,
    TypeStateDecoder,
)
from .coral import CoralConfig, CoralModel
from .coral_variants import CoralArcsinhModel, CoralCountPanelModel
from .domains import DomainModel
from .mapping import MappingModel

__all__ = [
    "AlignmentModel",
    "CellTypeDeconvolutionModel",
    "CellTypeStateReferenceModel",
    "CellTypeStatesModel",
    "CoralArcsinhModel",
    "CoralConfig",
    "CoralCountPanelModel",
    "CoralModel",
    "DomainModel",
    "EdgeDecoder",
    "HierarchicalPrior",
    "MappingModel",
    "TypeStateDecoder",
    "bernoulli_edges",
    "blocks",
    "contrastive_factor",
    "gamma_likelihood",
    "laplacian_factor",
    "negative_binomial",
    "spot_sum",
]
