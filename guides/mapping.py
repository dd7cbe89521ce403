"""Variational family of :class:`~pyrospatial.models.mapping.MappingModel`: q(T) is the plan
of :func:`~pyrospatial.guides.alignment.sparse_unbalanced_sinkhorn` (the alignment's solver,
imported) on the model's own scores."""

from __future__ import annotations

from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from pyrospatial.guides.alignment import sparse_unbalanced_sinkhorn
from pyrospatial.models.mapping import MappingBatch, MappingModel

__all__ = ["MappingGuide", "mapping_plan"]


@torch.no_grad()
def mapping_plan(model: MappingModel, batch: MappingBatch, *, n_iter: int = 100,
                 g_init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact maximiser of the ELBO over mean-field categorical locations: ``(T, g)``.

    Scores ``S_ic = log prior + log p(u_i | m_i = candidate c)`` (last column: no location);
    with ``lam = 0`` the plan is the row softmax of ``S`` (Bayes' rule per cell), with ``lam > 0``
    the unbalanced Sinkhorn plan with KL-relaxed column marginals ``beta``. ``g`` are the column
    potentials (warm start of the next call).
    """
    loglik = model.log_likelihood(batch)
    k = loglik.shape[1] - 1
    scores = loglik + model.log_prior_columns(k, batch.n_atlas, loglik.dtype, loglik.device)
    beta = torch.full((batch.n_atlas,), model.beta, dtype=scores.dtype, device=scores.device)
    return sparse_unbalanced_sinkhorn(scores, batch.candidates, batch.n_atlas, beta, model.lam, n_iter=n_iter,
                                      g_init=g_init)


class MappingGuide(PyroModule):
    r"""q(T) = Delta(the Sinkhorn plan of the model's scores), as the alignment's guide.

    T is the exact maximiser of the ELBO in T given the noise (so it is detached: the ELBO's
    gradient through it vanishes); its entropy enters the ELBO through the Delta's
    ``log_density = sum T log T``. The guide holds the model by reference and has no
    parameters of its own; the column potentials of the last plan warm-start the next one.
    """

    def __init__(self, model: MappingModel, *, n_iter: int = 100) -> None:
        super().__init__()
        self.__dict__["_model"] = model  # a reference, not a submodule
        self.n_iter = int(n_iter)
        self.g_potential: torch.Tensor | None = None

    @property
    def model(self) -> MappingModel:
        return self.__dict__["_model"]

    def forward(self, batch: MappingBatch) -> dict[str, Any]:
        warm = self.g_potential if self.g_potential is not None and self.g_potential.shape == (batch.n_atlas,) else None
        T, g = mapping_plan(self.model, batch, n_iter=self.n_iter, g_init=warm)
        self.g_potential = g
        pyro.sample("T", dist.Delta(T, log_density=torch.xlogy(T, T).sum(), event_dim=2))
        return {"T": T}
