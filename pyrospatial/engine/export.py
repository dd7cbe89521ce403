"""One export writer: posterior summaries into AnnData (``obs``/``obsm``/``layers``/``uns``) under one key scheme, with one h5ad sanitiser.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pyrospatial.engine.posterior import _numpy
from pyrospatial.errors import InputError

__all__ = ["NONE", "add_spatial_graph", "add_spatial_uns", "export", "frames_to_obs", "h5ad_safe", "output_markers"]


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


def output_markers(adata, *, prefix: str = "pyrospatial", limit: int = 4) -> list[str]:
    """The keys of ``adata`` that only an output of :func:`export` (any method's) carries, as
    readable strings (at most ``limit``; empty for an input).

    A marker is ``uns[prefix]`` holding the ``sites`` or ``settings`` record :func:`export`
    writes, or a layer / obsm entry ``{name}_mean`` that comes with ``{name}_sd`` (a posterior
    summary). Commands use it to refuse an output passed back as an input (e.g. CORAL's cells
    output, whose ``X`` holds RNA estimates, given as the protein input).
    """
    found: list[str] = []
    record = adata.uns.get(prefix) if hasattr(adata, "uns") else None
    if isinstance(record, dict) and ("sites" in record or "settings" in record):
        found.append(f"uns[{prefix!r}]")
    for slot in ("layers", "obsm"):
        keys = set(getattr(adata, slot, {}).keys())
        for key in sorted(keys):
            stem = key[: -len("_mean")] if key.endswith("_mean") else None
            if stem and all(f"{stem}_{stat}" in keys for stat in ("mean", "sd")):
                found.append(f"{slot}[{key!r}]")
    return found[:limit]


# ------------------------------------------------------------------------------------------
# scverse conventions: scanpy's uns['spatial'], squidpy's graph keys, per-column obs
# ------------------------------------------------------------------------------------------
#: library id of a ``uns['spatial']`` entry created by :func:`add_spatial_uns`
LIBRARY_ID = "pyrospatial"
#: width in pixels of the blank image of a created library (scanpy needs an image)
BLANK_IMAGE_PIXELS = 200


def _median_spacing(coords: np.ndarray) -> float:
    """Median distance of a point to its nearest neighbour (1.0 for fewer than two points)."""
    from scipy.spatial import cKDTree

    if coords.shape[0] < 2:
        return 1.0
    dist, _ = cKDTree(coords).query(coords, k=2)
    spacing = float(np.median(dist[:, 1]))
    return spacing if np.isfinite(spacing) and spacing > 0 else 1.0


def _blank_image(coords: np.ndarray, scalef: float | None = None) -> tuple[np.ndarray, float]:
    """A white RGB image covering ``coords`` (pixel = coordinate * ``scalef``) and its ``scalef``.

    scanpy (1.11) stops with StopIteration on a library without image, so a blank one stands
    in; ``scalef`` None makes it at most :data:`BLANK_IMAGE_PIXELS` wide.
    """
    finite = coords[np.isfinite(coords).all(1)] if coords.size else coords
    top = np.maximum(finite.max(0), 0.0) if len(finite) else np.ones(2)
    if not scalef or not np.isfinite(scalef) or scalef <= 0:
        scalef = BLANK_IMAGE_PIXELS / float(max(top.max(), 1e-9))
    width, height = (np.minimum(np.ceil(top * scalef), 4 * BLANK_IMAGE_PIXELS).astype(int) + 1)
    return np.full((int(height), int(width), 3), 255, dtype=np.uint8), float(scalef)


def add_spatial_uns(adata, *, spot_diameter: float | None = None, template: dict | None = None,
                    spatial_key: str = "spatial") -> None:
    """Give ``adata`` scanpy's ``uns['spatial'][library_id]`` so ``sc.pl.spatial(adata, color=...)``
    works with no extra argument (in place).

    An existing ``uns['spatial']`` (e.g. from :func:`pyrospatial.io.read_visium`, with its
    images) is kept as it is (a library read without images gets the blank image below, at
    its own ``tissue_hires_scalef``). Otherwise one library is created: ``template`` (another
    AnnData's library in the same coordinates, e.g. the spots' for CORAL's cells: its images
    are reused) or a new library ``"pyrospatial"`` whose only image is a blank white ``hires``
    one (scanpy 1.11 fails on a library without image) at most :data:`BLANK_IMAGE_PIXELS`
    wide; scale factors are in the units of ``obsm[spatial_key]``: ``spot_diameter_fullres`` =
    ``spot_diameter`` (None: the median nearest-neighbour distance) and
    ``tissue_hires_scalef`` = ``tissue_lowres_scalef`` = image pixels per unit. Nothing is done
    without ``obsm[spatial_key]``.
    """
    if spatial_key not in adata.obsm:
        return
    coords = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]
    existing = adata.uns.get("spatial")
    if isinstance(existing, dict) and existing and all(
        isinstance(lib, dict) and "scalefactors" in lib for lib in existing.values()
    ):
        for library in existing.values():  # kept; a library read without its images gets the blank one
            if not library.get("images"):
                factors = dict(library["scalefactors"])
                image, factors["tissue_hires_scalef"] = _blank_image(coords, factors.get("tissue_hires_scalef"))
                library["images"], library["scalefactors"] = {"hires": image}, factors
        return
    diameter = float(spot_diameter) if spot_diameter else _median_spacing(coords)
    if template is not None:
        library_id, library = next(iter(template.items()))
        factors = dict(library.get("scalefactors", {}))
        factors["spot_diameter_fullres"] = diameter
        library = {**library, "scalefactors": factors}
        if not library.get("images"):
            image, factors["tissue_hires_scalef"] = _blank_image(coords, factors.get("tissue_hires_scalef"))
            library["images"] = {"hires": image}
    else:
        image, scalef = _blank_image(coords)
        library_id = LIBRARY_ID
        library = {
            "images": {"hires": image},
            "scalefactors": {"spot_diameter_fullres": diameter, "tissue_hires_scalef": scalef,
                             "tissue_lowres_scalef": scalef},
            "metadata": {"source": "pyrospatial: created for scanpy; blank image; units of obsm['spatial']"},
        }
    adata.uns["spatial"] = {library_id: library}


def add_spatial_graph(adata, edges: np.ndarray, *, params: dict | None = None, spatial_key: str = "spatial") -> None:
    """Store an undirected graph under squidpy's keys (in place): ``obsp['spatial_connectivities']``
    (0/1, symmetric CSR), ``obsp['spatial_distances']`` (Euclidean length of every edge in the
    units of ``obsm[spatial_key]``) and ``uns['spatial_neighbors']`` (``connectivities_key``,
    ``distances_key``, ``params``), so ``squidpy.gr.nhood_enrichment`` and friends use it as built.

    ``edges`` is ``(2, E)`` with each undirected edge once (or both ways; duplicates are merged).
    """
    import scipy.sparse as sp

    edges = np.asarray(edges, dtype=np.int64)
    if edges.ndim != 2 or edges.shape[0] != 2:
        raise InputError(f"edges must have shape (2, E), got {edges.shape}.")
    n = adata.n_obs
    rows = np.concatenate([edges[0], edges[1]])
    cols = np.concatenate([edges[1], edges[0]])
    keep = rows != cols
    rows, cols = rows[keep], cols[keep]
    conn = sp.csr_matrix((np.ones(rows.size, dtype=np.float32), (rows, cols)), shape=(n, n))
    conn.data[:] = 1.0  # duplicated pairs were summed
    coords = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]
    conn = conn.tocoo()
    lengths = np.linalg.norm(coords[conn.row] - coords[conn.col], axis=1)
    adata.obsp["spatial_connectivities"] = conn.tocsr()
    adata.obsp["spatial_distances"] = sp.csr_matrix((lengths, (conn.row, conn.col)), shape=(n, n))
    adata.uns["spatial_neighbors"] = {
        "connectivities_key": "spatial_connectivities",
        "distances_key": "spatial_distances",
        "params": h5ad_safe(dict(params or {})),
    }


def frames_to_obs(adata, keys: list[str]) -> None:
    """Copy every column of the obsm DataFrames ``keys`` into ``obs`` as ``<key>_<column>``
    (in place; e.g. ``obsm['proportion_mean']['T0']`` -> ``obs['proportion_mean_T0']``), so that
    scanpy's ``color=`` reaches them. The obsm DataFrames stay."""
    import pandas as pd

    columns: dict = {}
    for key in keys:
        frame = adata.obsm[key]
        if not isinstance(frame, pd.DataFrame):
            raise InputError(f"obsm['{key}'] must be a DataFrame (cell types as columns) to be copied into obs.")
        for column in frame.columns:
            columns[f"{key}_{column}"] = frame[column].to_numpy()
    # all columns joined at once: inserting hundreds one by one fragments the frame (pandas warns)
    kept = adata.obs.drop(columns=[c for c in columns if c in adata.obs.columns])
    adata.obs = pd.concat([kept, pd.DataFrame(columns, index=adata.obs.index)], axis=1)
