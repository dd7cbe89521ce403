"""Mapping dissociated cells onto a spatial atlas: alignment with one side's coordinates missing.

Read :class:`MappingModel`'s docstring for the generative story. The latent is the coupling
``T`` of :class:`~pyrospatial.models.alignment.AlignmentModel` (each cell comes from one atlas
location, or from none), held as an ``(n, k + 1)`` table over each cell's ``k`` candidate
locations; there is no transform, because the cells have no coordinates to move. The
variational family (q(T) = the exact Sinkhorn plan given the model's scores) is
:class:`pyrospatial.guides.MappingGuide`; the user API is :func:`pyrospatial.map_cells`.

The blocks are the alignment's, imported: :func:`~pyrospatial.models.alignment.match_log_likelihood`
(the match likelihood, here with its spatial term switched off),
:func:`~pyrospatial.models.alignment.noise_update` (the closed-form M-step of the match
noise) and :class:`~pyrospatial.models.alignment.CouplingPrior`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import torch
from pyro.nn import PyroModule
from pyrospatial.models.alignment import (
    CouplingPrior,
    match_log_likelihood,
    noise_update,
)

from pyrospatial.protocols import ModelContract

__all__ = ["MappingBatch", "MappingModel", "expression_log_likelihood"]


@dataclass
class MappingBatch:
    """The cells (rows of the coupling), the atlas locations, and each cell's candidates.

    ``features_cells`` ``(n, d)`` and ``features_atlas`` ``(m, d)``: both sides in one
    embedding (joint principal components of the shared genes); ``candidates`` ``(n, k)``
    (long, rows of the atlas) and ``valid`` ``(n, k)`` (bool): the ``k`` atlas locations most
    similar to each cell under the current noise (:func:`pyrospatial.methods.mapping.candidate_locations`).
    """

    features_cells: torch.Tensor
    features_atlas: torch.Tensor
    candidates: torch.Tensor
    valid: torch.Tensor

    @property
    def n_cells(self) -> int:
        return int(self.features_cells.shape[0])

    @property
    def n_atlas(self) -> int:
        return int(self.features_atlas.shape[0])

    @property
    def device(self) -> torch.device:
        return self.features_cells.device


def expression_log_likelihood(u_cells: torch.Tensor, u_atlas: torch.Tensor, candidates: torch.Tensor,
                              valid: torch.Tensor, tau: torch.Tensor, nu: torch.Tensor | float,
                              slope: torch.Tensor | float, background_scale: torch.Tensor | float) -> torch.Tensor:
    """``(n, k + 1)`` log-likelihood of each cell's embedding at each candidate location, and
    under "no location" (last column): the alignment's
    :func:`~pyrospatial.models.alignment.match_log_likelihood` with its spatial term off
    (``spatial_weight=0``: a cell has no coordinates), i.e. ``log StudentT_d(u_i - slope * u_j |
    nu, diag(tau^2))`` and ``log Normal(u_i | 0, diag(background_scale^2))``."""
    zeros_c = torch.zeros(u_cells.shape[0], 2, dtype=u_cells.dtype, device=u_cells.device)
    zeros_a = torch.zeros(u_atlas.shape[0], 2, dtype=u_cells.dtype, device=u_cells.device)
    return match_log_likelihood(zeros_c, zeros_a, u_cells, u_atlas, candidates, valid, 1.0, tau, 0.0,
                                2.0, nu, slope, background_scale, spatial_weight=0.0, embedding_weight=1.0)


class MappingModel(PyroModule):
    r"""Cells without coordinates, each drawn from one location of a spatial atlas.

    Generative story (``i`` cells, ``j`` atlas locations, ``u`` the shared embedding of both
    sides: joint principal components of the shared genes)::

        1. coupling:  T ~ CouplingPrior(rho, lam, beta)                                  "T"
               each cell comes from atlas location j with prior probability (1 - rho) / m,
               or from no location of the atlas with probability rho; with lam > 0 a soft
               marginal constraint asks every location to receive its share beta of the cells
               (lam = 0, the default: cells are independent draws from the tissue)
        2. a cell's embedding given its location m_i (T_ij = q(m_i = j)):
               m_i = j:  u_i ~ StudentT_d(slope * u_j, diag((c * tau)^2), nu)
               m_i = ∅:  u_i ~ Normal(0, diag(background_scale^2))
           entered as the expected complete-data log-likelihood sum_ij T_ij log p(u_i | m_i = j)
           (a ``pyro.factor``, "match")
        3. its position given m_i = j: s_i ~ Normal(s_j, h^2 I) (h: the spread of a position
           within one location's share of the tissue; used by the summaries, it adds nothing to T)

    This is :class:`~pyrospatial.models.alignment.AlignmentModel` with one side's coordinates
    missing: no transform and no spatial match term; the coupling is the per-cell posterior
    over atlas locations. With the mean-field categorical ``q(m_i) = T_i·`` the ELBO in T is an
    entropic OT objective whose regulariser is 1 because the cost is a log-likelihood (see
    AlignmentModel): the sharpness (entropy) of each cell's posterior is set by the noise
    scales of the expression likelihood, not by a hand-set regulariser. ``tau``, ``slope``,
    ``nu`` and ``background_scale`` are fitted on the cells by variational EM
    (:meth:`update_noise`, the alignment's closed-form M-step), so they absorb the cells' own
    depth; the common multiplier ``c = exp(log_temperature)`` of the scales is a latent whose
    posterior comes from the atlas's own held-out locations
    (:func:`pyrospatial.methods.mapping.temperature_posterior`): maximum marginal likelihood
    of the expression alone makes the kernel too sharp for ``p(location | expression)`` in many
    dimensions. With ``lam = 0`` the plan is Bayes' posterior ``p(m_i = j | u_i)`` under a
    kernel density estimate of the atlas's joint law of (expression, location).
    """

    contract = ModelContract(global_sites=("T",))

    def __init__(self, embedding_dim: int, *, rho: float = 0.01, lam: float = 0.0, beta: float = 1.0,
                 nu_init: float = 8.0) -> None:
        super().__init__()
        if not 0.0 < rho < 1.0:
            raise ValueError(f"rho (prior probability of no location) must lie in (0, 1), got {rho}.")
        self.embedding_dim = int(embedding_dim)
        self.rho, self.lam, self.beta = float(rho), float(lam), float(beta)
        self.register_buffer("tau", torch.ones(self.embedding_dim))
        self.register_buffer("nu", torch.tensor(float(nu_init)))
        self.register_buffer("slope", torch.ones(self.embedding_dim))
        self.register_buffer("background_scale", torch.ones(self.embedding_dim))
        self.register_buffer("log_temperature", torch.zeros(()))

    def scales(self) -> torch.Tensor:
        """The expression noise scales in use: ``exp(log_temperature) * tau``."""
        return torch.exp(self.log_temperature) * self.tau

    def log_likelihood(self, batch: MappingBatch, chunk: int = 8192) -> torch.Tensor:
        """``(n, k + 1)``: :func:`expression_log_likelihood` at the model's current noise, over
        ``chunk`` cells at a time (memory O(chunk k d), not O(n k d))."""
        parts = [expression_log_likelihood(batch.features_cells[i:i + chunk], batch.features_atlas,
                                           batch.candidates[i:i + chunk], batch.valid[i:i + chunk], self.scales(),
                                           self.nu, self.slope, self.background_scale)
                 for i in range(0, batch.n_cells, int(chunk))]
        return torch.cat(parts, dim=0)

    def log_prior_columns(self, k: int, n_atlas: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``(k + 1,)``: log prior of each of ``k`` candidate locations, and of "no location" (last)."""
        prior = torch.full((k + 1,), math.log((1.0 - self.rho) / n_atlas), dtype=dtype, device=device)
        prior[-1] = math.log(self.rho)
        return prior

    @torch.no_grad()
    def update_noise(self, T: torch.Tensor, batch: MappingBatch) -> None:
        """One M-step of the expression noise given the plan ``T`` (the alignment's
        :func:`~pyrospatial.models.alignment.noise_update`, undamped: the plan is exact, not a
        draw). The scales are updated at the current temperature and stored divided by it."""
        u_c, u_a = batch.features_cells, batch.features_atlas
        zeros_c = torch.zeros(u_c.shape[0], 2, dtype=u_c.dtype, device=u_c.device)
        zeros_a = torch.zeros(u_a.shape[0], 2, dtype=u_c.dtype, device=u_c.device)
        new = noise_update(T, zeros_c, zeros_a, u_c, u_a, batch.candidates, batch.valid, self.scales(),
                           float(self.nu), self.slope)
        self.tau.copy_(new["tau"] / torch.exp(self.log_temperature))
        self.nu.fill_(float(new["nu"]))
        self.slope.copy_(new["slope"])
        self.background_scale.copy_(new["background_scale"])

    def forward(self, batch: MappingBatch) -> None:
        m = batch.n_atlas
        # 1. the coupling over each cell's candidate locations (the guide supplies T)
        beta = torch.full((m,), self.beta, device=batch.device)
        T = pyro.sample("T", CouplingPrior(batch.candidates, batch.valid, m, self.rho, self.lam, beta))
        # 2. each cell's embedding given its location (the mixture is the factor "match")
        loglik = self.log_likelihood(batch)
        pyro.factor("match", torch.where(T > 0, T * loglik, torch.zeros_like(loglik)).sum())
