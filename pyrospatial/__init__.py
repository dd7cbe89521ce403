"""pyrospatial: probabilistic programming on Pyro for spatial multi-omics.

Data (:class:`SpatialDataset`), one SVI engine for any model/guide pair (:func:`fit`),
coherent posterior draws (:func:`sample_posterior`, :func:`refine_posterior`) with summaries
and AnnData export, simulators with ground truth; methods: CORAL (:mod:`pyrospatial.methods.coral`),
reference-based deconvolution (:func:`deconvolve`), alignment (:func:`align`), model
criticism (:mod:`pyrospatial.criticism`), readers (:mod:`pyrospatial.io`).
Models live in :mod:`pyrospatial.models`, guides in :mod:`pyrospatial.guides`.

Imports are lazy (PEP 562): ``import pyrospatial`` loads neither torch nor pyro; the first
use of a name (``ps.CORAL``, ``ps.fit``, ``ps.io``, ...) imports its subpackage. Pyro's
``module_local_params`` setting is switched on by that first use, by importing
:mod:`pyrospatial.engine`, :mod:`pyrospatial.models` or :mod:`pyrospatial.guides`, and here
when pyro is already imported; see :mod:`pyrospatial._settings` for the rule a custom
``PyroModule`` follows.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

if "pyro" in sys.modules:  # cheap here: pyro is loaded already, so a user's PyroModule sees the setting
    from pyrospatial._settings import (
        use_module_local_params as _use_module_local_params,
    )

    _use_module_local_params()

try:
    __version__ = version("pyrospatial")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

#: subpackages/modules reachable as attributes, imported on first use
_SUBMODULES = {
    "criticism": "pyrospatial.criticism",
    "data": "pyrospatial.data",
    "engine": "pyrospatial.engine",
    "methods": "pyrospatial.methods",
    "io": "pyrospatial.io",
    "image": "pyrospatial.image",
    "metrics": "pyrospatial.criticism.metrics",
    "recalibration": "pyrospatial.criticism.recalibration",
    "datasets": "pyrospatial.data.datasets",
    "sim": "pyrospatial.data.sim",
    "analysis": "pyrospatial.methods.analysis",
    "baselines": "pyrospatial.methods.baselines",
}

#: public name -> module it is defined in, imported on first use
_NAMES = {
    "SpatialDataset": "pyrospatial.data",
    **{name: "pyrospatial.engine" for name in (
        "Batch", "FitResult", "batch_plates", "cell_plate", "export", "fit", "load_checkpoint",
        "refine_posterior", "sample_posterior", "spot_plate", "summarise", "summarise_posterior",
    )},
    **{name: "pyrospatial.methods" for name in (
        "CORAL", "Alignment", "Deconvolution", "align", "align_slices", "deconvolve",
    )},
    **{name: "pyrospatial.methods.domains" for name in ("Domains", "domains")},
    **{name: "pyrospatial.methods.mapping" for name in ("MappingResult", "map_cells")},
}

__all__ = [
    "CORAL",
    "Alignment",
    "Batch",
    "Deconvolution",
    "Domains",
    "FitResult",
    "MappingResult",
    "SpatialDataset",
    "align",
    "align_slices",
    "analysis",
    "baselines",
    "batch_plates",
    "cell_plate",
    "criticism",
    "data",
    "datasets",
    "deconvolve",
    "domains",
    "engine",
    "export",
    "fit",
    "image",
    "io",
    "load_checkpoint",
    "map_cells",
    "methods",
    "metrics",
    "recalibration",
    "refine_posterior",
    "sample_posterior",
    "sim",
    "spot_plate",
    "summarise",
    "summarise_posterior",
]


def __getattr__(name: str) -> Any:
    """Import a subpackage or public name on first use (PEP 562); switches on Pyro's
    ``module_local_params`` first (:mod:`pyrospatial._settings`)."""
    if name in _SUBMODULES:
        target = _SUBMODULES[name]
    elif name in _NAMES:
        target = _NAMES[name]
    else:
        raise AttributeError(f"module 'pyrospatial' has no attribute {name!r}")
    from pyrospatial._settings import use_module_local_params

    use_module_local_params()
    module = importlib.import_module(target)
    value = module if name in _SUBMODULES else getattr(module, name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
