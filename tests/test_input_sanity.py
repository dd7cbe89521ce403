"""Input sanity (issue 17, item 3 and the API half of item 4): unit mismatches caught by
statistics, square tiles with radius assignment, single spot / single cell messages, duplicated
names, wrong argument types, the section spacing check of align; inputs never modified."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from pyrospatial.data.dataset import SpatialDataset
from pyrospatial.data.geometry_checks import check_spot_geometry, skip_geometry_checks
from pyrospatial.data.sim import pseudo_spots, simulate_tissue
from pyrospatial.errors import (
    CoordinateError,
    DuplicateNamesError,
    GeometryError,
    InputError,
)
from pyrospatial.methods.alignment_features import (
    check_alignment_units,
    prepare_features,
    simulate_pair,
)

FACTORS = [2.0, 4.7, 20.0, 1 / 2.0, 1 / 4.7, 1 / 20.0]


@pytest.fixture(scope="module")
def tissue():
    return simulate_tissue(n_cells=800, seed=3)


def _build(cells, spots, **kwargs):
    kwargs.setdefault("spot_diameter", 55.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SpatialDataset.from_anndata(cells, spots, cell_type_key="cell_type", **kwargs)


def _scaled(adata, factor):
    out = adata.copy()
    out.obsm["spatial"] = np.asarray(adata.obsm["spatial"], dtype=np.float64) * factor
    return out


def test_simulators_pass_the_checks(tissue):
    """Every simulator layout builds, and on it the statistics behind the checks agree with the
    geometry: the share of cells inside spots is close to the share of area the spots cover
    (cells are uniform in the simulators), and radius assignment puts those cells in spots."""
    from pyrospatial.data.geometry_checks import measure_spot_geometry

    tiles = simulate_tissue(n_cells=800, seed=3, spot_layout="square_tiles")
    square = simulate_tissue(n_cells=800, seed=3, spot_layout="square")
    counted = tissue.cells.copy()
    counted.X = np.round(np.asarray(counted.X) * 10)  # pseudo-spots sum the cells' features: make them counts
    cases = [(tissue.cells, tissue.spots, 55.0, "radius"), (tiles.cells, tiles.spots, 55.0, "nearest"),
             (square.cells, square.spots, 55.0, "radius")]
    for grid, diameter, assignment in [("square", 50.0, "nearest"), ("hex", 55.0, "radius")]:
        cells, spots = pseudo_spots(counted, diameter, grid=grid)
        cases.append((cells, spots, diameter, assignment))
    for cells, spots, diameter, assignment in cases:
        data = _build(cells, spots, spot_diameter=diameter, assignment=assignment)
        assert data.n_cells == cells.n_obs and data.n_spots == spots.n_obs
        stats = measure_spot_geometry(np.asarray(cells.obsm["spatial"], float), np.asarray(spots.obsm["spatial"], float),
                                      diameter)
        assert stats.in_array > 0.8, stats  # the rest lie beyond the array's edge (23 spots on 800 cells)
        # 800 uniform cells: the binomial sd of a share is <= 0.018, so 0.1 is more than 5 sd
        assert abs(stats.cells_in_spots - stats.area_in_spots) < 0.1, stats
        if assignment == "radius":
            inside = float((data.cell_spot >= 0).mean())
            assert abs(inside - stats.cells_in_spots * stats.in_array) < 0.05, (inside, stats)


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("assignment", ["radius", "nearest"])
def test_pixels_vs_microns_of_the_cells_is_caught_in_both_directions(tissue, factor, assignment):
    cells = _scaled(tissue.cells, factor)
    before = cells.copy()
    with pytest.raises(CoordinateError) as info:  # GeometryError, or the extent check at 20x
        _build(cells, tissue.spots, assignment=assignment)
    message = str(info.value)
    assert "rescale" in message.lower()
    if 1 / 10 < factor < 10:  # under the extent check: the statistics catch it and name the numbers
        assert isinstance(info.value, GeometryError)
        assert "cell spacing" in message and "check_geometry=False" in message
    np.testing.assert_array_equal(cells.obsm["spatial"], before.obsm["spatial"])  # inputs never modified


@pytest.mark.parametrize("factor", [2.0, 4.7])
def test_the_override_lets_a_real_case_through(tissue, factor):
    cells = _scaled(tissue.cells, factor)
    dataset = _build(cells, tissue.spots, assignment="nearest", check_geometry=False)
    assert dataset.n_cells == tissue.cells.n_obs
    with skip_geometry_checks():
        _build(cells, tissue.spots, assignment="nearest")
    with pytest.raises(GeometryError):  # the context is over: the checks are back
        _build(cells, tissue.spots, assignment="nearest")


def test_square_tiles_with_radius_assignment_say_use_nearest():
    tiles = simulate_tissue(n_cells=800, seed=3, spot_layout="square_tiles")
    with pytest.raises(GeometryError, match="assignment='nearest'") as info:
        _build(tiles.cells, tiles.spots, assignment="radius")
    assert "%" in str(info.value)  # the measured fraction of cells left outside


def test_measured_statistics_agree_with_the_layout(tissue):
    xy_c, xy_s = np.asarray(tissue.cells.obsm["spatial"]), np.asarray(tissue.spots.obsm["spatial"])
    stats = check_spot_geometry(xy_c, xy_s, 55.0, "radius")
    assert stats is not None
    assert stats.in_array > 0.8  # the tissue edge lies a little outside the array
    assert abs(stats.cells_in_spots - stats.area_in_spots) < 0.1  # Visium gaps: most cells outside, as expected
    assert 0.5 < stats.cells_per_spot / stats.expected_per_spot < 2.0


def test_a_single_spot_gets_a_correct_message(tissue):
    one = tissue.spots[:1].copy()
    dataset = _build(tissue.cells, one)  # inside the cells' span: a correct (small) dataset
    assert dataset.n_spots == 1
    far = one.copy()
    far.obsm["spatial"] = np.asarray(far.obsm["spatial"]) + 1e6
    with pytest.raises(CoordinateError) as info:
        _build(tissue.cells, far)
    assert "one position" in str(info.value) and "units mismatch" not in str(info.value)


def test_a_single_cell_gets_a_correct_message(tissue):
    one = tissue.cells[:1].copy()
    one.obsm["spatial"] = np.asarray(tissue.spots.obsm["spatial"])[:1].astype(np.float64)
    dataset = _build(one, tissue.spots)
    assert dataset.n_cells == 1 and dataset.n_spots == 1
    one.obsm["spatial"] = one.obsm["spatial"] - 1e6
    with pytest.raises(CoordinateError) as info:
        _build(one, tissue.spots)
    assert "one position" in str(info.value) and "units mismatch" not in str(info.value)


@pytest.mark.parametrize("value", ["55", [55.0], True])
def test_a_wrong_type_of_spot_diameter_is_a_clear_input_error(tissue, value):
    with pytest.raises(InputError, match="spot_diameter must be a number"):
        _build(tissue.cells, tissue.spots, spot_diameter=value)


@pytest.mark.parametrize("axis", ["var", "obs"])
@pytest.mark.parametrize("side", ["cells", "spots"])
def test_duplicated_names_are_an_error_with_the_fix(tissue, axis, side):
    cells, spots = tissue.cells.copy(), tissue.spots.copy()
    target = cells if side == "cells" else spots
    names = list(getattr(target, f"{axis}_names"))
    names[1] = names[0]
    setattr(target, f"{axis}_names", names)
    with pytest.raises(DuplicateNamesError, match=f"{axis}_names_make_unique"):
        _build(cells, spots)


@pytest.mark.parametrize("axis", ["var", "obs"])
@pytest.mark.parametrize("side", ["spots", "reference"])
def test_deconvolution_duplicated_names_are_an_error_not_invalid_index(tissue, axis, side):
    from pyrospatial.methods.deconvolution import Deconvolution

    spots, reference = tissue.spots.copy(), tissue.cells.copy()
    reference.X = np.round(np.asarray(reference.X) * 10)
    reference.var_names = list(spots.var_names[: reference.n_vars])
    target = spots if side == "spots" else reference
    names = list(getattr(target, f"{axis}_names"))
    names[1] = names[0]
    setattr(target, f"{axis}_names", names)
    before = target.copy()
    with pytest.raises(DuplicateNamesError, match=f"{side}.{axis}_names_make_unique"):
        Deconvolution(spots, reference, "cell_type")
    assert list(getattr(target, f"{axis}_names")) == list(getattr(before, f"{axis}_names"))


@pytest.mark.parametrize("factor", FACTORS)
def test_align_catches_a_section_in_other_units(factor):
    a, b, _ = simulate_pair(200, drop_fraction=0.1, seed=2)
    assert check_alignment_units(a, b) == pytest.approx(1.0, rel=0.3)
    a_px = _scaled(a, factor)
    with pytest.raises(GeometryError, match="Rescale a's coordinates by about") as info:
        prepare_features(a_px, b, n_components=5)
    assert f"{factor:.3g}x" in str(info.value) or "x that of b" in str(info.value)
    assert check_alignment_units(a_px, b, check_geometry=False) is None
    with skip_geometry_checks():
        prepare_features(a_px, b, n_components=5)


def test_align_runs_the_check_through_the_public_api():
    from pyrospatial.methods.alignment import Alignment

    a, b, _ = simulate_pair(120, drop_fraction=0.1, seed=2)
    with pytest.raises(GeometryError):
        Alignment(_scaled(a, 4.7), b)
