"""Readers that delegate to anndata / spatialdata: ``.h5ad`` files and SpatialData zarr stores."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
from anndata import AnnData

from pyrospatial.errors import CoordinateError
from pyrospatial.io._common import (
    IO_UNS_KEY,
    MissingDependencyError,
    PathLike,
    ReaderError,
    finalise,
)

__all__ = ["IO_EXTRA_HINT", "read_h5ad", "read_spatialdata"]

IO_EXTRA_HINT = "pip install 'pyrospatial[io]'"


def read_h5ad(path: PathLike) -> AnnData:
    """Read an ``.h5ad`` file as written (``anndata.read_h5ad``), recording its source.

    The file is returned unchanged (no unit conversion: pyrospatial cannot know the unit of
    ``obsm['spatial']`` in an arbitrary h5ad; pyrospatial's own outputs are in microns) except
    for ``uns['pyrospatial_io']``, added when the file does not hold one already.
    """
    import anndata

    path = Path(path).expanduser()
    if not path.is_file():
        raise ReaderError(f"h5ad file {str(path)!r} does not exist.")
    try:
        adata = anndata.read_h5ad(path)
    except Exception as err:
        raise ReaderError(f"cannot read {str(path)!r} as an .h5ad file (truncated or corrupt?): {err}") from err
    if IO_UNS_KEY not in adata.uns:
        adata.uns[IO_UNS_KEY] = {"platform": "h5ad", "source": str(path), "reader": "pyrospatial.io.read_h5ad"}
    return adata


def _import_spatialdata():
    try:
        return importlib.import_module("spatialdata")
    except ImportError as err:
        raise MissingDependencyError(
            f"reading a SpatialData store needs the optional 'spatialdata' package: {IO_EXTRA_HINT} "
            f"(or pip install spatialdata). Import failed with: {err}"
        ) from err


def read_spatialdata(
    path: PathLike,
    table: str = "table",
    *,
    spatial_key: str = "spatial",
    microns_per_unit: float = 1.0,
) -> AnnData:
    """Read one table of a SpatialData ``.zarr`` store (needs ``pyrospatial[io]``).

    Delegates to ``spatialdata.read_zarr`` (the maintained reader; not a pyrospatial
    dependency because it is heavy: install it with ``pip install 'pyrospatial[io]'``) and
    returns the AnnData table ``table`` with its raw counts validated.

    Units: the table's ``obsm[spatial_key]`` is taken as is and multiplied by
    ``microns_per_unit``; SpatialData coordinate transformations are not applied. Tables
    written by spatialdata-io hold microns for Xenium and MERSCOPE (keep 1.0), full-resolution
    pixels for Visium (pass ``55 / spot_diameter_fullres``) and pixels for CosMx (0.12028).

    Parameters
    ----------
    path
        The ``.zarr`` store.
    table
        Name of the table in ``sdata.tables``.
    spatial_key
        ``obsm`` key of the table's coordinates.
    microns_per_unit
        Microns per coordinate unit.
    """
    spatialdata = _import_spatialdata()
    store = Path(path).expanduser()
    if not store.exists():
        raise ReaderError(f"SpatialData store {str(path)!r} does not exist.")
    if not np.isfinite(microns_per_unit) or microns_per_unit <= 0:
        raise ReaderError(f"microns_per_unit must be a positive number, got {microns_per_unit!r}.")
    try:
        sdata = spatialdata.read_zarr(store)
    except Exception as err:
        raise ReaderError(f"cannot read {str(path)!r} as a SpatialData zarr store: {err}") from err
    tables = getattr(sdata, "tables", None) or {}
    if table not in tables:
        raise ReaderError(
            f"SpatialData store {str(path)!r} has no table {table!r}; its tables are {sorted(tables)}: "
            "pass table=<name>."
        )
    adata = tables[table].copy()
    if spatial_key not in adata.obsm:
        raise CoordinateError(
            f"table {table!r} of {str(path)!r} has no obsm[{spatial_key!r}] (obsm keys: {sorted(adata.obsm.keys())}); "
            "pass spatial_key=<key of the x/y coordinates>."
        )
    coords = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise CoordinateError(
            f"table {table!r} of {str(path)!r}: obsm[{spatial_key!r}] must be (n_obs, 2+), got shape {coords.shape}."
        )
    adata.obsm["spatial"] = coords[:, :2] * float(microns_per_unit)
    return finalise(adata, platform="spatialdata", source=path, reader="pyrospatial.io.read_spatialdata",
                    microns_per_unit=float(microns_per_unit), coordinate_unit=f"obsm[{spatial_key!r}] unit",
                    extra={"table": table})
