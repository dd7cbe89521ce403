"""Variational family of :class:`~pyrospatial.models.alignment.AlignmentModel`.

Read :class:`AlignmentGuide`'s docstring; :func:`sparse_unbalanced_sinkhorn` is q(T).
"""

from __future__ import annotations

import math
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam
from torch import nn
from torch.nn import functional as F

from pyrospatial.models.alignment import (
    AlignmentBatch,
    AlignmentModel,
    candidate_pairs,
    match_log_likelihood,
    rigid_transform,
)

__all__ = ["AlignmentGuide", "sparse_unbalanced_sinkhorn", "coupling_scores"]


def sparse_unbalanced_sinkhorn(
    scores: torch.Tensor,
    candidates: torch.Tensor,
    n_b: int,
    beta: torch.Tensor,
    lam: float,
    *,
    n_iter: int = 50,
    g_init: torch.Tensor | None = None,
    tol: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Entropic unbalanced OT plan over sparse candidates, with a dustbin.

    Maximises over ``T`` (an ``(n, k + 1)`` table: ``k`` candidate partners per row plus the
    unmatched slot ``k``)::

        sum_ic T_ic S_ic + H(T) - lam * KL(col(T) || beta)    s.t.  sum_c T_ic = 1 for every i

    (``S`` = ``scores``, ``-inf`` for invalid pairs; ``col_j`` sums the entries whose candidate
    is ``j``; the entropic regulariser is 1 because ``S`` is a log-likelihood). The fixed point
    is the scaling iteration of unbalanced Sinkhorn (Chizat et al. 2018) with an exact row
    constraint and a KL-relaxed column constraint::

        f_i = -logsumexp_c (S_ic + g_{j(i,c)})            (g of the unmatched slot = 0)
        g_j = lam / (lam + 1) * (log beta_j - logsumexp_{(i,c): j(i,c) = j} (S_ic + f_i))

    POT's solvers (``ot.unbalanced.sinkhorn_unbalanced``) take a dense ``n x m`` cost; this
    is the same iteration on the candidate list, so memory stays O(n k). Tests check it
    against POT on a problem small enough to be dense. ``lam = 0`` gives independent row
    softmaxes (no column constraint). It runs in the scaling form (kernel ``exp(S_ic - max_c
    S_ic)`` in float64, see the comment in the code): a pair more than ~700 nats below its
    row's best has kernel 0 and gets no mass, and a column whose pairs all have kernel 0 keeps
    ``g_j = 0``.

    Returns
    -------
    (T, g)
        The plan ``(n, k + 1)`` (rows sum to 1) and the column potentials ``(n_b,)``, which
        can warm-start the next call (``g_init``).
    """
    k = scores.shape[1] - 1
    out_dtype = scores.dtype
    # The same iteration in the scaling form, in float64: with r_i = max_c S_ic the kernel
    # K_ic = exp(S_ic - r_i) lies in [0, 1] (0 for invalid pairs), v_j = exp(g_j), and
    #   Z_i = sum_c K_ic v_j(i,c) + K_i,dust          (f_i = -r_i - log Z_i)
    #   v_j = (beta_j / sum_{(i,c): j(i,c) = j} K_ic / Z_i) ^ (lam / (lam + 1))
    # (r_i cancels from the column sums), i.e. one gather and one index_add per iteration
    # instead of segment log-sum-exps; exact in exact arithmetic.
    S = scores.to(torch.float64)
    K = torch.exp(S - S.max(dim=1, keepdim=True).values)
    K_pairs, K_dust = K[:, :k], K[:, k]
    flat_idx = candidates.reshape(-1)
    g = torch.zeros(n_b, dtype=torch.float64, device=scores.device) if g_init is None else g_init.to(torch.float64).clone()
    v = torch.exp(g)
    exponent = lam / (lam + 1.0)
    if lam > 0 and n_b:
        log_beta = torch.log(beta.to(torch.float64))
        for it in range(int(n_iter)):
            Z = (K_pairs * v[candidates]).sum(1) + K_dust
            col = torch.zeros(n_b, dtype=torch.float64, device=scores.device)
            col = col.index_add(0, flat_idx, (K_pairs / Z.unsqueeze(1)).reshape(-1))
            has = col > 0
            g_new = torch.where(has, exponent * (log_beta - torch.log(torch.where(has, col, torch.ones_like(col)))),
                                torch.zeros_like(col))
            delta = float((g_new - g).abs().max())
            g = g_new
            v = torch.exp(g)
            if delta < tol:
                break
    num = torch.cat([K_pairs * v[candidates], K_dust.unsqueeze(1)], dim=1)
    T = (num / num.sum(1, keepdim=True)).to(out_dtype)
    g = g.to(out_dtype)
    return T, g


def coupling_scores(model: AlignmentModel, batch: AlignmentBatch, moved: torch.Tensor, u_a: torch.Tensor,
                    u_b: torch.Tensor, candidates: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``S_ic`` = log prior + log-likelihood of a's cell ``i`` under candidate ``c`` (or unmatched).

    The same terms as the model's "T" prior and "match" factor, with the model's current noise
    parameters (``sigma_xy``, ``power``, ``slope``, ``tau``, ``nu``, ``background_scale``), so
    that the Sinkhorn plan maximises the model's ELBO in T.
    """
    loglik = match_log_likelihood(
        moved, batch.coords_b, u_a, u_b, candidates, valid, model.sigma_xy, model.tau, batch.log_area_b,
        model.power, model.nu, model.slope, model.background_scale,
        spatial_weight=model.spatial_weight, embedding_weight=model.embedding_weight,
    )
    prior = torch.full((loglik.shape[1],), math.log((1.0 - model.rho) / batch.n_b), dtype=loglik.dtype,
                       device=loglik.device)
    prior[-1] = math.log(model.rho)
    return loglik + prior


class _Encoder(nn.Module):
    """``x -> (loc, scale)`` of a Normal over the shared embedding (linear, one per modality)."""

    def __init__(self, n_in: int, d: int, identity: bool, scale_init: float) -> None:
        super().__init__()
        self.loc = nn.Linear(n_in, d)
        self.scale = nn.Linear(n_in, d)
        with torch.no_grad():
            if identity and n_in == d:
                self.loc.weight.copy_(torch.eye(d))
                self.loc.bias.zero_()
            self.scale.weight.mul_(0.01)
            self.scale.bias.fill_(math.log(math.expm1(scale_init)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loc(x), F.softplus(self.scale(x)) + 1e-4


class AlignmentGuide(PyroModule):
    r"""q(transform) q(u_b | x_b) q(u_a | x_a) q(T | transform, u): the variational family.

    ::

        q(transform)   = MultivariateNormal(loc, L L^T)               full covariance, 3-4 dims
        q(u_j | x^b_j) = Normal(E_b(x^b_j), softplus(S_b(x^b_j)))     per-modality encoders
        q(u_i | x^a_i) = Normal(E_a(x^a_i), softplus(S_a(x^a_i)))
        q(T | ...)     = Delta(Sinkhorn plan)                         "T"

    (with the model's ``observed_embedding`` there are no ``u`` sites and no encoders: the
    embeddings are the features.)

    q(T) is not a free parameter: given the drawn transform and embeddings, the candidate
    partners of each moved *a* cell are its ``k`` nearest *b* cells within ``radius``
    (:func:`~pyrospatial.models.alignment.candidate_pairs`) and T is the plan
    :func:`sparse_unbalanced_sinkhorn` computes from the model's own scores, i.e. the exact
    maximiser of the ELBO over mean-field categorical matches (its entropy enters the ELBO
    through the Delta's ``log_density = sum T log T``). Because T is optimal, the ELBO's
    gradient through T vanishes (envelope theorem): T is detached, and no gradient flows
    through the Sinkhorn iterations (memory O(n k) per step). The column potentials of the
    last plan warm-start the next one.

    The guide only samples: it never writes the model. In training mode it keeps this draw's
    plan and what the plan was computed from in :attr:`last_draw`, from which
    :class:`~pyrospatial.methods.alignment_em.NoiseMStep` (a Lightning callback passed to
    :func:`pyrospatial.fit`) runs the model's M-step of the match noise
    (:meth:`~pyrospatial.models.alignment.AlignmentModel.update_noise`) after each SVI step, so
    each step is one round of variational EM: the plan (E-step, exact in T), a gradient step
    on q(transform) and the encoders/decoders, and the noise (M-step, closed form).

    The guide reads the model's noise scales and coupling settings; it holds the model by
    reference, not as a submodule (its parameters are the model's, trained once).

    Parameters
    ----------
    model
        The :class:`AlignmentModel` this guide approximates.
    n_features_a, n_features_b
        Input features per modality.
    identity_encoders
        Start the encoder means at the identity (shared principal components as inputs).
    transform_scale_init
        Initial sd of q(transform) per coordinate (1% of the prior sd by default: starting
        narrow, the first M-steps are not blurred by transform draws far from the mode; SVI
        widens q where the data allow).
    n_iter
        Sinkhorn iterations per step (the first step runs ``5 n_iter``).
    """

    def __init__(
        self,
        model: AlignmentModel,
        n_features_a: int,
        n_features_b: int,
        *,
        identity_encoders: bool = False,
        transform_scale_init: torch.Tensor | None = None,
        n_iter: int = 20,
        embedding_scale_init: float = 0.1,
    ) -> None:
        super().__init__()
        self.__dict__["_model"] = model  # a reference, not a submodule
        d = model.embedding_dim
        if not model.observed_embedding:
            self.encoder_a = _Encoder(n_features_a, d, identity_encoders, embedding_scale_init)
            self.encoder_b = _Encoder(n_features_b, d, identity_encoders, embedding_scale_init)
        loc = model.prior_loc.clone()
        scale = model.prior_scale * 0.01 if transform_scale_init is None else torch.as_tensor(transform_scale_init)
        self.transform_loc = PyroParam(loc)
        self.transform_scale_tril = PyroParam(torch.diag(scale.to(loc.dtype)), constraint=constraints.lower_cholesky)
        self.n_iter = int(n_iter)
        self.register_buffer("g_potential", torch.zeros(0), persistent=False)
        #: the plan of the last training call and its inputs (the M-step's statistics), or None
        self.last_draw: dict[str, torch.Tensor] | None = None

    @property
    def model(self) -> AlignmentModel:
        return self.__dict__["_model"]

    def forward(self, batch: AlignmentBatch) -> dict[str, Any]:  # noqa: D102
        model = self.model
        transform = pyro.sample("transform", dist.MultivariateNormal(self.transform_loc, scale_tril=self.transform_scale_tril))
        if model.observed_embedding:
            u_a, u_b = batch.features_a, batch.features_b
        else:
            with pyro.plate("b_cells", batch.n_b):
                loc_b, scale_b = self.encoder_b(batch.features_b)
                u_b = pyro.sample("u_b", dist.Normal(loc_b, scale_b).to_event(1))
            with pyro.plate("a_cells", batch.n_a):
                loc_a, scale_a = self.encoder_a(batch.features_a)
                u_a = pyro.sample("u_a", dist.Normal(loc_a, scale_a).to_event(1))
        with torch.no_grad():
            moved = rigid_transform(batch.coords_a, transform, batch.centre_a)
            candidates, valid = candidate_pairs(moved, batch, model.k, model.radius)
            scores = coupling_scores(model, batch, moved, u_a, u_b, candidates, valid)
            beta = torch.full((batch.n_b,), model.beta, dtype=scores.dtype, device=scores.device)
            warm = self.g_potential if self.g_potential.shape == (batch.n_b,) else None
            T, g = sparse_unbalanced_sinkhorn(scores, candidates, batch.n_b, beta, model.lam,
                                              n_iter=self.n_iter if warm is not None else 5 * self.n_iter,
                                              g_init=warm)
            self.g_potential = g.detach()
            T = T.detach()
            # kept for the M-step (NoiseMStep), which runs after the SVI step, outside the guide
            self.last_draw = dict(T=T, moved=moved, coords_b=batch.coords_b, u_a=u_a.detach(), u_b=u_b.detach(),
                                  candidates=candidates, valid=valid) if self.training else None
        pyro.sample("T", dist.Delta(T, log_density=torch.xlogy(T, T).sum(), event_dim=2))
        return {"transform": transform, "T": T, "candidates": candidates, "valid": valid, "moved": moved,
                "u_a": u_a, "u_b": u_b}
