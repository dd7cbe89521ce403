"""``read(path, format="auto")``: one entry point that picks the platform reader."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from anndata import AnnData

from pyrospatial.io._common import PathLike, ReaderError
from pyrospatial.io.imaging import read_cosmx, read_merscope, read_xenium
from pyrospatial.io.other import read_h5ad, read_spatialdata
from pyrospatial.io.tenx import read_10x_h5
from pyrospatial.io.visium import POSITION_FILES, read_visium

__all__ = ["FORMATS", "detect_format", "read"]

#: Format name -> reader. Every reader takes the path as its first argument.
FORMATS: dict[str, Callable[..., AnnData]] = {
    "visium": read_visium,
    "xenium": read_xenium,
    "cosmx": read_cosmx,
    "merscope": read_merscope,
    "10x_h5": read_10x_h5,
    "h5ad": read_h5ad,
    "spatialdata": read_spatialdata,
}


def _is_zarr_store(folder: Path) -> bool:
    return folder.suffix == ".zarr" or (folder / ".zgroup").is_file() or (folder / "zarr.json").is_file()


def _folder_matches(folder: Path) -> list[str]:
    """Every format whose tell-tale files are in ``folder``."""
    matches = []
    if _is_zarr_store(folder):
        matches.append("spatialdata")
    for outs in (folder, folder / "outs"):
        spatial = outs / "spatial"
        if (spatial / "scalefactors_json.json").is_file() or any((spatial / n).is_file() for n in POSITION_FILES):
            matches.append("visium")
            break
    if ((folder / "cell_feature_matrix.h5").is_file() or (folder / "cell_feature_matrix").is_dir()) and any(
        (folder / n).is_file() for n in ("cells.csv.gz", "cells.csv", "cells.parquet")
    ):
        matches.append("xenium")
    if any(folder.glob("*exprMat_file.csv*")):
        matches.append("cosmx")
    if any(folder.glob("*cell_by_gene.csv*")):
        matches.append("merscope")
    return matches


def detect_format(path: PathLike) -> str:
    """Name of the format of ``path`` (a key of :data:`FORMATS`), when it is unambiguous.

    Files: ``.h5ad`` -> ``h5ad``, ``.h5`` -> ``10x_h5``. Folders: ``spatial/scalefactors_json.json``
    or ``spatial/tissue_positions*`` (in the folder or its ``outs/``) -> ``visium``;
    ``cell_feature_matrix`` + ``cells.*`` -> ``xenium``; ``*exprMat_file.csv`` -> ``cosmx``;
    ``*cell_by_gene.csv`` -> ``merscope``; ``*.zarr`` / a zarr group -> ``spatialdata``.

    Raises
    ------
    ReaderError
        The path does not exist, or it matches no format or several (the message lists them
        and says to pass ``format=``).
    """
    target = Path(path).expanduser()
    known = ", ".join(FORMATS)
    if not target.exists():
        raise ReaderError(f"input {str(path)!r} does not exist.")
    if target.is_file():
        suffixes = "".join(target.suffixes[-2:]).lower()
        if target.suffix.lower() == ".h5ad":
            return "h5ad"
        if target.suffix.lower() == ".h5":
            return "10x_h5"
        raise ReaderError(
            f"cannot tell the format of the file {str(path)!r} (suffix {suffixes or 'none'!r}): pass a .h5ad or 10x "
            f".h5 file, or the platform's output folder; or say format= one of: {known}."
        )
    matches = _folder_matches(target)
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ReaderError(
            f"cannot tell the format of the folder {str(path)!r}: it holds none of the files a Space Ranger "
            "(spatial/scalefactors_json.json), Xenium (cell_feature_matrix.h5 + cells.csv.gz), CosMx "
            "(*_exprMat_file.csv), MERSCOPE (*_cell_by_gene.csv) or SpatialData (*.zarr) output has; "
            f"pass format= one of: {known}."
        )
    raise ReaderError(
        f"the folder {str(path)!r} looks like several formats ({', '.join(matches)}); pass format= one of: {known}."
    )


def read(path: PathLike, format: str = "auto", **kwargs) -> AnnData:
    """Read spatial omics data from any supported platform into a validated AnnData.

    Parameters
    ----------
    path
        File or output folder.
    format
        ``"auto"`` (detect with :func:`detect_format`) or one of ``visium``, ``xenium``,
        ``cosmx``, ``merscope``, ``10x_h5``, ``h5ad``, ``spatialdata``.
    **kwargs
        Passed to the reader (e.g. ``in_tissue_only=False`` for Visium, ``table=`` for
        SpatialData).

    Returns
    -------
    AnnData
        Raw counts in ``X``, ``obsm['spatial']`` in microns and ``uns['pyrospatial_io']`` (for
        ``h5ad``, the file as written).
    """
    name = str(format).lower().replace("-", "_")
    if name == "auto":
        name = detect_format(path)
    if name not in FORMATS:
        raise ReaderError(f"unknown format {format!r}; choose 'auto' or one of: {', '.join(FORMATS)}.")
    return FORMATS[name](path, **kwargs)
