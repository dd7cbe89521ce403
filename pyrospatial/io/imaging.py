"""Imaging-based platforms (Xenium, CosMx, MERSCOPE): cell x gene tables with cell centroids.

These are written by hand: scanpy has no reader for them, and the maintained ones
(``spatialdata-io``) return SpatialData objects, need a heavy optional install and expect
the full vendor folder (images, transcripts), whereas a cell x gene table plus per-cell
metadata is all pyrospatial models use. Through spatialdata-io, use :func:`read_spatialdata`.

Each reader keeps the platform's **gene** features in ``X`` and moves control features
(negative-control probes, blank / unassigned codewords) to ``obsm['control_counts']``, a
cells x controls integer DataFrame, so that no model mistakes a control for a gene.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from pyrospatial.errors import CoordinateError
from pyrospatial.io._common import (
    CONTROL_KEY,
    PathLike,
    ReaderError,
    as_folder,
    finalise,
    find_one_glob,
    read_csv_table,
    require_columns,
    split_controls,
)
from pyrospatial.io.tenx import (
    GENE_EXPRESSION,
    read_10x_h5_features,
    read_10x_mtx_features,
)

__all__ = ["COSMX_MICRONS_PER_PIXEL", "read_cosmx", "read_merscope", "read_xenium"]

#: CosMx SMI camera pixel size: 0.120280 um per pixel (1 um = 8.31393 px; Bruker/NanoString's
#: documented value for the global ``*_px`` coordinates of the flat-file export).
COSMX_MICRONS_PER_PIXEL = 0.12028

COSMX_CONTROL_PREFIXES = ("NegPrb", "Negative", "SystemControl", "FalseCode")
MERSCOPE_CONTROL_PREFIXES = ("Blank-",)


def _attach_table(adata: AnnData, table: pd.DataFrame, table_path: Path, matrix_source: str) -> AnnData:
    """Join a per-cell table (indexed by cell id) onto ``adata`` by obs name, strictly."""
    table.index = table.index.astype(str)
    if not table.index.is_unique:
        duplicated = table.index[table.index.duplicated()].unique()
        raise ReaderError(f"{str(table_path)!r} lists {len(duplicated)} cell id(s) twice (e.g. {list(duplicated[:3])}).")
    ids = adata.obs_names.astype(str)
    missing = ~ids.isin(table.index)
    if missing.any():
        raise CoordinateError(
            f"{int(missing.sum())} of {adata.n_obs} cells of {matrix_source!r} are not in {str(table_path)!r} "
            f"(e.g. {list(ids[missing][:3])}); both files must come from the same run."
        )
    adata.obs = table.loc[ids].copy()
    adata.obs.index = pd.Index(ids)
    return adata


def _matrix_from_table(counts: pd.DataFrame, path: Path) -> sp.csr_matrix:
    values = counts.apply(pd.to_numeric, errors="coerce")
    if values.isna().to_numpy().any():
        column = values.columns[values.isna().any(axis=0)][0]
        raise ReaderError(f"{str(path)!r}: column {column!r} holds non-numeric or empty counts.")
    return sp.csr_matrix(values.to_numpy(dtype=np.float64))


def _starts_with(names: Sequence[str], prefixes: Sequence[str]) -> np.ndarray:
    return np.array([str(name).startswith(tuple(prefixes)) for name in names], dtype=bool)


# ------------------------------------------------------------------------------------------
# Xenium
# ------------------------------------------------------------------------------------------
def read_xenium(path: PathLike) -> AnnData:
    """Read a 10x Xenium output folder: cell x gene counts with cell centroids in microns.

    Reads ``cell_feature_matrix.h5`` (or the ``cell_feature_matrix/`` mtx folder) with
    :func:`pyrospatial.io.tenx.read_10x_h5_features` and ``cells.csv.gz`` / ``cells.csv`` /
    ``cells.parquet``; ``x_centroid``/``y_centroid`` are already microns (10x documents them
    so), hence ``microns_per_unit = 1``.

    Only ``Gene Expression`` features stay in ``X``; negative-control probes and codewords
    (``Negative Control Probe``, ``Negative Control Codeword``, ``Unassigned Codeword``, ...) go
    to ``obsm['control_counts']``. Every column of the cells table goes to ``obs``.
    """
    folder = as_folder(path, "Xenium")
    h5 = folder / "cell_feature_matrix.h5"
    mtx = folder / "cell_feature_matrix"
    if h5.is_file():
        adata, _ = read_10x_h5_features(h5)
        matrix_source = h5
    elif mtx.is_dir():
        adata, matrix_source = read_10x_mtx_features(mtx), mtx
    else:
        raise ReaderError(
            f"no Xenium count matrix in {str(path)!r}: expected cell_feature_matrix.h5 or a cell_feature_matrix/ folder."
        )
    cells_path = next((folder / n for n in ("cells.csv.gz", "cells.csv", "cells.parquet") if (folder / n).is_file()), None)
    if cells_path is None:
        raise ReaderError(f"no Xenium cell table in {str(path)!r}: expected cells.csv.gz, cells.csv or cells.parquet.")
    cells = read_csv_table(cells_path, "Xenium cell table")
    require_columns(cells, ["cell_id", "x_centroid", "y_centroid"], cells_path, "Xenium cell table")
    cells = cells.drop(columns=[c for c in cells.columns if str(c).startswith("Unnamed:") or str(c) == ""])
    cells["cell_id"] = cells["cell_id"].map(lambda v: v.decode() if isinstance(v, bytes) else str(v))
    cells = cells.set_index("cell_id")
    adata = _attach_table(adata, cells, cells_path, str(matrix_source))
    adata = split_controls(adata, adata.var["feature_types"].to_numpy() != GENE_EXPRESSION, str(matrix_source))
    adata.obsm["spatial"] = _numeric_xy(adata.obs, ("x_centroid", "y_centroid"), cells_path)
    return finalise(adata, platform="xenium", source=path, reader="pyrospatial.io.read_xenium",
                    microns_per_unit=1.0, coordinate_unit="micron",
                    extra={"matrix_file": str(matrix_source), "cells_file": str(cells_path),
                           "control_key": CONTROL_KEY if CONTROL_KEY in adata.obsm else ""})


def _numeric_xy(obs: pd.DataFrame, columns: tuple[str, str], path: Path) -> np.ndarray:
    xy = obs[list(columns)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        raise CoordinateError(
            f"{str(path)!r}: {int(bad.sum())} cell(s) have missing or non-numeric {columns[0]}/{columns[1]} "
            f"(e.g. cell {obs.index[bad][0]!r})."
        )
    return xy


# ------------------------------------------------------------------------------------------
# CosMx
# ------------------------------------------------------------------------------------------
def _column(frame: pd.DataFrame, name: str) -> str | None:
    """The column of ``frame`` equal to ``name`` ignoring case, or None."""
    lower = {str(c).lower(): c for c in frame.columns}
    return lower.get(name.lower())


def _cosmx_ids(frame: pd.DataFrame, path: Path, what: str) -> tuple[pd.Index, pd.DataFrame]:
    fov, cell = _column(frame, "fov"), _column(frame, "cell_ID")
    if fov is None or cell is None:
        raise ReaderError(f"the CosMx {what} {str(path)!r} lacks column(s) 'fov' and/or 'cell_ID'; "
                          f"it has {list(frame.columns)[:12]}.")
    frame = frame.copy()
    for column in (fov, cell):
        numbers = pd.to_numeric(frame[column], errors="coerce")
        if numbers.isna().any():
            raise ReaderError(f"the CosMx {what} {str(path)!r}: column {column!r} must be integers.")
        frame[column] = numbers.astype(np.int64)
    frame = frame[frame[cell] != 0]  # cell_ID 0 = transcripts outside every segmented cell
    ids = pd.Index(frame[fov].astype(str) + "_" + frame[cell].astype(str))
    return ids, frame.rename(columns={fov: "fov", cell: "cell_ID"})


def read_cosmx(
    path: PathLike,
    *,
    microns_per_pixel: float = COSMX_MICRONS_PER_PIXEL,
    control_prefixes: Sequence[str] = COSMX_CONTROL_PREFIXES,
) -> AnnData:
    """Read a CosMx SMI flat-file export: ``*_exprMat_file.csv`` + ``*_metadata_file.csv``.

    Cells are keyed ``"<fov>_<cell_ID>"`` (``cell_ID`` restarts in every FOV); rows with
    ``cell_ID == 0`` (transcripts outside segmented cells) are dropped. Coordinates are the
    slide-global centroids ``CenterX_global_px``/``CenterY_global_px`` times
    ``microns_per_pixel`` (default 0.12028 um/px, the CosMx SMI camera pixel; newer AtoMx exports
    with ``CenterX_global_mm`` are converted with 1000 um/mm instead). FOV-local pixel
    coordinates stay in ``obs`` with every other metadata column.

    Features whose name starts with one of ``control_prefixes`` (``NegPrb``, ``Negative``,
    ``SystemControl``, ``FalseCode``) are controls, moved to ``obsm['control_counts']``. A bare
    ``"Neg"`` prefix is not used because it would also catch real genes (mouse *Negr1*).
    """
    folder = as_folder(path, "CosMx")
    expr_path = find_one_glob(folder, ["*exprMat_file.csv", "*exprMat_file.csv.gz"], "CosMx expression matrix")
    meta_path = find_one_glob(folder, ["*metadata_file.csv", "*metadata_file.csv.gz"], "CosMx cell metadata")
    if not np.isfinite(microns_per_pixel) or microns_per_pixel <= 0:
        raise ReaderError(f"microns_per_pixel must be a positive number, got {microns_per_pixel!r}.")

    expr = read_csv_table(expr_path, "CosMx expression matrix")
    ids, expr = _cosmx_ids(expr, expr_path, "expression matrix")
    genes = [c for c in expr.columns if c not in ("fov", "cell_ID")]
    if not genes:
        raise ReaderError(f"the CosMx expression matrix {str(expr_path)!r} has no gene columns after fov, cell_ID.")
    counts = _matrix_from_table(expr[genes], expr_path)
    adata = AnnData(X=counts, obs=pd.DataFrame(index=ids), var=pd.DataFrame(index=pd.Index(genes, dtype=str)))

    meta = read_csv_table(meta_path, "CosMx cell metadata")
    meta_ids, meta = _cosmx_ids(meta, meta_path, "cell metadata")
    meta.index = meta_ids
    adata = _attach_table(adata, meta, meta_path, str(expr_path))
    if {"CenterX_global_px", "CenterY_global_px"} <= set(meta.columns):
        columns, factor, unit = ("CenterX_global_px", "CenterY_global_px"), float(microns_per_pixel), "cosmx_pixel"
    elif {"CenterX_global_mm", "CenterY_global_mm"} <= set(meta.columns):
        columns, factor, unit = ("CenterX_global_mm", "CenterY_global_mm"), 1000.0, "millimetre"
    else:
        raise ReaderError(
            f"the CosMx cell metadata {str(meta_path)!r} lacks the global centroid columns "
            "CenterX_global_px/CenterY_global_px (or CenterX_global_mm/CenterY_global_mm)."
        )
    adata = split_controls(adata, _starts_with(adata.var_names, control_prefixes), str(expr_path))
    adata.obsm["spatial"] = _numeric_xy(adata.obs, columns, meta_path) * factor
    return finalise(adata, platform="cosmx", source=path, reader="pyrospatial.io.read_cosmx",
                    microns_per_unit=factor, coordinate_unit=unit,
                    extra={"matrix_file": str(expr_path), "metadata_file": str(meta_path),
                           "coordinate_columns": list(columns), "control_prefixes": list(control_prefixes),
                           "control_key": CONTROL_KEY if CONTROL_KEY in adata.obsm else ""})


# ------------------------------------------------------------------------------------------
# MERSCOPE
# ------------------------------------------------------------------------------------------
def read_merscope(path: PathLike, *, control_prefixes: Sequence[str] = MERSCOPE_CONTROL_PREFIXES) -> AnnData:
    """Read a Vizgen MERSCOPE region folder: ``*cell_by_gene.csv`` + ``*cell_metadata.csv``.

    Both tables are indexed by their first column (the cell / EntityID); ``center_x`` and
    ``center_y`` are already microns (MERSCOPE's mosaic micron frame), hence
    ``microns_per_unit = 1``. Features starting with ``Blank-`` are blank codewords, moved to
    ``obsm['control_counts']``; the metadata columns (fov, volume, bounds...) go to ``obs``.
    """
    folder = as_folder(path, "MERSCOPE")
    counts_path = find_one_glob(folder, ["*cell_by_gene.csv", "*cell_by_gene.csv.gz"], "MERSCOPE cell_by_gene table")
    meta_path = find_one_glob(folder, ["*cell_metadata.csv", "*cell_metadata.csv.gz"], "MERSCOPE cell metadata")

    table = read_csv_table(counts_path, "MERSCOPE cell_by_gene table", index_col=0)
    if table.shape[1] == 0:
        raise ReaderError(f"the MERSCOPE cell_by_gene table {str(counts_path)!r} has no gene columns.")
    table.index = table.index.astype(str)
    counts = _matrix_from_table(table, counts_path)
    adata = AnnData(X=counts, obs=pd.DataFrame(index=table.index),
                    var=pd.DataFrame(index=pd.Index(table.columns.astype(str), dtype=str)))
    meta = read_csv_table(meta_path, "MERSCOPE cell metadata", index_col=0)
    require_columns(meta, ["center_x", "center_y"], meta_path, "MERSCOPE cell metadata")
    adata = _attach_table(adata, meta, meta_path, str(counts_path))
    adata = split_controls(adata, _starts_with(adata.var_names, control_prefixes), str(counts_path))
    adata.obsm["spatial"] = _numeric_xy(adata.obs, ("center_x", "center_y"), meta_path)
    return finalise(adata, platform="merscope", source=path, reader="pyrospatial.io.read_merscope",
                    microns_per_unit=1.0, coordinate_unit="micron",
                    extra={"matrix_file": str(counts_path), "metadata_file": str(meta_path),
                           "control_prefixes": list(control_prefixes),
                           "control_key": CONTROL_KEY if CONTROL_KEY in adata.obsm else ""})
