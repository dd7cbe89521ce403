"""Tests of pyrospatial.data.datasets (real data read from the shared data folder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pyrospatial.data.datasets import OSMFISH_FILENAME, load_osmfish, shared_data_dir
from pyrospatial.data.sim import pseudo_spots

SKIP_REASON = "shared data folder not found; CI always has it"


def _osmfish_dir() -> Path:
    base = shared_data_dir()
    if base is None or not (base / "osmfish_sscortex" / OSMFISH_FILENAME).is_file():
        pytest.skip(SKIP_REASON)
    return base / "osmfish_sscortex"


@pytest.fixture(scope="module")
def osmfish():
    return load_osmfish(_osmfish_dir())


def test_load_osmfish(osmfish) -> None:
    a = osmfish
    assert a.shape == (4363, 33)  # 4,839 valid records less 476 duplicated ones
    assert a.X.dtype == np.float32
    assert np.all(a.X >= 0) and np.all(a.X == np.round(a.X)) and a.X.sum() > 0
    assert a.obs_names.is_unique and a.var_names.is_unique
    assert a.obs["cell_type"].nunique() == 31
    assert "Excluded" not in set(a.obs["cell_type"]) and "Excluded" not in set(a.obs["region"])
    assert a.obs["region"].nunique() == 11
    xy = a.obsm["spatial"]
    assert xy.shape == (4363, 2) and np.isfinite(xy).all()
    # micrometres: the section spans ~1.5 x 3 mm (pixels would be ~20x larger, mm ~1000x smaller)
    extent = xy.max(0) - xy.min(0)
    assert np.all(extent > 500) and np.all(extent < 5000)
    assert xy.min() >= 0
    assert a.uns["pyrospatial_dataset"]["pixel_size_um"] == pytest.approx(0.065)


def test_load_osmfish_drops_duplicated_records(osmfish) -> None:
    """No two kept cells share counts and position; keeping the copies gives back all 4,839
    records, and every dropped record is an exact copy of a kept one."""
    table = np.hstack([osmfish.X, osmfish.obsm["spatial"]])
    assert len(np.unique(table, axis=0)) == osmfish.n_obs
    assert osmfish.uns["pyrospatial_dataset"]["n_duplicates_dropped"] == 476
    full = load_osmfish(_osmfish_dir(), drop_duplicates=False)
    assert full.n_obs == 4839 and full.uns["pyrospatial_dataset"]["n_duplicates_dropped"] == 0
    full_table = np.hstack([full.X, full.obsm["spatial"]])
    kept_rows = {row.tobytes() for row in table}
    assert all(row.tobytes() in kept_rows for row in full_table)
    assert len(np.unique(full_table, axis=0)) == osmfish.n_obs


def test_load_osmfish_file_path_equals_folder(osmfish) -> None:
    b = load_osmfish(_osmfish_dir() / OSMFISH_FILENAME)
    np.testing.assert_array_equal(osmfish.X, b.X)
    assert list(osmfish.obs_names) == list(b.obs_names)


def test_osmfish_pseudo_spots(osmfish) -> None:
    cells, spots = pseudo_spots(osmfish, 100.0, grid="square")
    assert spots.obs["n_cells"].sum() == osmfish.n_obs
    np.testing.assert_allclose(spots.X.sum(0), osmfish.X.sum(0))
    assert spots.obsm["cell_type_counts"].shape[1] == 31


def test_load_osmfish_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=OSMFISH_FILENAME) as err:
        load_osmfish(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(FileNotFoundError):
        load_osmfish(tmp_path / "nothing.loom")


def test_shared_data_dir_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYROSPATIAL_SHARED_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path
    monkeypatch.setenv("PYROSPATIAL_SHARED_DATA", str(tmp_path / "absent"))
    assert shared_data_dir() is None
