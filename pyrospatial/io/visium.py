"""10x Visium: a Space Ranger ``outs/`` folder read into AnnData with coordinates in microns.

Written by hand on top of :mod:`pyrospatial.io.tenx` because ``scanpy.read_visium`` (now
deprecated in favour of ``spatialdata-io``) keeps full-resolution pixel coordinates, reads
only ``tissue_positions_list.csv``/``tissue_positions.csv`` and requires the ``.h5`` matrix,
whereas pyrospatial works in microns and users also have mtx folders and parquet positions.

Layout read (Space Ranger 1.x to 3.x)::

    outs/
      filtered_feature_bc_matrix.h5        or  filtered_feature_bc_matrix/ (matrix.mtx.gz, ...)
      raw_feature_bc_matrix.h5|/            (only used with in_tissue_only=False)
      spatial/
        tissue_positions.csv               (Space Ranger >= 2, with a header row)
        tissue_positions_list.csv|.txt     (Space Ranger 1, no header)
        tissue_positions.parquet           (Space Ranger >= 3 / Visium HD bins)
        scalefactors_json.json
        tissue_lowres_image.png, tissue_hires_image.png   (optional)

Units. Positions are full-resolution image pixels (``pxl_row_in_fullres``,
``pxl_col_in_fullres``). The micron scale (``scale="auto"``) is taken, in this order, from

1. ``microns_per_pixel`` in ``scalefactors_json.json`` when Space Ranger wrote it (>= 3, HD);
2. the spot array itself (``scale="array"``): Visium spot centres are 100 um apart on a
   hexagonal grid, i.e. 50 um per ``array_col`` step and 86.6 um per ``array_row`` step, so a
   least-squares fit of pixel positions on (array_col, array_row) gives the pixels per micron
   in any image orientation (the fit is checked: the row/col step ratio must be sqrt(3));
3. ``spot_diameter_fullres`` as a 55 um spot (``scale="spot_diameter"``).

The array is preferred to the spot diameter because Space Ranger versions disagree on what
``spot_diameter_fullres`` spans: on DLPFC 151673 (Space Ranger 1.0) it is 96.4 px while the
spots are 138 px apart, so 55 um per spot diameter would put the centres 78 um apart
instead of 100 um (it corresponds to ~70 um). Both estimates are recorded in
``uns['pyrospatial_io']``. ``obsm['spatial']`` holds (x, y) = (col, row) times the factor.

The scale factors stored in ``uns['spatial'][library_id]['scalefactors']`` are rescaled to map **microns** to image pixels (``tissue_lowres_scalef`` becomes lowres pixels per
micron, ``spot_diameter_fullres`` becomes the spot width in microns: 55, or a Visium HD bin's), so ``sc.pl.spatial(adata, color=...)`` places
spots on the image with no extra argument. The original values are kept in
``uns['pyrospatial_io']['scalefactors_fullres']`` and the pixel coordinates in
``obsm['spatial_fullres_px']``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from pyrospatial.errors import CoordinateError
from pyrospatial.io._common import (
    CONTROL_KEY,
    PathLike,
    ReaderError,
    as_folder,
    finalise,
    read_csv_table,
    require_columns,
    split_controls,
)
from pyrospatial.io.tenx import (
    GENE_EXPRESSION,
    read_10x_h5_features,
    read_10x_mtx_features,
)

__all__ = ["POSITION_COLUMNS", "VISIUM_SPOT_DIAMETER_UM", "read_visium"]

#: Physical diameter of a Visium spot (10x Genomics specification); centres are 100 um apart.
VISIUM_SPOT_DIAMETER_UM = 55.0

POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
#: Looked up in this order; CSV first so that a folder holding both needs no parquet engine.
POSITION_FILES = [
    "tissue_positions.csv",
    "tissue_positions_list.csv",
    "tissue_positions_list.txt",
    "tissue_positions.parquet",
]


def _outs_folder(path: PathLike) -> Path:
    folder = as_folder(path, "Visium")
    if not (folder / "spatial").is_dir() and (folder / "outs" / "spatial").is_dir():
        folder = folder / "outs"
    if not (folder / "spatial").is_dir():
        raise ReaderError(
            f"{str(path)!r} is not a Space Ranger output folder: it has no 'spatial/' subfolder "
            "(expected outs/spatial/ with tissue_positions*.csv and scalefactors_json.json)."
        )
    return folder


def _read_positions(spatial: Path) -> tuple[pd.DataFrame, Path]:
    """Spot positions indexed by barcode, from whichever positions file Space Ranger wrote."""
    for name in POSITION_FILES:
        path = spatial / name
        if path.is_file():
            break
    else:
        raise ReaderError(f"no spot positions in {str(spatial)!r}: expected one of {', '.join(POSITION_FILES)}.")
    if path.suffix == ".parquet":
        frame = read_csv_table(path, "spot positions file")
    else:
        frame = read_csv_table(path, "spot positions file", header=None, dtype=str)
        if str(frame.iloc[0, 0]).strip() == "barcode":  # Space Ranger >= 2 writes a header row
            frame.columns = [str(c).strip() for c in frame.iloc[0]]
            frame = frame.iloc[1:]
        elif frame.shape[1] == len(POSITION_COLUMNS):
            frame.columns = POSITION_COLUMNS
        else:
            raise ReaderError(
                f"the spot positions file {str(path)!r} has {frame.shape[1]} columns and no header; expected "
                f"{len(POSITION_COLUMNS)}: {', '.join(POSITION_COLUMNS)}."
            )
    require_columns(frame, POSITION_COLUMNS, path, "spot positions file")
    frame = frame[POSITION_COLUMNS].copy()
    frame["barcode"] = frame["barcode"].astype(str)
    for column in POSITION_COLUMNS[1:]:
        values = pd.to_numeric(frame[column], errors="coerce")
        if values.isna().any():
            raise ReaderError(
                f"the spot positions file {str(path)!r}: column {column!r} has {int(values.isna().sum())} "
                "non-numeric or empty value(s)."
            )
        frame[column] = values
    frame = frame.set_index("barcode")
    if not frame.index.is_unique:
        raise ReaderError(f"the spot positions file {str(path)!r} lists some barcodes more than once.")
    return frame, path


def _array_microns_per_pixel(positions: pd.DataFrame) -> float | None:
    """Microns per full-res pixel from the Visium grid (100 um pitch), or None if not a clean grid.

    Fits pixel = A @ (array_col, array_row) + b by least squares; one ``array_col`` step is
    50 um and one ``array_row`` step is 50 * sqrt(3) um on the hexagonal Visium array.
    """
    design = np.column_stack([positions["array_col"], positions["array_row"], np.ones(len(positions))])
    pixels = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    if len(positions) < 3 or np.linalg.matrix_rank(design) < 3:
        return None
    coef, *_ = np.linalg.lstsq(design, pixels, rcond=None)
    col_step, row_step = np.linalg.norm(coef[0]), np.linalg.norm(coef[1])
    if col_step <= 0 or not np.isfinite(col_step) or abs(row_step / col_step / np.sqrt(3.0) - 1.0) > 0.1:
        return None
    residual = np.abs(pixels - design @ coef).max()
    if residual > col_step:  # positions off the grid by more than half a spot pitch
        return None
    return 50.0 / col_step


def _read_scalefactors(spatial: Path) -> dict:
    path = spatial / "scalefactors_json.json"
    if not path.is_file():
        raise ReaderError(f"no scale factors in {str(spatial)!r}: expected scalefactors_json.json.")
    try:
        factors = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise ReaderError(f"cannot read {str(path)!r} as JSON: {err}") from err
    if not isinstance(factors, dict):
        raise ReaderError(f"{str(path)!r} must hold a JSON object of scale factors.")
    diameter = factors.get("spot_diameter_fullres")
    if not isinstance(diameter, (int, float)) or not np.isfinite(diameter) or diameter <= 0:
        raise ReaderError(
            f"{str(path)!r}: 'spot_diameter_fullres' must be a positive number (the 55 um spot width in full-res "
            f"pixels), got {diameter!r}; it sets the micron scale."
        )
    return factors


def _read_image(path: Path) -> np.ndarray:
    import matplotlib.image

    try:
        return np.asarray(matplotlib.image.imread(path))
    except (OSError, ValueError, SyntaxError) as err:
        raise ReaderError(f"cannot read the tissue image {str(path)!r}: {err}") from err


def _read_matrix(outs: Path, in_tissue_only: bool) -> tuple[AnnData, dict, Path]:
    kinds = ["filtered", "raw"] if in_tissue_only else ["raw", "filtered"]
    for kind in kinds:
        h5 = outs / f"{kind}_feature_bc_matrix.h5"
        if h5.is_file():
            adata, attrs = read_10x_h5_features(h5)
            return adata, attrs, h5
        folder = outs / f"{kind}_feature_bc_matrix"
        if folder.is_dir():
            return read_10x_mtx_features(folder), {}, folder
    raise ReaderError(
        f"no count matrix in {str(outs)!r}: expected filtered_feature_bc_matrix.h5 or a "
        "filtered_feature_bc_matrix/ folder (matrix.mtx.gz, barcodes.tsv.gz, features.tsv.gz)."
    )


def read_visium(
    path: PathLike,
    *,
    in_tissue_only: bool = True,
    library_id: str | None = None,
    load_images: bool = True,
    scale: Literal["auto", "array", "spot_diameter"] = "auto",
) -> AnnData:
    """Read a Space Ranger ``outs/`` folder (Visium) with spot coordinates in microns.

    Parameters
    ----------
    path
        The ``outs/`` folder (or the run folder that contains ``outs/``).
    in_tissue_only
        Keep only spots over tissue (``in_tissue == 1``; default). False keeps every spot of
        the matrix, reading ``raw_feature_bc_matrix`` when present.
    library_id
        Key under ``uns['spatial']``; default: the ``library_ids`` attribute of the ``.h5``,
        else the name of the run folder (the parent of ``outs/``).
    load_images
        Load ``tissue_lowres_image.png``/``tissue_hires_image.png`` when present.
    scale
        Where the micron scale comes from: ``"auto"`` (``microns_per_pixel`` of the scale
        factors, else the 100 um spot array, else the spot diameter), ``"array"`` or
        ``"spot_diameter"`` (55 um per ``spot_diameter_fullres``); see the module docstring.

    Returns
    -------
    AnnData
        Spots x genes, raw counts (CSR float32); ``obs`` with ``in_tissue``, ``array_row``,
        ``array_col``; ``obsm['spatial']`` (x, y) in microns and ``obsm['spatial_fullres_px']``;
        scanpy's ``uns['spatial'][library_id]`` (images, micron scale factors, metadata); non-gene
        features in ``obsm['control_counts']``; ``uns['pyrospatial_io']``. See the module docstring
        for the units.
    """
    if scale not in ("auto", "array", "spot_diameter"):
        raise ReaderError(f"scale must be 'auto', 'array' or 'spot_diameter', got {scale!r}.")
    outs = _outs_folder(path)
    spatial = outs / "spatial"
    factors = _read_scalefactors(spatial)
    positions, positions_path = _read_positions(spatial)
    adata, attrs, matrix_path = _read_matrix(outs, in_tissue_only)

    barcodes = adata.obs_names.astype(str)
    missing = ~barcodes.isin(positions.index)
    if missing.any():
        raise CoordinateError(
            f"{int(missing.sum())} of {adata.n_obs} barcodes of {str(matrix_path)!r} are not in the positions file "
            f"{str(positions_path)!r} (e.g. {list(barcodes[missing][:3])}); the matrix and spatial/ folder must "
            "come from the same Space Ranger run."
        )
    spots = positions.loc[barcodes]
    if in_tissue_only:
        keep = spots["in_tissue"].to_numpy() == 1
        adata = adata[keep].copy()
        spots = spots.loc[keep]
    adata = split_controls(adata, adata.var["feature_types"].to_numpy() != GENE_EXPRESSION, str(matrix_path))

    by_diameter = VISIUM_SPOT_DIAMETER_UM / float(factors["spot_diameter_fullres"])
    by_array = _array_microns_per_pixel(positions)
    stated = factors.get("microns_per_pixel")
    if scale == "spot_diameter":
        microns_per_pixel, scale_source = by_diameter, "spot_diameter_fullres = 55 um"
    elif scale == "array":
        if by_array is None:
            raise CoordinateError(
                f"{str(positions_path)!r}: cannot derive the micron scale from the spot array (need >= 3 spots on "
                "a regular Visium grid); pass scale='spot_diameter'."
            )
        microns_per_pixel, scale_source = by_array, "spot array (100 um centre to centre)"
    elif isinstance(stated, (int, float)) and np.isfinite(stated) and stated > 0:
        microns_per_pixel, scale_source = float(stated), "scalefactors microns_per_pixel"
    elif by_array is not None:
        microns_per_pixel, scale_source = by_array, "spot array (100 um centre to centre)"
    else:
        microns_per_pixel, scale_source = by_diameter, "spot_diameter_fullres = 55 um"
    # a Visium spot is 55 um; Visium HD bins (scale factors with microns_per_pixel) are as wide as stated
    spot_diameter_um = (float(factors["spot_diameter_fullres"]) * microns_per_pixel
                        if scale_source == "scalefactors microns_per_pixel" else VISIUM_SPOT_DIAMETER_UM)
    pixels = spots[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    adata.obsm["spatial_fullres_px"] = pixels
    adata.obsm["spatial"] = pixels * microns_per_pixel
    for column in ("in_tissue", "array_row", "array_col"):
        adata.obs[column] = spots[column].to_numpy().astype(np.int64)

    if library_id is None:
        ids = attrs.get("library_ids")
        if ids is not None and np.size(ids):
            first = np.atleast_1d(ids)[0]
            library_id = first.decode() if isinstance(first, bytes) else str(first)
        else:
            library_id = outs.parent.name if outs.name == "outs" else outs.name
    images: dict = {}
    if load_images:
        for resolution in ("hires", "lowres"):
            image_path = spatial / f"tissue_{resolution}_image.png"
            if image_path.is_file():
                images[resolution] = _read_image(image_path)
    pixels_per_micron = 1.0 / microns_per_pixel
    micron_factors = {"spot_diameter_fullres": spot_diameter_um}
    for key in ("tissue_lowres_scalef", "tissue_hires_scalef"):
        if isinstance(factors.get(key), (int, float)):
            micron_factors[key] = float(factors[key]) * pixels_per_micron
    if isinstance(factors.get("fiducial_diameter_fullres"), (int, float)):
        micron_factors["fiducial_diameter_fullres"] = float(factors["fiducial_diameter_fullres"]) * microns_per_pixel
    for resolution in images:
        if f"tissue_{resolution}_scalef" not in micron_factors:
            raise ReaderError(
                f"{str(spatial / 'scalefactors_json.json')!r} lacks 'tissue_{resolution}_scalef', needed to place "
                f"spots on tissue_{resolution}_image.png."
            )
    metadata = {"coordinate_unit": "micron", "source_image_path": str(spatial)}
    for key in ("chemistry_description", "software_version"):
        if key in attrs:
            metadata[key] = str(attrs[key])
    adata.uns["spatial"] = {
        library_id: {"images": images, "scalefactors": micron_factors, "metadata": metadata}
    }
    extra = {
        "library_id": library_id,
        "matrix_file": str(matrix_path),
        "positions_file": str(positions_path),
        "in_tissue_only": bool(in_tissue_only),
        "scalefactors_fullres": {k: float(v) for k, v in factors.items() if isinstance(v, (int, float))},
        "spot_diameter_um": spot_diameter_um,
        "scale_source": scale_source,
        "microns_per_pixel_by_spot_diameter": float(by_diameter),
        "microns_per_pixel_by_array": float(by_array) if by_array is not None else float("nan"),
        "control_key": CONTROL_KEY if CONTROL_KEY in adata.obsm else "",
    }
    return finalise(adata, platform="visium", source=path, reader="pyrospatial.io.read_visium",
                    microns_per_unit=microns_per_pixel, coordinate_unit="fullres_pixel", extra=extra)
