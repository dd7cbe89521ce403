"""Shared plumbing of the platform readers: errors, file look-up, table reading, validation.

Every reader ends with :func:`finalise`, which turns whatever the platform files held into
the one shape pyrospatial expects:

- ``X``: raw counts as a ``scipy.sparse.csr_matrix`` of float32 holding whole numbers;
- ``obsm['spatial']``: an ``(n_obs, 2)`` float64 array of x/y in **microns**;
- unique ``obs_names`` and ``var_names`` (duplicated gene names are made unique with
  ``AnnData.var_names_make_unique`` and the originals recorded);
- ``uns['pyrospatial_io']``: where the data came from and how its coordinates were converted
  (``platform``, ``source`` as given, ``reader``, ``microns_per_unit``, ``coordinate_unit``).

Malformed input never surfaces as a raw pandas/h5py traceback: each helper here raises a
:class:`~pyrospatial.errors.InputError` subclass naming the file and what was expected.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from pyrospatial.errors import CoordinateError, CountsError, InputError

__all__ = [
    "CONTROL_KEY",
    "MissingDependencyError",
    "ReaderError",
    "finalise",
    "find_first",
    "find_one_glob",
    "read_csv_table",
    "require_columns",
    "split_controls",
]

#: ``obsm`` key under which every reader stores the counts of control features (negative
#: control probes, blank/unassigned codewords) it removed from ``X``.
CONTROL_KEY = "control_counts"

IO_UNS_KEY = "pyrospatial_io"

#: Temporary ``uns`` key naming the library that parsed the matrix; moved into the record.
MATRIX_READER_KEY = "_pyrospatial_matrix_reader"


class ReaderError(InputError):
    """A platform file is missing, unreadable or not laid out as the platform documents it."""


class MissingDependencyError(InputError):
    """An optional dependency needed by a reader is not installed; the message names the extra."""


PathLike = str | os.PathLike


def as_folder(path: PathLike, platform: str) -> Path:
    """The input as an existing folder, or a :class:`ReaderError` saying what was expected."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ReaderError(f"{platform} input {str(path)!r} does not exist; pass the {platform} output folder.")
    if not folder.is_dir():
        raise ReaderError(f"{platform} input {str(path)!r} is a file; pass the {platform} output folder that holds it.")
    return folder


def find_first(folder: Path, names: Sequence[str], what: str) -> Path:
    """First of ``names`` (relative to ``folder``) that exists, else a :class:`ReaderError`."""
    for name in names:
        candidate = folder / name
        if candidate.exists():
            return candidate
    raise ReaderError(
        f"no {what} found in {str(folder)!r}: expected one of {', '.join(names)}."
    )


def find_one_glob(folder: Path, patterns: Sequence[str], what: str) -> Path:
    """The single file in ``folder`` matching any of ``patterns``; error if none or several."""
    matches = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    if not matches:
        raise ReaderError(
            f"no {what} found in {str(folder)!r}: expected a file named like {' or '.join(patterns)}."
        )
    if len(matches) > 1:
        raise ReaderError(
            f"several {what} files in {str(folder)!r} ({', '.join(p.name for p in matches)}); keep one "
            "sample per folder, or move the others out."
        )
    return matches[0]


def read_csv_table(path: Path, what: str, **kwargs) -> pd.DataFrame:
    """``pandas.read_csv`` (or ``read_parquet`` for ``.parquet``) with errors naming the file."""
    try:
        if path.suffix == ".parquet":
            frame = pd.read_parquet(path)
        else:
            frame = pd.read_csv(path, **kwargs)
    except ImportError as err:  # parquet engine missing
        raise MissingDependencyError(
            f"reading the {what} {str(path)!r} needs a parquet engine: pip install pyarrow "
            f"(pandas said: {err})."
        ) from err
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError, ValueError) as err:
        raise ReaderError(f"cannot read the {what} {str(path)!r} as a table: {err}") from err
    if frame.shape[0] == 0:
        raise ReaderError(f"the {what} {str(path)!r} has a header but no rows.")
    return frame


def require_columns(frame: pd.DataFrame, columns: Iterable[str], path: Path, what: str) -> None:
    """Raise a :class:`ReaderError` naming the missing columns of a table read from ``path``."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ReaderError(
            f"the {what} {str(path)!r} lacks column(s) {missing}; it has {list(frame.columns)[:20]}."
        )


def split_controls(adata: AnnData, is_control: np.ndarray, source: str) -> AnnData:
    """Move the control features out of ``X`` into ``obsm[CONTROL_KEY]`` (a DataFrame).

    The controls (negative probes, blank codewords...) are not genes: keeping them in ``X``
    would add fake genes to every model. Their per-cell counts are kept, as integers, in
    ``obsm['control_counts']`` (columns = the control feature names) for quality control.
    """
    is_control = np.asarray(is_control, dtype=bool)
    if not is_control.any():
        return adata
    if is_control.all():
        raise ReaderError(f"every feature of {source!r} is a control probe/codeword: no gene is left to read.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # duplicated gene names: finalise makes them unique
        controls = adata[:, is_control]
        matrix = controls.X.toarray() if sp.issparse(controls.X) else np.asarray(controls.X)
        table = pd.DataFrame(
            np.rint(matrix).astype(np.int64), index=adata.obs_names.copy(), columns=controls.var_names.astype(str)
        )
        genes = adata[:, ~is_control].copy()
    genes.obsm[CONTROL_KEY] = table
    return genes


def _csr_counts(matrix, source: str) -> sp.csr_matrix:
    """Raw counts as CSR float32, rejecting NaN, negative and non-integer values."""
    csr = sp.csr_matrix(matrix) if not sp.issparse(matrix) else matrix.tocsr()
    values = csr.data
    if values.dtype.kind not in "biuf":
        raise CountsError(f"the counts in {source!r} are not numeric (dtype {values.dtype}).")
    if values.size:
        if not np.all(np.isfinite(values)):
            raise CountsError(f"the counts in {source!r} contain NaN/inf; a raw count matrix must hold whole numbers.")
        if values.min() < 0:
            raise CountsError(f"the counts in {source!r} contain negative values (min {values.min()}); expected raw counts.")
        if not np.all(values == np.rint(values)):
            raise CountsError(
                f"the counts in {source!r} are not whole numbers (e.g. {values[values != np.rint(values)][0]}); "
                "pyrospatial readers expect the platform's raw counts, not normalised values."
            )
        if values.max() > 2**24:
            raise CountsError(f"a count in {source!r} ({values.max()}) is too large to hold exactly as float32.")
    out = sp.csr_matrix(csr, dtype=np.float32)
    out.sort_indices()
    out.eliminate_zeros()
    return out


def finalise(
    adata: AnnData,
    *,
    platform: str,
    source: PathLike,
    reader: str,
    microns_per_unit: float,
    coordinate_unit: str,
    extra: dict | None = None,
) -> AnnData:
    """Validate a freshly read AnnData and record where it came from; see the module docstring.

    Parameters
    ----------
    adata
        Counts in ``X`` and coordinates **already in microns** in ``obsm['spatial']``.
    platform, source, reader
        Recorded in ``uns['pyrospatial_io']``; ``source`` is the path as the user gave it.
    microns_per_unit
        Microns per unit of the platform's native coordinates (1.0 when they are microns).
    coordinate_unit
        Name of the native unit (e.g. ``"fullres_pixel"``, ``"micron"``).
    extra
        Further entries for ``uns['pyrospatial_io']``.
    """
    source_text = str(source)
    if adata.n_obs == 0:
        raise ReaderError(f"{platform} input {source_text!r} holds no cells/spots after reading (empty matrix).")
    if adata.n_vars == 0:
        raise ReaderError(f"{platform} input {source_text!r} holds no gene features (empty matrix).")
    adata.X = _csr_counts(adata.X, source_text)

    coords = np.asarray(adata.obsm.get("spatial", np.empty((0, 0))), dtype=np.float64)
    if coords.shape != (adata.n_obs, 2):
        raise CoordinateError(
            f"{platform} input {source_text!r}: expected one x/y pair per observation, got coordinates of shape "
            f"{coords.shape} for {adata.n_obs} observations."
        )
    if not np.all(np.isfinite(coords)):
        bad = int((~np.isfinite(coords)).any(axis=1).sum())
        raise CoordinateError(f"{platform} input {source_text!r}: {bad} observation(s) have NaN/inf coordinates.")
    adata.obsm["spatial"] = coords

    record: dict = {
        "platform": platform,
        "source": source_text,
        "reader": reader,
        "microns_per_unit": float(microns_per_unit),
        "coordinate_unit": coordinate_unit,
        "spatial_unit": "micron",
    }
    adata.obs_names = adata.obs_names.astype(str)
    if not adata.obs_names.is_unique:
        duplicated = adata.obs_names[adata.obs_names.duplicated()].unique()
        raise ReaderError(
            f"{platform} input {source_text!r} has {len(duplicated)} duplicated cell/spot id(s) "
            f"(e.g. {list(duplicated[:3])}); each barcode/cell id must appear once."
        )
    adata.var_names = adata.var_names.astype(str)
    if not adata.var_names.is_unique:
        duplicated = sorted(set(adata.var_names[adata.var_names.duplicated()]))
        adata.var_names_make_unique()
        record["var_names_made_unique"] = True
        record["duplicated_var_names"] = [str(name) for name in duplicated]
    else:
        record["var_names_made_unique"] = False
    if MATRIX_READER_KEY in adata.uns:
        record["matrix_reader"] = str(adata.uns.pop(MATRIX_READER_KEY))
    if extra:
        record.update(extra)
    adata.uns[IO_UNS_KEY] = record
    return adata
