"""Building blocks: each one line of a generative story.

Every block is a small function or :class:`~pyro.nn.PyroModule` that a model calls inside the
plates of :mod:`pyrospatial.engine.batch`. They are written to be reused: CORAL
(:mod:`pyrospatial.models.coral`) uses all of them; a reference-based deconvolution model
reuses :func:`negative_binomial` and :func:`spot_sum`.

Symbols: ``i`` cells, ``j`` spots, ``p`` proteins / cell features, ``g`` genes,
``c`` cell types, ``v_i`` the low-dimensional latent, ``z_i`` the cell state, ``A_ii'`` the
cell graph.

Blocks
------
:class:`HierarchicalPrior`
    ``z_i | v_i, c_i ~ Normal(mu_{c_i}(v_i), sigma_{c_i}(v_i))``, one head per cell type.
:func:`gamma_likelihood`
    ``y_ip ~ Gamma(concentration k_p, rate k_p / mean_ip)`` (mean / concentration form).
:func:`negative_binomial`
    ``x ~ NB(mean, inverse dispersion theta)`` (mean / inverse-dispersion form).
:func:`spot_sum`
    ``sum_{i in U(j)} rho_i`` as one sparse matmul.
:func:`spot_sum_negative_binomial`
    A spot's counts as a sum of per-cell NB counts (moment-matched NB).
:class:`EdgeDecoder`, :func:`bernoulli_edges`
    ``A_ii' ~ Bernoulli(logits = f(z_i, z_i'))`` over observed edges / sampled non-edges.
:func:`laplacian_factor`, :func:`contrastive_factor`
    Optional regularisers as ``pyro.factor`` sites (weight 0: no site at all).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam
from torch import nn
from torch.nn import functional as F

__all__ = [
    "HierarchicalPrior",
    "gamma_likelihood",
    "negative_binomial",
    "spot_sum",
    "spot_sum_negative_binomial",
    "EdgeDecoder",
    "bernoulli_edges",
    "laplacian_factor",
    "contrastive_factor",
    "positive_param",
    "MIN_SCALE",
    "MIN_MEAN",
]

#: Floor added to every learned standard deviation (keeps log-densities finite).
MIN_SCALE = 1e-4
#: Floor added to every likelihood mean (an exact 0 mean with a positive count is -inf).
MIN_MEAN = 1e-8


# ----------------------------------------------------------------------------- prior v -> z


class HierarchicalPrior(PyroModule):
    """Cell-type specific conditional prior ``z_i | v_i, c_i ~ Normal(mu_c(v_i), sigma_c(v_i))``.

    ``mu_c`` and ``sigma_c`` are small two-layer networks, one *head* per cell type ``c``.
    All heads are stored as batched weight tensors (``(n_types, ...)``) and evaluated at once;
    each cell then picks its own type's output with a gather (no Python loop over cells or
    types). ``sigma_c(v) = softplus(.) + MIN_SCALE``.

    The network weights are point estimates (``nn.Parameter``s), learned by maximising the
    ELBO like every other global parameter of the models in this package.

    Parameters
    ----------
    n_types
        Number of coarse cell types ``C`` (one head each).
    v_dim
        Dimension of ``v`` (1 by default, as in the CORAL paper).
    z_dim
        Dimension of ``z``.
    hidden
        Width of each head's hidden layer.
    init_scale
        Initial ``sigma_c(v)`` (approximately, for every ``v``).
    """

    def __init__(
        self, n_types: int, v_dim: int = 1, z_dim: int = 8, hidden: int = 32, init_scale: float = 1.0
    ) -> None:
        super().__init__()
        self.n_types, self.v_dim, self.z_dim, self.hidden = int(n_types), int(v_dim), int(z_dim), int(hidden)
        C, H = self.n_types, self.hidden
        # layer 1: v -> hidden, one weight matrix per type
        self.w1 = nn.Parameter(torch.randn(C, self.v_dim, H) / math.sqrt(self.v_dim))
        self.b1 = nn.Parameter(0.1 * torch.randn(C, H))
        # layer 2: hidden -> (mu, raw sigma); the mu bias spreads the types apart at init
        self.w2 = nn.Parameter(torch.randn(C, H, 2 * self.z_dim) * (0.5 / math.sqrt(H)))
        raw0 = math.log(math.expm1(max(init_scale - MIN_SCALE, 1e-3)))
        b2 = torch.cat([torch.randn(C, self.z_dim), torch.full((C, self.z_dim), raw0)], dim=-1)
        self.b2 = nn.Parameter(b2)

    def forward(self, v: torch.Tensor, cell_type: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu_{c_i}(v_i), sigma_{c_i}(v_i))``, each of shape ``(n, z_dim)``.

        Parameters
        ----------
        v
            ``(n, v_dim)`` (any leading batch dims, e.g. from vectorised particles, are kept).
        cell_type
            ``(n,)`` long codes in ``[0, n_types)``.
        """
        # each cell's own head: gather its type's weights, then a per-cell two-layer network
        h = torch.einsum("...nv,nvh->...nh", v, self.w1[cell_type]) + self.b1[cell_type]  # (..., n, H)
        out = torch.einsum("...nh,nhk->...nk", F.elu(h), self.w2[cell_type]) + self.b2[cell_type]  # (..., n, 2z)
        mu, raw = out[..., : self.z_dim], out[..., self.z_dim :]
        return mu, F.softplus(raw) + MIN_SCALE

    def distribution(self, v: torch.Tensor, cell_type: torch.Tensor) -> dist.Distribution:
        """``Normal(mu_c(v), sigma_c(v)).to_event(1)``: batch shape ``(n,)``, event ``(z_dim,)``."""
        mu, sigma = self(v, cell_type)
        return dist.Normal(mu, sigma).to_event(1)


# ----------------------------------------------------------------------------- likelihoods


def gamma_likelihood(mean: torch.Tensor, concentration: torch.Tensor, event_dims: int = 1) -> dist.Distribution:
    """Gamma in mean / concentration form: ``Gamma(concentration=k, rate=k / mean)``.

    ``E[y] = mean`` and ``Var[y] = mean**2 / k``: the concentration ``k`` is an inverse
    squared coefficient of variation, independent of the mean. Values must be strictly
    positive.

    Parameters
    ----------
    mean
        ``(..., P)`` positive means, e.g. ``l^y_i * h_y(z_i)_p``.
    concentration
        ``(P,)`` (or broadcastable) positive concentrations ``k_p``.
    event_dims
        Trailing dims declared as the event (1: one event per cell over its ``P`` features).
    """
    mean = mean + MIN_MEAN
    d = dist.Gamma(concentration.expand_as(mean), concentration / mean)
    return d.to_event(event_dims) if event_dims else d


def negative_binomial(
    mean: torch.Tensor, inverse_dispersion: torch.Tensor, event_dims: int = 1
) -> dist.Distribution:
    """Negative binomial in mean / inverse-dispersion form.

    ``NegativeBinomial(total_count=theta, logits=log(mean) - log(theta))``, i.e. the
    Gamma-Poisson mixture ``x ~ Poisson(lambda)``, ``lambda ~ Gamma(theta, theta / mean)``:
    ``E[x] = mean``, ``Var[x] = mean + mean**2 / theta``. Large ``theta`` approaches Poisson.
    The logits form is numerically stable for small means (no huge rates).

    Parameters
    ----------
    mean
        ``(..., G)`` non-negative means (``MIN_MEAN`` is added).
    inverse_dispersion
        ``(G,)`` (or broadcastable) positive ``theta_g``.
    event_dims
        Trailing dims declared as the event (1: one event per spot over its ``G`` genes).
    """
    mean = mean + MIN_MEAN
    theta = inverse_dispersion.expand_as(mean)
    d = dist.NegativeBinomial(total_count=theta, logits=mean.log() - theta.log())
    return d.to_event(event_dims) if event_dims else d


# ----------------------------------------------------------------------------- spot sum


def spot_sum(membership: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """``sum_{i in U(j)} rho_i`` for every spot ``j`` as one sparse matmul.

    Parameters
    ----------
    membership
        ``(m, n)`` sparse COO (or dense) 0/1 matrix ``U`` with ``U[j, i] = 1`` when cell ``i``
        belongs to spot ``j`` (weights other than 1 are honoured, e.g. partial membership).
    rho
        ``(n, G)`` per-cell expected profiles (or ``(..., n, G)`` with leading sample dims).

    Returns
    -------
    torch.Tensor
        ``(m, G)`` = ``U @ rho`` (``(..., m, G)`` with leading dims); differentiable in
        ``rho``.
    """
    if membership.dtype != rho.dtype:
        membership = membership.to(rho.dtype)
    if rho.dim() == 2:
        return torch.sparse.mm(membership, rho) if membership.is_sparse else membership @ rho
    # leading sample dims (vectorised particles / Predictive(parallel=True)): fold them into G
    n, G = rho.shape[-2:]
    lead = rho.shape[:-2]
    flat = rho.movedim(-2, 0).reshape(n, -1)
    out = torch.sparse.mm(membership, flat) if membership.is_sparse else membership @ flat
    return out.reshape((membership.shape[0],) + lead + (G,)).movedim(0, -2)


def spot_sum_negative_binomial(
    membership: torch.Tensor,
    rho: torch.Tensor,
    inverse_dispersion: torch.Tensor,
    capture: torch.Tensor | None = None,
    event_dims: int = 1,
) -> dist.Distribution:
    """NB for spot counts that are sums of per-cell NB counts, matching mean and variance.

    If cell ``i`` of spot ``j`` has counts ``x_ig ~ NB(l_j rho_ig, theta_g)`` independently,
    ``X_jg = sum_i x_ig`` has mean ``mu_jg = l_j sum_i rho_ig`` and variance
    ``mu_jg + l_j^2 sum_i rho_ig^2 / theta_g``. This returns the NB with that mean and
    variance: inverse dispersion ``theta_g (sum_i rho_ig)^2 / sum_i rho_ig^2`` (between
    ``theta_g`` for one dominant cell and ``n_j theta_g`` for ``n_j`` equal cells), so
    ``theta_g`` keeps its per-cell meaning. Both sums are sparse matmuls (:func:`spot_sum`).

    Parameters
    ----------
    membership
        ``(m, n)`` spot membership ``U``.
    rho
        ``(..., n, G)`` per-cell expected counts.
    inverse_dispersion
        ``(G,)`` per-cell ``theta_g``.
    capture
        Optional ``(..., m)`` per-spot multiplier ``l_j`` (1 when None).
    event_dims
        As in :func:`negative_binomial`.
    """
    total = spot_sum(membership, rho)
    squares = spot_sum(membership, rho * rho)
    ratio = (total * total / squares.clamp(min=MIN_MEAN**2)).clamp(min=1.0)  # in [1, n_j]
    mean = total if capture is None else capture.unsqueeze(-1) * total
    return negative_binomial(mean, inverse_dispersion * ratio, event_dims=event_dims)


# ----------------------------------------------------------------------------- edges


class EdgeDecoder(PyroModule):
    """Edge logits ``f(z_i, z_i') = z_i^T W z_i' + b`` with ``W`` symmetric.

    Point estimates (default): ``W = (M + M^T) / 2`` (so ``f`` is symmetric in its arguments),
    initialised at ``I / sqrt(z_dim)`` (a scaled inner product), and a bias ``b``.
    ``point_estimates=False`` registers no parameters: the caller passes draws of ``W`` and
    ``b`` (a Bayesian decoder, e.g. CORAL's ``bayesian_edge_decoder``; see
    :func:`symmetric_from_upper`).
    """

    def __init__(self, z_dim: int, bias_init: float = 0.0, point_estimates: bool = True) -> None:
        super().__init__()
        self.z_dim = int(z_dim)
        self.point_estimates = bool(point_estimates)
        if self.point_estimates:
            self.weight = nn.Parameter(torch.eye(self.z_dim) / math.sqrt(self.z_dim))
            self.bias = nn.Parameter(torch.tensor(float(bias_init)))

    def forward(
        self, z: torch.Tensor, pairs: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``(..., K)`` for the ``(2, K)`` index ``pairs`` into the cells of ``z (..., n, z_dim)``.

        ``weight (..., z_dim, z_dim)`` (symmetric) and ``bias (..., 1)``, with the leading dims
        of ``z``, replace the point estimates (one decoder per draw or chain)."""
        if weight is None:
            if not self.point_estimates:
                raise ValueError("this EdgeDecoder holds no point estimates: pass weight and bias draws.")
            W, b = 0.5 * (self.weight + self.weight.T), self.bias
        else:
            W, b = weight, bias
        n = z.shape[-2]
        if pairs.shape[1] * 8 > n * n:
            # many pairs (e.g. every non-adjacent pair of a small tissue): one dense product
            # z W z^T and a scalar gather are ~10x faster than gathering two vectors per pair
            logits = (z @ W) @ z.transpose(-1, -2)
            return logits.flatten(-2).index_select(-1, pairs[0] * n + pairs[1]) + b
        zi = z.index_select(-2, pairs[0])
        zj = z.index_select(-2, pairs[1])
        return ((zi @ W) * zj).sum(-1) + b


def symmetric_from_upper(upper: torch.Tensor, size: int) -> torch.Tensor:
    """``(..., size (size + 1) / 2)`` upper-triangle entries (row-major, diagonal included)
    -> the symmetric ``(..., size, size)`` matrix."""
    rows, cols = torch.triu_indices(size, size, device=upper.device)
    full = upper.new_zeros(upper.shape[:-1] + (size, size))
    full[..., rows, cols] = upper
    full[..., cols, rows] = upper
    return full


def bernoulli_edges(
    name: str,
    logits: torch.Tensor,
    observed: bool | None,
    scale: float = 1.0,
) -> torch.Tensor | None:
    """``A ~ Bernoulli(logits)`` for a set of cell pairs, scaled by ``scale``.

    The site lives in its own plate ``f"{name}_plate"`` (size ``K``, the pairs given) under
    ``poutine.scale(scale)``; with the batch's ``edge_scale`` / ``nonedge_scale`` the sum over
    one epoch is unbiased for the full graph. No site is created when ``K == 0``.

    Parameters
    ----------
    name
        Site name (CORAL: ``"edges"`` for observed edges, ``"nonedges"`` for sampled pairs).
    logits
        ``(K,)`` logits ``f(z_i, z_i')``.
    observed
        ``True``: observed value 1 (edges); ``False``: observed 0 (non-edges); ``None``:
        unobserved, so the site draws replicated adjacencies (posterior predictive).
    scale
        Multiplier of the log-likelihood.

    Returns
    -------
    torch.Tensor or None
        The site's value, ``(K,)``, or None when ``K == 0``.
    """
    K = logits.shape[-1]
    if K == 0:
        return None
    obs = None
    if observed is not None:
        obs = torch.full(logits.shape[-1:], 1.0 if observed else 0.0, dtype=logits.dtype, device=logits.device)
    with poutine.scale(scale=float(scale)), pyro.plate(f"{name}_plate", K, dim=-1):
        return pyro.sample(name, dist.Bernoulli(logits=logits), obs=obs)


# ----------------------------------------------------------------------------- regularisers


def laplacian_factor(
    name: str, z: torch.Tensor, pairs: torch.Tensor, weight: float, scale: float = 1.0
) -> None:
    """Graph-Laplacian smoothness ``pyro.factor(name, -weight * tr(Z^T L Z))``.

    With ``L = D - A`` of the undirected graph whose edges are ``pairs`` (each once),
    ``tr(Z^T L Z) = sum_{(i, i') in pairs} ||z_i - z_i'||^2``. The factor is multiplied by
    ``scale`` (pass the batch's ``edge_scale`` so that it stands for the full graph).
    ``weight`` is per edge and per unit squared distance; ``weight == 0`` (or no pairs) adds
    no site at all.
    """
    if weight == 0 or pairs.shape[-1] == 0:
        return
    diff = z.index_select(-2, pairs[0]) - z.index_select(-2, pairs[1])
    penalty = diff.pow(2).sum((-1, -2))
    with poutine.scale(scale=float(scale)):
        pyro.factor(name, -float(weight) * penalty)


def contrastive_factor(
    name: str,
    z: torch.Tensor,
    cell_type: torch.Tensor,
    pairs: torch.Tensor,
    weight: float,
    margin: float = 1.0,
    pair_weights: torch.Tensor | float = 1.0,
) -> None:
    """Margin contrastive term on cell types as ``pyro.factor(name, -weight * sum_k w_k l_k)``.

    For a pair ``k = (i, i')`` with distance ``d = ||z_i - z_i'||``:
    ``l_k = d^2`` when ``c_i == c_i'`` (same type: pulled together) and
    ``l_k = max(0, margin - d)^2`` otherwise (different types: pushed at least ``margin``
    apart) -- the classic contrastive loss of Hadsell et al. (2006).
    ``pair_weights`` (scalar or ``(K,)``) lets a model make the sum an unbiased estimate over
    all pairs of the data set (CORAL: edges weighted by ``edge_scale``, sampled non-edges by
    ``nonedge_scale``, normalised per cell). ``weight == 0`` (or no pairs) adds no site.
    """
    if weight == 0 or pairs.shape[-1] == 0:
        return
    diff = z.index_select(-2, pairs[0]) - z.index_select(-2, pairs[1])
    d2 = diff.pow(2).sum(-1)
    same = cell_type[pairs[0]] == cell_type[pairs[1]]
    d = (d2 + 1e-12).sqrt()
    loss = torch.where(same, d2, F.relu(float(margin) - d).pow(2))
    pyro.factor(name, -float(weight) * (loss * pair_weights).sum(-1))


def positive_param(init: torch.Tensor | float, shape: tuple[int, ...] = ()) -> PyroParam:
    """A positive point estimate (``PyroParam`` with ``constraints.positive``)."""
    value = torch.as_tensor(init, dtype=torch.get_default_dtype())
    if shape:
        value = value.expand(shape).clone()
    return PyroParam(value, constraint=constraints.positive)
