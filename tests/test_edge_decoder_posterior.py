"""The edge decoder's posterior given the states (pyrospatial.methods.edge_decoder_posterior):
the features reproduce the decoder, and on graphs simulated from the decoder itself the Laplace
draws (every edge, sampled non-edges weighted as in training) cover the true coefficients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyrospatial.methods.edge_decoder_posterior import edge_decoder_posterior, edge_probabilities, pair_features

K = 3
D = K * (K + 1) // 2 + 1


def test_pair_features_reproduce_the_bilinear_decoder():
    rng = np.random.default_rng(0)
    z = torch.as_tensor(rng.normal(size=(40, K)))
    pairs = torch.as_tensor(rng.integers(0, 40, size=(2, 100)))
    M = torch.as_tensor(rng.normal(size=(K, K)))
    W, b = 0.5 * (M + M.T), 0.7
    rows, cols = torch.triu_indices(K, K)
    theta = torch.cat([W[rows, cols], torch.tensor([b], dtype=W.dtype)])
    expected = ((z[pairs[0]] @ W) * z[pairs[1]]).sum(-1) + b
    torch.testing.assert_close(pair_features(z, pairs) @ theta, expected)


def _all_pairs_graph(z: np.ndarray, W: np.ndarray, b: float, rng: np.random.Generator) -> np.ndarray:
    n = len(z)
    i, j = np.triu_indices(n, 1)
    p = 1.0 / (1.0 + np.exp(-(np.einsum("pk,kl,pl->p", z[i], W, z[j]) + b)))
    keep = rng.random(p.size) < p
    return np.stack([i[keep], j[keep]])


def _nonedge_sampler(n: int, edges: np.ndarray):
    edge_keys = np.sort(edges[0] * n + edges[1])

    def sample(size: int, rng: np.random.Generator) -> np.ndarray:
        i, j = rng.integers(0, n, size=(2, 4 * size + 64))
        key = np.minimum(i, j) * n + np.maximum(i, j)
        at = np.minimum(np.searchsorted(edge_keys, key), edge_keys.size - 1)
        key = np.unique(key[(i != j) & (edge_keys[at] != key)])
        key = rng.permutation(key)[:size]
        assert key.size == size
        return np.stack([key // n, key % n])

    return sample


def _fit(z, edges, n, seed, num_samples=100):
    n_nonedges = n * (n - 1) // 2 - edges.shape[1]
    return edge_decoder_posterior(
        z, edges, _nonedge_sampler(n, edges), n_nonedges, num_samples,
        prior_weight_loc=torch.zeros(D - 1, dtype=torch.float64), prior_weight_scale=3.0,
        prior_bias_loc=0.0, prior_bias_scale=5.0, nonedge_ratio=1.0, seed=seed)


def test_laplace_draws_cover_the_true_decoder_on_graphs_it_generated():
    """20 graphs drawn from one decoder over 250 cells (all pairs, ~3,000 edges each): the 90%
    intervals of the 7 coefficients (upper(W), b) hold the truth at about their level. 140
    coefficient-intervals: a calibrated posterior lands in [0.82, 0.97] with probability > 0.99.
    Weighting the drawn non-edges by 1 instead of (non-edges / drawn, about 8) moves the bias
    from -2.5 to about -0.4 (sd 0.03), so its intervals never hold the truth."""
    rng = np.random.default_rng(3)
    n = 250
    z = rng.normal(size=(n, K))
    M = rng.normal(scale=0.5, size=(K, K))
    W, b = 0.5 * (M + M.T), -2.5
    rows, cols = np.triu_indices(K)
    truth = np.concatenate([W[rows, cols], [b]])
    hits = []
    for replicate in range(20):
        edges = _all_pairs_graph(z, W, b, rng)
        draws = _fit(z, edges, n, seed=replicate)
        assert draws.converged
        theta = np.concatenate([draws.weight[:, rows, cols], draws.bias[:, None]], axis=1)
        lo, hi = np.quantile(theta, [0.05, 0.95], axis=0)
        hits.append((lo <= truth) & (truth <= hi))
        np.testing.assert_allclose(draws.weight, np.swapaxes(draws.weight, 1, 2))  # symmetric
    hits = np.array(hits)  # (replicates, coefficients)
    assert 0.82 <= hits.mean() <= 0.97, hits.mean(0)
    # the bias alone (the coefficient the non-edges' weight sets): 20 intervals, P(< 14 hits) < 0.01
    assert hits[:, -1].mean() >= 0.7, hits[:, -1].mean()


def test_each_draw_has_its_own_nonedge_sample_and_the_seed_fixes_them():
    rng = np.random.default_rng(5)
    n = 120
    z = rng.normal(size=(n, K))
    edges = _all_pairs_graph(z, np.eye(K) * 0.5, -2.0, rng)
    a, b = _fit(z, edges, n, seed=1, num_samples=5), _fit(z, edges, n, seed=1, num_samples=5)
    np.testing.assert_array_equal(a.weight, b.weight)
    np.testing.assert_array_equal(a.bias, b.bias)
    assert a.nonedges_per_draw == edges.shape[1]
    assert a.nonedge_weight == pytest.approx((n * (n - 1) // 2 - edges.shape[1]) / edges.shape[1])
    prob = edge_probabilities(z, edges, a)
    assert prob.shape == (5, edges.shape[1]) and ((prob > 0) & (prob < 1)).all()
    # the probabilities are those of each draw's decoder
    i, j = edges
    expected = 1 / (1 + np.exp(-(np.einsum("pk,skl,pl->sp", z[i], a.weight, z[j]) + a.bias[:, None])))
    np.testing.assert_allclose(prob, expected, rtol=1e-5)


def test_newton_started_far_from_the_mode_still_finds_it():
    """A start far from the mode (a decoder 20x too large, as the trained decoder of a badly
    scaled state can be): the full Newton step overshoots into a region where the weighted
    non-edges make the curvature vanish, and without the line search the iterates diverged to
    NaN (a Cholesky error); with it they reach the mode found from the prior mean."""
    rng = np.random.default_rng(7)
    n = 200
    z = rng.normal(size=(n, K))
    edges = _all_pairs_graph(z, np.eye(K) * 0.5, -2.5, rng)
    near = _fit(z, edges, n, seed=2, num_samples=3)
    n_nonedges = n * (n - 1) // 2 - edges.shape[1]
    far = edge_decoder_posterior(
        z, edges, _nonedge_sampler(n, edges), n_nonedges, 3,
        prior_weight_loc=torch.zeros(D - 1, dtype=torch.float64), prior_weight_scale=3.0,
        prior_bias_loc=0.0, prior_bias_scale=5.0, nonedge_ratio=1.0, seed=2,
        start_weight=20.0 * torch.ones(K, K, dtype=torch.float64), start_bias=30.0)
    assert near.converged and far.converged and far.unconverged_draws == 0
    np.testing.assert_allclose(far.weight, near.weight, atol=1e-3)
    np.testing.assert_allclose(far.bias, near.bias, atol=1e-3)


def test_newton_finds_the_float64_mode_on_a_tissue_sized_problem():
    """20,000 cells, 30k edges, the drawn non-edges weighted about 6,000 each (as on a real
    tissue): the mode must be the float64 one to a small fraction of a posterior sd. With the
    gradient and log posterior from float32 features (as before) the rounding noise of these
    weighted sums moved the mode by about a hundredth of a sd and, on 100k cells, stalled the
    line search; the reference here is plain float64 Newton run to convergence."""
    from pyrospatial.methods.edge_decoder_posterior import _curvature, _newton, _Pairs

    rng = np.random.default_rng(0)
    n, k = 20000, 10
    z = torch.as_tensor(rng.normal(size=(n, k)))
    i, j = rng.integers(0, n, size=(2, 100000))
    key = np.unique(np.minimum(i, j)[i != j] * n + np.maximum(i, j)[i != j])
    i, j = key // n, key % n
    logits = 0.3 * np.einsum("pk,pk->p", z.numpy()[i], z.numpy()[j]) - 1.0
    keep = rng.random(logits.size) < 1.0 / (1.0 + np.exp(-logits))
    edges = torch.as_tensor(np.stack([i[keep], j[keep]]))
    nonedges = torch.as_tensor(_nonedge_sampler(n, edges.numpy())(edges.shape[1], rng))
    weight = (n * (n - 1) / 2 - edges.shape[1]) / nonedges.shape[1]
    d = k * (k + 1) // 2 + 1
    loc = torch.zeros(d, dtype=torch.float64)
    precision = torch.full((d,), 1 / 9.0, dtype=torch.float64)
    edge_pairs, nonedge_pairs = _Pairs(z.float(), z, edges), _Pairs(z.float(), z, nonedges)
    mode, hessian, iterations, converged = _newton(edge_pairs, nonedge_pairs, weight, loc, precision, loc.clone())
    assert converged and iterations < 20
    # reference: float64 features, full Newton steps from the mode found (already in its basin)
    f_edge, f_non = pair_features(z, edges), pair_features(z, nonedges)
    reference = mode.clone()
    for _ in range(5):
        p_edge, p_non = torch.sigmoid(f_edge @ reference), torch.sigmoid(f_non @ reference)
        grad = f_edge.T @ (1 - p_edge) - weight * f_non.T @ p_non - precision * (reference - loc)
        h = _curvature(f_edge, p_edge * (1 - p_edge)) + weight * _curvature(f_non, p_non * (1 - p_non)) + torch.diag(precision)
        reference = reference + torch.linalg.solve(h, grad)
    sd = torch.linalg.inv(h).diagonal().sqrt()
    assert float(((mode - reference).abs() / sd).max()) < 2e-3
    assert weight > 1000


def test_draws_stopped_at_the_iteration_cap_are_counted(monkeypatch):
    """With one Newton iteration allowed, a start far from the mode cannot reach the tolerance:
    every draw is counted as unconverged (what CORAL.interactions() then warns about)."""
    from pyrospatial.methods import edge_decoder_posterior as module

    rng = np.random.default_rng(7)
    n = 200
    z = rng.normal(size=(n, K))
    edges = _all_pairs_graph(z, np.eye(K) * 0.5, -2.5, rng)
    monkeypatch.setattr(module, "NEWTON_MAX_ITER", 1)
    capped = edge_decoder_posterior(
        z, edges, _nonedge_sampler(n, edges), n * (n - 1) // 2 - edges.shape[1], 3,
        prior_weight_loc=torch.zeros(D - 1, dtype=torch.float64), prior_weight_scale=3.0,
        prior_bias_loc=0.0, prior_bias_scale=5.0, nonedge_ratio=1.0, seed=2,
        start_weight=20.0 * torch.ones(K, K, dtype=torch.float64), start_bias=30.0)
    assert not capped.converged and capped.unconverged_draws >= 1 and capped.newton_iterations == 1
