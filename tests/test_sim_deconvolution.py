"""Tests of pyrospatial.data.sim_deconvolution: spots whose cell types shift expression with x."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pyrospatial.data.sim_deconvolution import simulate_deconvolution, state_mean
from pyrospatial.errors import InputError
from pyrospatial.methods.deconvolution import nnls_abundance

SMALL = {"n_cells": 3000, "width": 1000.0}


@pytest.fixture(scope="module")
def strong():
    return simulate_deconvolution(gradient_strength=1.0, seed=0, return_cells=True, **SMALL)


@pytest.fixture(scope="module")
def flat():
    return simulate_deconvolution(gradient_strength=0.0, seed=0, return_cells=True, **SMALL)


def _right_left_log_ratio(reference, type_name: str) -> np.ndarray:
    """Per gene: log relative expression of a type's reference cells in the right fifth of the
    tissue minus the left fifth (pooled counts, +0.5 pseudo-count)."""
    width = reference.uns["sim_deconvolution"]["width"]
    x = reference.obsm["spatial"][:, 0]
    X = np.asarray(reference.X, dtype=np.float64)
    is_type = (reference.obs["cell_type"] == type_name).to_numpy()

    def log_freq(mask: np.ndarray) -> np.ndarray:
        total = X[is_type & mask].sum(0) + 0.5
        return np.log(total / total.sum())

    return log_freq(x > 0.8 * width) - log_freq(x < 0.2 * width)


def test_shapes_keys_and_seed(strong) -> None:
    spots, reference, cells = strong
    assert reference.n_obs == 1500 and cells.n_obs == 1500
    assert spots.n_vars == reference.n_vars == 60
    assert list(spots.var_names) == list(reference.var_names)
    assert spots.X.dtype == np.float32 and np.array_equal(spots.X, np.round(spots.X))
    truth = spots.obsm["cell_type_counts"]
    assert isinstance(truth, pd.DataFrame)
    assert list(truth.columns) == list(reference.obs["cell_type"].cat.categories) == [f"type{t}" for t in range(6)]
    assert reference.obsm["true_state"].shape == (1500, 2)
    assert reference.uns["sim_deconvolution"]["loadings"].shape == (6, 60, 2)
    again, _ = simulate_deconvolution(gradient_strength=1.0, seed=0, **SMALL)
    assert np.array_equal(again.X, spots.X)
    other, _ = simulate_deconvolution(gradient_strength=1.0, seed=1, **SMALL)
    assert not (other.shape == spots.shape and np.array_equal(other.X, spots.X))


def test_truth_is_consistent_with_the_cells(strong) -> None:
    spots, reference, cells = strong
    truth = spots.obsm["cell_type_counts"]
    assert np.array_equal(truth.to_numpy().sum(1), spots.obs["n_cells"].to_numpy())
    assert truth.to_numpy().sum() == cells.n_obs  # square tiles: every spatial cell is in a spot
    assert not set(reference.obs_names) & set(cells.obs_names)
    spot = cells.obs["spot"].astype(str).to_numpy()
    for name in spots.obs_names[:25]:
        members = spot == name
        assert np.array_equal(np.asarray(cells.X)[members].sum(0), spots[name].X.ravel())
        counted = cells.obs.loc[members, "cell_type"].value_counts().reindex(truth.columns, fill_value=0)
        assert np.array_equal(counted.to_numpy(), truth.loc[name].to_numpy())


def test_within_type_gradient_follows_the_loadings(strong, flat) -> None:
    # With the gradient, each type's right-vs-left log-ratio over genes is its loadings times
    # m(right) - m(left), up to sampling noise of ~50 cells a side (seen: r >= 0.92 on seeds 0-2).
    _, reference, _ = strong
    s = reference.uns["sim_deconvolution"]
    width = s["width"]
    shift = state_mean(np.array([0.9 * width]), width, s["state_dim"])[0] - \
        state_mean(np.array([0.1 * width]), width, s["state_dim"])[0]
    spreads = []
    for t, name in enumerate(reference.obs["cell_type"].cat.categories):
        observed = _right_left_log_ratio(reference, name)
        expected = s["loadings"][t] @ shift
        assert np.corrcoef(observed, expected)[0, 1] > 0.8, name
        spreads.append(observed.std())
    # without it, the ratio is noise only (seen: spread <= 0.48 against >= 1.48 with it)
    _, flat_reference, _ = flat
    flat_spreads = [_right_left_log_ratio(flat_reference, n).std()
                    for n in flat_reference.obs["cell_type"].cat.categories]
    assert min(spreads) > 2.0 * max(flat_spreads)


def test_gradient_breaks_fixed_signatures(strong, flat) -> None:
    # NNLS on the reference's mean signatures is the method the simulator is built to trouble:
    # its proportion RMSE must grow clearly with the gradient (seen: 0.049 -> 0.128 at the defaults).
    def nnls_rmse(spots, reference) -> float:
        types = list(spots.obsm["cell_type_counts"].columns)
        X = np.asarray(reference.X)
        signatures = np.stack([X[(reference.obs["cell_type"] == t).to_numpy()].mean(0) for t in types])
        w = nnls_abundance(np.asarray(spots.X), signatures)
        truth = spots.obsm["cell_type_counts"].to_numpy(float)
        return float(np.sqrt(np.mean((w / w.sum(1, keepdims=True) - truth / truth.sum(1, keepdims=True)) ** 2)))

    assert nnls_rmse(*strong[:2]) > 1.5 * nnls_rmse(*flat[:2])


@pytest.mark.parametrize("kwargs", [{"n_types": 1}, {"n_genes": 10}, {"reference_fraction": 1.0},
                                    {"spot_size": 0.0}, {"state_dim": 0}])
def test_bad_settings_raise_input_error(kwargs) -> None:
    with pytest.raises(InputError):
        simulate_deconvolution(**kwargs)
