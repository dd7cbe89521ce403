"""CORAL variants that swap one block of :class:`~pyrospatial.models.CoralModel`.

Each variant overrides :meth:`CoralModel.feature_likelihood` (and, where the observations
are transformed, :meth:`CoralModel.observed_features`); the rest of the generative story,
the guide, the engine, the posterior export and the plots are unchanged.

- :class:`CoralCountPanelModel`: the single-cell panel is a set of *counts* (e.g. MERFISH,
  osmFISH or a held-out gene panel), so ``y_ip ~ NB(mean = l^y_i h_y(z_i)_p, theta^y_p)``
  replaces the Gamma (which needs strictly positive intensities).
- :class:`CoralArcsinhModel`: intensities are modelled after the usual cytometry transform,
  ``arcsinh(y_ip / c) ~ Normal(h_y(z_i)_p, sigma_p)`` with cofactor ``c`` (5 by default).
"""

from __future__ import annotations

from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroParam
from torch.nn import functional as F

from pyrospatial.engine.batch import Batch

from .blocks import negative_binomial
from .coral import CoralModel

__all__ = ["CoralCountPanelModel", "CoralArcsinhModel"]


class CoralCountPanelModel(CoralModel):
    """CORAL with a negative-binomial likelihood for a count panel per cell.

    ``y_ip ~ NB(mean = l^y_i softmax(h_y(z_i))_p, inverse dispersion theta^y_p)`` with
    ``theta^y_p`` a per-feature point estimate (constrained positive); zeros are allowed.
    """

    def __init__(self, *args: Any, panel_inverse_dispersion_init: float = 5.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.panel_inverse_dispersion = PyroParam(
            torch.full((self.n_features,), float(panel_inverse_dispersion_init)), constraint=constraints.positive
        )

    def feature_likelihood(self, z: torch.Tensor, batch: Batch) -> dist.Distribution:
        mean = batch.cell_library.unsqueeze(-1) * F.softmax(self.protein_decoder(z), dim=-1)
        return negative_binomial(mean.clamp_min(1e-8), self.panel_inverse_dispersion)


class CoralArcsinhModel(CoralModel):
    """CORAL with a Normal likelihood for arcsinh-transformed intensities.

    ``u_ip = arcsinh(y_ip / c) ~ Normal(h_y(z_i)_p, sigma_p)``: ``h_y`` is the protein
    decoder (unnormalised output), ``sigma_p`` a per-protein point estimate. Observations are
    the transformed intensities (:meth:`observed_features`).
    """

    def __init__(self, *args: Any, cofactor: float = 5.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cofactor = float(cofactor)
        self.protein_scale = PyroParam(torch.full((self.n_features,), 0.5), constraint=constraints.positive)

    def observed_features(self, batch: Batch) -> torch.Tensor:
        return torch.asinh(batch.cell_features / self.cofactor)

    def feature_likelihood(self, z: torch.Tensor, batch: Batch) -> dist.Distribution:
        return dist.Normal(self.protein_decoder(z), self.protein_scale).to_event(1)
