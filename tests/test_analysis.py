"""Posterior analysis: exact spot-consistent count splits, interaction matrices, domains,
baselines and metrics."""

from __future__ import annotations

import numpy as np
import pytest

from pyrospatial.methods.analysis import split_spot_counts, interaction_matrix, spatial_domains, summarise_draws
from pyrospatial.methods.baselines import spot_broadcast, type_signatures_nnls, type_split
from pyrospatial.criticism.metrics import domain_ari, edge_auc, gene_mean_pearson, interval_coverage, within_type_abs_spearman


@pytest.fixture
def split_problem():
    rng = np.random.default_rng(0)
    n_cells, n_spots, n_genes, n_draws = 120, 15, 7, 30
    cell_spot = np.where(rng.random(n_cells) < 0.85, rng.integers(0, n_spots, n_cells), -1)
    counts = rng.poisson(30, (n_spots, n_genes))
    rates = rng.gamma(2.0, 1.0, (n_draws, n_cells, n_genes))
    return counts, cell_spot, rates


@pytest.mark.parametrize("method", ["multinomial", "dirichlet_multinomial"])
def test_split_counts_add_up_exactly_in_every_draw(split_problem, method):
    counts, cell_spot, rates = split_problem
    result = split_spot_counts(counts, cell_spot, rates, method=method,
                               inverse_dispersion=np.full(counts.shape[1], 3.0), keep_draws=True)
    assert result.max_abs_spot_error == 0.0
    for s in range(rates.shape[0]):
        summed = np.zeros_like(counts)
        np.add.at(summed, cell_spot[cell_spot >= 0], result.draws[s][cell_spot >= 0])
        np.testing.assert_array_equal(summed, counts)
    outside = cell_spot < 0
    assert np.isnan(result.mean[outside]).all() and not np.isnan(result.mean[~outside]).any()
    assert (result.q05[~outside] <= result.q50[~outside]).all()
    assert (result.q50[~outside] <= result.q95[~outside]).all()


@pytest.mark.parametrize("method, dispersion", [("multinomial", "spot"), ("dirichlet_multinomial", "cell"),
                                                 ("dirichlet_multinomial", "spot")])
def test_split_gives_each_cell_its_share_in_spots_of_every_size_and_nothing_where_the_spot_saw_none(
        method, dispersion):
    """Spots of 1 to 9 cells, the cells of a spot scattered through the table, a third of the
    spot counts zero: every cell's mean count over the draws is its spot's count times its
    share of the spot's rate (the DM's mean too), within 4.5 Monte Carlo sds per entry; a spot
    count of zero gives each of its cells zero in every draw. A split that gave one cell's
    weights to another, or drew for the wrong spot-gene, fails the z-test."""
    rng = np.random.default_rng(11)
    sizes = np.arange(1, 10)
    cell_spot = np.concatenate([np.repeat(np.arange(sizes.size), sizes), np.full(6, -1)])
    cell_spot = cell_spot[rng.permutation(cell_spot.size)]
    n_cells, n_genes, n_draws, theta = cell_spot.size, 6, 3000, 2.5
    counts = rng.poisson(20, (sizes.size, n_genes)) * (rng.random((sizes.size, n_genes)) > 0.33)
    rates = rng.gamma(2.0, 1.0, (n_cells, n_genes))
    result = split_spot_counts(counts, cell_spot, np.broadcast_to(rates, (n_draws, n_cells, n_genes)),
                               method=method, inverse_dispersion=np.full(n_genes, theta), dispersion=dispersion,
                               keep_draws=True, seed=2)
    inside = cell_spot >= 0
    share = rates[inside] / np.stack([rates[cell_spot == j].sum(0) for j in cell_spot[inside]])
    total = counts[cell_spot[inside]]
    variance = total * share * (1 - share)
    if method == "dirichlet_multinomial":  # DM(alpha): variance n p (1 - p) (n + A) / (1 + A)
        spot_sq = np.stack([(share[cell_spot[inside] == j] ** 2).sum(0) for j in cell_spot[inside]])
        concentration = theta / spot_sq if dispersion == "cell" else np.full_like(share, theta)
        variance = variance * (total + concentration) / (1 + concentration)
    mean = result.draws[:, inside].mean(0)
    seen = variance > 0
    z = (mean[seen] - (total * share)[seen]) / np.sqrt(variance[seen] / n_draws)
    assert np.abs(z).max() < 4.5
    assert (result.draws[:, inside][:, total == 0] == 0).all() and (total == 0).sum() > 5
    assert result.max_abs_spot_error == 0.0


def test_deconvolve_counts_is_a_deprecated_alias_of_split_spot_counts(split_problem):
    from pyrospatial.methods.analysis import deconvolve_counts

    counts, cell_spot, rates = split_problem
    new = split_spot_counts(counts, cell_spot, rates, method="multinomial", seed=3, keep_draws=True)
    with pytest.warns(DeprecationWarning, match="split_spot_counts"):
        old = deconvolve_counts(counts, cell_spot, rates, method="multinomial", seed=3, keep_draws=True)
    np.testing.assert_array_equal(old.draws, new.draws)


def test_multinomial_split_has_the_right_mean_and_dm_the_right_overdispersion():
    """One spot, two cells with rates 1:3, X = 40, many draws with identical rates:
    multinomial mean 10 and variance n p (1-p) = 7.5; Dirichlet-multinomial with theta = 4
    has variance n p (1-p) (n + theta) / (1 + theta) = 66 (the NB-consistent split)."""
    n_draws = 4000
    rates = np.tile(np.array([[1.0], [3.0]]), (n_draws, 1, 1))
    counts = np.array([[40]])
    cell_spot = np.array([0, 0])
    multi = split_spot_counts(counts, cell_spot, rates, method="multinomial", keep_draws=True, seed=1)
    first = multi.draws[:, 0, 0]
    # standard errors: mean 7.5/sqrt(4000)=0.04; variance ~ 7.5*sqrt(2/4000)=0.17
    assert first.mean() == pytest.approx(10.0, abs=0.2)
    assert first.var() == pytest.approx(7.5, abs=0.8)
    dm = split_spot_counts(counts, cell_spot, rates, method="dirichlet_multinomial",
                           inverse_dispersion=np.array([4.0]), keep_draws=True, seed=2)
    first = dm.draws[:, 0, 0]
    assert first.mean() == pytest.approx(10.0, abs=0.6)  # sd 8.1/sqrt(4000) = 0.13
    assert first.var() == pytest.approx(7.5 * 44 / 5, rel=0.12)


def test_dm_split_matches_gamma_poisson_conditional_by_rejection():
    """Cells with rates Gamma(theta mu_i / M, theta / M) and Poisson counts, conditioned on
    their sum: the empirical conditional distribution of cell 0's count equals the DM split."""
    rng = np.random.default_rng(3)
    mu, theta, total = np.array([2.0, 5.0, 3.0]), 2.0, 10
    M = mu.sum()
    lam = rng.gamma(theta * mu / M, M / theta, size=(400_000, 3))
    x = rng.poisson(lam)
    exact = x[x.sum(1) == total, 0]
    dm = split_spot_counts(np.array([[total]]), np.zeros(3, dtype=int),
                           np.tile(mu[None, :, None], (6000, 1, 1)), inverse_dispersion=np.array([theta]),
                           keep_draws=True, seed=4).draws[:, 0, 0]
    assert dm.mean() == pytest.approx(exact.mean(), abs=0.2)
    assert dm.var() == pytest.approx(exact.var(), rel=0.12)


def test_cell_dispersion_split_matches_per_cell_negative_binomials_by_rejection():
    """theta_g as each cell's inverse dispersion (CORAL's spot_dispersion="sum"): cells with
    x_i ~ NB(mu_i, theta), conditioned on their sum. With equal means the rates are Gamma with a
    common scale, so the conditional is exactly DM(theta, ..., theta); the spot-level split
    (weights theta mu_i / M, summing to theta instead of n theta) is far too wide there."""
    rng = np.random.default_rng(5)
    mu, theta, total = np.array([2.5, 2.5, 2.5, 2.5]), 3.0, 10
    lam = rng.gamma(theta, mu / theta, size=(400_000, 4))
    x = rng.poisson(lam)
    exact = x[x.sum(1) == total, 0]
    rates = np.tile(mu[None, :, None], (6000, 1, 1))
    args = (np.array([[total]]), np.zeros(4, dtype=int), rates)
    cell = split_spot_counts(*args, inverse_dispersion=np.array([theta]), dispersion="cell",
                             keep_draws=True, seed=6).draws[:, 0, 0]
    spot = split_spot_counts(*args, inverse_dispersion=np.array([theta]), dispersion="spot",
                             keep_draws=True, seed=6).draws[:, 0, 0]
    # DM(3,3,3,3), n = 10: Var = 10 (1/4)(3/4)(10 + 12) / 13 = 3.17; the spot form DM(0.75, ...) gives 6.1
    assert exact.var() == pytest.approx(10 * 3 / 16 * 22 / 13, rel=0.05)
    assert cell.var() == pytest.approx(exact.var(), rel=0.1)
    assert spot.var() > 1.5 * exact.var()
    assert cell.mean() == pytest.approx(2.5, abs=0.1)


def test_split_rejects_an_unknown_dispersion():
    with pytest.raises(ValueError, match="dispersion must be 'spot'"):
        split_spot_counts(np.array([[3]]), np.zeros(2, dtype=int), np.ones((2, 2, 1)),
                          inverse_dispersion=np.array([1.0]), dispersion="cells")


def test_interaction_matrix_recovers_type_pair_probabilities():
    rng = np.random.default_rng(0)
    cell_type = rng.integers(0, 3, 300)
    edges = np.unique(np.sort(rng.integers(0, 300, (2, 900)), axis=0), axis=1)
    edges = edges[:, edges[0] != edges[1]]
    truth = np.array([[0.9, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.7]])
    base = truth[cell_type[edges[0]], cell_type[edges[1]]]
    draws = np.clip(base[None] + rng.normal(0, 0.05, (50, base.size)), 0, 1)
    result = interaction_matrix(draws, edges, cell_type, 3)
    np.testing.assert_allclose(result["mean"], truth, atol=0.02)
    np.testing.assert_allclose(result["mean"], result["mean"].T)
    assert (result["q05"] <= result["mean"]).all() and (result["mean"] <= result["q95"]).all()
    assert result["n_edges"].sum() > 0
    kept = interaction_matrix(draws, edges, cell_type, 3, keep_draws=True)["draws"]
    assert kept.shape == (50, 3, 3)
    np.testing.assert_allclose(kept.mean(0), result["mean"])


def test_interaction_draws_are_the_mean_edge_probability_of_each_type_pair():
    # computed one draw at a time, both orientations of every edge (a pair (a, b) and (b, a))
    rng = np.random.default_rng(1)
    cell_type = rng.integers(0, 3, 60)
    edges = rng.integers(0, 60, (2, 200))
    draws = rng.random((7, 200))
    kept = interaction_matrix(draws, edges, cell_type, 3, keep_draws=True)["draws"]
    a, b = cell_type[edges[0]], cell_type[edges[1]]
    for s in range(7):
        for i in range(3):
            for j in range(3):
                joins = ((a == i) & (b == j)) | ((a == j) & (b == i))
                expected = draws[s, joins].mean() if joins.any() else np.nan
                np.testing.assert_allclose(kept[s, i, j], expected, rtol=1e-12)


def test_spatial_domains_and_confidence():
    rng = np.random.default_rng(0)
    n = 300
    xy = rng.uniform(0, 1, (n, 2))
    truth = (xy[:, 0] > 0.5).astype(int)
    centre = np.where(truth[:, None] == 1, 2.0, -2.0) * np.ones((n, 3))
    # draws: boundary cells (|x - 0.5| < 0.05) are uncertain, others are not
    boundary = np.abs(xy[:, 0] - 0.5) < 0.05
    spread = np.where(boundary, 4.0, 0.2)[None, :, None]
    draws = centre[None] * np.where(boundary, 0.0, 1.0)[None, :, None] + rng.normal(0, 1, (40, n, 3)) * spread
    from pyrospatial.data.graph import knn_pairs

    result = spatial_domains(draws, knn_pairs(xy, 6), 2, smooth=0, seed=0)
    assert domain_ari(result["labels"][~boundary], truth[~boundary]) > 0.95
    assert result["confidence"][~boundary].mean() > 0.95
    assert result["confidence"][boundary].mean() < result["confidence"][~boundary].mean() - 0.15


def test_type_split_is_exact_without_noise_and_broadcast_is_the_spot_mean():
    rng = np.random.default_rng(1)
    n_cells, n_spots, n_types, n_genes = 200, 20, 3, 5
    cell_spot = rng.integers(0, n_spots, n_cells)
    cell_type = rng.integers(0, n_types, n_cells)
    signatures = rng.gamma(2.0, 3.0, (n_types, n_genes))
    per_cell = signatures[cell_type]
    counts = np.zeros((n_spots, n_genes))
    np.add.at(counts, cell_spot, per_cell)
    np.testing.assert_allclose(type_signatures_nnls(counts, cell_spot, cell_type, n_types), signatures, rtol=1e-6)
    np.testing.assert_allclose(type_split(counts, cell_spot, cell_type, n_types), per_cell, rtol=1e-6)
    broadcast = spot_broadcast(counts, cell_spot)
    summed = np.zeros_like(counts)
    np.add.at(summed, cell_spot, broadcast)
    np.testing.assert_allclose(summed, counts)


def test_metrics_on_known_cases():
    rng = np.random.default_rng(0)
    truth = rng.gamma(2, 1, (100, 4))
    assert gene_mean_pearson(truth * 3 + 1, truth) == pytest.approx(1.0)
    assert gene_mean_pearson(rng.permutation(truth), truth) < 0.3
    draws = truth[None] + rng.normal(0, 1, (2000, 100, 4))
    summary = summarise_draws(draws)
    # the truth is the centre of each draw distribution: a central 90% interval covers 90%
    # of draws-from-the-same-law; here check the summary shapes and ordering instead
    assert set(summary) == {"mean", "sd", "q05", "q50", "q95"}
    assert interval_coverage(summary["q05"], summary["q95"], truth) == 1.0
    assert interval_coverage(summary["q05"], summary["q95"], truth + 5) == 0.0
    assert edge_auc(np.array([0.9, 0.8]), np.array([0.1, 0.2])) == 1.0
    cell_type = np.repeat([0, 1], 50)
    v = rng.normal(size=100)
    assert within_type_abs_spearman(-v, v, cell_type) == pytest.approx(1.0)
