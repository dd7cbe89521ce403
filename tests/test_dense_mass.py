"""The per-row dense mass of the sampler's HMC (engine/hmc.py): on a Gaussian target whose rows
have strongly correlated coefficients and are coupled to each other in the all-rows direction
(as a softmax over genes couples the RNA read-out's rows), the mass is each row's own block of
the precision, and the sampler with it draws the exact posterior where a diagonal mass is
still far from it after the same number of iterations."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.transforms import identity_transform

from pyrospatial.engine.hmc import _HMC, _mass_windows, _Part, _Site

from test_refine import toy_batch

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("fresh_pyro")  # tests/conftest.py

G, K, SIGMA, KAPPA = 5, 3, 0.1, 4.0
# one design shared by the rows, with nearly collinear columns (correlation above 0.99)
_rng = np.random.default_rng(0)
_base = _rng.normal(size=(40, 1))
X = torch.tensor(np.c_[_base + 0.03 * _rng.normal(size=(40, 1)), _base + 0.03 * _rng.normal(size=(40, 1)),
                       _rng.normal(size=(40, 1))], dtype=torch.float32)
W_TRUE = torch.tensor(_rng.normal(size=(G, K)), dtype=torch.float32)
Y = W_TRUE @ X.T + SIGMA * torch.tensor(_rng.normal(size=(G, 40)), dtype=torch.float32)  # (G, 40)


def model(batch, predictive: bool = False) -> None:
    """w_g ~ N(0, I_K); y_g ~ N(X w_g, sigma^2 I); a factor -kappa/2 ||sum_g w_g||^2 couples the rows."""
    with pyro.plate("genes", G, dim=-1):
        w = pyro.sample("w", dist.Normal(torch.zeros(G, K), 1.0).to_event(1))
        pyro.factor("fit", -0.5 * ((Y - w @ X.T) ** 2).sum(-1) / SIGMA**2)
    pyro.factor("coupling", -0.5 * KAPPA * (w.sum(-2) ** 2).sum(-1, keepdim=True))  # (chains, 1)


def exact_precision() -> np.ndarray:
    """(G K) x (G K) precision of the joint Gaussian posterior of w (row-major: row g, column k)."""
    block = np.eye(K) + X.numpy().T @ X.numpy() / SIGMA**2
    return np.kron(np.eye(G), block) + KAPPA * np.kron(np.ones((G, G)), np.eye(K))


def _kernel(C: int, dense: bool, seed: int) -> _HMC:
    torch.manual_seed(seed)
    part = _Part("globals", toy_batch(np.array([0, -1]), np.array([1.0])), torch.arange(2),
                 [_Site("w", "global", 1, identity_transform, (G, K))], per_cell=False)
    part.state["w"] = 0.3 * torch.randn(C, G, K)  # over-dispersed starts, far from the posterior mean
    return _HMC(model, part, C, num_steps=6, step_size=0.05, target_accept=0.7, dense=("w",) if dense else ())


def _run(kernel: _HMC, warmup: int, keep: int) -> np.ndarray:
    windows = _mass_windows(warmup)
    draws = []
    for it in range(warmup + keep):
        rate = kernel.transition()
        if it < warmup:
            kernel.adapt(rate)
            if it + 1 in windows:
                kernel.update_mass()
            if it + 1 == warmup:
                kernel.finish_warmup()
        else:
            draws.append(kernel.part.state["w"].detach().clone())
    return torch.stack(draws).numpy()  # (T, C, G, K)


def test_dense_mass_is_each_rows_own_block_of_the_precision():
    kernel = _kernel(C=400, dense=True, seed=0)
    precision = exact_precision()
    for g in range(G):
        block = precision[g * K:(g + 1) * K, g * K:(g + 1) * K]
        estimate = np.linalg.inv(kernel.dense_cov["w"][g].double().numpy())
        # the cross-row terms enter with random signs: over 400 chains they add about
        # kappa sqrt(G - 1) / sqrt(400) = 0.4 to entries of size 10^3-10^4
        np.testing.assert_allclose(estimate, block, rtol=0.03, atol=1.0)
    # the collinear columns make each block ill-conditioned, which is what the dense mass undoes
    assert np.linalg.cond(precision[:K, :K]) > 300


def test_dense_mass_samples_the_exact_posterior_where_a_diagonal_mass_has_not_mixed():
    covariance = np.linalg.inv(exact_precision())
    mean = covariance @ (np.kron(np.eye(G), X.numpy().T) @ Y.numpy().reshape(-1)) / SIGMA**2
    sd = np.sqrt(np.diag(covariance))
    dense = _run(_kernel(C=20, dense=True, seed=1), warmup=60, keep=60).reshape(-1, G * K)
    diagonal = _run(_kernel(C=20, dense=False, seed=1), warmup=60, keep=60).reshape(-1, G * K)
    # 1200 autocorrelated draws: the mean within 0.25 posterior sd, the sd within 25%
    assert np.max(np.abs(dense.mean(0) - mean) / sd) < 0.25
    np.testing.assert_allclose(dense.std(0), sd, rtol=0.25)
    # the same budget with a diagonal mass is still where it started along the collinear
    # directions (its mean 1.5-1.9 posterior sd off over seeds 1-3)
    assert np.max(np.abs(diagonal.mean(0) - mean) / sd) > 1.0


def test_diagonal_mass_is_the_variance_over_the_windows_states_and_chains():
    """The window keeps running sums, not the states: the mass must still be their variance
    over iterations x chains (shrunk towards 1e-3 as before), and the next window starts empty."""
    kernel = _kernel(4, dense=False, seed=0)
    states = [5.0 + 3.0 * torch.randn(4, G, K) for _ in range(7)]
    for state in states:
        kernel.part.state["w"] = state
        kernel.adapt(0.7)
    kernel.update_mass()
    n = 7 * 4
    var = torch.stack(states).reshape(n, G, K).var(0, keepdim=True)
    torch.testing.assert_close(kernel.mass["w"], (n / (n + 5.0)) * var + 1e-3 * (5.0 / (n + 5.0)), rtol=1e-5, atol=1e-6)
    assert kernel.window_n == 0
    before = kernel.mass["w"].clone()
    kernel.update_mass()  # an empty window changes nothing
    torch.testing.assert_close(kernel.mass["w"], before)
