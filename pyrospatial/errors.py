"""Exceptions raised by pyrospatial.

Every error names the offending field and says how to fix it, so that bad input
never surfaces as a deep torch traceback.
"""

from __future__ import annotations


class PyrospatialError(Exception):
    """Base class of every error raised on purpose by pyrospatial."""


class InputError(PyrospatialError, ValueError):
    """An input AnnData (or argument) is malformed: missing key, wrong shape, NaN, ..."""


class CountsError(InputError):
    """Spot counts are not raw non-negative integers."""


class CoordinateError(InputError):
    """Spatial coordinates are missing, mis-shaped, or cells and spots do not overlap."""


class AssignmentError(InputError):
    """Cells cannot be assigned to spots (e.g. every cell lies outside every spot)."""


class FitError(PyrospatialError, RuntimeError):
    """Training failed, e.g. the loss became NaN/inf; the message names the step and site."""


class CheckpointError(PyrospatialError):
    """A checkpoint cannot be loaded safely or does not match the model/guide."""


class GeometryError(CoordinateError):
    """Cells and spots (or two sections) look like different units, or the spot layout loses
    cells; the message gives the measured numbers, the likely fix and the override."""


class DuplicateNamesError(InputError):
    """Gene (var) or cell (obs) names are duplicated; the message names the fix."""


class FileInputError(InputError):
    """An input file is missing, empty, truncated, corrupt or of another format than expected."""


class OutputFolderError(PyrospatialError):
    """The output folder cannot be written as asked (exists and is not empty, is a file, ...)."""
