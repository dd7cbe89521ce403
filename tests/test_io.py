"""pyrospatial.io readers on real platform files.

- Xenium, CosMx, MERSCOPE: the SpatialExperimentIO format stubs in the shared data folder
  (mock values, real vendor layouts);
- Visium: a Space Ranger-style ``outs/`` folder assembled in ``tmp_path`` from the DLPFC
  sample 151673 (counts, spot positions, scale factors, lowres H&E image).

Every malformed input must give a pyrospatial ``InputError`` naming the file, never a raw
pandas/h5py traceback.
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
from scipy.spatial import cKDTree

import pyrospatial.io as pio
from pyrospatial.data.datasets import shared_data_dir
from pyrospatial.errors import CoordinateError, CountsError, InputError

SHARED = shared_data_dir()
STUBS = SHARED / "format_stubs_spatialexperimentio" if SHARED else None
DLPFC = SHARED / "dlpfc_visium" / "151673" if SHARED else None

needs_stubs = pytest.mark.skipif(
    STUBS is None or not STUBS.is_dir(),
    reason="shared data folder ../shared/data/format_stubs_spatialexperimentio is absent "
    "(set PYROSPATIAL_SHARED_DATA to the shared data folder to run these tests)",
)
needs_dlpfc = pytest.mark.skipif(
    DLPFC is None or not DLPFC.is_dir(),
    reason="shared data folder ../shared/data/dlpfc_visium/151673 is absent "
    "(set PYROSPATIAL_SHARED_DATA to the shared data folder to run these tests)",
)


def _link_tree(source: Path, target: Path) -> Path:
    """Copy a folder of stub files into ``target`` (small files; real copies, so tests may edit them)."""
    shutil.copytree(source, target)
    for path in target.rglob("*"):
        path.chmod(0o644 if path.is_file() else 0o755)
    target.chmod(0o755)
    return target


def _write_10x_h5(path: Path, matrix: sp.spmatrix, barcodes, ids, names, types, float_index: bool = False,
                  library_id: str | None = None) -> None:
    """Write barcodes x features ``matrix`` in the Cell Ranger 3 ``.h5`` layout."""
    csr = sp.csr_matrix(matrix)
    index_dtype = np.float64 if float_index else np.int64
    with h5py.File(path, "w") as handle:
        if library_id is not None:
            handle.attrs["library_ids"] = np.array([library_id.encode()])
        group = handle.create_group("matrix")
        group["data"] = csr.data.astype(np.int32)
        group["indices"] = csr.indices.astype(index_dtype)
        group["indptr"] = csr.indptr.astype(index_dtype)
        group["shape"] = np.array([csr.shape[1], csr.shape[0]], dtype=index_dtype)
        group["barcodes"] = np.array([b.encode() for b in barcodes])
        features = group.create_group("features")
        features["id"] = np.array([s.encode() for s in ids])
        features["name"] = np.array([s.encode() for s in names])
        features["feature_type"] = np.array([s.encode() for s in types])
        features["genome"] = np.array([b"GRCh38"] * len(ids))


# ------------------------------------------------------------------------------------------
# Visium: a Space Ranger outs/ folder built from DLPFC 151673
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dlpfc_source():
    counts = scipy.io.mmread(DLPFC / "counts.mtx.gz").tocsr()  # spots x genes
    barcodes = pd.read_csv(DLPFC / "barcodes.tsv", header=None)[0].to_numpy(dtype=str)
    genes = pd.read_csv(DLPFC / "genes.tsv", header=None)[0].to_numpy(dtype=str)
    positions = pd.read_csv(DLPFC / "tissue_positions_list.txt", header=None, index_col=0,
                            names=["barcode", "in_tissue", "array_row", "array_col", "pxl_row", "pxl_col"])
    factors = json.loads((DLPFC / "scalefactors_json.json").read_text())
    return {"counts": counts, "barcodes": barcodes, "genes": genes, "positions": positions, "factors": factors}


@pytest.fixture(scope="module")
def visium_outs(tmp_path_factory, dlpfc_source):
    """``run/outs`` with a filtered mtx folder, a raw .h5 holding every spot, and spatial/."""
    outs = tmp_path_factory.mktemp("visium") / "151673" / "outs"
    mtx = outs / "filtered_feature_bc_matrix"
    mtx.mkdir(parents=True)
    src = dlpfc_source
    with gzip.open(mtx / "matrix.mtx.gz", "wb", compresslevel=1) as handle:
        scipy.io.mmwrite(handle, src["counts"].T.tocoo(), field="integer")  # 10x writes genes x barcodes
    with gzip.open(mtx / "barcodes.tsv.gz", "wt") as handle:
        handle.write("\n".join(src["barcodes"]) + "\n")
    with gzip.open(mtx / "features.tsv.gz", "wt") as handle:
        handle.write("".join(f"{g}\t{g}\tGene Expression\n" for g in src["genes"]))
    # raw matrix: every spot of the slide; the off-tissue spots get one count of the first gene
    all_barcodes = src["positions"].index.to_numpy(dtype=str)
    row_of = {b: i for i, b in enumerate(src["barcodes"])}
    rows = []
    for barcode in all_barcodes:
        if barcode in row_of:
            rows.append(src["counts"][row_of[barcode]])
        else:
            rows.append(sp.csr_matrix(([1], ([0], [0])), shape=(1, src["counts"].shape[1])))
    _write_10x_h5(outs / "raw_feature_bc_matrix.h5", sp.vstack(rows), all_barcodes, src["genes"], src["genes"],
                  ["Gene Expression"] * len(src["genes"]), library_id="151673_lib")
    spatial = outs / "spatial"
    spatial.mkdir()
    for name in ("tissue_positions_list.txt", "scalefactors_json.json", "tissue_lowres_image.png"):
        shutil.copy(DLPFC / name, spatial / name)
        (spatial / name).chmod(0o644)
    return outs


@pytest.fixture(scope="module")
def visium(visium_outs):
    return pio.read_visium(visium_outs)


def _variant(base: Path, target: Path, drop=(), edit=None) -> Path:
    """A copy of ``base`` (big files linked, not copied) without ``drop``; ``edit(target)`` then runs."""
    for path in base.rglob("*"):
        relative = path.relative_to(base)
        if path.is_dir() or any(str(relative).startswith(d) for d in drop):
            continue
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        (target / relative).symlink_to(path)
    if edit is not None:
        edit(target)
    return target


def _replace(path: Path, text: str) -> None:
    path.unlink()
    path.write_text(text)


@needs_dlpfc
def test_visium_counts_genes_and_barcodes_equal_the_source(visium, dlpfc_source):
    src = dlpfc_source
    assert visium.shape == (3639, 5000)
    assert list(visium.obs_names) == list(src["barcodes"])
    assert list(visium.var_names) == list(src["genes"])
    assert sp.isspmatrix_csr(visium.X) and visium.X.dtype == np.float32
    assert visium.X.sum() == src["counts"].sum()
    np.testing.assert_array_equal(np.asarray(visium.X.sum(axis=0)).ravel(), np.asarray(src["counts"].sum(axis=0)).ravel())
    assert np.all(visium.X.data == np.rint(visium.X.data))
    assert (visium.obs["in_tissue"] == 1).all()


@needs_dlpfc
def test_visium_coordinates_are_microns_with_100um_spot_pitch(visium, dlpfc_source):
    info = visium.uns["pyrospatial_io"]
    factors = dlpfc_source["factors"]
    assert info["platform"] == "visium"
    assert info["scale_source"].startswith("spot array")
    # neighbouring spots of 151673 are 138 px apart in the full-res image: 100 um / 138 px
    assert info["microns_per_unit"] == pytest.approx(100.0 / 138.0, rel=0.01)
    assert info["microns_per_pixel_by_spot_diameter"] == pytest.approx(55.0 / factors["spot_diameter_fullres"])
    xy = visium.obsm["spatial"]
    pos = dlpfc_source["positions"].loc[visium.obs_names]
    np.testing.assert_allclose(xy[:, 0], pos["pxl_col"] * info["microns_per_unit"])
    np.testing.assert_allclose(xy[:, 1], pos["pxl_row"] * info["microns_per_unit"])
    distance, _ = cKDTree(xy).query(xy, k=2)
    pitch = np.median(distance[:, 1])
    assert 90.0 < pitch < 110.0, f"Visium spot centres are 100 um apart, got {pitch:.1f} um"


@needs_dlpfc
def test_visium_spot_diameter_scale_is_available_and_disagrees_on_space_ranger_1(visium_outs, dlpfc_source):
    adata = pio.read_visium(visium_outs, scale="spot_diameter", load_images=False)
    expected = 55.0 / dlpfc_source["factors"]["spot_diameter_fullres"]
    assert adata.uns["pyrospatial_io"]["microns_per_unit"] == pytest.approx(expected)
    distance, _ = cKDTree(adata.obsm["spatial"]).query(adata.obsm["spatial"], k=2)
    assert np.median(distance[:, 1]) == pytest.approx(138.0 * expected, rel=0.01)  # ~78 um, not 100
    assert adata.uns["spatial"]["151673"]["images"] == {}
    with pytest.raises(InputError, match="scale must be"):
        pio.read_visium(visium_outs, scale="pixels")


@needs_dlpfc
def test_visium_stated_microns_per_pixel_wins(visium_outs, dlpfc_source, tmp_path):
    def edit(target: Path) -> None:
        factors = dict(dlpfc_source["factors"], microns_per_pixel=0.5)
        _replace(target / "spatial" / "scalefactors_json.json", json.dumps(factors))

    adata = pio.read_visium(_variant(visium_outs, tmp_path / "outs", edit=edit), load_images=False)
    info = adata.uns["pyrospatial_io"]
    assert info["microns_per_unit"] == 0.5 and info["scale_source"] == "scalefactors microns_per_pixel"
    np.testing.assert_allclose(adata.obsm["spatial"], adata.obsm["spatial_fullres_px"] * 0.5)
    spot = adata.uns["spatial"][info["library_id"]]["scalefactors"]["spot_diameter_fullres"]
    assert spot == pytest.approx(dlpfc_source["factors"]["spot_diameter_fullres"] * 0.5)


@needs_dlpfc
def test_visium_scanpy_spatial_plot_puts_spots_on_the_image(visium, dlpfc_source):
    import matplotlib.pyplot as plt
    import scanpy as sc

    library = visium.uns["spatial"][visium.uns["pyrospatial_io"]["library_id"]]
    image = library["images"]["lowres"]
    assert image.shape[:2] == (600, 600)
    scale = library["scalefactors"]["tissue_lowres_scalef"]
    lowres = visium.obsm["spatial"] * scale  # micron -> lowres pixel, as sc.pl.spatial does
    assert lowres.min() >= 0 and lowres[:, 0].max() < image.shape[1] and lowres[:, 1].max() < image.shape[0]
    pos = dlpfc_source["positions"].loc[visium.obs_names]
    np.testing.assert_allclose(lowres[:, 1], pos["pxl_row"] * dlpfc_source["factors"]["tissue_lowres_scalef"])
    # the spots cover tissue (darker than the white background of the H&E)
    rows, cols = np.rint(lowres[:, 1]).astype(int), np.rint(lowres[:, 0]).astype(int)
    assert image[rows, cols, :3].mean() < image[:20, :20, :3].mean()

    visium.obs["total"] = np.asarray(visium.X.sum(axis=1)).ravel()
    ax = sc.pl.spatial(visium, color="total", show=False)
    ax = ax[0] if isinstance(ax, list) else ax
    assert len(ax.images) >= 1
    x_lo, x_hi = sorted(ax.get_xlim())
    assert x_lo >= -1 and x_hi <= image.shape[1] + 1  # axes in lowres pixels, i.e. spots on the image
    plt.close("all")


@needs_dlpfc
def test_visium_keep_all_spots_reads_the_raw_h5(visium_outs, dlpfc_source):
    everything = pio.read_visium(visium_outs, in_tissue_only=False)
    positions = dlpfc_source["positions"]
    assert everything.n_obs == len(positions) == 4992
    assert (everything.obs["in_tissue"] == 1).sum() == (positions["in_tissue"] == 1).sum()
    assert everything.uns["pyrospatial_io"]["library_id"] == "151673_lib"
    assert everything.uns["pyrospatial_io"]["matrix_reader"] == "scanpy.read_10x_h5"
    assert everything.X.sum() == dlpfc_source["counts"].sum() + (positions["in_tissue"] == 0).sum()


@needs_dlpfc
def test_visium_filters_the_raw_matrix_to_in_tissue_spots(visium_outs, dlpfc_source, tmp_path):
    outs = _variant(visium_outs, tmp_path / "run" / "outs", drop=("filtered_feature_bc_matrix",))
    adata = pio.read_visium(tmp_path / "run")  # the run folder holding outs/ is accepted too
    in_tissue = dlpfc_source["positions"]["in_tissue"] == 1
    assert adata.n_obs == int(in_tissue.sum())
    assert set(adata.obs_names) == set(dlpfc_source["barcodes"])
    assert adata.X.sum() == dlpfc_source["counts"].sum()
    assert adata.uns["pyrospatial_io"]["matrix_file"].endswith("raw_feature_bc_matrix.h5")
    assert outs.is_dir()


@needs_dlpfc
def test_visium_reads_space_ranger_2_positions_with_header(visium_outs, visium, tmp_path):
    def edit(target: Path) -> None:
        old = target / "spatial" / "tissue_positions_list.txt"
        frame = pd.read_csv(old, header=None)
        old.unlink()
        frame.columns = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
        frame.to_csv(target / "spatial" / "tissue_positions.csv", index=False)

    adata = pio.read(_variant(visium_outs, tmp_path / "outs", edit=edit))
    np.testing.assert_allclose(adata.obsm["spatial"], visium.obsm["spatial"])
    assert adata.uns["pyrospatial_io"]["positions_file"].endswith("tissue_positions.csv")


@needs_dlpfc
def test_visium_output_round_trips_through_h5ad(visium, tmp_path):
    import anndata

    visium.write_h5ad(tmp_path / "v.h5ad")
    back = pio.read(tmp_path / "v.h5ad")
    assert back.uns["pyrospatial_io"]["platform"] == "visium"
    np.testing.assert_allclose(back.obsm["spatial"], visium.obsm["spatial"])
    assert isinstance(back, anndata.AnnData)


@needs_dlpfc
@pytest.mark.parametrize(
    "case, error, words",
    [
        ("no_scalefactors", InputError, ["scalefactors_json.json"]),
        ("bad_scalefactors", InputError, ["spot_diameter_fullres"]),
        ("no_positions", InputError, ["tissue_positions"]),
        ("missing_column", InputError, ["pxl_col_in_fullres", "tissue_positions.csv"]),
        ("barcodes_not_in_positions", CoordinateError, ["not in the positions file", "tissue_positions_list.txt"]),
        ("corrupt_h5", InputError, ["filtered_feature_bc_matrix.h5", "HDF5"]),
        ("no_matrix", InputError, ["filtered_feature_bc_matrix"]),
        ("no_spatial", InputError, ["spatial/"]),
    ],
)
def test_visium_malformed_folder_gives_a_clear_error(visium_outs, tmp_path, case, error, words):
    def edit(target: Path) -> None:
        spatial = target / "spatial"
        if case == "no_scalefactors":
            (spatial / "scalefactors_json.json").unlink()
        elif case == "bad_scalefactors":
            _replace(spatial / "scalefactors_json.json", json.dumps({"tissue_lowres_scalef": 0.04}))
        elif case == "no_positions":
            (spatial / "tissue_positions_list.txt").unlink()
        elif case == "missing_column":
            (spatial / "tissue_positions_list.txt").unlink()
            (spatial / "tissue_positions.csv").write_text(
                "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres\nAAACAAGTATCTCCCA-1,1,50,102,5000\n")
        elif case == "barcodes_not_in_positions":
            lines = (visium_outs / "spatial" / "tissue_positions_list.txt").read_text().splitlines()
            _replace(spatial / "tissue_positions_list.txt",
                     "\n".join(line for line in lines if not line.startswith("AAACAAGTATCTCCCA-1")) + "\n")
        elif case == "corrupt_h5":
            data = (visium_outs / "raw_feature_bc_matrix.h5").read_bytes()
            (target / "filtered_feature_bc_matrix.h5").write_bytes(data[: len(data) // 3])
        elif case == "no_matrix":
            shutil.rmtree(target / "filtered_feature_bc_matrix")
            (target / "raw_feature_bc_matrix.h5").unlink()
        elif case == "no_spatial":
            shutil.rmtree(spatial)

    folder = _variant(visium_outs, tmp_path / "outs", edit=edit)
    with pytest.raises(error) as info:
        pio.read_visium(folder)
    for word in words:
        assert word in str(info.value)


# ------------------------------------------------------------------------------------------
# Xenium
# ------------------------------------------------------------------------------------------
@needs_stubs
def test_xenium_stub_reads_counts_and_micron_centroids():
    adata = pio.read_xenium(STUBS / "Xenium_small")
    assert adata.shape == (6, 4)
    assert list(adata.var_names) == ["ABCC11", "ACTA2", "ACTG2", "ADAM9"]
    assert list(adata.var["gene_ids"]) == ["ENSG00000121270", "ENSG00000107796", "ENSG00000163017", "ENSG00000168615"]
    assert list(adata.obs_names) == ["1", "2", "3", "4", "5", "6"]
    with h5py.File(STUBS / "Xenium_small" / "cell_feature_matrix.h5") as handle:
        stored_sum = handle["matrix/data"][()].sum()
    assert adata.X.sum() == stored_sum == 21
    np.testing.assert_array_equal(adata.X.toarray()[0], [0, 1, 2, 3])
    cells = pd.read_csv(STUBS / "Xenium_small" / "cells.csv.gz")
    np.testing.assert_allclose(adata.obsm["spatial"], cells[["x_centroid", "y_centroid"]].to_numpy())
    assert adata.uns["pyrospatial_io"]["microns_per_unit"] == 1.0
    assert "cell_area" in adata.obs


@needs_stubs
def test_read_10x_h5_falls_back_when_scanpy_rejects_float_indices():
    import scanpy as sc

    path = STUBS / "Xenium_small" / "cell_feature_matrix.h5"
    with pytest.raises(TypeError):
        sc.read_10x_h5(path)  # the reason for the hand-written fallback
    adata = pio.read_10x_h5(path)
    assert adata.shape == (6, 4) and adata.X.sum() == 21
    assert adata.uns["pyrospatial_io"]["has_coordinates"] is False
    assert adata.uns["pyrospatial_io"]["matrix_reader"] == "pyrospatial h5py reader"


def test_xenium_controls_leave_x_and_duplicates_are_made_unique(tmp_path):
    folder = tmp_path / "xenium"
    folder.mkdir()
    counts = sp.csr_matrix(np.array([[1, 0, 2, 5], [0, 3, 1, 0], [4, 4, 0, 1]]))
    _write_10x_h5(folder / "cell_feature_matrix.h5", counts, ["a", "b", "c"], ["g1", "g2", "g3", "n1"],
                  ["EPCAM", "EPCAM", "KRT5", "NegControlProbe_00042"],
                  ["Gene Expression"] * 3 + ["Negative Control Probe"], float_index=True)
    pd.DataFrame({"cell_id": ["c", "a", "b"], "x_centroid": [30.0, 10.0, 20.0], "y_centroid": [3.0, 1.0, 2.0]}).to_csv(
        folder / "cells.csv.gz", index=False)
    adata = pio.read(folder)
    assert adata.uns["pyrospatial_io"]["platform"] == "xenium"
    assert list(adata.var_names) == ["EPCAM", "EPCAM-1", "KRT5"]
    assert adata.uns["pyrospatial_io"]["var_names_made_unique"] is True
    assert adata.uns["pyrospatial_io"]["duplicated_var_names"] == ["EPCAM"]
    np.testing.assert_array_equal(adata.X.toarray(), counts.toarray()[:, :3])
    assert list(adata.obsm["control_counts"].columns) == ["NegControlProbe_00042"]
    np.testing.assert_array_equal(adata.obsm["control_counts"].to_numpy().ravel(), [5, 0, 1])
    np.testing.assert_allclose(adata.obsm["spatial"], [[10.0, 1.0], [20.0, 2.0], [30.0, 3.0]])
    adata.write_h5ad(tmp_path / "x.h5ad")


@pytest.mark.parametrize(
    "layout, reader",
    [
        ("v3", "scanpy.read_10x_mtx"),  # matrix.mtx.gz, barcodes.tsv.gz, features.tsv.gz
        ("legacy", "scanpy.read_10x_mtx"),  # matrix.mtx, barcodes.tsv, genes.tsv (2 columns)
        ("plain_features", "pyrospatial mtx reader"),  # uncompressed v3 names: scanpy cannot
        ("one_column_genes_gz", "pyrospatial mtx reader"),  # genes.tsv.gz with ids only
    ],
)
def test_xenium_mtx_folder_layouts(tmp_path, layout, reader):
    folder = tmp_path / "xenium"
    mtx = folder / "cell_feature_matrix"
    mtx.mkdir(parents=True)
    counts = np.array([[1, 0, 7], [0, 3, 0]])  # cells x features
    genes, ids = ["CD3E", "MS4A1", "NegControlCodeword_0500"], ["g1", "g2", "n1"]
    types = ["Gene Expression", "Gene Expression", "Negative Control Codeword"]
    gz = layout in ("v3", "one_column_genes_gz")

    def write(name: str, text: str) -> None:
        if name.endswith(".gz"):
            with gzip.open(mtx / name, "wt") as handle:
                handle.write(text)
        else:
            (mtx / name).write_text(text)

    with (gzip.open(mtx / "matrix.mtx.gz", "wb") if gz else open(mtx / "matrix.mtx", "wb")) as handle:
        scipy.io.mmwrite(handle, sp.coo_matrix(counts.T), field="integer")
    write("barcodes.tsv.gz" if gz else "barcodes.tsv", "c1\nc2\n")
    if layout in ("v3", "plain_features"):
        write("features.tsv.gz" if gz else "features.tsv", "".join(f"{i}\t{g}\t{t}\n" for i, g, t in zip(ids, genes, types)))
    elif layout == "legacy":
        write("genes.tsv", "".join(f"{i}\t{g}\n" for i, g in zip(ids, genes)))
    else:
        write("genes.tsv.gz", "".join(f"{i}\n" for i in ids))
    pd.DataFrame({"cell_id": ["c2", "c1"], "x_centroid": [5.0, 1.0], "y_centroid": [6.0, 2.0]}).to_csv(
        folder / "cells.csv", index=False)
    adata = pio.read_xenium(folder)
    assert adata.uns["pyrospatial_io"]["matrix_reader"] == reader
    assert list(adata.obs_names) == ["c1", "c2"]
    np.testing.assert_allclose(adata.obsm["spatial"], [[1.0, 2.0], [5.0, 6.0]])
    if layout in ("v3", "plain_features"):  # feature types known: the codeword leaves X
        assert list(adata.var_names) == genes[:2]
        np.testing.assert_array_equal(adata.X.toarray(), counts[:, :2])
        np.testing.assert_array_equal(adata.obsm["control_counts"].to_numpy().ravel(), [7, 0])
    else:  # no feature types in a Cell Ranger 2 gene list: every feature is kept
        expected_names = genes if layout == "legacy" else ids
        assert list(adata.var_names) == expected_names
        np.testing.assert_array_equal(adata.X.toarray(), counts)


def test_visium_parquet_positions_need_a_parquet_engine(tmp_path):
    try:
        import pyarrow  # noqa: F401
        pytest.skip("pyarrow is installed: parquet positions are read (nothing to report)")
    except ImportError:
        pass
    outs = tmp_path / "outs"
    (outs / "spatial").mkdir(parents=True)
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps({"spot_diameter_fullres": 90.0}))
    (outs / "spatial" / "tissue_positions.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(pio.MissingDependencyError, match="tissue_positions.parquet.*pip install pyarrow"):
        pio.read_visium(outs)


@needs_stubs
@pytest.mark.parametrize(
    "case, error, words",
    [
        ("no_cells", InputError, ["cells.csv.gz"]),
        ("no_matrix", InputError, ["cell_feature_matrix.h5"]),
        ("truncated_h5", InputError, ["cell_feature_matrix.h5", "HDF5"]),
        ("missing_column", InputError, ["x_centroid", "cells.csv.gz"]),
        ("cell_not_in_table", CoordinateError, ["cells.csv.gz", "not in"]),
    ],
)
def test_xenium_malformed_folder_gives_a_clear_error(tmp_path, case, error, words):
    folder = _link_tree(STUBS / "Xenium_small", tmp_path / "xenium")
    cells = pd.read_csv(folder / "cells.csv.gz")
    if case == "no_cells":
        (folder / "cells.csv.gz").unlink()
    elif case == "no_matrix":
        (folder / "cell_feature_matrix.h5").unlink()
    elif case == "truncated_h5":
        data = (folder / "cell_feature_matrix.h5").read_bytes()
        (folder / "cell_feature_matrix.h5").write_bytes(data[:2000])
    elif case == "missing_column":
        cells.drop(columns=["x_centroid"]).to_csv(folder / "cells.csv.gz", index=False)
    elif case == "cell_not_in_table":
        cells.iloc[1:].to_csv(folder / "cells.csv.gz", index=False)
    with pytest.raises(error) as info:
        pio.read_xenium(folder)
    for word in words:
        assert word in str(info.value)


# ------------------------------------------------------------------------------------------
# CosMx
# ------------------------------------------------------------------------------------------
@needs_stubs
def test_cosmx_stub_reads_counts_and_converts_pixels_to_microns():
    folder = STUBS / "CosMx_small"
    adata = pio.read_cosmx(folder)
    expr = pd.read_csv(folder / "lung_p9s1_exprMat_file.csv")
    meta = pd.read_csv(folder / "lung_p9s1_metadata_file.csv")
    assert adata.shape == (9, 8)
    assert list(adata.var_names) == list(expr.columns[2:])
    assert list(adata.obs_names) == [f"10_{i}" for i in range(1, 10)]
    assert adata.X.sum() == expr.iloc[:, 2:].to_numpy().sum() == 7
    assert adata.uns["pyrospatial_io"]["microns_per_unit"] == pytest.approx(0.12028)
    np.testing.assert_allclose(adata.obsm["spatial"], meta[["CenterX_global_px", "CenterY_global_px"]] * 0.12028)
    # cells 1 and 2 of FOV 10 are 286 px apart in x: ~34.4 um, a plausible cell-to-cell distance
    assert adata.obsm["spatial"][1, 0] - adata.obsm["spatial"][0, 0] == pytest.approx(286 * 0.12028)
    assert "CenterX_local_px" in adata.obs


@needs_stubs
def test_cosmx_negative_probes_background_and_pixel_size_parameter(tmp_path):
    folder = _link_tree(STUBS / "CosMx_small", tmp_path / "cosmx")
    expr = pd.read_csv(folder / "lung_p9s1_exprMat_file.csv")
    expr["NegPrb1"] = 1
    background = expr.iloc[[0]].copy()
    background["cell_ID"] = 0  # transcripts outside cells
    background.iloc[0, 2:] = 50
    pd.concat([background, expr]).to_csv(folder / "lung_p9s1_exprMat_file.csv", index=False)
    adata = pio.read(folder, microns_per_pixel=0.18)
    assert adata.uns["pyrospatial_io"]["platform"] == "cosmx"
    assert adata.n_obs == 9 and "NegPrb1" not in adata.var_names
    assert adata.X.sum() == 7
    assert adata.obsm["control_counts"]["NegPrb1"].sum() == 9
    meta = pd.read_csv(folder / "lung_p9s1_metadata_file.csv")
    np.testing.assert_allclose(adata.obsm["spatial"][:, 1], meta["CenterY_global_px"] * 0.18)


@needs_stubs
@pytest.mark.parametrize(
    "case, error, words",
    [
        ("no_metadata", InputError, ["metadata_file"]),
        ("no_global_px", InputError, ["CenterX_global_px", "lung_p9s1_metadata_file.csv"]),
        ("no_cell_id", InputError, ["cell_ID", "lung_p9s1_exprMat_file.csv"]),
        ("cell_missing", CoordinateError, ["not in", "lung_p9s1_metadata_file.csv"]),
        ("text_counts", InputError, ["ACE", "non-numeric"]),
        ("negative_counts", CountsError, ["negative"]),
    ],
)
def test_cosmx_malformed_folder_gives_a_clear_error(tmp_path, case, error, words):
    folder = _link_tree(STUBS / "CosMx_small", tmp_path / "cosmx")
    expr_path, meta_path = folder / "lung_p9s1_exprMat_file.csv", folder / "lung_p9s1_metadata_file.csv"
    expr, meta = pd.read_csv(expr_path), pd.read_csv(meta_path)
    if case == "no_metadata":
        meta_path.unlink()
    elif case == "no_global_px":
        meta.drop(columns=["CenterX_global_px"]).to_csv(meta_path, index=False)
    elif case == "no_cell_id":
        expr.drop(columns=["cell_ID"]).to_csv(expr_path, index=False)
    elif case == "cell_missing":
        meta.iloc[:-1].to_csv(meta_path, index=False)
    elif case == "text_counts":
        expr["ACE"] = expr["ACE"].astype(str).replace("1", "one")
        expr.to_csv(expr_path, index=False)
    elif case == "negative_counts":
        expr.loc[0, "ACE"] = -3
        expr.to_csv(expr_path, index=False)
    with pytest.raises(error) as info:
        pio.read_cosmx(folder)
    for word in words:
        assert word in str(info.value)


# ------------------------------------------------------------------------------------------
# MERSCOPE
# ------------------------------------------------------------------------------------------
@needs_stubs
def test_merscope_stub_aligns_metadata_by_cell_id():
    folder = STUBS / "MERSCOPE_small"
    adata = pio.read_merscope(folder)
    counts = pd.read_csv(folder / "ovarian_p2s2_cell_by_gene.csv", index_col=0)
    meta = pd.read_csv(folder / "ovarian_p2s2_cell_metadata.csv", index_col=0)
    assert adata.shape == (8, 9)
    assert list(adata.var_names) == list(counts.columns)
    assert list(adata.obs_names) == [str(i) for i in counts.index]  # 88869 is last here, first in the metadata
    expected = meta.loc[counts.index, ["center_x", "center_y"]].to_numpy()
    np.testing.assert_allclose(adata.obsm["spatial"], expected)
    assert adata.obsm["spatial"][-1, 0] == pytest.approx(12501.3060081969)
    assert adata.X.sum() == counts.to_numpy().sum()
    assert adata.uns["pyrospatial_io"]["microns_per_unit"] == 1.0


@needs_stubs
def test_merscope_blanks_go_to_control_counts(tmp_path):
    folder = _link_tree(STUBS / "MERSCOPE_small", tmp_path / "merscope")
    counts = pd.read_csv(folder / "ovarian_p2s2_cell_by_gene.csv", index_col=0)
    counts.iloc[:, 0] = np.arange(8)
    counts["Blank-1"] = 2
    counts.to_csv(folder / "ovarian_p2s2_cell_by_gene.csv")
    adata = pio.read(folder)
    assert adata.uns["pyrospatial_io"]["platform"] == "merscope"
    assert "Blank-1" not in adata.var_names and adata.n_vars == 9
    assert adata.X.sum() == 28
    assert adata.obsm["control_counts"]["Blank-1"].sum() == 16


@needs_stubs
@pytest.mark.parametrize(
    "case, error, words",
    [
        ("no_counts", InputError, ["cell_by_gene"]),
        ("no_center", InputError, ["center_x", "ovarian_p2s2_cell_metadata.csv"]),
        ("empty_metadata", InputError, ["ovarian_p2s2_cell_metadata.csv"]),
        ("fractional", CountsError, ["whole numbers"]),
        ("header_only", InputError, ["cell_by_gene", "no rows"]),
    ],
)
def test_merscope_malformed_folder_gives_a_clear_error(tmp_path, case, error, words):
    folder = _link_tree(STUBS / "MERSCOPE_small", tmp_path / "merscope")
    counts_path, meta_path = folder / "ovarian_p2s2_cell_by_gene.csv", folder / "ovarian_p2s2_cell_metadata.csv"
    if case == "no_counts":
        counts_path.unlink()
    elif case == "no_center":
        pd.read_csv(meta_path, index_col=0).drop(columns=["center_x"]).to_csv(meta_path)
    elif case == "empty_metadata":
        meta_path.write_text("")
    elif case == "header_only":
        counts_path.write_text(counts_path.read_text().splitlines()[0] + "\n")
    elif case == "fractional":
        counts = pd.read_csv(counts_path, index_col=0).astype(float)
        counts.iloc[0, 0] = 0.5
        counts.to_csv(counts_path)
    with pytest.raises(error) as info:
        pio.read_merscope(folder)
    for word in words:
        assert word in str(info.value)


# ------------------------------------------------------------------------------------------
# 10x .h5, h5ad, SpatialData and the dispatcher
# ------------------------------------------------------------------------------------------
def test_read_10x_h5_rejects_non_10x_and_corrupt_files(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as handle:
        handle["x"] = np.arange(3)
    with pytest.raises(InputError, match="not a 10x feature-barcode matrix"):
        pio.read_10x_h5(other)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(InputError, match="junk.h5.*HDF5"):
        pio.read_10x_h5(junk)
    with pytest.raises(InputError, match="does not exist"):
        pio.read_10x_h5(tmp_path / "absent.h5")


def test_read_10x_h5_shape_mismatch_is_named(tmp_path):
    path = tmp_path / "bad.h5"
    _write_10x_h5(path, sp.csr_matrix(np.eye(3)), ["a", "b", "c"], ["g1", "g2", "g3"], ["A", "B", "C"],
                  ["Gene Expression"] * 3, float_index=True)
    with h5py.File(path, "a") as handle:
        del handle["matrix/shape"]
        handle["matrix/shape"] = np.array([3.0, 4.0])
    with pytest.raises(InputError, match="shape mismatch"):
        pio.read_10x_h5(path)


def test_read_10x_h5_empty_matrix_is_named(tmp_path):
    path = tmp_path / "empty.h5"
    _write_10x_h5(path, sp.csr_matrix((0, 2)), [], ["g1", "g2"], ["A", "B"], ["Gene Expression"] * 2)
    with pytest.raises(InputError, match="empty.h5.*empty matrix"):
        pio.read_10x_h5(path)


def test_read_spatialdata_without_the_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "spatialdata", None)  # makes `import spatialdata` fail
    with pytest.raises(pio.MissingDependencyError, match=r"pip install 'pyrospatial\[io\]'"):
        pio.read_spatialdata(tmp_path / "sample.zarr")
    assert issubclass(pio.MissingDependencyError, InputError)


def test_read_spatialdata_takes_the_table_through_the_package(tmp_path, monkeypatch):
    import types

    import anndata

    table = anndata.AnnData(X=sp.csr_matrix(np.array([[1.0, 0.0], [2.0, 3.0]])))
    table.obsm["spatial"] = np.array([[10.0, 20.0], [30.0, 40.0]])
    store = tmp_path / "sample.zarr"
    store.mkdir()
    fake = types.ModuleType("spatialdata")
    fake.read_zarr = lambda path: types.SimpleNamespace(tables={"cells": table})
    monkeypatch.setitem(sys.modules, "spatialdata", fake)
    assert pio.detect_format(store) == "spatialdata"
    adata = pio.read(store, table="cells", microns_per_unit=0.5)
    np.testing.assert_allclose(adata.obsm["spatial"], [[5.0, 10.0], [15.0, 20.0]])
    assert adata.uns["pyrospatial_io"]["table"] == "cells"
    with pytest.raises(InputError, match=r"no table 'table'.*\['cells'\]"):
        pio.read_spatialdata(store)


@needs_stubs
def test_read_detects_formats_and_explains_ambiguity(tmp_path):
    assert pio.detect_format(STUBS / "Xenium_small") == "xenium"
    assert pio.detect_format(STUBS / "CosMx_small") == "cosmx"
    assert pio.detect_format(STUBS / "MERSCOPE_small") == "merscope"
    assert pio.detect_format(STUBS / "Xenium_small" / "cell_feature_matrix.h5") == "10x_h5"
    both = tmp_path / "both"
    _link_tree(STUBS / "CosMx_small", both)
    for path in (STUBS / "MERSCOPE_small").iterdir():
        shutil.copy(path, both / path.name)
    with pytest.raises(InputError, match="several formats.*cosmx, merscope"):
        pio.read(both)
    with pytest.raises(InputError, match="cannot tell the format.*visium, xenium, cosmx, merscope, 10x_h5"):
        pio.read(STUBS / "STARmapPLUS_small")
    with pytest.raises(InputError, match="unknown format 'slide-seq'"):
        pio.read(STUBS / "Xenium_small", format="slide-seq")
    with pytest.raises(InputError, match="does not exist"):
        pio.read(tmp_path / "nowhere")
    with pytest.raises(InputError, match="cannot read .*h5ad"):
        (tmp_path / "broken.h5ad").write_bytes(b"nope")
        pio.read(tmp_path / "broken.h5ad")
    assert pio.read(STUBS / "Xenium_small", format="xenium").n_obs == 6
