"""Readers for the data users have: Visium, Xenium, CosMx, MERSCOPE, 10x ``.h5``, SpatialData.

Every reader returns an AnnData ready for pyrospatial and scanpy:

- ``X``: the platform's raw **gene** counts, CSR float32 holding whole numbers;
- ``obsm['spatial']``: (x, y) in **microns** (Visium full-res pixels are converted with the
  55 um spot diameter; CosMx pixels with 0.12028 um/px; Xenium and MERSCOPE are already microns);
- ``obsm['control_counts']``: the control features removed from ``X`` (negative probes, blank
  codewords), when the platform has any;
- ``uns['pyrospatial_io']``: platform, source path, reader, ``microns_per_unit`` and the files read;
- for Visium, scanpy's ``uns['spatial'][library_id]`` (images + micron scale factors), so that
  ``sc.pl.spatial(adata, color=...)`` works with no extra argument.

Malformed input raises a :class:`pyrospatial.errors.InputError` subclass
(:class:`ReaderError`, :class:`MissingDependencyError`, ``CoordinateError``, ``CountsError``)
naming the file and what was expected.

Example
-------
>>> import pyrospatial.io as pio
>>> adata = pio.read("run1/outs")                 # doctest: +SKIP  (format detected: visium)
>>> adata = pio.read_xenium("xenium_output/")     # doctest: +SKIP
"""

from __future__ import annotations

from pyrospatial.io._common import CONTROL_KEY, MissingDependencyError, ReaderError
from pyrospatial.io.dispatch import FORMATS, detect_format, read
from pyrospatial.io.imaging import (
    COSMX_MICRONS_PER_PIXEL,
    read_cosmx,
    read_merscope,
    read_xenium,
)
from pyrospatial.io.other import read_h5ad, read_spatialdata
from pyrospatial.io.tenx import read_10x_h5
from pyrospatial.io.visium import VISIUM_SPOT_DIAMETER_UM, read_visium

__all__ = [
    "CONTROL_KEY",
    "COSMX_MICRONS_PER_PIXEL",
    "FORMATS",
    "VISIUM_SPOT_DIAMETER_UM",
    "MissingDependencyError",
    "ReaderError",
    "detect_format",
    "read",
    "read_10x_h5",
    "read_cosmx",
    "read_h5ad",
    "read_merscope",
    "read_spatialdata",
    "read_visium",
    "read_xenium",
]
