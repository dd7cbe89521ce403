"""Tests of pyrospatial.sim: the generative simulator and the pseudo-spot aggregator."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from pyrospatial.data.sim import VISIUM_SPACING_RATIO, SimulatedTissue, pseudo_spots, simulate_tissue

LAYOUTS = ["hex", "square", "square_tiles"]


@pytest.fixture(scope="module")
def sim() -> SimulatedTissue:
    return simulate_tissue(n_cells=2000, seed=0)


@pytest.fixture(scope="module", params=LAYOUTS)
def sim_layout(request) -> SimulatedTissue:
    return simulate_tissue(n_cells=1500, n_genes=30, seed=1, spot_layout=request.param)


# ----------------------------------------------------------------------------- simulate_tissue


def test_shapes_and_keys(sim: SimulatedTissue) -> None:
    cells, spots, t = sim.cells, sim.spots, sim.truth
    n, J = cells.n_obs, spots.n_obs
    assert cells.shape == (2000, 20)
    assert spots.n_vars == 100 and J > 10
    assert cells.X.dtype == np.float32 and isinstance(cells.X, np.ndarray)
    assert np.all(cells.X > 0) and np.isfinite(cells.X).all()
    assert list(cells.var_names[:2]) == ["prot0", "prot1"]
    assert list(spots.var_names[:2]) == ["gene0", "gene1"]
    assert cells.obs_names.is_unique and spots.obs_names.is_unique
    assert isinstance(cells.obs["cell_type"].dtype, pd.CategoricalDtype)
    assert isinstance(cells.obs["layer"].dtype, pd.CategoricalDtype)
    assert set(cells.obs["cell_type"].cat.categories) == {f"type{c}" for c in range(4)}
    assert cells.obsm["spatial"].shape == (n, 2)
    assert spots.obsm["spatial"].shape == (J, 2)
    assert "pyrospatial_sim" in cells.uns and "pyrospatial_sim" in spots.uns
    assert cells.uns["pyrospatial_sim"]["seed"] == 0
    # spot counts: float32 holding exact non-negative integers
    assert spots.X.dtype == np.float32
    assert np.all(spots.X >= 0) and np.all(spots.X == np.round(spots.X))
    expected = {
        "z": (n, 8), "v": (n, 1), "cell_type": (n,), "layer": (n,), "expected_rna": (n, 100),
        "rho": (n, 100), "counts": (n, 100), "cell_spot": (n,), "size_factor": (n,),
        "protein_library": (n,), "expected_protein": (n, 20),
    }
    for key, shape in expected.items():
        assert t[key].shape == shape, key
    assert t["edge_index"].shape[0] == 2 and t["edge_index"].dtype == np.int64
    assert t["counts"].dtype == np.int64 and t["counts"].min() >= 0
    # obs/truth agree
    np.testing.assert_array_equal(cells.obs["cell_type"].cat.codes.to_numpy(), t["cell_type"])
    np.testing.assert_array_equal(cells.obs["layer"].cat.codes.to_numpy(), t["layer"])
    np.testing.assert_array_equal(cells.obs["spot"].cat.codes.to_numpy(), t["cell_spot"])
    np.testing.assert_array_equal(cells.obsm["true_spot_gene_counts"], t["counts"])
    assert (spots.obs["n_cells"] >= 1).all()


def test_deterministic_for_a_seed() -> None:
    a = simulate_tissue(n_cells=400, seed=5)
    b = simulate_tissue(n_cells=400, seed=5)
    c = simulate_tissue(n_cells=400, seed=6)
    np.testing.assert_array_equal(a.cells.X, b.cells.X)
    np.testing.assert_array_equal(a.spots.X, b.spots.X)
    np.testing.assert_array_equal(a.cells.obsm["spatial"], b.cells.obsm["spatial"])
    for key in a.truth:
        np.testing.assert_array_equal(a.truth[key], b.truth[key])
    assert not np.array_equal(a.cells.obsm["spatial"], c.cells.obsm["spatial"])
    assert not np.array_equal(a.cells.X, c.cells.X)


def test_spot_counts_are_exact_sums(sim_layout: SimulatedTissue) -> None:
    t, spots = sim_layout.truth, sim_layout.spots
    J = spots.n_obs
    manual = np.zeros((J, spots.n_vars), dtype=np.int64)
    np.add.at(manual, t["cell_spot"][t["cell_spot"] >= 0], t["counts"][t["cell_spot"] >= 0])
    np.testing.assert_array_equal(spots.X.astype(np.int64), manual)
    np.testing.assert_array_equal(spots.obs["n_cells"].to_numpy(), np.bincount(t["cell_spot"][t["cell_spot"] >= 0], minlength=J))
    ctc = spots.obsm["cell_type_counts"]
    np.testing.assert_array_equal(ctc.sum(axis=1).to_numpy(), spots.obs["n_cells"].to_numpy())


def test_spot_membership_by_radius(sim_layout: SimulatedTissue) -> None:
    """Brute force: members within d/2 of their own centre; non-members outside every spot."""
    s = sim_layout
    d = s.settings["spot_diameter"]
    xy, centres, cs = s.cells.obsm["spatial"], s.spots.obsm["spatial"], s.truth["cell_spot"]
    if s.settings["spot_layout"] == "square_tiles":
        assert (cs >= 0).all()  # tiles cover the tissue
        assert np.all(np.abs(xy - centres[cs]) <= d / 2 + 1e-9)
        return
    dist = np.linalg.norm(xy[:, None, :] - centres[None, :, :], axis=-1)  # (n, J)
    members = cs >= 0
    assert np.all(dist[members, cs[members]] <= d / 2 + 1e-9)
    inside = dist <= d / 2
    assert np.all(inside.sum(1) <= 1)  # spots never overlap
    assert not inside[~members].any()  # no spot-less cell lies in a (kept) spot
    # centre spacing is Visium's 100/55 of the diameter
    cd = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    np.fill_diagonal(cd, np.inf)
    assert cd.min() == pytest.approx(d * VISIUM_SPACING_RATIO, rel=1e-6)


@pytest.mark.parametrize("layout", ["hex", "square_tiles"])
def test_cells_per_spot_matches_target(layout: str) -> None:
    # Counts per spot are ~Poisson(8) (sd 2.8); with >= 250 spots the standard error of
    # the mean is < 0.2, so +-0.8 (10 %) is a > 4-sigma tolerance.
    s = simulate_tissue(n_cells=8000, n_genes=5, n_proteins=3, seed=2, spot_layout=layout, cells_per_spot=8.0)
    assert s.spots.n_obs >= 250
    assert abs(s.spots.obs["n_cells"].mean() - 8.0) < 0.8
    if layout == "hex":
        # Poisson dispersion: variance ~ mean (uniform placement)
        assert 0.6 < s.spots.obs["n_cells"].var() / s.spots.obs["n_cells"].mean() < 1.5


def test_layers_are_spatially_coherent(sim: SimulatedTissue) -> None:
    xy, layer, ctype = sim.cells.obsm["spatial"], sim.truth["layer"], sim.truth["cell_type"]
    # 1-nearest-neighbour on y alone, trained on half the cells, predicts the other half
    rng = np.random.default_rng(0)
    train = rng.uniform(size=len(layer)) < 0.5
    ytr, ltr = xy[train, 1], layer[train]
    order = np.argsort(ytr)
    pos = np.clip(np.searchsorted(ytr[order], xy[~train, 1]), 1, order.size - 1)
    left, right = order[pos - 1], order[pos]
    nearest = np.where(np.abs(ytr[left] - xy[~train, 1]) < np.abs(ytr[right] - xy[~train, 1]), left, right)
    assert (ltr[nearest] == layer[~train]).mean() > 0.95
    # layers have different type compositions: the layer's majority type predicts the type
    tab = pd.crosstab(layer, ctype).to_numpy()
    assert tab.max(1).sum() / tab.sum() > 0.6  # chance would be ~1/4
    assert len(set(tab.argmax(1))) == 4


def test_protein_means_differ_by_type(sim: SimulatedTissue) -> None:
    logy = np.log(sim.cells.X)
    ctype = sim.truth["cell_type"]
    pvals = np.array([stats.f_oneway(*[logy[ctype == c, p] for c in range(4)]).pvalue for p in range(logy.shape[1])])
    assert (pvals < 1e-6).mean() > 0.5


def test_likelihood_means_match_truth(sim: SimulatedTissue) -> None:
    t = sim.truth
    # Gamma: E[y] = l^y h_y(z); NB: E[x] = L rho  (relative errors of totals are ~1e-3)
    assert sim.cells.X.sum() / t["expected_protein"].sum() == pytest.approx(1.0, rel=0.02)
    assert t["counts"].sum() / t["expected_rna"].sum() == pytest.approx(1.0, rel=0.02)
    np.testing.assert_allclose(t["expected_rna"], sim.settings["rna_library"] * t["rho"])
    np.testing.assert_allclose(t["rho"].sum(1), t["size_factor"])
    np.testing.assert_allclose(t["expected_protein"].sum(1), t["protein_library"])
    # NB is overdispersed: variance > mean for highly expressed genes
    big = t["expected_rna"].mean(0) > 5
    resid = (t["counts"] - t["expected_rna"])[:, big]
    assert (resid**2).mean() > t["expected_rna"][:, big].mean() * 1.5


def test_v_has_spatial_signal() -> None:
    def neighbour_corr(frac: float) -> float:
        s = simulate_tissue(n_cells=1500, n_genes=5, n_proteins=3, seed=4, v_spatial_fraction=frac)
        ei, v = s.truth["edge_index"], s.truth["v"][:, 0]
        return float(np.corrcoef(v[ei[0]], v[ei[1]])[0, 1])

    assert neighbour_corr(0.7) > 0.5
    assert abs(neighbour_corr(0.0)) < 0.1


def test_edges(sim: SimulatedTissue) -> None:
    ei = sim.truth["edge_index"]
    n = sim.cells.n_obs
    assert (ei[0] != ei[1]).all()
    fwd = set(zip(ei[0].tolist(), ei[1].tolist()))
    assert fwd == {(j, i) for i, j in fwd}  # both directions
    assert len(fwd) == ei.shape[1]
    deg = np.bincount(ei[0], minlength=n)
    assert deg.min() >= 6  # k = 6 nearest neighbours, symmetrised
    np.testing.assert_array_equal(ei, sim.truth["knn_edge_index"])  # default keeps all
    # with edge_z_scale > 0, kept edges join cells with more similar z
    s = simulate_tissue(n_cells=1500, n_genes=5, n_proteins=3, seed=3, edge_z_scale=2.0, edge_bias=0.0)
    knn, kept, z = s.truth["knn_edge_index"], s.truth["edge_index"], s.truth["z"]
    assert 0 < kept.shape[1] < knn.shape[1]
    dot = lambda e: np.einsum("ez,ez->e", z[e[0]], z[e[1]])  # noqa: E731
    kept_set = set(zip(kept[0].tolist(), kept[1].tolist()))
    dropped = np.array([(a, b) not in kept_set for a, b in zip(knn[0].tolist(), knn[1].tolist())])
    assert dot(kept).mean() > dot(knn[:, dropped]).mean() + 1.0
    assert s.truth["knn_edge_prob"].shape == (knn.shape[1],)


def test_all_pair_edges_follow_their_true_probabilities() -> None:
    """edge_candidates="all": every pair is a Bernoulli(sigmoid(b + s z.z'/K)) draw; the edges'
    recorded probabilities are those of the rule, and the graph's size matches their sum over
    all pairs (a sum of 4950 Bernoullis: sd ~ sqrt(sum p) < 20, so 4 sd is 80 edges)."""
    s = simulate_tissue(n_cells=100, n_genes=5, n_proteins=3, seed=2, edge_z_scale=2.0, edge_bias=-3.0,
                        edge_candidates="all")
    ei, p, z = s.truth["edge_index"], s.truth["edge_prob"], s.truth["z"]
    assert ei.shape[1] == p.shape[0] and (ei[0] != ei[1]).all()
    expected = 1.0 / (1.0 + np.exp(-(-3.0 + 2.0 * np.einsum("ez,ez->e", z[ei[0]], z[ei[1]]) / z.shape[1])))
    np.testing.assert_allclose(p, expected, rtol=1e-10)
    lo, hi = np.triu_indices(100, 1)
    p_all = 1.0 / (1.0 + np.exp(-(-3.0 + 2.0 * np.einsum("ez,ez->e", z[lo], z[hi]) / z.shape[1])))
    assert abs(ei.shape[1] / 2 - p_all.sum()) < 4 * np.sqrt(p_all.sum())
    assert set(zip(ei[0].tolist(), ei[1].tolist())) == set(zip(ei[1].tolist(), ei[0].tolist()))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="spot_layout"):
        simulate_tissue(n_cells=100, spot_layout="triangle")
    with pytest.raises(ValueError, match="edge_candidates"):
        simulate_tissue(n_cells=100, edge_candidates="nearest")
    with pytest.raises(ValueError):
        simulate_tissue(n_cells=100, cells_per_spot=0)


# ----------------------------------------------------------------------------- pseudo_spots


def _toy_cells(n: int = 800, n_genes: int = 12, sparse: bool = False, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 600, size=(n, 2)) + np.array([1000.0, -200.0])
    X = rng.poisson(3.0, size=(n, n_genes)).astype(np.float32)
    types = rng.choice(["A", "B", "C"], size=n)
    a = ad.AnnData(
        X=sp.csr_matrix(X) if sparse else X,
        obs=pd.DataFrame({"cell_type": pd.Categorical(types)}, index=[f"c{i}" for i in range(n)]),
        var=pd.DataFrame(index=[f"g{g}" for g in range(n_genes)]),
        obsm={"spatial": xy},
    )
    return a


def _dense(m) -> np.ndarray:
    return m.toarray() if sp.issparse(m) else np.asarray(m)


@pytest.mark.parametrize("sparse", [False, True])
def test_pseudo_spots_square(sparse: bool) -> None:
    cells = _toy_cells(sparse=sparse)
    d = 55.0
    cells_out, spots = pseudo_spots(cells, d, grid="square")
    codes = cells_out.obs["spot"].cat.codes.to_numpy()
    assert (codes >= 0).all()  # every cell in exactly one spot
    assert spots.obs["n_cells"].sum() == cells.n_obs
    xy, centres = cells.obsm["spatial"], spots.obsm["spatial"]
    assert np.all(np.abs(xy - centres[codes]) <= d / 2 + 1e-9)
    manual = np.zeros(spots.shape)
    np.add.at(manual, codes, _dense(cells.X))
    np.testing.assert_array_equal(spots.X, manual)
    assert spots.X.dtype == np.float32
    ctc = spots.obsm["cell_type_counts"]
    np.testing.assert_array_equal(ctc.sum(1).to_numpy(), spots.obs["n_cells"].to_numpy())
    expected = pd.crosstab(codes, cells.obs["cell_type"].to_numpy())
    np.testing.assert_array_equal(ctc.to_numpy(), expected.to_numpy())
    # feature_split=None: cells keep all genes, and the truth of the spot genes
    assert list(cells_out.var_names) == list(cells.var_names)
    np.testing.assert_array_equal(_dense(cells_out.obsm["true_spot_gene_counts"]), _dense(cells.X))
    assert "pyrospatial_pseudo_spots" in spots.uns


def test_pseudo_spots_hex_radius() -> None:
    cells = _toy_cells(n=1500)
    d = 55.0
    cells_out, spots = pseudo_spots(cells, d, grid="hex")
    codes = cells_out.obs["spot"].cat.codes.to_numpy()
    members = codes >= 0
    assert 0 < members.sum() < cells.n_obs  # Visium-like: gaps between spots
    assert cells_out.obs["spot"].isna().sum() == (~members).sum()
    xy, centres = cells.obsm["spatial"], spots.obsm["spatial"]
    dist = np.linalg.norm(xy[:, None] - centres[None], axis=-1)
    assert np.all(dist[members, codes[members]] <= d / 2 + 1e-9)
    assert not (dist[~members] <= d / 2).any()
    manual = np.zeros(spots.shape)
    np.add.at(manual, codes[members], cells.X[members])
    np.testing.assert_array_equal(spots.X, manual)
    np.testing.assert_array_equal(spots.obsm["cell_type_counts"].sum(1).to_numpy(), spots.obs["n_cells"].to_numpy())
    assert (spots.obs["n_cells"] >= 1).all()


def test_pseudo_spots_feature_split() -> None:
    cells = _toy_cells()
    c1, s1 = pseudo_spots(cells, 80.0, feature_split=0.25, seed=3)
    c2, s2 = pseudo_spots(cells, 80.0, feature_split=0.25, seed=3)
    assert list(c1.var_names) == list(c2.var_names) and list(s1.var_names) == list(s2.var_names)
    assert c1.n_vars == 3 and s1.n_vars == 9
    assert set(c1.var_names).isdisjoint(s1.var_names)
    assert set(c1.var_names) | set(s1.var_names) == set(cells.var_names)
    truth = c1.obsm["true_spot_gene_counts"]
    np.testing.assert_array_equal(truth, cells[:, s1.var_names].X)
    codes = c1.obs["spot"].cat.codes.to_numpy()
    manual = np.zeros(s1.shape)
    np.add.at(manual, codes, truth)
    np.testing.assert_array_equal(s1.X, manual)
    np.testing.assert_array_equal(c1.X, cells[:, c1.var_names].X)
    # explicit list
    c3, s3 = pseudo_spots(cells, 80.0, feature_split=["g0", "g5"])
    assert list(c3.var_names) == ["g0", "g5"] and "g0" not in s3.var_names and s3.n_vars == 10


def test_pseudo_spots_errors() -> None:
    cells = _toy_cells(n=50)
    with pytest.raises(KeyError, match="nope"):
        pseudo_spots(cells, 55.0, cell_type_key="nope")
    with pytest.raises(KeyError, match="g99"):
        pseudo_spots(cells, 55.0, feature_split=["g99"])
    with pytest.raises(ValueError):
        pseudo_spots(cells, 55.0, feature_split=1.5)
    with pytest.raises(ValueError, match="grid"):
        pseudo_spots(cells, 55.0, grid="tri")
    no_xy = cells.copy()
    del no_xy.obsm["spatial"]
    with pytest.raises(KeyError, match="spatial"):
        pseudo_spots(no_xy, 55.0)
    _, spots = pseudo_spots(cells, 55.0, cell_type_key=None)
    assert "cell_type_counts" not in spots.obsm
