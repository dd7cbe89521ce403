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

import numpy as np

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam
from torch import nn

from pyrospatial.protocols import ModelContract, ObservedSite

from pyrospatial.data.alignment_data import AlignmentBatch  # the model's batch (re-exported here)

__all__ = [
    "AlignmentBatch",
    "AlignmentModel",
    "CouplingPrior",
    "rigid_transform",
    "candidate_pairs",
    "match_log_likelihood",
    "noise_update",
    "best_power",
    "min_sigma",
    "TRANSFORM_NAMES",
]

#: Order of the coordinates of the ``transform`` latent (``log_scale`` only with ``scale=True``).
TRANSFORM_NAMES = ("angle", "tx", "ty", "log_scale")


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
    sigma_xy: torch.Tensor | float,
    tau: torch.Tensor,
    log_area_b: float,
    power: torch.Tensor | float = 2.0,
    nu: torch.Tensor | float = 1e3,
    slope: torch.Tensor | float = 1.0,
    background_scale: torch.Tensor | float = 1.0,
    *,
    spatial_weight: float = 1.0,
    embedding_weight: float = 1.0,
) -> torch.Tensor:
    """``(n, k + 1)`` log-likelihood of each *a* cell under each candidate partner and under "unmatched".

    Column ``c < k`` (partner ``j = candidates[i, c]``)::

        w_xy  * sum_{axis x, y} log GenNormal(moved_a_i - coords_b_j | sigma_xy, power)
      + w_emb * log StudentT_d(u_a_i - slope * u_b_j | nu, diag(tau^2))

    column ``k`` (unmatched)::

        w_xy * (-log area_b) + w_emb * log Normal(u_a_i | 0, diag(background_scale^2))

    Spatial term: a generalised normal per axis of b's frame,
    ``GenNormal(r | sigma, p) = p exp(-(|r| / sigma)^p) / (2 sigma Gamma(1 / p))``. ``p = 2``
    is an isotropic Normal (variance ``sigma^2 / 2`` per axis); a large ``p`` tends to the
    uniform distribution on the square ``[-sigma, sigma]^2``, the error of positions snapped
    to a grid in b's frame (spot arrays, pixels). Embedding term: a multivariate Student-t
    with one scale per dimension ``tau`` (``(d,)``) and ``nu`` degrees of freedom (a Normal as
    ``nu -> inf``): cells whose features are much noisier than the rest (e.g. spots with few
    counts) do not lose their partner to "unmatched". ``slope`` (``(d,)``) regresses a's
    embedding on its partner's, one coefficient per dimension: ``u_a = z + e_a``, ``u_b = z + e_b``
    with a shared signal ``z`` gives ``E[u_a | u_b] = slope u_b`` with ``slope`` = signal / total
    variance, so a dimension that carries only noise (``slope ~ 0``) adds no spurious evidence
    for any partner (with ``slope = 1`` every noise dimension adds random score differences).
    An unmatched cell's embedding follows the background ``Normal(0, background_scale^2)``, the
    marginal of a's embedding. ``sigma_xy``, ``power``, ``tau``, ``nu`` and ``slope`` are the
    model's noise parameters (fitted by the ELBO, see :func:`noise_update`).

    Invalid candidates (padding, or beyond the search radius) get ``-inf``. The weights
    ``w_xy`` (``spatial_weight``) and ``w_emb`` (``embedding_weight``) temper the two terms
    (1 = the plain likelihood, the default); the negative of this table is the Sinkhorn cost.
    """
    d = u_a.shape[-1]
    # invalid candidates (padding: index 0, possibly far away) get a zero offset before the power:
    # |dx / sigma|^power of a far pair overflows to inf, and its gradient times the zero weight of
    # a masked entry is NaN (0 * inf), which reached the transform at 10,000 cells per side
    dxy = torch.where(valid.unsqueeze(-1), (moved_a.unsqueeze(1) - coords_b[candidates]).abs(),
                      torch.zeros((), dtype=moved_a.dtype, device=moved_a.device))  # (n, k, 2)
    power = torch.as_tensor(power, dtype=dxy.dtype, device=dxy.device)
    sigma_xy = torch.as_tensor(sigma_xy, dtype=dxy.dtype, device=dxy.device)
    log_xy = (-((dxy + 1e-12) / sigma_xy) ** power).sum(-1) + 2.0 * (
        torch.log(power) - torch.log(2.0 * sigma_xy) - torch.lgamma(1.0 / power))
    nu = torch.as_tensor(nu, dtype=u_a.dtype, device=u_a.device)
    du = (u_a.unsqueeze(1) - slope * u_b[candidates]) / tau  # (n, k, d)
    log_u = (torch.lgamma(0.5 * (nu + d)) - torch.lgamma(0.5 * nu) - 0.5 * d * torch.log(nu * math.pi)
             - torch.log(tau).sum() - 0.5 * (nu + d) * torch.log1p((du**2).sum(-1) / nu))
    matched = spatial_weight * log_xy + embedding_weight * log_u
    matched = matched.masked_fill(~valid, float("-inf"))
    background_scale = torch.as_tensor(background_scale, dtype=u_a.dtype, device=u_a.device)
    log_u0 = (-0.5 * ((u_a / background_scale) ** 2).sum(-1) - 0.5 * d * math.log(2 * math.pi)
              - torch.log(background_scale).sum())
    unmatched = spatial_weight * (-float(log_area_b)) + embedding_weight * log_u0
    return torch.cat([matched, unmatched.unsqueeze(-1)], dim=-1)


#: Grids of the two shape parameters searched by :func:`noise_update` (``power`` of the spatial
#: generalised normal; ``nu`` of the embedding Student-t).
POWER_GRID = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
NU_GRID = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 1000.0)


@torch.no_grad()
def noise_update(
    T: torch.Tensor,
    moved_a: torch.Tensor,
    coords_b: torch.Tensor,
    u_a: torch.Tensor,
    u_b: torch.Tensor,
    candidates: torch.Tensor,
    valid: torch.Tensor,
    tau: torch.Tensor,
    nu: float,
    slope: torch.Tensor | float = 1.0,
) -> dict[str, torch.Tensor | float]:
    r"""The noise parameters that maximise the ELBO's expected match log-likelihood given q.

    With ``W_ic = T_ic`` (the coupling's mass on candidate pair ``(i, c)``), the "match" term
    of the ELBO is ``sum_ic W_ic log p(s_i, u_i | m_i = c)``; its maximiser in the noise
    parameters (one step of variational EM, the M-step of the match mixture):

    * spatial: the statistics ``S_p = sum W |dx|^p`` (both axes) for every ``p`` of
      :data:`POWER_GRID`; given them the scale is closed-form, ``sigma_p^p = p S_p / (2 sum W)``,
      and the shape is the grid value with the highest expected log-likelihood
      (:func:`best_power`);
    * embedding: the slopes ``slope_d`` by weighted least squares of ``u_a`` on the partners'
      ``u_b`` (weights ``W w``, with the Student-t's latent precision weights
      ``w = (nu + d) / (nu + delta^2)``, ``delta^2`` the Mahalanobis distance of the current
      fit); then for every ``nu`` of :data:`NU_GRID` one EM step of the scales,
      ``tau_d^2 = sum W w du_d^2 / sum W`` with ``du = u_a - slope u_b``, and the ``nu`` with
      the highest expected log-likelihood wins;
    * the background sd of an unmatched cell's embedding: the marginal sd of ``u_a``.

    Returns ``{"power_stats", "mass", "slope", "tau", "nu", "background_scale"}``; the model
    averages the statistics over steps and picks the shape with :func:`best_power`.
    """
    d = u_a.shape[-1]
    W = T[:, :-1] * valid
    total = W.sum().clamp_min(1e-12)
    # invalid candidates: zero offset (their weight is 0; a far padding pair's |dx|^16 would overflow)
    dxy = torch.where(valid.unsqueeze(-1), (moved_a.unsqueeze(1) - coords_b[candidates]).abs(),
                      torch.zeros((), dtype=moved_a.dtype, device=moved_a.device)) + 1e-12  # (n, k, 2)
    # sufficient statistics of the spatial shape: sum W |dx|^p for every p of the grid (both axes),
    # all grid values at once: |dx|^p = exp(p log |dx|)
    grid_p = torch.tensor(POWER_GRID, dtype=dxy.dtype, device=dxy.device)
    power_stats = torch.einsum("nk,nkg->g", W, torch.exp(torch.log(dxy).unsqueeze(-1) * grid_p).sum(2))
    ub = u_b[candidates]  # (n, k, d)
    delta2 = (((u_a.unsqueeze(1) - slope * ub) / tau) ** 2).sum(-1)
    # slope: weighted least squares of u_a on its partners' u_b (Student-t weights of the current fit)
    weight = (W * (nu + d) / (nu + delta2)).unsqueeze(-1)
    slope = (weight * u_a.unsqueeze(1) * ub).sum((0, 1)) / (weight * ub**2).sum((0, 1)).clamp_min(1e-12)
    du2 = (u_a.unsqueeze(1) - slope * ub) ** 2
    delta2 = (du2 / tau**2).sum(-1)
    # for every nu of the grid at once: one EM step of tau from the current tau, then its
    # expected log-likelihood; the best nu (the first of equals) wins
    grid_nu = torch.tensor(NU_GRID, dtype=du2.dtype, device=du2.device)  # (v,)
    weight = (grid_nu + d) / (grid_nu + delta2.unsqueeze(-1))  # (n, k, v)
    tau_v = (torch.einsum("nkv,nkd->vd", W.unsqueeze(-1) * weight, du2) / total).clamp_min(1e-8).sqrt()  # (v, d)
    dv = torch.einsum("nkd,vd->nkv", du2, 1.0 / tau_v**2)
    const = torch.tensor([math.lgamma(0.5 * (v + d)) - math.lgamma(0.5 * v) - 0.5 * d * math.log(v * math.pi)
                          for v in NU_GRID], dtype=du2.dtype, device=du2.device)
    ll = total * (const - torch.log(tau_v).sum(-1)) - 0.5 * (grid_nu + d) * torch.einsum(
        "nk,nkv->v", W, torch.log1p(dv / grid_nu))
    best = int(torch.argmax(ll))
    best_nu = (float(ll[best]), NU_GRID[best], tau_v[best])
    return {"power_stats": power_stats, "mass": total, "tau": best_nu[2], "nu": best_nu[1], "slope": slope,
            "background_scale": u_a.pow(2).mean(0).clamp_min(1e-8).sqrt()}


def min_sigma(power: float, min_var: float) -> float:
    """The smallest GenNormal scale whose per-axis variance ``sigma^2 Gamma(3/p) / Gamma(1/p)`` is
    at least ``min_var`` (0 when ``min_var`` is 0)."""
    if min_var <= 0:
        return 0.0
    return math.sqrt(min_var * math.exp(math.lgamma(1.0 / power) - math.lgamma(3.0 / power)))


def best_power(power_stats: torch.Tensor, mass: torch.Tensor, min_var: float = 0.0) -> tuple[float, torch.Tensor]:
    """The grid shape ``p`` and scale ``sigma`` maximising the expected spatial log-likelihood
    ``sum W log GenNormal`` given its statistics ``S_p = sum W |dx|^p`` and ``mass = sum W``:
    ``sigma_p^p = p S_p / (2 mass)``, held at or above :func:`min_sigma` (the footprint: the
    per-axis variance of the error is at least ``min_var``; the expected log-likelihood is
    unimodal in ``sigma``, so the constrained maximiser is the larger of the two), and value
    ``2 mass (log p - log 2 sigma_p - lgamma(1/p)) - S_p / sigma_p^p``."""
    # every shape of the grid at once; the first of equal values wins
    grid = torch.tensor(POWER_GRID, dtype=power_stats.dtype, device=power_stats.device)
    floor = torch.tensor([min_sigma(p, min_var) for p in POWER_GRID], dtype=power_stats.dtype,
                         device=power_stats.device)
    sigma = torch.maximum((grid * power_stats / (2.0 * mass)).clamp_min(1e-6) ** (1.0 / grid), floor)
    log_norm = torch.tensor([math.log(p) - math.lgamma(1.0 / p) for p in POWER_GRID], dtype=power_stats.dtype,
                            device=power_stats.device)
    value = 2.0 * mass * (log_norm - torch.log(2.0 * sigma)) - power_stats / sigma**grid
    best = int(torch.argmax(value))
    return POWER_GRID[best], sigma[best]


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
    ``s`` coordinates; symbols as in the module docstring)::

        1. transform  (angle, tx, ty[, log_scale]) ~ Normal(pre-registration, diag(prior_sd^2))
               moves a's coordinates into b's frame:  phi(s) = e^log_scale R(angle)(s - s̄_a) + s̄_a + t
        2. b cells:   u_j ~ Normal(0, I_d)                          shared embedding        "u_b"
                      x^b_j ~ Normal(D_b u_j + c_b, sigma_b^2)      b's own features         "x_b"
                      (observed_embedding: u_j = x^b_j, no "u_b"/"x_b" sites)
        3. coupling:  T ~ CouplingPrior(rho, lam, beta)             which b cell (or none)
                      each a cell comes from, over the candidates: the k nearest b cells
                      within `radius` of phi(s^a_i) (other pairs have negligible likelihood) "T"
        4. a cells, given their match m_i (T_ij = q(m_i = j), T_i,∅ = q(m_i = ∅)):
               m_i = j:  phi(s^a_i) - s^b_j ~ GenNormal(sigma_xy, power) on each axis of b's frame
                         u_i ~ StudentT_d(slope * u_j, diag(tau^2), nu)
               m_i = ∅:  phi(s^a_i) ~ Uniform(area of b),   u_i ~ Normal(0, diag(background_scale^2))
           entered as the expected complete-data log-likelihood
               sum_i sum_j T_ij log p(s^a_i, u_i | m_i = j) + T_i∅ log p(s^a_i, u_i | m_i = ∅)
           (a ``pyro.factor``, "match"; ``u_a`` is sampled with a masked prior so that its
           density is this mixture term), with the Jacobian ``2 log_scale`` of phi.
        5. a's features:  x^a_i ~ Normal(D_a u_i + c_a, sigma_a^2)                         "x_a"
                      (observed_embedding: u_i = x^a_i, no "u_a"/"x_a" sites)

    ``D_a``, ``D_b`` are linear decoders (one per modality: features may differ completely),
    ``sigma_a``, ``sigma_b`` per-feature noise scales (learned by SVI). With
    ``observed_embedding`` (both sides already in one space, e.g. joint principal components
    of shared genes) the embedding is the features themselves: no latent noise is added to
    them, and their noise is all in the match term's ``tau``.

    Match noise (see :func:`match_log_likelihood`): ``sigma_xy`` and ``power`` the scale and
    shape of the spatial error (per axis; ``power = 2`` is an isotropic Normal, a large power
    the uniform error of positions snapped to a grid in b's frame); ``slope``, ``tau``, ``nu``
    the per-dimension regression, scales and degrees of freedom of the embedding match;
    ``background_scale`` the embedding's marginal sd (``sigma_xy`` is held at or above the
    partner's footprint, ``footprint_var``, see below). These are point estimates fitted by
    variational EM, not by gradient steps: after every SVI step a Lightning callback
    (:class:`~pyrospatial.methods.alignment_em.NoiseMStep`) calls :meth:`update_noise` (the
    closed-form / grid M-step of :func:`noise_update` given the guide's last plan, damped over
    steps); neither the model nor the guide runs it inside its forward. No weight is
    hand-set: ``spatial_weight`` and ``embedding_weight`` stay 1 (the plain likelihood) by
    default.

    The shape is found by EM started from the sharpest shape of the grid (``power_init``):
    EM has a self-confirming fixed point at broad shapes (a diffuse T puts mass on wrong
    partners, which favours a broad shape, which keeps T diffuse), and starting from the
    sharp end lets the data move the shape to broad when the residuals are broad (a
    Gaussian jitter ends at ``power`` 2-3) but not the reverse. On the simulated Ståhl pairs
    the ELBO at the two fixed points is nearly tied, so this start, not the ELBO, picks the
    sharper one there.

    With the mean-field categorical ``q(m_i) = T_i·`` the ELBO in ``T`` is
    ``sum T log-lik + log p(T) + H(T)``, i.e. an entropic (``eps = 1``) optimal-transport
    objective with cost ``-log-lik``, exact row marginals (each a cell distributes one unit
    over its partners and the unmatched slot) and KL-relaxed column marginals (strength
    ``lam``): its maximiser is the unbalanced Sinkhorn plan the guide computes. The entropic
    regulariser is not a tuning knob: it is 1 because the cost is a log-likelihood, and the
    sharpness of T comes from the fitted noise parameters.

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
        Tempering weights ``w_xy`` and ``w_emb`` of the two log-likelihood terms of a match
        (1 = the plain likelihood).
    k, radius
        Candidate partners of each moved *a* cell: its ``k`` nearest *b* cells within
        ``radius`` (coordinate units); the coupling lives on these pairs only.
    identity_decoders
        Start ``D_a``/``D_b`` at the identity (when both modalities are the same shared
        principal components and ``embedding_dim`` equals their number).
    power_init, nu_init
        Starting shapes of the spatial and embedding match noise (the EM start, see above).
    noise_damping
        Fraction of the previous value kept at each M-step (averages single-draw noise).
    observed_embedding
        Use the features as the shared embedding (needs ``n_features_a == n_features_b ==
        embedding_dim``); no encoders, decoders or ``u`` sites.
    footprint_var
        Lower bound of the per-axis variance of the spatial error (coordinate units squared):
        the footprint of a *b* cell or spot. A partner is a spot centre, but the tissue that
        matches a's cell lies anywhere in the partner's footprint, so the error is
        ``footprint + deformation`` and its variance is at least the footprint's (a square of
        side ``h`` gives ``h^2 / 12``). Without it, two sections sampled on one lattice (Visium,
        ST arrays) put every moved *a* spot exactly on a *b* spot once the grids coincide, the
        spatial likelihood is unbounded as ``sigma_xy -> 0`` and the M-step collapses
        ``sigma_xy`` (and the coupling) onto the nearest spot whatever the embeddings say. 0
        (the default here) leaves ``sigma_xy`` free; :func:`pyrospatial.align` sets ``1 / 12``
        in units of b's spacing.
    """

    #: The sites the engine and criticism read (pyrospatial.protocols); the two slices' cells
    #: are plates of their own ("a_cells", "b_cells"), whole in every batch.
    contract = ModelContract(
        observed=(ObservedSite("x_a", "global", ("a_cell", "feature_a")),
                  ObservedSite("x_b", "global", ("b_cell", "feature_b"))),
        global_sites=("transform", "T", "u_a", "u_b"),
        dims={"u_a": ("a_cell",), "u_b": ("b_cell",)},
    )

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
        power_init: float = 16.0,
        nu_init: float = 8.0,
        noise_damping: float = 0.5,
        observed_embedding: bool = False,
        footprint_var: float = 0.0,
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
        self.observed_embedding = bool(observed_embedding)
        if self.observed_embedding and not n_features_a == n_features_b == embedding_dim:
            raise ValueError("observed_embedding needs both modalities in one space of embedding_dim features "
                             f"(got {n_features_a}, {n_features_b}, {embedding_dim}).")
        if not self.observed_embedding:
            self.decoder_a = nn.Linear(embedding_dim, n_features_a)
            self.decoder_b = nn.Linear(embedding_dim, n_features_b)
            if identity_decoders and n_features_a == n_features_b == embedding_dim:
                with torch.no_grad():
                    for dec in (self.decoder_a, self.decoder_b):
                        dec.weight.copy_(torch.eye(embedding_dim))
                        dec.bias.zero_()
            self.sigma_a = PyroParam(torch.full((n_features_a,), 0.5), constraint=constraints.positive)
            self.sigma_b = PyroParam(torch.full((n_features_b,), 0.5), constraint=constraints.positive)
        # match noise: point estimates set by the M-step (noise_update), not by gradient steps
        self.register_buffer("sigma_xy", torch.tensor(float(sigma_xy_init)))
        self.register_buffer("power", torch.tensor(float(power_init)))
        self.register_buffer("tau", torch.ones(self.embedding_dim))
        self.register_buffer("nu", torch.tensor(float(nu_init)))
        self.register_buffer("slope", torch.ones(self.embedding_dim))
        self.register_buffer("background_scale", torch.ones(self.embedding_dim))
        self.register_buffer("power_stats", torch.zeros(len(POWER_GRID)))  # running M-step statistics
        self.register_buffer("stat_mass", torch.zeros(()))
        self.noise_damping = float(noise_damping)
        if footprint_var < 0:
            raise ValueError(f"footprint_var must be >= 0, got {footprint_var}.")
        self.footprint_var = float(footprint_var)

    @torch.no_grad()
    def update_noise(self, T: torch.Tensor, moved: torch.Tensor, coords_b: torch.Tensor, u_a: torch.Tensor,
                     u_b: torch.Tensor, candidates: torch.Tensor, valid: torch.Tensor) -> None:
        """One M-step of the match noise at the current spatial shape ``power`` (:func:`noise_update`),
        damped: the scales move a fraction ``1 - noise_damping`` of the way (on the log scale)
        towards the step's maximiser, which averages the noise of single posterior draws; ``nu``
        jumps to its best grid value, and ``power`` with ``sigma_xy`` to the best shape of the
        running statistics (:func:`best_power`)."""
        new = noise_update(T, moved, coords_b, u_a, u_b, candidates, valid, self.tau, float(self.nu), self.slope)
        keep = self.noise_damping
        if float(self.stat_mass) > 0:
            self.power_stats.mul_(keep).add_((1 - keep) * new["power_stats"])
            self.stat_mass.mul_(keep).add_((1 - keep) * new["mass"])
        else:
            self.power_stats.copy_(new["power_stats"])
            self.stat_mass.copy_(new["mass"])
        power, sigma = best_power(self.power_stats, self.stat_mass, self.footprint_var)
        self.power.fill_(power)
        self.sigma_xy.copy_(sigma)
        self.tau.copy_(torch.exp(keep * torch.log(self.tau) + (1 - keep) * torch.log(new["tau"])))
        self.nu.fill_(float(new["nu"]))
        self.slope.mul_(keep).add_((1 - keep) * new["slope"])
        self.background_scale.copy_(new["background_scale"])

    @property
    def transform_dim(self) -> int:
        return int(self.prior_loc.shape[0])

    def forward(self, batch: AlignmentBatch) -> None:  # noqa: D102 - the class docstring is the story
        n, m, d = batch.n_a, batch.n_b, self.embedding_dim
        # 1. the rigid transform, centred on the pre-registration
        transform = pyro.sample("transform", dist.Normal(self.prior_loc, self.prior_scale).to_event(1))
        # 2. b cells: embedding and features (observed embedding: u_b = x_b)
        if self.observed_embedding:
            u_b = batch.features_b
        else:
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
        if self.observed_embedding:
            u_a = batch.features_a
        else:
            with a_cells:
                u_a = pyro.sample("u_a", dist.Normal(torch.zeros(d, device=batch.device), 1.0).to_event(1).mask(False))
        loglik = match_log_likelihood(
            moved, batch.coords_b, u_a, u_b, candidates, valid, self.sigma_xy, self.tau, batch.log_area_b,
            self.power, self.nu, self.slope, self.background_scale, spatial_weight=self.spatial_weight,
            embedding_weight=self.embedding_weight,
        )
        expected = torch.where(T > 0, T * loglik, torch.zeros_like(loglik)).sum()
        jacobian = 2.0 * n * transform[3] if transform.shape[0] > 3 else 0.0
        pyro.factor("match", expected + self.spatial_weight * jacobian)
        # 5. a's features
        if not self.observed_embedding:
            with a_cells:
                pyro.sample("x_a", dist.Normal(self.decoder_a(u_a), self.sigma_a).to_event(1), obs=batch.features_a)
