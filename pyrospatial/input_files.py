"""Reading the CLI's input files with errors that name the file and what was expected.

:func:`read_input_h5ad` reads one ``.h5ad`` for a command and turns every file problem into a
:class:`~pyrospatial.errors.FileInputError`: a missing path, a folder, an empty file, a file
that is not HDF5 (random bytes, a CSV: pointing to ``pyrospatial.io.read``), a 10x Genomics
``.h5`` matrix (pointing to ``pyrospatial.io.read_10x_h5``), and a truncated or corrupt h5ad.
"""

from __future__ import annotations

import os
from pathlib import Path

from pyrospatial.errors import FileInputError

__all__ = ["read_input_h5ad", "sniff_h5ad"]

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_READERS_HINT = ("pyrospatial.io.read(path) detects Visium, Xenium, CosMx, MERSCOPE, 10x and SpatialData "
                 "inputs; save the result with adata.write_h5ad(...) and pass that file")


def sniff_h5ad(path: str | os.PathLike, what: str = "input") -> Path:
    """Check ``path`` looks like an h5ad file before reading it; raise :class:`FileInputError`
    naming ``what`` (e.g. ``"--cells"``), the file and the fix otherwise."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileInputError(f"{what} file {str(path)!r} does not exist: pass the path of an .h5ad file.")
    if path.is_dir():
        raise FileInputError(
            f"{what} {str(path)!r} is a folder, not an .h5ad file; for a platform output folder use "
            f"{_READERS_HINT}."
        )
    size = path.stat().st_size
    if size == 0:
        raise FileInputError(f"{what} file {str(path)!r} is empty (0 bytes): expected an .h5ad file (AnnData).")
    with open(path, "rb") as handle:
        head = handle.read(512)
    if not head.startswith(_HDF5_SIGNATURE):
        text_like = all(32 <= b < 127 or b in (9, 10, 13) for b in head[:256])
        kind = "a text file (e.g. CSV/TSV)" if text_like else "not an HDF5 file (random or corrupt bytes)"
        raise FileInputError(
            f"{what} file {str(path)!r} is {kind}, not an .h5ad file (AnnData, HDF5). For tables or "
            f"platform files use {_READERS_HINT}."
        )
    _reject_10x_h5(path, what)
    return path


def _reject_10x_h5(path: Path, what: str) -> None:
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            keys = set(handle.keys())
            is_10x = "matrix" in keys and "obs" not in keys and "X" not in keys
    except Exception as err:  # truncated or corrupt HDF5
        raise FileInputError(
            f"{what} file {str(path)!r} is a truncated or corrupt HDF5 file ({type(err).__name__}: {err}); "
            "write it again (adata.write_h5ad(...)) or copy it again."
        ) from err
    if is_10x:
        raise FileInputError(
            f"{what} file {str(path)!r} is a 10x Genomics feature-barcode matrix (.h5), not an .h5ad: read it with "
            "pyrospatial.io.read_10x_h5(path) (or pyrospatial.io.read_visium(outs_folder) for Visium, which "
            "adds the spot positions) and save it with adata.write_h5ad(...)."
        )


def read_input_h5ad(path: str | os.PathLike, what: str = "input"):
    """An AnnData read from ``path`` (:func:`anndata.read_h5ad`), or a :class:`FileInputError`
    naming ``what``, the file and what was expected (module docstring)."""
    import anndata

    checked = sniff_h5ad(path, what)
    try:
        return anndata.read_h5ad(checked)
    except Exception as err:
        raise FileInputError(
            f"cannot read {what} file {str(checked)!r} as an .h5ad (AnnData) file: {type(err).__name__}: {err}. "
            "It may be truncated, corrupt or written by another tool; write it again with adata.write_h5ad(...)."
        ) from err
