"""10x Genomics feature-barcode matrices: the ``.h5`` file and the Matrix Market folder.

Both readers return *all* features with ``var['gene_ids']`` and ``var['feature_types']``
(callers keep the genes and split off the controls); :func:`read_10x_h5` is the public,
validated entry point for a bare ``.h5`` file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp
from anndata import AnnData

from pyrospatial.io._common import (
    CONTROL_KEY,
    MATRIX_READER_KEY,
    PathLike,
    ReaderError,
    finalise,
    find_first,
    split_controls,
)

__all__ = ["GENE_EXPRESSION", "read_10x_h5", "read_10x_h5_features", "read_10x_mtx_features"]

GENE_EXPRESSION = "Gene Expression"


# ------------------------------------------------------------------------------------------
# .h5
# ------------------------------------------------------------------------------------------
def _h5_matrix_group(handle: h5py.File, path: Path) -> h5py.Group:
    """The group holding the matrix: ``/matrix`` (Cell Ranger >= 3) or the one genome group (v2)."""
    if "matrix" in handle:
        return handle["matrix"]
    groups = [key for key in handle if isinstance(handle[key], h5py.Group)]
    if len(groups) == 1 and "data" in handle[groups[0]]:
        return handle[groups[0]]
    raise ReaderError(
        f"{str(path)!r} is HDF5 but not a 10x feature-barcode matrix: expected a '/matrix' group "
        f"(with data, indices, indptr, shape, barcodes, features), found {sorted(handle.keys())}."
    )


def _decode(values: np.ndarray) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


def _whole(values: np.ndarray, name: str, path: Path) -> np.ndarray:
    """Integer copy of an index array that may be stored as float64; error if not whole."""
    values = np.asarray(values)
    if values.dtype.kind == "f" and (not np.all(np.isfinite(values)) or not np.all(values == np.rint(values))):
        raise ReaderError(f"{str(path)!r}: matrix/{name} holds non-integer values; the file is corrupt.")
    return values.astype(np.int64)


def _read_h5_by_hand(path: Path) -> AnnData:
    """Read a 10x ``.h5`` with h5py, accepting index arrays stored as float64.

    scanpy's ``read_10x_h5`` passes ``shape``/``indices``/``indptr`` straight to scipy, which
    rejects float64 (``'numpy.float64' object cannot be interpreted as an integer``); files
    written by some converters (e.g. the Xenium stub's ``cell_feature_matrix.h5`` made by R's
    DropletUtils) store them so. This reader checks they are whole numbers and casts them.
    """
    try:
        with h5py.File(path, "r") as handle:
            group = _h5_matrix_group(handle, path)
            missing = [k for k in ("data", "indices", "indptr", "shape", "barcodes") if k not in group]
            if missing:
                raise ReaderError(f"{str(path)!r}: the matrix group lacks {missing}; the file is incomplete.")
            data = group["data"][()]
            indices = _whole(group["indices"][()], "indices", path)
            indptr = _whole(group["indptr"][()], "indptr", path)
            n_features, n_barcodes = (int(v) for v in _whole(group["shape"][()], "shape", path)[:2])
            barcodes = _decode(group["barcodes"][()])
            if "features" in group:
                features = group["features"]
                ids = _decode(features["id"][()])
                names = _decode(features["name"][()]) if "name" in features else ids
                types = (_decode(features["feature_type"][()]) if "feature_type" in features
                         else np.array([GENE_EXPRESSION] * len(ids), dtype=object))
            elif "genes" in group:  # Cell Ranger 2
                ids = _decode(group["genes"][()])
                names = _decode(group["gene_names"][()]) if "gene_names" in group else ids
                types = np.array([GENE_EXPRESSION] * len(ids), dtype=object)
            else:
                raise ReaderError(f"{str(path)!r}: the matrix group has neither 'features' nor 'genes'.")
    except OSError as err:
        raise ReaderError(f"cannot read {str(path)!r} as HDF5 (truncated or corrupt file?): {err}") from err
    except KeyError as err:
        raise ReaderError(f"{str(path)!r}: a 10x matrix dataset is missing ({err}).") from err

    if len(barcodes) != n_barcodes or len(ids) != n_features:
        raise ReaderError(
            f"{str(path)!r}: shape says {n_features} features x {n_barcodes} barcodes but the file lists "
            f"{len(ids)} features and {len(barcodes)} barcodes (shape mismatch)."
        )
    if len(indptr) != n_barcodes + 1 or indptr[-1] != len(data) or len(indices) != len(data):
        raise ReaderError(
            f"{str(path)!r}: indptr/indices/data lengths ({len(indptr)}, {len(indices)}, {len(data)}) do not fit "
            f"{n_barcodes} barcodes (shape mismatch); the file is corrupt."
        )
    if len(indices) and (indices.min() < 0 or indices.max() >= n_features):
        raise ReaderError(f"{str(path)!r}: feature indices fall outside 0..{n_features - 1}; the file is corrupt.")
    # stored column-compressed as features x barcodes == row-compressed barcodes x features
    matrix = sp.csr_matrix((data, indices, indptr), shape=(n_barcodes, n_features))
    var = pd.DataFrame({"gene_ids": ids, "feature_types": types}, index=pd.Index(names, dtype=object))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # duplicated names: finalise makes them unique
        return AnnData(X=matrix, obs=pd.DataFrame(index=pd.Index(barcodes, dtype=object)), var=var)


def read_10x_h5_features(path: PathLike) -> tuple[AnnData, dict]:
    """Every feature of a 10x ``.h5`` (genes and controls) plus the file's attributes.

    Tries ``scanpy.read_10x_h5`` first (the maintained reader) and falls back to
    :func:`_read_h5_by_hand` when scanpy rejects the file's layout (float64 index arrays).
    A file that is not HDF5 at all, or lacks the 10x layout, raises :class:`ReaderError`.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ReaderError(f"10x matrix file {str(path)!r} does not exist.")
    try:
        with h5py.File(path, "r") as handle:
            _h5_matrix_group(handle, path)
            attrs = {key: (value.decode() if isinstance(value, bytes) else value) for key, value in handle.attrs.items()}
    except OSError as err:
        raise ReaderError(f"cannot read {str(path)!r} as HDF5 (truncated or corrupt file?): {err}") from err

    import scanpy as sc

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adata = sc.read_10x_h5(path, gex_only=False)
        adata.uns[MATRIX_READER_KEY] = "scanpy.read_10x_h5"
    except Exception:  # noqa: BLE001 - any scanpy failure: our own reader gives the precise error
        adata = _read_h5_by_hand(path)
        adata.uns[MATRIX_READER_KEY] = "pyrospatial h5py reader"
    if "feature_types" not in adata.var:
        adata.var["feature_types"] = GENE_EXPRESSION
    if "gene_ids" not in adata.var:
        adata.var["gene_ids"] = adata.var_names.astype(str)
    return adata, attrs


def read_10x_h5(path: PathLike, *, gex_only: bool = True) -> AnnData:
    """Read a 10x Genomics feature-barcode matrix ``.h5`` (Cell Ranger, Space Ranger, Xenium).

    Uses ``scanpy.read_10x_h5`` when it can read the file; files whose ``shape``/``indices``/
    ``indptr`` are stored as float64 (scanpy fails on them with ``'numpy.float64' object cannot
    be interpreted as an integer``) are read by a hand-written h5py reader that checks the
    values are whole numbers first.

    The matrix carries no coordinates, so ``obsm['spatial']`` is filled with zeros and
    ``uns['pyrospatial_io']['has_coordinates']`` is False: use :func:`read_visium` or
    :func:`read_xenium` on the whole output folder to get positions.

    Parameters
    ----------
    path
        The ``.h5`` file.
    gex_only
        Keep only ``Gene Expression`` features in ``X`` (default). The other features (antibody
        capture, negative-control probes/codewords...) go to ``obsm['control_counts']``.
        False keeps every feature in ``X``.

    Returns
    -------
    AnnData
        Barcodes x features, raw counts as CSR float32, ``var`` with ``gene_ids`` and
        ``feature_types``, and ``uns['pyrospatial_io']``.
    """
    adata, attrs = read_10x_h5_features(path)
    if gex_only:
        adata = split_controls(adata, adata.var["feature_types"].to_numpy() != GENE_EXPRESSION, str(path))
    adata.obsm["spatial"] = np.zeros((adata.n_obs, 2))
    extra = {"has_coordinates": False, "control_key": CONTROL_KEY if CONTROL_KEY in adata.obsm else ""}
    for key in ("library_ids", "chemistry_description", "software_version"):
        if key in attrs:
            value = attrs[key]
            extra[f"h5_{key}"] = str(value[0] if isinstance(value, np.ndarray) and value.size else value)
    return finalise(adata, platform="10x_h5", source=path, reader="pyrospatial.io.read_10x_h5",
                    microns_per_unit=1.0, coordinate_unit="none", extra=extra)


# ------------------------------------------------------------------------------------------
# Matrix Market folder
# ------------------------------------------------------------------------------------------
def read_10x_mtx_features(folder: PathLike) -> AnnData:
    """Every feature of a 10x Matrix Market folder (``matrix.mtx``, barcodes, features/genes).

    Uses ``scanpy.read_10x_mtx`` for the two layouts it knows (Cell Ranger >= 3: all three
    files gzipped with ``features.tsv.gz``; Cell Ranger 2: uncompressed with a two-column
    ``genes.tsv``). Any other mix (e.g. ``genes.tsv.gz``, an uncompressed ``features.tsv``, or
    a one-column gene list) is read by hand with ``scipy.io.mmread``, which scanpy does not do.
    The matrix file is genes x barcodes as 10x writes it; the result is barcodes x genes.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ReaderError(f"10x matrix folder {str(folder)!r} does not exist or is not a folder.")
    matrix_path = find_first(folder, ["matrix.mtx.gz", "matrix.mtx"], "10x matrix file")
    barcodes_path = find_first(folder, ["barcodes.tsv.gz", "barcodes.tsv"], "10x barcodes file")
    features_path = find_first(
        folder, ["features.tsv.gz", "features.tsv", "genes.tsv", "genes.tsv.gz"], "10x features/genes file"
    )
    names = {matrix_path.name, barcodes_path.name, features_path.name}
    v3 = names == {"matrix.mtx.gz", "barcodes.tsv.gz", "features.tsv.gz"}
    legacy = names == {"matrix.mtx", "barcodes.tsv", "genes.tsv"}
    features = _read_tsv(features_path, "10x features/genes file")
    if v3 or (legacy and features.shape[1] >= 2):
        import scanpy as sc

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                adata = sc.read_10x_mtx(folder, var_names="gene_symbols", make_unique=False, gex_only=False)
        except Exception:  # noqa: BLE001 - fall back to the reader that names the problem
            adata = None
        if adata is not None:
            adata.uns[MATRIX_READER_KEY] = "scanpy.read_10x_mtx"
            if "feature_types" not in adata.var:
                adata.var["feature_types"] = GENE_EXPRESSION
            return adata
    adata = _read_mtx_by_hand(matrix_path, barcodes_path, features_path, features)
    adata.uns[MATRIX_READER_KEY] = "pyrospatial mtx reader"
    return adata


def _read_tsv(path: Path, what: str) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, sep="\t", header=None, dtype=str)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as err:
        raise ReaderError(f"cannot read the {what} {str(path)!r}: {err}") from err
    if frame.shape[0] == 0:
        raise ReaderError(f"the {what} {str(path)!r} is empty.")
    return frame


def _read_mtx_by_hand(matrix_path: Path, barcodes_path: Path, features_path: Path, features: pd.DataFrame) -> AnnData:
    try:
        matrix = scipy.io.mmread(matrix_path)
    except (ValueError, OSError, EOFError, IndexError) as err:
        raise ReaderError(f"cannot read the Matrix Market file {str(matrix_path)!r}: {err}") from err
    barcodes = _read_tsv(barcodes_path, "10x barcodes file")[0].to_numpy(dtype=object)
    ids = features[0].to_numpy(dtype=object)
    names = features[1].to_numpy(dtype=object) if features.shape[1] >= 2 else ids
    types = (features[2].to_numpy(dtype=object) if features.shape[1] >= 3
             else np.array([GENE_EXPRESSION] * len(ids), dtype=object))
    if matrix.shape != (len(ids), len(barcodes)):
        raise ReaderError(
            f"{str(matrix_path)!r} is {matrix.shape[0]} x {matrix.shape[1]} but {features_path.name} lists "
            f"{len(ids)} features and {barcodes_path.name} {len(barcodes)} barcodes (expected features x "
            "barcodes; shape mismatch)."
        )
    var = pd.DataFrame({"gene_ids": ids, "feature_types": types}, index=pd.Index(names, dtype=object))
    obs = pd.DataFrame(index=pd.Index(barcodes, dtype=object))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # duplicated names: finalise makes them unique
        return AnnData(X=sp.csr_matrix(matrix.T), obs=obs, var=var)
