"""Explicit Pyro models (installed as ``pyrospatial.models``).

Each model reads top to bottom as its generative story; the reusable pieces are in
:mod:`pyrospatial.models.blocks`.
"""

from . import blocks
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
from .coral import CoralModel

__all__ = [
    "blocks",
    "CoralModel",
    "EdgeDecoder",
    "HierarchicalPrior",
    "bernoulli_edges",
    "contrastive_factor",
    "gamma_likelihood",
    "laplacian_factor",
    "negative_binomial",
    "spot_sum",
]
