"""Loaders for public spatial data sets given a local path.

The package ships code, not data: every loader reads files the user (or CI) already has.
Tests and benchmarks find them through :func:`shared_data_dir`.
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

__all__ = ["SHARED_DATA_ENV", "OSMFISH_FILENAME", "OSMFISH_PIXEL_SIZE_UM", "shared_data_dir", "load_osmfish"]

#: Environment variable overriding the location of the shared data folder.
SHARED_DATA_ENV = "PYROSPATIAL_SHARED_DATA"

OSMFISH_FILENAME = "osmFISH_SScortex_mouse_all_cells.loom"
#: µm per pixel of the osmFISH coordinates: sqrt(size_um2 / size_pix) = sqrt(0.004225).
OSMFISH_PIXEL_SIZE_UM = 0.065


def shared_data_dir() -> Path | None:
    """Folder of the shared data sets, or None when it is absent.

    ``$PYROSPATIAL_SHARED_DATA`` when set; otherwise ``../shared/data`` relative to the
    repository root (the folder holding the ``pyrospatial`` package in a checkout).

    Returns
    -------
    pathlib.Path or None
        The folder, when it exists.
    """
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        candidate = Path(env).expanduser()
    else:
        repo_root = Path(__file__).resolve().parents[2]  # pyrospatial/data/datasets.py -> repository
        candidate = repo_root.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def _as_str(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind in ("S", "O"):
        return np.array([x.decode() if isinstance(x, bytes) else str(x) for x in a], dtype=object)
    return a.astype(str).astype(object)


def load_osmfish(
    path: str | os.PathLike | None = None, *, drop_duplicates: bool = True
) -> ad.AnnData:
    """Load the osmFISH mouse somatosensory cortex data (Codeluppi et al. 2018).

    Parameters
    ----------
    path
        The loom file ``osmFISH_SScortex_mouse_all_cells.loom`` or a folder containing it.
        ``None`` looks in ``shared_data_dir() / "osmfish_sscortex"``.
    drop_duplicates
        The loom holds 476 of its 4,839 valid cells twice (the same counts in every gene at the
        same position, under a repeated CellID). ``True`` (default) keeps the first record of
        each, leaving 4,363 cells; ``False`` keeps every record (CellIDs made unique). Keeping the
        copies lets a cell and its exact twin fall on both sides of any split (reference and
        spots, atlas and query), which is a leak rather than a measurement.

    Returns
    -------
    anndata.AnnData
        The valid cells (``Valid == 1``; 4,363 without duplicates, 4,839 with) x 33 genes:
        ``.X`` raw molecule counts (float32 holding integers), ``obs["cell_type"]``
        (ClusterName, categorical, 31 types), ``obs["region"]`` (Region, categorical), ``obs["cluster_id"]``,
        ``obs["total_molecules"]``, ``obs["size_um2"]``, ``obsm["spatial"]`` = pixel
        X, Y times 0.065 µm/pixel, obs_names the CellID (made unique),
        ``uns["pyrospatial_dataset"]`` with the source, pixel size and
        ``n_duplicates_dropped``.

    Raises
    ------
    FileNotFoundError
        When the file is not found at ``path``.
    """
    import h5py

    if path is None:
        base = shared_data_dir()
        if base is None:
            raise FileNotFoundError(
                "load_osmfish(path=None) looks in the shared data folder, which was not found; "
                f"set ${SHARED_DATA_ENV} or pass the path of {OSMFISH_FILENAME} (or its folder)"
            )
        path = base / "osmfish_sscortex"
    p = Path(path).expanduser()
    file = p / OSMFISH_FILENAME if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(
            f"osmFISH loom file not found at {str(file)!r}: expected the file {OSMFISH_FILENAME} "
            "or a folder containing it (Codeluppi et al. 2018, Linnarsson-lab release)"
        )

    with h5py.File(file, "r") as f:
        try:
            matrix = f["matrix"][()]                      # genes x cells
            col = f["col_attrs"]
            genes = _as_str(f["row_attrs/Gene"][()])
            cell_id = _as_str(col["CellID"][()])
            cluster = _as_str(col["ClusterName"][()])
            region = _as_str(col["Region"][()])
            valid = np.asarray(col["Valid"][()]).astype(np.int64)
            px = np.stack([col["X"][()], col["Y"][()]], axis=1).astype(np.float64)
            extra = {
                "cluster_id": np.asarray(col["ClusterID"][()]) if "ClusterID" in col else None,
                "total_molecules": np.asarray(col["Total_molecules"][()])
                if "Total_molecules" in col else None,
                "size_um2": np.asarray(col["size_um2"][()]) if "size_um2" in col else None,
            }
        except KeyError as err:
            raise ValueError(f"{str(file)!r} is not the expected osmFISH loom layout: {err}") from err

    keep = valid == 1
    counts = np.asarray(matrix).T
    n_dropped = 0
    if drop_duplicates:
        table = pd.DataFrame(np.hstack([counts, px]).astype(np.float64))
        first = ~table.duplicated(keep="first").to_numpy()
        n_dropped = int((keep & ~first).sum())
        keep &= first
    X = counts[keep].astype(np.float32)
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(cluster[keep]),
            "region": pd.Categorical(region[keep]),
        },
        index=pd.Index(cell_id[keep].astype(str)),
    )
    for key, val in extra.items():
        if val is not None:
            obs[key] = val[keep]
    adata = ad.AnnData(
        X=X,
        obs=obs,
        var=pd.DataFrame(index=pd.Index(genes.astype(str))),
        obsm={"spatial": px[keep] * OSMFISH_PIXEL_SIZE_UM},
        uns={
            "pyrospatial_dataset": {
                "name": "osmfish_sscortex",
                "source": "Codeluppi et al., Nat Methods 15:932 (2018); loom from "
                "github.com/xianglin226/DSSC (data/" + OSMFISH_FILENAME + ")",
                "file": str(file),
                "pixel_size_um": OSMFISH_PIXEL_SIZE_UM,
                "spatial_units": "um",
                "filter": "Valid == 1" + (", duplicated records dropped" if drop_duplicates else ""),
                "n_duplicates_dropped": n_dropped,
            }
        },
    )
    adata.obs_names_make_unique()
    return adata
