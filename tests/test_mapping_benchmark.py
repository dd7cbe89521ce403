"""The metric function of the mapping benchmark (benchmarks/mapping.py) on hand-built matrices P
whose answer is known, and its data split and thinning."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def bench():
    """benchmarks/mapping.py, imported by path (benchmarks/ is not a package)."""
    return load_benchmark("mapping", "mapping_bench")


def grid(n: int = 6) -> np.ndarray:
    """An n x n unit lattice of atlas locations."""
    return np.array([(x, y) for x in range(n) for y in range(n)], dtype=float)


def test_point_mass_at_the_truth_scores_perfectly(bench):
    atlas = grid()
    cells = np.array([3, 10, 35])
    p = sp.csr_matrix((np.ones(3), (np.arange(3), cells)), shape=(3, len(atlas)))
    m = bench.mapping_metrics(p, atlas, atlas[cells])
    assert m["mean_distance"] == 0.0
    assert m["frac_within_10nn"] == 1.0
    assert m["coverage_90"] == 1.0
    assert m["mean_radius_90"] == 0.0


def test_point_mass_elsewhere_has_its_distance_and_no_coverage(bench):
    atlas = grid()
    truth = np.array([[0.0, 0.0]])
    p = np.zeros((1, len(atlas)))
    p[0, 35] = 5.0  # (5, 5); not normalised: the metric normalises rows
    m = bench.mapping_metrics(p, atlas, truth)
    assert m["mean_distance"] == pytest.approx(np.sqrt(50.0))
    assert m["coverage_90"] == 0.0
    assert m["frac_within_10nn"] == 0.0


def test_uniform_row_gives_the_centroid(bench):
    atlas = grid()
    truth = np.array([[2.5, 2.5], [0.0, 0.0], [-1.0, -1.0]])
    p = np.ones((3, len(atlas)))
    c = bench.cell_metrics(p, atlas, truth)
    np.testing.assert_allclose(c["mean_xy"], np.full((3, 2), 2.5))
    np.testing.assert_allclose(c["distance"], [0.0, np.sqrt(12.5), np.sqrt(24.5)], atol=1e-12)
    # 36 equal masses around the centre (2.5, 2.5): the 32 points within sqrt(8.5) hold 32/36 =
    # 0.889 < 0.9, so the 90% disc reaches the 4 corners at sqrt(12.5), which it covers
    np.testing.assert_allclose(c["radius"], np.sqrt(12.5))
    np.testing.assert_array_equal(c["covered"], [True, True, False])


def test_two_point_row_radius_and_coverage_edge(bench):
    atlas = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0]])
    p = sp.csr_matrix(np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]]))
    truth = np.array([[1.0, 1.0], [1.0, 1.01]])  # at distance 1 and 1.01 from the mean (1, 0)
    c = bench.cell_metrics(p, atlas, truth)
    np.testing.assert_allclose(c["mean_xy"], [[1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(c["radius"], [1.0, 1.0])
    np.testing.assert_array_equal(c["covered"], [True, False])


def test_mass_threshold_picks_the_smallest_disc(bench):
    atlas = np.array([[0.0, 0.0], [1.0, 0.0], [-4.0, 0.0]])
    # mean = 0.95 * 0 + 0.04 * 1 + 0.01 * (-4) = 0: the 90% disc is the point itself
    p = np.array([[0.95, 0.04, 0.01]])
    c = bench.cell_metrics(p, atlas, np.array([[0.0, 0.5]]))
    assert c["radius"][0] == pytest.approx(0.0)
    assert not c["covered"][0]


def test_knn_radius_is_the_tenth_neighbour(bench):
    atlas = np.column_stack([np.arange(20.0), np.zeros(20)])
    r = bench.knn_radius(atlas, np.array([[-1.0, 0.0]]))
    assert r[0] == pytest.approx(10.0)  # neighbours at 1, 2, ..., 10


def test_rows_without_mass_and_wrong_shapes_are_errors(bench):
    atlas = grid(3)
    with pytest.raises(ValueError, match="without mass"):
        bench.mapping_metrics(np.zeros((1, 9)), atlas, atlas[:1])
    with pytest.raises(ValueError, match="shape"):
        bench.mapping_metrics(np.ones((2, 9)), atlas, atlas[:1])


def test_split_is_a_fixed_partition_and_thinning_keeps_the_expected_fraction(bench):
    a, c = bench.split_half(101)
    assert len(a) == 50 and len(c) == 51
    assert set(a).isdisjoint(c) and set(a) | set(c) == set(range(101))
    a2, _ = bench.split_half(101)
    np.testing.assert_array_equal(a, a2)
    counts = np.full((200, 50), 20.0)
    t = bench.thin(counts, 0.2, seed=0)
    assert np.all(t <= counts)
    # 200,000 molecules kept with p 0.2: sd of the kept fraction sqrt(0.16 / 2e5) ~ 0.0009
    assert t.sum() / counts.sum() == pytest.approx(0.2, abs=0.005)
    np.testing.assert_array_equal(bench.thin(counts, 1.0, seed=0), counts)


def test_peer_environment_reports_a_failed_install(bench, tmp_path):
    venv = tmp_path / ".bench-venv-mapping"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text("")
    assert bench.peer_environment(str(py), "pot")[0] is None  # no stamp: install did not finish
    (venv / ".installed").write_text("")
    (venv / "install.log").write_text("== tangram-sc==1.0.4\nERROR: no matching distribution\nFAILED: tangram-sc==1.0.4\n")
    found, why = bench.peer_environment(str(py), "tangram-sc")
    assert found is None and "tangram-sc" in why and "no matching distribution" in why
    assert bench.peer_environment(str(py), "pot") == (str(py), "")


def test_seeds_do_not_depend_on_the_depths_run(bench):
    # the thinning of a depth is the same whether or not the other depths are run
    assert [bench.thinning_seed(d) for d in (1.0, 0.5, 0.2)] == [1000, 1001, 1002]
    assert bench.thinning_seed(0.3) not in (1000, 1001, 1002)
