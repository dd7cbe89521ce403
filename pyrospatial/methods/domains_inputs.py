"""Inputs of :func:`pyrospatial.domains`: sections, modalities, validation and the encoder's
input features (what the model observes and what the guide's encoder reads)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from pyrospatial.data.domain_data import knn_edges
from pyrospatial.errors import CountsError, InputError

__all__ = ["MODALITIES", "DomainInputs", "read_domain_inputs"]

#: Modalities the domains model knows.
MODALITIES = ("counts", "proteins", "morphology")


@dataclass
class DomainInputs:
    """Everything :class:`~pyrospatial.methods.domains.Domains` builds its data from.

    ``rows[j]`` are the rows of the stacked arrays that belong to ``adatas[j]`` (in its order);
    ``section`` codes index ``section_names``.
    """

    adatas: list[AnnData]
    rows: list[np.ndarray]
    section: np.ndarray  # (n,) codes
    section_names: list[str]
    coords: np.ndarray  # (n, 2)
    modalities: tuple[str, ...]
    counts: np.ndarray | None  # (n, G)
    genes: list[str]
    proteins: np.ndarray | None  # (n, P)
    protein_names: list[str]
    morphology: np.ndarray | None  # (n, F) standardised (or its principal components)
    features: np.ndarray  # (n, D) encoder input
    smoothed: np.ndarray  # (n, D / 2) neighbour-averaged blocks (the starting embedding's input)


def _sections(adatas, section_key: str | None) -> tuple[list[AnnData], list[np.ndarray], np.ndarray, list[str]]:
    single = isinstance(adatas, AnnData)
    items = [adatas] if single else list(adatas)
    if not items or not all(isinstance(a, AnnData) for a in items):
        raise InputError("adatas must be an AnnData or a non-empty list of AnnData (one per section).")
    for j, a in enumerate(items):
        if a.n_obs == 0:
            raise InputError(f"adatas[{j}] has no observations (n_obs == 0): pass non-empty sections.")
    codes, names, rows, start = [], [], [], 0
    for j, a in enumerate(items):
        rows.append(np.arange(start, start + a.n_obs))
        start += a.n_obs
        if section_key is None:
            codes.append(np.full(a.n_obs, len(names)))
            names.append(str(j) if len(items) > 1 else "0")
            continue
        if section_key not in a.obs:
            raise InputError(f"section_key='{section_key}' is not a column of adatas[{j}].obs: name the column "
                             "holding each spot's section, or pass a list of AnnData (one per section).")
        values = a.obs[section_key].astype(str).to_numpy()
        for value in pd.unique(values):
            if value not in names:
                names.append(value)
        codes.append(np.array([names.index(v) for v in values]))
    return items, rows, np.concatenate(codes).astype(np.int64), names


def _coords(items: list[AnnData], spatial_key: str) -> np.ndarray:
    out = []
    for j, a in enumerate(items):
        if spatial_key not in a.obsm:
            raise InputError(f"adatas[{j}].obsm['{spatial_key}'] is missing: the spatial prior needs spot "
                             f"coordinates (x, y); pass spatial_key= naming the obsm key that holds them.")
        xy = np.asarray(a.obsm[spatial_key], dtype=np.float64)[:, :2]
        if not np.isfinite(xy).all():
            raise InputError(f"adatas[{j}].obsm['{spatial_key}'] has NaN or infinite coordinates.")
        out.append(xy)
    return np.concatenate(out)


def _dense(m) -> np.ndarray:
    return np.asarray(m.toarray() if sp.issparse(m) else m, dtype=np.float64)


def _counts(items: list[AnnData], layer: str | None) -> tuple[np.ndarray, list[str]]:
    genes = pd.Index(map(str, items[0].var_names))
    for a in items[1:]:
        genes = genes.intersection(pd.Index(map(str, a.var_names)), sort=False)
    if len(genes) == 0:
        raise InputError("the sections share no gene (var_names): counts cannot be modelled jointly; "
                         "drop 'counts' from modalities or harmonise the gene names.")
    blocks = []
    for j, a in enumerate(items):
        if layer is not None and layer not in a.layers:
            raise InputError(f"layer='{layer}' is not in adatas[{j}].layers (available: {list(a.layers)}).")
        m = a.layers[layer] if layer is not None else a.X
        idx = pd.Index(map(str, a.var_names)).get_indexer(genes)
        x = _dense(m[:, idx])
        field = f"adatas[{j}].{'layers[' + repr(layer) + ']' if layer else 'X'}"
        if not np.isfinite(x).all() or (x < 0).any() or not np.allclose(x, np.round(x)):
            raise CountsError(f"{field} must hold raw counts (finite, non-negative integers): pass the raw counts "
                              "or name the layer that holds them with layer=.")
        blocks.append(x)
    counts = np.concatenate(blocks)
    empty = np.flatnonzero(counts.sum(1) <= 0)
    if empty.size:
        raise InputError(f"{empty.size} spot(s) have zero counts over the {len(genes)} shared genes: drop them "
                         "first (e.g. adata = adata[adata.X.sum(1) > 0]).")
    return counts, list(genes)


def _obsm_block(items: list[AnnData], key: str, what: str) -> tuple[np.ndarray, list[str]]:
    blocks, names = [], None
    for j, a in enumerate(items):
        if key not in a.obsm:
            raise InputError(f"adatas[{j}].obsm['{key}'] is missing: the '{what}' modality reads it; put the "
                             f"matrix there (or pass {what}_key= naming another obsm key, or leave '{what}' "
                             "out of modalities).")
        value = a.obsm[key]
        cols = list(map(str, value.columns)) if isinstance(value, pd.DataFrame) else None
        x = _dense(value.to_numpy() if isinstance(value, pd.DataFrame) else value)
        if x.ndim == 1:
            x = x[:, None]
        if not np.isfinite(x).all():
            raise InputError(f"adatas[{j}].obsm['{key}'] has NaN or infinite values: fill or drop them.")
        if blocks and x.shape[1] != blocks[0].shape[1]:
            raise InputError(f"adatas[{j}].obsm['{key}'] has {x.shape[1]} columns, adatas[0]'s has "
                             f"{blocks[0].shape[1]}: every section needs the same features.")
        blocks.append(x)
        names = names or cols
    out = np.concatenate(blocks)
    return out, names or [f"{what}{i}" for i in range(out.shape[1])]


def _centre_by_section(x: np.ndarray, section: np.ndarray) -> np.ndarray:
    out = x.copy()
    for s in np.unique(section):
        out[section == s] -= out[section == s].mean(0)
    return out


def _reduce(x: np.ndarray, n_components: int, seed: int) -> np.ndarray:
    """Standardised columns, reduced to ``n_components`` principal components when wider."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    if x.shape[1] <= n_components:
        return x
    from sklearn.decomposition import PCA

    return PCA(n_components, random_state=seed).fit_transform(x)


def _neighbour_mean(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Mean of each spot and its graph neighbours."""
    n = x.shape[0]
    rows = np.concatenate([edges[0], edges[1], np.arange(n)])
    cols = np.concatenate([edges[1], edges[0], np.arange(n)])
    adj = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(n, n))
    deg = np.asarray(adj.sum(1)).ravel()
    return (adj @ x) / deg[:, None]


def read_domain_inputs(
    adatas: AnnData | Sequence[AnnData],
    modalities: Sequence[str] | None,
    *,
    layer: str | None,
    protein_key: str,
    morphology_key: str,
    spatial_key: str,
    section_key: str | None,
    n_neighbours: int,
    n_top_genes: int | None,
    n_pcs: int,
    seed: int,
) -> DomainInputs:
    """Validate the inputs and build the observed matrices and the encoder's input.

    Encoder input: per modality a block (counts: log1p of counts per 10,000 over the used genes;
    proteins: log1p; morphology: as given), centred per section, standardised and reduced to
    ``n_pcs`` principal components when wider, each block scaled to total variance 1 (so that
    no modality dominates by its width); then the blocks and their average over each spot and
    its graph neighbours side by side.
    """
    items, rows, section, names = _sections(adatas, section_key)
    coords = _coords(items, spatial_key)
    if modalities is None:
        chosen = ["counts"]
        chosen += [m for m, key in (("proteins", protein_key), ("morphology", morphology_key))
                   if all(key in a.obsm for a in items)]
    else:
        chosen = [modalities] if isinstance(modalities, str) else list(modalities)
        unknown = [m for m in chosen if m not in MODALITIES]
        if unknown or not chosen:
            raise InputError(f"modalities must be a non-empty subset of {list(MODALITIES)}, got {chosen}.")
    chosen = [m for m in MODALITIES if m in chosen]
    counts, genes, proteins, protein_names, morphology = None, [], None, [], None
    blocks = []
    if "counts" in chosen:
        counts, genes = _counts(items, layer)
        norm = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
        if n_top_genes is not None and len(genes) > int(n_top_genes):
            keep = np.sort(np.argsort(-norm.var(0), kind="stable")[: int(n_top_genes)])
            counts, genes, norm = counts[:, keep], [genes[g] for g in keep], norm[:, keep]
        blocks.append(_reduce(_centre_by_section(norm, section), n_pcs, seed))
    if "proteins" in chosen:
        proteins, protein_names = _obsm_block(items, protein_key, "proteins")
        if (proteins <= 0).any():
            raise InputError(f"obsm['{protein_key}'] must be strictly positive (the proteins' Gamma likelihood): "
                             "add a small offset or pass raw positive intensities.")
        blocks.append(_reduce(_centre_by_section(np.log1p(proteins), section), n_pcs, seed))
    if "morphology" in chosen:
        raw, _ = _obsm_block(items, morphology_key, "morphology")
        morphology = _reduce(raw, n_pcs, seed)
        blocks.append(_reduce(_centre_by_section(raw, section), n_pcs, seed))
    blocks = [b / np.sqrt(max(b.var(0).sum(), 1e-12)) for b in blocks]
    own = np.concatenate(blocks, axis=1)
    edges = knn_edges(coords, section, n_neighbours) if n_neighbours > 0 else np.zeros((2, 0), dtype=np.int64)
    smoothed = _neighbour_mean(own, edges)
    features = np.concatenate([own, smoothed], axis=1).astype(np.float32)
    return DomainInputs(
        adatas=items, rows=rows, section=section, section_names=names, coords=coords, modalities=tuple(chosen),
        counts=counts, genes=genes, proteins=proteins, protein_names=protein_names,
        morphology=None if morphology is None else morphology.astype(np.float32), features=features,
        smoothed=smoothed.astype(np.float32),
    )
