"""The edge decoder's posterior given the graph and the cells' states: interaction intervals at a
cost linear in cells.

CORAL's default posterior (HMC per spot, :func:`pyrospatial.engine.local.local_posterior`)
leaves the cell graph out of its target: the graph couples every cell, so it has no per-spot
blocks. The interaction matrix is a function of the states ``z`` *and* of the edge decoder
``f(z_i, z_j) = z_i^T W_e z_j + b_e``; with the trained decoder held at one value its 90%
intervals cover about a third of simulated truths. Here the decoder is drawn from its
posterior given the graph, with the states at their posterior mean ``zbar`` (the default
posterior's, which the graph did not inform)::

    theta^(s) ~ p(theta | zbar, A),        theta = (upper(W_e), b_e),   s = 1..S

and an interaction entry of draw ``s`` is read at ``zbar`` with decoder ``s``.

Why the posterior mean and not one decoder per draw of ``z``: a draw of ``z`` is the truth
plus posterior noise, and a logistic regression on noisy covariates is attenuated (errors in
variables): the edges' fitted probabilities shrink towards the average, so the entries of
frequent pairs come out low and those of rare pairs high. Regressing on ``E[z | data]``
instead is regression calibration, the standard correction. On 8 simulations held apart
from the scored ones (``benchmarks/interaction_decoder_choice.py``) the per-draw decoder
covered 0.54 of the entries at 90% and the posterior-mean one 0.85, with half the error.

Given ``zbar`` the edges are a logistic regression in ``theta``: ``f`` is linear in the
``K (K + 1) / 2`` free entries of the symmetric ``W_e`` and the bias, with features
``z_ik z_jl + z_il z_jk`` (``k < l``), ``z_ik z_jk`` and 1. Its likelihood is the training
one: every observed edge, and ``nonedge_ratio`` non-edges per edge drawn uniformly among the
non-adjacent pairs, each weighted by ``(non-adjacent pairs) / (drawn)`` so the sum is unbiased
for all pairs (never all pairs: the cost is linear in edges, so in cells). The prior is that of
CORAL's Bayesian decoder (``upper(W_e) ~ Normal(upper(I / sqrt(K)), 1 / sqrt(K))``,
``b_e ~ Normal(b0, 2)``).

The posterior of a logistic regression with thousands of observations and a few dozen
coefficients is close to Gaussian, so each draw is a Laplace approximation: Newton's method to
the mode, then one draw from ``Normal(mode, H^-1)`` with ``H`` the negative Hessian there. Each
draw has its own non-edge sample, so the spread also carries the error of sampling the
non-edges.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from pyrospatial.models.blocks import symmetric_from_upper

__all__ = ["EdgeDecoderDraws", "edge_decoder_posterior", "edge_probabilities", "pair_features"]

#: Newton iterations at most per draw, and the step (in posterior sds, from the Hessian) below
#: which it stops: a hundredth of the spread the draws are taken with
NEWTON_MAX_ITER = 25
NEWTON_TOL = 1e-2
#: step halvings of the line search before a Newton step is taken as it is (2^-30 of it)
LINE_SEARCH_HALVINGS = 30
#: pairs per product of the Hessian, the logits and the gradient (:func:`_curvature`, :class:`_Pairs`)
CURVATURE_CHUNK = 16384


@dataclass
class EdgeDecoderDraws:
    """One edge decoder per draw of the states: ``weight`` ``(S, K, K)`` symmetric,
    ``bias`` ``(S,)``, and what the Laplace approximation did (``newton_iterations``: the
    largest over draws; ``converged``: every draw's last Newton step was below the tolerance;
    ``unconverged_draws``: how many draws stopped at the iteration cap instead;
    ``nonedges_per_draw``, ``nonedge_weight``)."""

    weight: np.ndarray
    bias: np.ndarray
    newton_iterations: int
    converged: bool
    nonedges_per_draw: int
    nonedge_weight: float
    unconverged_draws: int = 0


def pair_features(z: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """``(..., P, K (K + 1) / 2 + 1)`` features of the pairs ``(2, P)`` of cells of ``z (..., n, K)``:
    ``f(z_i, z_j) = features @ (upper(W), b)`` for a symmetric ``W`` (row-major upper triangle,
    diagonal included, as :func:`pyrospatial.models.blocks.symmetric_from_upper`). Made
    :data:`CURVATURE_CHUNK` pairs at a time: the ``K x K`` products of all pairs at once
    (141 MB on 100k cells) left the cache for every step."""
    K = z.shape[-1]
    rows, cols = torch.triu_indices(K, K, device=z.device)
    half_on_diagonal = torch.where(rows == cols, 0.5, 1.0).to(z.dtype)
    out = torch.ones(z.shape[:-2] + (pairs.shape[-1], rows.numel() + 1), dtype=z.dtype, device=z.device)
    for lo in range(0, pairs.shape[-1], CURVATURE_CHUNK):
        block = pairs[:, lo:lo + CURVATURE_CHUNK]
        outer = z.index_select(-2, block[0]).unsqueeze(-1) * z.index_select(-2, block[1]).unsqueeze(-2)  # z_ik z_jl
        flat = (outer + outer.transpose(-1, -2)).flatten(-2)[..., rows * K + cols]  # z_ik z_jl + z_il z_jk
        out[..., lo:lo + CURVATURE_CHUNK, :-1] = flat * half_on_diagonal
    return out


def _curvature(features: torch.Tensor, weights: torch.Tensor, chunk: int = CURVATURE_CHUNK) -> torch.Tensor:
    """``features^T diag(weights) features``: float32 products over ``chunk`` pairs at a time,
    summed in float64. In chunks the weighted copy stays in cache: 2.4x faster on the 353k
    edges of 100k cells (94 -> 39 ms per product, one thread) than one product over all pairs."""
    out = torch.zeros(features.shape[-1], features.shape[-1], dtype=torch.float64, device=features.device)
    for lo in range(0, features.shape[0], chunk):
        block = features[lo:lo + chunk]
        out += ((block * weights[lo:lo + chunk].unsqueeze(-1)).T @ block).double()
    return out


class _Pairs:
    """The pairs of one Newton fit: their features (float32, for the Hessian) and the states of
    both ends (float64, for the logits, the log posterior and the gradient).

    Why two precisions: the Hessian only sets the step, while the logits and the gradient fix
    where Newton stops. Computed from float32 features, whose products carry a rounding error
    of about ``1e-7 |f|`` per pair, sums over ``10^5 - 10^6`` pairs (the non-edges weighted by
    ``10^3 - 10^4``) were noisy: the mode came out 0.03 posterior sds from the float64 one (a
    20,000-cell problem, ``tests/test_edge_decoder_posterior.py``), above the 0.01 tolerance,
    and where the log posterior's noise hid every rise the line search halved the step 30
    times per iteration: 33 of 100 draws on a 100k-cell tissue stopped at the iteration cap
    and the decoder's posterior took 337 CPU s (68 s now)."""

    def __init__(self, z32: torch.Tensor, z: torch.Tensor, pairs: torch.Tensor) -> None:
        self.features = pair_features(z32, pairs)  # (P, D) float32
        self.first = z.index_select(0, pairs[0])  # (P, K) float64
        self.second = z.index_select(0, pairs[1])

    def logits(self, theta: torch.Tensor) -> torch.Tensor:
        """``f(z_i, z_j) = z_i^T W z_j + b`` of every pair, float64 (``P K^2`` products)."""
        weight = symmetric_from_upper(theta[:-1], self.first.shape[-1])
        out = torch.empty(self.first.shape[0], dtype=self.first.dtype, device=self.first.device)
        for rows in self._chunks():  # in cache-sized chunks, as :func:`_curvature`
            out[rows] = ((self.first[rows] @ weight) * self.second[rows]).sum(-1)
        return out + theta[-1]

    def _chunks(self) -> list[slice]:
        return [slice(lo, lo + CURVATURE_CHUNK) for lo in range(0, self.first.shape[0], CURVATURE_CHUNK)]

    def feature_sums(self, weights: torch.Tensor) -> torch.Tensor:
        """``features^T weights`` in float64 from the states: ``sum_p w_p z_i z_j^T`` is the
        ``K x K`` matrix whose symmetrised upper triangle is the weight part (see
        :func:`pair_features`: ``z_ik z_jl + z_il z_jk`` off the diagonal, ``z_ik z_jk`` on it)."""
        K = self.first.shape[-1]
        outer = sum((self.first[rows].T @ (weights[rows].unsqueeze(-1) * self.second[rows]) for rows in self._chunks()),
                    torch.zeros(K, K, dtype=self.first.dtype, device=self.first.device))
        rows, cols = torch.triu_indices(K, K, device=outer.device)
        upper = (outer + outer.T)[rows, cols] * torch.where(rows == cols, 0.5, 1.0).to(outer.dtype)
        return torch.cat([upper, weights.sum().reshape(1)])


def _log_posterior(edges: _Pairs, nonedges: _Pairs, nonedge_weight: float, prior_loc: torch.Tensor,
                   prior_precision: torch.Tensor, theta: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The logistic regression's log posterior (up to a constant), float64: ``sum log
    sigmoid(f)`` over the edges, ``nonedge_weight * sum log(1 - sigmoid(f))`` over the drawn
    non-edges, the prior; with the logits of the edges and of the non-edges (the next Newton
    step's, where this ``theta`` is taken)."""
    edge_logits, nonedge_logits = edges.logits(theta), nonedges.logits(theta)
    value = (-F.softplus(-edge_logits).sum() - nonedge_weight * F.softplus(nonedge_logits).sum()
             - 0.5 * (prior_precision * (theta - prior_loc) ** 2).sum())
    return float(value), edge_logits, nonedge_logits


def _newton(edges: _Pairs, nonedges: _Pairs, nonedge_weight: float,
            prior_loc: torch.Tensor, prior_precision: torch.Tensor,
            start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Mode and negative Hessian of the logistic regression of the edges (label 1, weight 1)
    and the drawn non-edges (label 0, weight ``nonedge_weight``) with a Gaussian prior, by
    Newton's method with a backtracking line search (a full step can overshoot far from the
    mode, where the weighted non-edges make the curvature change fast: without it the
    iterates diverged to NaN on a simulated tissue; near the mode the full step is taken).
    The Hessian returned is the last step's, at most one step (below the tolerance: a
    hundredth of a posterior sd) from the mode. The Hessian's products are float32 (they
    dominate the cost); the logits, log posterior, gradient, parameters and solve float64
    (:class:`_Pairs`)."""
    args = (edges, nonedges, nonedge_weight, prior_loc, prior_precision)
    theta = start.clone()
    value, edge_logits, nonedge_logits = _log_posterior(*args, theta)
    converged = False
    for iteration in range(1, NEWTON_MAX_ITER + 1):
        p_edge = torch.sigmoid(edge_logits)
        p_non = torch.sigmoid(nonedge_logits)
        grad = (edges.feature_sums(1.0 - p_edge) - nonedge_weight * nonedges.feature_sums(p_non)
                - prior_precision * (theta - prior_loc))
        hessian = (_curvature(edges.features, (p_edge * (1.0 - p_edge)).float())
                   + nonedge_weight * _curvature(nonedges.features, (p_non * (1.0 - p_non)).float())
                   + torch.diag(prior_precision))
        step = torch.linalg.solve(hessian, grad)
        posterior_sd = torch.linalg.inv(hessian).diagonal().sqrt()
        if float((step.abs() / posterior_sd).max()) < NEWTON_TOL:
            theta = theta + step
            converged = True
            break
        # Armijo backtracking on the (concave) log posterior: halve until it rises enough
        slope, scale = float(grad @ step), 1.0
        for _ in range(LINE_SEARCH_HALVINGS):
            candidate = theta + scale * step
            new_value, edge_logits, nonedge_logits = _log_posterior(*args, candidate)
            if math.isfinite(new_value) and new_value >= value + 1e-4 * scale * slope:
                break
            scale *= 0.5
        theta, value = candidate, new_value
    return theta, hessian, iteration, converged


def edge_decoder_posterior(
    z: np.ndarray,
    edges: np.ndarray,
    sample_nonedges: Callable[[int, np.random.Generator], np.ndarray],
    n_nonedges_total: int,
    num_samples: int,
    *,
    prior_weight_loc: torch.Tensor,
    prior_weight_scale: float,
    prior_bias_loc: float,
    prior_bias_scale: float,
    start_weight: torch.Tensor | None = None,
    start_bias: float | None = None,
    nonedge_ratio: float = 1.0,
    seed: int = 0,
) -> EdgeDecoderDraws:
    """Draws of the edge decoder ``(W_e, b_e)`` from its posterior given the states ``z`` (the
    posterior mean of the cells' states; see the module docstring).

    Parameters
    ----------
    z
        ``(n, K)`` the cells' states.
    edges
        ``(2, E)`` observed edges (each pair once).
    sample_nonedges
        ``callable(size, rng) -> (2, size)`` uniformly drawn non-adjacent pairs
        (:meth:`pyrospatial.data.dataset.SpatialDataset.sample_nonedges`).
    n_nonedges_total
        Number of non-adjacent pairs of the tissue (the weight of the drawn ones).
    num_samples
        Draws returned; each has its own non-edge sample and Laplace fit.
    prior_weight_loc, prior_weight_scale, prior_bias_loc, prior_bias_scale
        The Gaussian prior of ``upper(W_e)`` (``(K (K + 1) / 2,)`` mean, one sd) and of ``b_e``.
    start_weight, start_bias
        Where Newton's method starts (e.g. the trained point estimate); default the prior mean.
    nonedge_ratio
        Non-edges drawn per observed edge for each draw (the training ratio).
    seed
        Seeds the non-edge samples and the Gaussian draws.
    """
    z_t = torch.as_tensor(np.asarray(z), dtype=torch.float64)
    n, K = z_t.shape
    D = K * (K + 1) // 2 + 1
    edges_t = torch.as_tensor(np.asarray(edges), dtype=torch.long)
    E = edges_t.shape[1]
    n_drawn = int(min(n_nonedges_total, max(1, round(float(nonedge_ratio) * max(E, 1)))))
    nonedge_weight = float(n_nonedges_total) / n_drawn if n_drawn else 0.0
    prior_loc = torch.cat([torch.as_tensor(prior_weight_loc, dtype=torch.float64).flatten(),
                           torch.tensor([float(prior_bias_loc)], dtype=torch.float64)])
    prior_precision = torch.cat([torch.full((D - 1,), 1.0 / float(prior_weight_scale) ** 2, dtype=torch.float64),
                                 torch.tensor([1.0 / float(prior_bias_scale) ** 2], dtype=torch.float64)])
    rows, cols = torch.triu_indices(K, K)
    if start_weight is not None:
        W = torch.as_tensor(start_weight, dtype=torch.float64)
        mode = torch.cat([(0.5 * (W + W.T))[rows, cols], torch.tensor([float(start_bias)], dtype=torch.float64)])
    else:
        mode = prior_loc.clone()
    z32 = z_t.float()
    edge_pairs = _Pairs(z32, z_t, edges_t)  # the same for every draw
    rng = np.random.default_rng(int(seed))
    generator = torch.Generator().manual_seed(int(seed))
    thetas, max_iter, unconverged = [], 0, 0
    for _ in range(int(num_samples)):
        nonedges = torch.as_tensor(sample_nonedges(n_drawn, rng), dtype=torch.long)
        # each draw starts where the last one ended: the modes differ by the non-edge sample
        mode, hessian, iterations, converged = _newton(edge_pairs, _Pairs(z32, z_t, nonedges),
                                                       nonedge_weight, prior_loc, prior_precision, mode)
        max_iter, unconverged = max(max_iter, iterations), unconverged + (not converged)
        # theta ~ Normal(mode, H^-1): with H = L L^T, theta = mode + L^-T eps
        chol = torch.linalg.cholesky(hessian)
        eps = torch.randn(D, 1, dtype=torch.float64, generator=generator)
        thetas.append(mode + torch.linalg.solve_triangular(chol.T, eps, upper=True).squeeze(-1))
    theta = torch.stack(thetas)
    weight = symmetric_from_upper(theta[:, :-1], K)
    return EdgeDecoderDraws(weight=weight.numpy(), bias=theta[:, -1].numpy(), newton_iterations=max_iter,
                            converged=unconverged == 0, nonedges_per_draw=n_drawn, nonedge_weight=nonedge_weight,
                            unconverged_draws=unconverged)


def edge_probabilities(z: np.ndarray, pairs: np.ndarray, decoders: EdgeDecoderDraws, chunk: int = 16) -> np.ndarray:
    """``(S, P)`` float32 probabilities ``sigmoid(z_i^T W_e z_j + b_e)`` of the pairs ``(2, P)`` of
    the cells of ``z (n, K)`` under each of the ``S`` decoders (``chunk`` decoders at a time)."""
    z32 = torch.as_tensor(np.asarray(z), dtype=torch.float32)
    features = pair_features(z32, torch.as_tensor(np.asarray(pairs), dtype=torch.long))
    K = z32.shape[-1]
    rows, cols = torch.triu_indices(K, K)
    theta = torch.cat([torch.as_tensor(decoders.weight)[:, rows, cols], torch.as_tensor(decoders.bias)[:, None]],
                      dim=1).float()
    out = np.empty((theta.shape[0], features.shape[0]), dtype=np.float32)
    for lo in range(0, theta.shape[0], chunk):
        out[lo:lo + chunk] = torch.sigmoid(theta[lo:lo + chunk] @ features.T).numpy()
    return out


def coral_edge_decoder_posterior(model, dataset, z_mean: np.ndarray, num_samples: int, *, seed: int = 0,
                                 decoder_samples: dict[str, np.ndarray] | None = None) -> EdgeDecoderDraws:
    """:func:`edge_decoder_posterior` for a trained CORAL model (:class:`pyrospatial.models.CoralModel`)
    on its :class:`~pyrospatial.data.dataset.SpatialDataset`: the prior of CORAL's Bayesian edge
    decoder, the training ratio of non-edges per edge, and Newton's method started at the trained
    decoder (the point estimate, or the mean of a Bayesian decoder's ``decoder_samples``,
    sites ``"edge_weight"`` and ``"edge_bias"``)."""
    from pyrospatial.models.coral import EDGE_BIAS_PRIOR_SCALE

    cfg = model.config
    if model.bayesian_edge_decoder:
        if decoder_samples is None:
            raise ValueError("a Bayesian edge decoder needs its draws (decoder_samples) to start from.")
        upper = torch.as_tensor(np.asarray(decoder_samples["edge_weight"]), dtype=torch.float64).mean(0)
        start_weight = symmetric_from_upper(upper, cfg.z_dim)
        start_bias = float(np.mean(decoder_samples["edge_bias"]))
    else:
        start_weight = model.edge_decoder.weight.detach().cpu().double()
        start_bias = float(model.edge_decoder.bias.detach().cpu())
    return edge_decoder_posterior(
        z_mean, dataset.edges, dataset.sample_nonedges, dataset.n_nonedges, num_samples,
        prior_weight_loc=cfg.edge_weight_prior_loc(torch.float64), prior_weight_scale=cfg.edge_weight_prior_scale,
        prior_bias_loc=cfg.edge_bias_init, prior_bias_scale=EDGE_BIAS_PRIOR_SCALE,
        start_weight=start_weight, start_bias=start_bias, nonedge_ratio=dataset.nonedge_ratio, seed=seed)
