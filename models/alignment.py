"""Alignment of two unpaired slices or modalities: an OT coupling as a latent.

Read :class:`AlignmentModel`'s docstring for the generative story; ``AlignmentModel.forward``
is that story, line by line. The variational family (with q(T) an entropic unbalanced
Sinkhorn plan over sparse candidate pairs) is :class:`pyrospatial.guides.AlignmentGuide`;
the user API on AnnData is :func:`pyrospatial.align`.

Shapes: ``n`` cells of slice *a* (the source, whose cells get matched), ``m`` cells of slice
*b* (the target frame), ``k`` candidate partners per *a* cell (plus one "unmatched" slot),
``d`` embedding dimensions, ``P_a``/``P_b`` input features per modality. The coupling is held
as an ``(n, k + 1)`` table over the candidate index ``(n, k)``: memory O(n k), never O(n m).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam
from torch import nn

__all__ = [
    "AlignmentBatch",
    "AlignmentModel",
    "CouplingPrior",
    "rigid_transform",
    "candidate_pairs",
    "match_log_likelihood",
    "TRANSFORM_NAMES",
]

#: Order of the coordinates of the ``transform`` latent (``log_scale`` only with ``scale=True``).
TRANSFORM_NAMES = ("angle", "tx", "ty", "log_scale")


@dataclass
class AlignmentBatch:
    """Everything the alignment model and guide read (the whole pair; tensors on one device).

    ``features_*`` are the per-modality inputs (standardised principal components, see
    :func:`pyrospatial.alignment.align`), ``coords_*`` the spatial coordinates in each slice's
    own frame, ``centre_a`` the point of *a* about which the transform rotates (its centroid).
    """

    features_a: torch.Tensor  # (n, P_a)
    features_b: torch.Tensor  # (m, P_b)
    coords_a: torch.Tensor  # (n, 2)
    coords_b: torch.Tensor  # (m, 2)
    centre_a: torch.Tensor  # (2,)
    log_area_b: float  # log of the area of b's bounding box (background density of positions)
    tree_b: Any = field(default=None, repr=False)  # scipy cKDTree of coords_b (candidate search)

    @property
    def n_a(self) -> int:
        return int(self.coords_a.shape[0])

    @property
    def n_b(self) -> int:
        return int(self.coords_b.shape[0])

    @property
    def device(self) -> torch.device:
        return self.coords_a.device

    def to(self, device: torch.device | str) -> "AlignmentBatch":
        """A copy with every tensor on ``device``."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return replace(self, **moved)


def rigid_transform(coords: torch.Tensor, transform: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """``y = s R(angle) (x - centre) + centre + (tx, ty)`` for every row ``x`` of ``coords``.

    ``transform`` is ``(angle, tx, ty[, log_scale])`` (angle in radians, counter-clockwise);
    without ``log_scale`` the scale ``s`` is 1.
    """
    angle = transform[0]
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([cos, -sin]), torch.stack([sin, cos])])
    scale = torch.exp(transform[3]) if transform.shape[0] > 3 else torch.ones((), dtype=coords.dtype)
    return scale * (coords - centre) @ rot.T + centre + transform[1:3]


def candidate_pairs(moved_a: torch.Tensor, batch: AlignmentBatch, k: int, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest *b* cells of every moved *a* cell, and whether each lies within ``radius``.

    Returns ``candidates`` ``(n, k)`` (long indices into b) and ``valid`` ``(n, k)`` (bool).
    A scipy ``cKDTree`` query: memory O(n k), never an ``n x m`` matrix. The result of the
    last query is cached on the batch, so the guide and the model (which replays the guide's
    transform) share one query per step.
    """
    key = moved_a.detach().cpu().numpy()
    cache = getattr(batch, "_candidate_cache", None)
    if cache is not None and cache[0] == (k, radius) and cache[1].shape == key.shape and np.array_equal(cache[1], key):
        return cache[2]
    if batch.tree_b is None:
        from scipy.spatial import cKDTree

        batch.tree_b = cKDTree(batch.coords_b.detach().cpu().numpy())
    k_eff = min(int(k), batch.n_b)
    dist_, idx = batch.tree_b.query(key, k=k_eff, distance_upper_bound=float(radius))
    dist_, idx = np.asarray(dist_).reshape(len(key), k_eff), np.asarray(idx).reshape(len(key), k_eff)
    valid = np.isfinite(dist_)
    idx = np.where(valid, idx, 0)
    out = (torch.as_tensor(idx, dtype=torch.long, device=moved_a.device),
           torch.as_tensor(valid, dtype=torch.bool, device=moved_a.device))
    object.__setattr__(batch, "_candidate_cache", ((k, radius), key, out))
    return out


def match_log_likelihood(
    moved_a: torch.Tensor,
    coords_b: torch.Tensor,
    u_a: torch.Tensor,
    u_b: torch.Tensor,
    candidates: torch.Tensor,
    valid: torch.Tensor,
    sigma_xy: torch.Tensor,
    tau: torch.Tensor,
    log_area_b: float,
    power: torch.Tensor | float = 2.0,
    *,
    spatial_weight: float = 1.0,
    embedding_weight: float = 1.0,
) -> torch.Tensor:
    """``(n, k + 1)`` log-likelihood of each *a* cell under each candidate partner and under "unmatched".

    Column ``c < k`` (partner ``j = candidates[i, c]``)::

        w_xy  * log GenNormal2(moved_a_i - coords_b_j | sigma_xy, power)
      + w_emb * log Normal(u_a_i | u_b_j, tau^2 I_d)

    column ``k`` (unmatched)::

        w_xy * (-log area_b) + w_emb * log Normal(u_a_i | 0, I_d)

    ``GenNormal2(r | sigma, p) = p exp(-(|r| / sigma)^p) / (2 pi sigma^2 Gamma(2 / p))`` is a
    radial generalised normal in the plane: ``p = 2`` is a Normal with variance ``sigma^2 / 2``
    per axis; a larger learned ``p`` flattens the top and sharpens the edge (e.g. for positions
    snapped to a grid, whose error is uniform within a cell).

    Invalid candidates (padding, or beyond the search radius) get ``-inf``. The weights
    ``w_xy`` (``spatial_weight``) and ``w_emb`` (``embedding_weight``) temper the two terms
    (1 = the plain likelihood); the negative of this table is the Sinkhorn cost.
    """
    d = u_a.shape[-1]
    dxy = moved_a.unsqueeze(1) - coords_b[candidates]  # (n, k, 2)
    power = torch.as_tensor(power, dtype=dxy.dtype)
    r = torch.sqrt((dxy**2).sum(-1) + 1e-12)
    log_xy = (-(r / sigma_xy) ** power + torch.log(power) - math.log(2 * math.pi) - 2.0 * torch.log(sigma_xy)
              - torch.lgamma(2.0 / power))
    du = u_a.unsqueeze(1) - u_b[candidates]  # (n, k, d)
    log_u = -0.5 * (du**2).sum(-1) / tau**2 - d * torch.log(tau) - 0.5 * d * math.log(2 * math.pi)
    matched = spatial_weight * log_xy + embedding_weight * log_u
    matched = matched.masked_fill(~valid, float("-inf"))
    log_u0 = -0.5 * (u_a**2).sum(-1) - 0.5 * d * math.log(2 * math.pi)
    unmatched = spatial_weight * (-float(log_area_b)) + embedding_weight * log_u0
    return torch.cat([matched, unmatched.unsqueeze(-1)], dim=-1)


class CouplingPrior(dist.TorchDistribution):
    r"""Unnormalised prior of a soft coupling ``T`` held as an ``(n, k + 1)`` candidate table.

    Each *a* cell is matched to one *b* cell with prior probability ``(1 - rho) / m`` each,
    or to nobody with probability ``rho``; a soft one-to-one constraint penalises *b* cells
    that receive much more or much less than their share ``beta_j`` of the matches::

        log p(T) = sum_i [ sum_c T_ic log((1 - rho) / m) + T_ik log rho ]
                   - lam * sum_j KL(col_j(T) || beta_j)           (generalised KL)

    where ``col_j(T) = sum_{(i, c): candidates[i, c] = j} T_ic``. The normalising constant
    does not depend on any latent or parameter (``rho``, ``lam``, ``beta`` are fixed), so it is
    left out; ``sample`` is not available (``T`` is only ever supplied by the guide).
    """

    arg_constraints: dict = {}
    support = constraints.real_vector

    def __init__(self, candidates: torch.Tensor, valid: torch.Tensor, n_b: int, rho: float, lam: float,
                 beta: torch.Tensor, validate_args=None):
        self.candidates, self.valid = candidates, valid
        self.n_b, self.rho, self.lam, self.beta = int(n_b), float(rho), float(lam), beta
        super().__init__(batch_shape=torch.Size(), event_shape=torch.Size(candidates.shape[:1] + (candidates.shape[1] + 1,)),
                         validate_args=False)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:  # noqa: D102
        matched = value[:, :-1] * self.valid
        logp = matched.sum() * math.log((1.0 - self.rho) / self.n_b) + value[:, -1].sum() * math.log(self.rho)
        col = torch.zeros(self.n_b, dtype=value.dtype, device=value.device)
        col = col.index_add(0, self.candidates.reshape(-1), matched.reshape(-1))
        kl = (torch.xlogy(col, col / self.beta) - col + self.beta).sum()
        return logp - self.lam * kl

    def sample(self, sample_shape=torch.Size()):  # pragma: no cover - never sampled
        raise NotImplementedError("CouplingPrior is only scored: T comes from the guide's Sinkhorn plan.")


class AlignmentModel(PyroModule):
    r"""Two slices (or modalities), a rigid transform between them, and a coupling of their cells.

    Generative story (``i`` cells of slice *a*, ``j`` cells of slice *b*; ``x`` features,
    ``s`` coordinates; symbols as in DESIGN.md, "OT coupling as a latent")::

        1. transform  (angle, tx, ty[, log_scale]) ~ Normal(pre-registration, diag(prior_sd^2))
               moves a's coordinates into b's frame:  phi(s) = e^log_scale R(angle)(s - s̄_a) + s̄_a + t
        2. b cells:   u_j ~ Normal(0, I_d)                          shared embedding        "u_b"
                      x^b_j ~ Normal(D_b u_j + c_b, sigma_b^2)      b's own features         "x_b"
        3. coupling:  T ~ CouplingPrior(rho, lam, beta)             which b cell (or none)
                      each a cell comes from, over the candidates: the k nearest b cells
                      within `radius` of phi(s^a_i) (other pairs have negligible likelihood) "T"
        4. a cells, given their match m_i (T_ij = q(m_i = j), T_i,∅ = q(m_i = ∅)):
               m_i = j:  phi(s^a_i) - s^b_j ~ GenNormal2(sigma_xy, power),   u_i ~ Normal(u_j, tau^2 I)
               m_i = ∅:  phi(s^a_i) ~ Uniform(area of b),           u_i ~ Normal(0, I)
           entered as the expected complete-data log-likelihood
               sum_i sum_j T_ij log p(s^a_i, u_i | m_i = j) + T_i∅ log p(s^a_i, u_i | m_i = ∅)
           (a ``pyro.factor``, "match"; ``u_a`` is sampled with a masked prior so that its
           density is this mixture term), with the Jacobian ``2 log_scale`` of phi.
        5. a's features:  x^a_i ~ Normal(D_a u_i + c_a, sigma_a^2)                         "x_a"

    ``D_a``, ``D_b`` are linear decoders (one per modality: features may differ completely);
    ``sigma_a``, ``sigma_b`` per-feature noise scales, ``sigma_xy`` and ``power`` the scale and
    shape of the spatial match noise (a radial generalised normal, see
    :func:`match_log_likelihood`; ``power = 2`` is Gaussian), ``tau`` the embedding match noise: all point-estimated parameters. With the mean-field
    categorical ``q(m_i) = T_i·`` the ELBO in ``T`` is
    ``sum T log-lik + log p(T) + H(T)``, i.e. an entropic (``eps = 1``) optimal-transport
    objective with cost ``-log-lik``, exact row marginals (each a cell distributes one unit
    over its partners and the unmatched slot) and KL-relaxed column marginals (strength
    ``lam``): its maximiser is the unbalanced Sinkhorn plan the guide computes.

    Parameters
    ----------
    n_features_a, n_features_b
        Input features per modality.
    embedding_dim
        ``d``, the shared embedding's dimension.
    prior_loc, prior_scale
        Mean (the pre-registration) and sd of the transform prior, ``(3,)`` or ``(4,)``
        (``angle`` rad, ``tx``, ``ty`` in coordinate units[, ``log_scale``]).
    sigma_xy_init
        Initial spatial match noise (coordinate units; e.g. half the spot spacing).
    rho
        Prior probability that an *a* cell has no partner in *b*.
    lam
        Strength of the soft one-to-one (column marginal) constraint; 0 turns it off.
    beta
        Target number of matches per *b* cell (``min(1, n/m)`` by default in the API).
    spatial_weight, embedding_weight
        Tempering weights ``w_xy`` and ``w_emb`` of the two log-likelihood terms of a match.
    k, radius
        Candidate partners of each moved *a* cell: its ``k`` nearest *b* cells within
        ``radius`` (coordinate units); the coupling lives on these pairs only.
    identity_decoders
        Start ``D_a``/``D_b`` at the identity (when both modalities are the same shared
        principal components and ``embedding_dim`` equals their number).
    """

    def __init__(
        self,
        n_features_a: int,
        n_features_b: int,
        embedding_dim: int,
        prior_loc: torch.Tensor,
        prior_scale: torch.Tensor,
        *,
        sigma_xy_init: float = 1.0,
        rho: float = 0.1,
        lam: float = 1.0,
        beta: float = 1.0,
        spatial_weight: float = 1.0,
        embedding_weight: float = 1.0,
        identity_decoders: bool = False,
        k: int = 16,
        radius: float = float("inf"),
    ) -> None:
        super().__init__()
        if not 0.0 < rho < 1.0:
            raise ValueError(f"rho (prior probability of no partner) must lie in (0, 1), got {rho}.")
        self.embedding_dim = int(embedding_dim)
        self.k, self.radius = int(k), float(radius)
        self.register_buffer("prior_loc", torch.as_tensor(prior_loc, dtype=torch.float32).clone())
        self.register_buffer("prior_scale", torch.as_tensor(prior_scale, dtype=torch.float32).clone())
        self.rho, self.lam, self.beta = float(rho), float(lam), float(beta)
        self.spatial_weight, self.embedding_weight = float(spatial_weight), float(embedding_weight)
        self.decoder_a = nn.Linear(embedding_dim, n_features_a)
        self.decoder_b = nn.Linear(embedding_dim, n_features_b)
        if identity_decoders and n_features_a == n_features_b == embedding_dim:
            with torch.no_grad():
                for dec in (self.decoder_a, self.decoder_b):
                    dec.weight.copy_(torch.eye(embedding_dim))
                    dec.bias.zero_()
        self.sigma_a = PyroParam(torch.full((n_features_a,), 0.5), constraint=constraints.positive)
        self.sigma_b = PyroParam(torch.full((n_features_b,), 0.5), constraint=constraints.positive)
        self.sigma_xy = PyroParam(torch.tensor(float(sigma_xy_init)), constraint=constraints.positive)
        self.tau = PyroParam(torch.tensor(1.0), constraint=constraints.positive)
        self.power = PyroParam(torch.tensor(2.0), constraint=constraints.interval(1.0, 20.0))

    @property
    def transform_dim(self) -> int:
        return int(self.prior_loc.shape[0])

    def forward(self, batch: AlignmentBatch) -> None:  # noqa: D102 - the class docstring is the story
        n, m, d = batch.n_a, batch.n_b, self.embedding_dim
        # 1. the rigid transform, centred on the pre-registration
        transform = pyro.sample("transform", dist.Normal(self.prior_loc, self.prior_scale).to_event(1))
        # 2. b cells: embedding and features
        with pyro.plate("b_cells", m):
            u_b = pyro.sample("u_b", dist.Normal(torch.zeros(d, device=batch.device), 1.0).to_event(1))
            pyro.sample("x_b", dist.Normal(self.decoder_b(u_b), self.sigma_b).to_event(1), obs=batch.features_b)
        # 3. the coupling over the candidate partners of each moved a cell (the guide supplies T)
        moved = rigid_transform(batch.coords_a, transform, batch.centre_a)
        candidates, valid = candidate_pairs(moved, batch, self.k, self.radius)
        beta = torch.full((m,), self.beta, device=batch.device)
        T = pyro.sample("T", CouplingPrior(candidates, valid, m, self.rho, self.lam, beta))
        # 4. a cells given their match: embedding and position (the mixture is the factor "match")
        a_cells = pyro.plate("a_cells", n)
        with a_cells:
            u_a = pyro.sample("u_a", dist.Normal(torch.zeros(d, device=batch.device), 1.0).to_event(1).mask(False))
        loglik = match_log_likelihood(
            moved, batch.coords_b, u_a, u_b, candidates, valid, self.sigma_xy, self.tau, batch.log_area_b,
            self.power, spatial_weight=self.spatial_weight, embedding_weight=self.embedding_weight,
        )
        expected = torch.where(T > 0, T * loglik, torch.zeros_like(loglik)).sum()
        jacobian = 2.0 * n * transform[3] if transform.shape[0] > 3 else 0.0
        pyro.factor("match", expected + self.spatial_weight * jacobian)
        # 5. a's features
        with a_cells:
            pyro.sample("x_a", dist.Normal(self.decoder_a(u_a), self.sigma_a).to_event(1), obs=batch.features_a)
