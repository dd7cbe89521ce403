"""The spot-coupled size family of benchmarks/posterior_error_sources.py: its log-density is the
exact density of the affine map it samples through, and its spot totals are pinned as designed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def bench():
    """benchmarks/posterior_error_sources.py, imported by path (benchmarks/ is not a package)."""
    return load_benchmark("posterior_error_sources")


def _family(bench):
    torch.manual_seed(0)
    cell_spot = torch.tensor([0, 0, 0, 1, 1, -1, 0])
    counts = torch.tensor([4.0, 2.0])
    loc, scale = torch.randn(7, dtype=torch.float64), torch.rand(7, dtype=torch.float64) + 0.5
    eta = torch.tensor([-1.5, 0.7], dtype=torch.float64)
    return bench.SpotCoupledLogNormal(loc, scale, eta, cell_spot, counts), cell_spot, loc, scale, eta


def test_log_prob_is_the_exact_density_of_the_affine_map(bench):
    family, cell_spot, loc, scale, eta = _family(bench)
    # log s = loc + T eps with T = diag(scale) (I - lambda_j / n_j 1 1^T) on each spot's cells
    T = torch.diag(scale).clone()
    for j, n in ((0, 4), (1, 2)):
        members = torch.nonzero(cell_spot == j).flatten()
        lam = 1.0 - torch.exp(eta[j])
        block = torch.eye(n, dtype=torch.float64) - lam / n
        T[members[:, None], members[None, :]] = scale[members][:, None] * block
    reference = torch.distributions.MultivariateNormal(loc, scale_tril=None, covariance_matrix=T @ T.T)
    values = family.rsample((50,))
    expected = reference.log_prob(torch.log(values)) - torch.log(values).sum(-1)  # Jacobian of exp
    assert torch.allclose(family.log_prob(values).sum(-1), expected, atol=1e-8)


def test_spot_totals_shrink_with_eta_while_cells_stay_wide(bench):
    family, cell_spot, loc, scale, eta = _family(bench)
    draws = torch.log(family.rsample((40000,))) - loc
    spot0 = (cell_spot == 0).numpy()
    a = (draws / scale).numpy()
    # the scaled deviations of spot 0 have mean-direction sd exp(eta_0) / sqrt(4), each cell about 1
    assert np.std(a[:, spot0].mean(1)) == pytest.approx(np.exp(-1.5) / 2.0, rel=0.03)
    assert np.std(a[:, spot0], axis=0) == pytest.approx(np.sqrt(1 - (1 - np.exp(-3.0)) / 4), rel=0.03)
    # a cell outside every spot is a plain LogNormal
    assert np.std(a[:, 5]) == pytest.approx(1.0, rel=0.03)
