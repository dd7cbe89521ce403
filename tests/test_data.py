"""Data layer: validation errors, membership and graph against brute force, sampler invariants."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyrospatial.engine.batch import cell_plate, spot_plate
from pyrospatial.data.dataset import SpatialDataset
from pyrospatial.data.batching import SpotBatchSampler
from pyrospatial.data.graph import knn_pairs
from pyrospatial.errors import AssignmentError, CoordinateError, CountsError, InputError


def make_inputs(n_cells=400, side=500.0, spacing=100.0, n_genes=12, seed=0):
    """Cells uniformly in a square; spots on a square lattice (µm)."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, side, (n_cells, 2))
    cells = ad.AnnData(rng.gamma(2.0, 1.0, (n_cells, 5)).astype(np.float32))
    cells.obs_names = [f"cell{i}" for i in range(n_cells)]
    cells.obs["cell_type"] = pd.Categorical(rng.choice(["A", "B", "C"], n_cells))
    cells.obsm["spatial"] = xy
    grid = np.arange(spacing / 2, side, spacing)
    gx, gy = np.meshgrid(grid, grid)
    spot_xy = np.c_[gx.ravel(), gy.ravel()]
    spots = ad.AnnData(rng.poisson(3.0, (len(spot_xy), n_genes)).astype(np.float32) + 1)
    spots.obs_names = [f"spot{j}" for j in range(len(spot_xy))]
    spots.obsm["spatial"] = spot_xy
    return cells, spots


def build(cells, spots, **kw):
    kw.setdefault("cell_type_key", "cell_type")
    kw.setdefault("spot_diameter", 80.0)
    return SpatialDataset.from_anndata(cells, spots, **kw)


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------
def _nan_feature(c, s):
    c.X[3, 1] = np.nan


def _inf_coords(c, s):
    c.obsm["spatial"][2, 0] = np.inf


def _negative_count(c, s):
    s.X[0, 0] = -1


def _fractional_count(c, s):
    s.X[1, 2] = 0.5


def _nan_count(c, s):
    s.X[1, 2] = np.nan


def _no_cell_spatial(c, s):
    del c.obsm["spatial"]


def _no_spot_spatial(c, s):
    del s.obsm["spatial"]


def _bad_coord_shape(c, s):
    c.obsm["spatial"] = np.c_[c.obsm["spatial"], np.zeros(c.n_obs)]


def _pixels_vs_microns(c, s):
    s.obsm["spatial"] = s.obsm["spatial"] / 0.065  # spots in pixels, cells in µm


def _disjoint(c, s):
    s.obsm["spatial"] = s.obsm["spatial"] + 10_000.0


def _dup_cells(c, s):
    c.obs_names = ["x"] * c.n_obs


def _dup_spots(c, s):
    s.obs_names = ["y"] * s.n_obs


def _empty_type(c, s):
    c.obs["cell_type"] = c.obs["cell_type"].cat.add_categories(["Ghost"])


def _missing_type_label(c, s):
    c.obs["cell_type"] = c.obs["cell_type"].astype(object)
    c.obs.iloc[0, c.obs.columns.get_loc("cell_type")] = None


def _negative_feature(c, s):
    c.X[0, 0] = -2.0


BAD_INPUTS = [
    (_nan_feature, InputError, "cells.X"),
    (_inf_coords, InputError, "cells.obsm['spatial']"),
    (_negative_count, CountsError, "negative"),
    (_fractional_count, CountsError, "non-integer"),
    (_nan_count, CountsError, "NaN"),
    (_no_cell_spatial, CoordinateError, "cells.obsm['spatial'] is missing"),
    (_no_spot_spatial, CoordinateError, "spots.obsm['spatial'] is missing"),
    (_bad_coord_shape, CoordinateError, "must have shape"),
    (_pixels_vs_microns, CoordinateError, "units mismatch"),
    (_disjoint, CoordinateError, "do not overlap"),
    (_dup_cells, InputError, "cells.obs_names"),
    (_dup_spots, InputError, "spots.obs_names"),
    (_empty_type, InputError, "Ghost"),
    (_missing_type_label, InputError, "missing label"),
    (_negative_feature, InputError, "negative"),
]


@pytest.mark.parametrize("corrupt, error, fragment", BAD_INPUTS, ids=[f.__name__ for f, *_ in BAD_INPUTS])
def test_bad_input_raises_named_error_and_keeps_input(corrupt, error, fragment):
    cells, spots = make_inputs()
    corrupt(cells, spots)
    before_cells, before_spots = cells.copy(), spots.copy()
    with pytest.raises(error) as info:
        build(cells, spots)
    assert fragment in str(info.value)
    # the error is ours, raised before any torch code ran, and the inputs are untouched
    np.testing.assert_array_equal(cells.X, before_cells.X)
    np.testing.assert_array_equal(spots.X, before_spots.X)
    assert set(cells.obsm.keys()) == set(before_cells.obsm.keys())


def test_missing_cell_type_key_names_the_key_and_alternatives():
    cells, spots = make_inputs()
    with pytest.raises(InputError, match=r"obs\['celltype'\].*cell_type"):
        build(cells, spots, cell_type_key="celltype")


def test_radius_assignment_requires_diameter():
    cells, spots = make_inputs()
    with pytest.raises(InputError, match="spot_diameter"):
        SpatialDataset.from_anndata(cells, spots, cell_type_key="cell_type")


def test_every_cell_outside_every_spot():
    cells, spots = make_inputs()
    with pytest.raises(AssignmentError, match="outside every spot"):
        build(cells, spots, spot_diameter=1e-3)


def test_zero_count_spots_are_dropped_with_a_warning_and_input_kept():
    cells, spots = make_inputs()
    spots.X[[0, 5, 7]] = 0
    with pytest.warns(UserWarning, match="dropping 3 of 25 spots with zero total counts"):
        ds = build(cells, spots)
    assert ds.n_spots == 22
    assert not {"spot0", "spot5", "spot7"} & set(ds.spot_names)
    assert spots.n_obs == 25 and spots.X[0].sum() == 0  # input untouched


def test_spots_without_cells_are_dropped_with_a_warning():
    cells, spots = make_inputs()
    far = np.vstack([spots.obsm["spatial"], [[-400.0, -400.0]]])
    extra = ad.AnnData(np.vstack([spots.X, np.ones((1, spots.n_vars), np.float32)]))
    extra.obs_names = list(spots.obs_names) + ["lonely"]
    extra.obsm["spatial"] = far
    with pytest.warns(UserWarning, match="contain no cell"):
        ds = build(cells, extra)
    assert "lonely" not in set(ds.spot_names)


@settings(max_examples=25, deadline=None)
@given(
    row=st.integers(0, 24),
    col=st.integers(0, 11),
    value=st.one_of(st.floats(-1e6, -1e-3), st.floats(0.01, 0.99).map(lambda f: 3 + f)),
)
def test_any_single_bad_count_is_caught(row, col, value):
    cells, spots = make_inputs()
    spots.X[row, col] = value
    with pytest.raises(CountsError, match=r"spots\.X"):
        build(cells, spots)


def test_success_does_not_modify_inputs():
    cells, spots = make_inputs()
    cells_before, spots_before = cells.copy(), spots.copy()
    build(cells, spots)
    np.testing.assert_array_equal(cells.X, cells_before.X)
    np.testing.assert_array_equal(spots.X, spots_before.X)
    np.testing.assert_array_equal(cells.obsm["spatial"], cells_before.obsm["spatial"])
    assert list(cells.obs.columns) == list(cells_before.obs.columns)
    assert list(spots.obs.columns) == list(spots_before.obs.columns)


# ------------------------------------------------------------------------------------------
# membership and graph against brute force
# ------------------------------------------------------------------------------------------
def test_radius_membership_matches_brute_force():
    cells, spots = make_inputs(n_cells=600)
    ds = build(cells, spots, spot_diameter=80.0)
    d = np.linalg.norm(cells.obsm["spatial"][:, None, :] - spots.obsm["spatial"][None], axis=2)
    inside = d <= 40.0
    expected = np.where(inside.any(1), d.argmin(1), -1)  # lattice spacing 100 > 80: no overlaps
    np.testing.assert_array_equal(ds.cell_spot, expected)
    dense = ds.membership.toarray()
    assert dense.shape == (25, 600)
    np.testing.assert_array_equal(dense.sum(0), (expected >= 0).astype(float))
    np.testing.assert_array_equal(dense.argmax(0)[expected >= 0], expected[expected >= 0])
    assert 0 < (expected >= 0).sum() < 600  # some cells outside every spot are kept


def test_nearest_membership_matches_brute_force():
    cells, spots = make_inputs(n_cells=300)
    ds = build(cells, spots, assignment="nearest", spot_diameter=None)
    d = np.linalg.norm(cells.obsm["spatial"][:, None, :] - spots.obsm["spatial"][None], axis=2)
    np.testing.assert_array_equal(ds.cell_spot, d.argmin(1))
    assert ds.membership.sum() == 300


def test_library_sizes():
    cells, spots = make_inputs()
    ds = build(cells, spots)
    np.testing.assert_allclose(ds.cell_library, cells.X.sum(1), rtol=1e-6)
    cells.X[4] = 0.0  # an all-zero panel (count panels) gets a small positive library
    with pytest.warns(UserWarning, match="1 cell"):
        ds = build(cells, spots)
    assert 0 < ds.cell_library[4] < 0.01 * np.median(ds.cell_library)
    np.testing.assert_allclose(ds.spot_library, spots.X.sum(1), rtol=1e-6)


@pytest.mark.parametrize("k", [1, 4, 8])
def test_knn_graph_matches_brute_force(k):
    rng = np.random.default_rng(k)
    xy = rng.uniform(0, 1, (150, 2))
    pairs = knn_pairs(xy, k)
    d = np.linalg.norm(xy[:, None] - xy[None], axis=2)
    np.fill_diagonal(d, np.inf)
    nbr = np.argsort(d, axis=1)[:, :k]
    expected = {(min(i, j), max(i, j)) for i in range(150) for j in nbr[i]}
    assert set(map(tuple, pairs.T.tolist())) == expected
    assert (pairs[0] < pairs[1]).all()


def test_edge_index_is_symmetric_pyg_convention():
    cells, spots = make_inputs()
    ds = build(cells, spots, k=5)
    ei = ds.edge_index
    assert ei.shape == (2, 2 * ds.n_edges)
    forward = set(map(tuple, ei.T.tolist()))
    assert all((j, i) in forward for i, j in forward)


# ------------------------------------------------------------------------------------------
# sampler
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset():
    cells, spots = make_inputs(n_cells=800, side=1000.0, spacing=100.0)
    return build(cells, spots, spot_diameter=90.0, k=6)


def _epoch(ds, batch_size, epoch, seed=0, **kw):
    loader = ds.dataloader(batch_size, seed=seed, **kw)
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_every_spot_and_cell_once_per_epoch(dataset):
    for epoch in range(3):
        batches = _epoch(dataset, 7, epoch)
        spots = np.concatenate([b.spot_index.numpy() for b in batches])
        cells = np.concatenate([b.cell_index.numpy() for b in batches])
        assert np.sort(spots).tolist() == list(range(dataset.n_spots))
        assert np.sort(cells).tolist() == list(range(dataset.n_cells))


def test_batches_are_spot_complete_with_induced_edges(dataset):
    adjacency = set(map(tuple, dataset.edges.T.tolist()))
    for b in _epoch(dataset, 9, 1):
        cells = b.cell_index.numpy()
        members = dataset.membership[b.spot_index.numpy()]
        # all member cells of the batch's spots are in the batch
        assert set(members.indices.tolist()) <= set(cells.tolist())
        # local membership equals the global one restricted to the batch
        np.testing.assert_array_equal(b.membership.to_dense().numpy(), members[:, cells].toarray())
        # cell_spot is consistent with membership
        local = b.cell_spot.numpy()
        for i in np.flatnonzero(local >= 0):
            assert dataset.cell_spot[cells[i]] == b.spot_index[local[i]].item()
        # edges = the graph induced on the batch's cells; non-edges are not edges
        got = {tuple(sorted((cells[i], cells[j]))) for i, j in b.edge_index.T.tolist()}
        induced = {(i, j) for (i, j) in adjacency if i in set(cells) and j in set(cells)}
        assert got == induced
        for i, j in b.nonedge_index.T.tolist():
            assert i < j and (cells[i], cells[j]) not in adjacency


def test_partition_is_deterministic_and_changes_between_epochs(dataset):
    first = [b.spot_index.tolist() for b in _epoch(dataset, 10, 0)]
    again = [b.spot_index.tolist() for b in _epoch(dataset, 10, 0)]
    other = [b.spot_index.tolist() for b in _epoch(dataset, 10, 1)]
    assert first == again
    assert sorted(map(tuple, first)) != sorted(map(tuple, other))


def test_batches_are_spatially_compact(dataset):
    """Spatial batches keep most graph edges (a random split of 10 batches would keep ~10%)."""
    batches = _epoch(dataset, 10, 0)
    kept = sum(b.edge_pairs.shape[1] for b in batches)
    assert kept / dataset.n_edges > 0.6


def test_scale_factors_reconstruct_full_graph_counts(dataset):
    batches = _epoch(dataset.with_nonedge_ratio(2.0), 8, 2)
    n_batches = len(batches)
    for b in batches:
        assert b.cell_scale == b.spot_scale == n_batches == b.n_batches
    # averaged over the uniform choice of a batch, scaled counts equal the full-graph counts
    edge_total = np.mean([b.edge_scale * b.edge_pairs.shape[1] for b in batches])
    nonedge_total = np.mean([b.nonedge_scale * b.nonedge_index.shape[1] for b in batches])
    assert edge_total == pytest.approx(dataset.n_edges, rel=1e-9)
    assert nonedge_total == pytest.approx(dataset.n_nonedges, rel=1e-9)


def test_full_batch_can_hold_every_non_adjacent_pair(dataset):
    """Asking for at least as many non-edges as exist gives each non-adjacent pair exactly
    once, with scale 1 (the exact graph likelihood used by refine_posterior(graph=True))."""
    batch = dataset.full_batch(nonedge_ratio=dataset.n_nonedges / dataset.n_edges + 1.0)
    keys = batch.nonedge_index[0].numpy() * dataset.n_cells + batch.nonedge_index[1].numpy()
    assert (batch.nonedge_index[0] < batch.nonedge_index[1]).all() and np.unique(keys).size == keys.size
    assert keys.size == dataset.n_nonedges and batch.nonedge_scale == 1.0
    edge_keys = {i * dataset.n_cells + j for i, j in dataset.edges.T.tolist()}
    assert not edge_keys & set(keys.tolist())


def test_ddp_ranks_take_disjoint_shares_of_one_partition(dataset):
    shares = []
    for rank in range(2):
        sampler = SpotBatchSampler(dataset, 6, seed=3, rank=rank, world_size=2)
        sampler.set_epoch(4)
        shares.append([spec.units.tolist() for spec in sampler])
    assert len(shares[0]) == len(shares[1])  # equal step counts, or DDP would hang
    flat = [u for share in shares for units in share for u in units]
    assert sorted(flat) == list(range(dataset.n_spots))


def _toy_model(batch):
    """Per-cell, per-spot and edge terms with fixed parameters (no latent)."""
    with cell_plate(batch):
        pyro.sample("y", dist.Normal(0.0, 1.0).expand([batch.n_cells, 5]).to_event(1), obs=batch.cell_features)
    with spot_plate(batch):
        pyro.sample("x", dist.Poisson(3.0).expand([batch.n_spots, 12]).to_event(1), obs=batch.spot_counts)
    d_pos = (batch.cell_coords[batch.edge_pairs[0]] - batch.cell_coords[batch.edge_pairs[1]]).norm(dim=-1)
    with pyro.poutine.scale(scale=batch.edge_scale):
        pyro.sample("edges", dist.Bernoulli(logits=2 - d_pos / 30).to_event(1), obs=torch.ones_like(d_pos))


def test_scaled_minibatch_log_density_is_unbiased_for_cells_spots_and_edges(dataset):
    """The mean over an epoch's batches of the scaled log density equals the full one
    exactly for per-cell and per-spot terms; for edges up to the cut edges' share, which the
    scale redistributes (checked here on a term that depends on distance only weakly)."""

    def logp(batch, site):
        tr = pyro.poutine.trace(_toy_model).get_trace(batch)
        tr.compute_log_prob()
        return tr.nodes[site]["log_prob"].sum().item()  # pyro applies the site's scale here

    full = dataset.full_batch()
    batches = _epoch(dataset, 6, 0)
    for site in ("y", "x"):
        mini = np.mean([logp(b, site) for b in batches])
        assert mini == pytest.approx(logp(full, site), rel=1e-5)
    mini_edges = np.mean([logp(b, "edges") for b in batches])
    assert mini_edges == pytest.approx(logp(full, "edges"), rel=0.05)


def test_cells_only_dataset_batches_over_cells():
    cells, _ = make_inputs(n_cells=120)
    ds = SpatialDataset.from_anndata(cells, None, cell_type_key="cell_type")
    assert ds.n_spots == 0 and ds.n_units == 120
    batches = _epoch(ds, 25, 0)
    assert np.sort(np.concatenate([b.cell_index.numpy() for b in batches])).tolist() == list(range(120))
    assert all(b.n_spots == 0 and b.membership.shape == (0, b.n_cells) for b in batches)
    assert (batches[0].cell_spot == -1).all()


def test_batch_moves_to_device_and_keeps_sparse_membership(dataset):
    b = dataset.full_batch().to("cpu")
    assert b.membership.is_sparse
    dense = torch.sparse.mm(b.membership, torch.ones(b.n_cells, 1)).squeeze(1)
    np.testing.assert_array_equal(dense.numpy(), np.asarray(dataset.membership.sum(1)).ravel())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert b.edge_pairs.shape[1] == dataset.n_edges


def test_with_edges_replaces_only_the_graph(dataset):
    held_out = dataset.edges[:, ::10]
    keep = np.ones(dataset.n_edges, bool)
    keep[::10] = False
    train = dataset.with_edges(dataset.edges[:, keep][::-1])  # reversed direction is fine
    assert train.n_edges == keep.sum() and dataset.n_edges == keep.size
    assert train.cell_features is dataset.cell_features
    batch_pairs = set(map(tuple, train.full_batch().edge_pairs.T.tolist()))
    assert not batch_pairs & set(map(tuple, held_out.T.tolist()))
    with pytest.raises(InputError, match="shape"):
        dataset.with_edges(np.zeros((3, 2), dtype=int))


def test_sampled_nonedges_are_uniform_over_nonadjacent_pairs(dataset):
    """sample_nonedges: pairs i < j, never an edge, never a self-pair, each cell drawn about
    equally often (uniform over pairs: each cell is in (n - 1 - degree) of them), the same for
    one seed; a copy with other edges does not reuse the cached keys of the first graph."""
    n = dataset.n_cells
    pairs = dataset.sample_nonedges(20000, np.random.default_rng(0))
    assert pairs.shape == (2, 20000) and (pairs[0] < pairs[1]).all()
    edges = set(map(tuple, np.sort(dataset.edges, axis=0).T.tolist()))
    assert not edges & set(map(tuple, pairs.T.tolist()))
    counts = np.bincount(pairs.ravel(), minlength=n)
    degree = np.bincount(dataset.edges.ravel(), minlength=n)
    expected = 2 * 20000 * (n - 1 - degree) / (2 * dataset.n_nonedges)
    z = (counts - expected) / np.sqrt(expected)
    assert abs(z.mean()) < 0.2 and 0.8 < z.std() < 1.2  # Poisson-like scatter around the uniform rate
    np.testing.assert_array_equal(pairs, dataset.sample_nonedges(20000, np.random.default_rng(0)))
    other = dataset.with_edges(np.stack([np.arange(n - 1), np.arange(1, n)]))  # a chain graph
    chain = other.sample_nonedges(5000, np.random.default_rng(1))
    assert not (chain[1] - chain[0] == 1).any()
