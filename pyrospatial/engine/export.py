"""One export writer: posterior summaries into AnnData (``obs``/``obsm``/``layers``/``uns``) under one key scheme, with one h5ad sanitiser.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pyrospatial.errors import InputError
from pyrospatial.engine.posterior import _numpy

__all__ = ["NONE", "export", "h5ad_safe"]


# ------------------------------------------------------------------------------------------
# export into AnnData
# ------------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    from pyrospatial.engine.infer import versions

    return versions()


#: What :func:`h5ad_safe` writes for ``None`` (h5ad has no null): the string ``"None"``.
NONE = "None"


def h5ad_safe(value: Any) -> Any:
    """``value`` (settings, run records, nested dicts) as types anndata writes to h5ad.

    The one sanitiser of every method's ``uns`` record. Rules: ``None`` becomes the string
    ``"None"`` (:data:`NONE`; h5ad has no null), dict keys become strings (values converted
    recursively), tensors become arrays, arrays of non-numeric dtype become string arrays,
    lists/tuples become arrays (bool, int64, float64 when all entries are numbers; strings
    otherwise; an empty one a float64 array of length 0), numpy scalars stay, and anything
    else becomes its ``str``.
    """
    if value is None:
        return NONE
    if isinstance(value, dict):
        return {str(k): h5ad_safe(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        value = _numpy(value)
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biufc":
            return value
        return value.astype(str)
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str):
        return str(value)  # also str subclasses such as torch.__version__
    if isinstance(value, (np.integer, np.floating)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            return np.zeros(0, dtype=np.float64)
        if all(isinstance(v, (bool, np.bool_)) for v in value):
            return np.asarray(value, dtype=bool)
        if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in value):
            return np.asarray(value, dtype=np.float64 if any(isinstance(v, (float, np.floating)) for v in value) else np.int64)
        return np.asarray([str(v) for v in value], dtype=str)
    return str(value)


def _infer_plate(name: str, first: np.ndarray, n_cells: int | None, n_spots: int | None) -> str:
    if first.ndim == 0:
        return "global"
    lead = first.shape[0]
    is_cells = n_cells is not None and lead == n_cells
    is_spots = n_spots is not None and lead == n_spots
    if is_cells and is_spots:
        raise InputError(
            f"cannot tell whether site '{name}' (leading size {lead}) is per cell or per spot: pass "
            "summaries from summarise/summarise_posterior (they carry .plates) or plates={site: 'cells'|'spots'|'global'}."
        )
    return "cells" if is_cells else "spots" if is_spots else "global"


def export(
    adata_cells,
    adata_spots,
    summaries: dict[str, dict[str, np.ndarray]],
    *,
    settings: dict | None = None,
    prefix: str = "pyrospatial",
    plates: dict[str, str] | None = None,
    locations: dict[str, str] | None = None,
):
    """Write posterior summaries into copies of the cells and spots AnnData objects.

    See the module docstring for the key scheme. ``plates`` overrides/extends
    ``summaries.plates`` (site -> ``"cells"|"spots"|"global"``); without either, a site's plate
    is inferred from its leading size. ``locations`` forces where a local site goes
    (site -> ``"obs"|"obsm"|"layers"``), e.g. ``{"z": "obsm"}`` when a latent dimension happens
    to equal ``n_vars``. Either AnnData may be ``None``. Inputs are not modified.

    The AnnData rows must be in dataset order: a :class:`~pyrospatial.data.dataset.SpatialDataset`
    keeps the cells' order but drops spots without counts or cells; pass
    ``spots[dataset.spot_names]`` then.

    Returns
    -------
    (cells, spots)
        Modified copies (``None`` where the input was ``None``).
    """
    cells = adata_cells.copy() if adata_cells is not None else None
    spots = adata_spots.copy() if adata_spots is not None else None
    known = dict(getattr(summaries, "plates", {}) or {})
    known.update(plates or {})
    targets = {"cells": cells, "spots": spots}
    info = {"cells": {}, "spots": {}}
    globals_: dict[str, dict[str, np.ndarray]] = {}
    for name, stats in summaries.items():
        if not isinstance(stats, dict) or not stats:
            raise InputError(f"summaries['{name}'] must be a dict of statistics (mean, sd, ...).")
        first = np.asarray(next(iter(stats.values())))
        plate = known.get(name) or _infer_plate(
            name, first, None if cells is None else cells.n_obs, None if spots is None else spots.n_obs
        )
        if plate == "global":
            globals_[name] = {stat: np.asarray(v) for stat, v in stats.items()}
            continue
        if plate not in targets:
            raise InputError(f"site '{name}' has plate {plate!r}; expected 'cells', 'spots' or 'global'.")
        adata = targets[plate]
        if adata is None:
            raise InputError(f"site '{name}' is per {plate[:-1]} but adata_{plate} is None.")
        if first.ndim == 0 or first.shape[0] != adata.n_obs:
            raise InputError(
                f"site '{name}' has {first.shape[0] if first.ndim else 0} rows but adata_{plate} has "
                f"{adata.n_obs} observations; export the summaries of the dataset built from these AnnData "
                "(if the dataset dropped spots, pass spots[dataset.spot_names])."
            )
        location = (locations or {}).get(name)
        if location is None:
            if first.ndim == 1:
                location = "obs"
            elif first.ndim == 2 and first.shape[1] == adata.n_vars:
                location = "layers"
            else:
                location = "obsm"
        if location not in ("obs", "obsm", "layers"):
            raise InputError(f"locations['{name}'] must be 'obs', 'obsm' or 'layers', got {location!r}.")
        bad_obs = location == "obs" and first.ndim != 1
        bad_layer = location == "layers" and (first.ndim != 2 or first.shape[1] != adata.n_vars)
        if bad_obs or bad_layer:
            raise InputError(
                f"site '{name}' of per-{plate[:-1]} shape {first.shape[1:]} cannot go to {location} "
                f"(obs needs a scalar per row, layers needs ({adata.n_obs}, {adata.n_vars}))."
            )
        keys = []
        for stat, value in stats.items():
            key = f"{name}_{stat}"
            value = np.asarray(value)
            if location == "obs":
                adata.obs[key] = value
            elif location == "layers":
                adata.layers[key] = value
            else:
                adata.obsm[key] = value.reshape(-1, 1) if value.ndim == 1 else value
            keys.append(key)
        info[plate][name] = {"plate": plate, "location": location, "keys": np.asarray(keys, dtype=str)}
    meta_settings = h5ad_safe(dict(settings or {}))
    for plate, adata in targets.items():
        if adata is None:
            continue
        record = dict(adata.uns.get(prefix, {}))
        record["globals"] = {name: dict(stats) for name, stats in globals_.items()}
        record["sites"] = info[plate]
        record["settings"] = meta_settings
        record["versions"] = _versions()
        adata.uns[prefix] = record
    return cells, spots
