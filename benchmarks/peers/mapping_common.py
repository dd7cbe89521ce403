"""What every peer runner of ``benchmarks/mapping.py`` shares (imported from the runner's folder).

A runner is started as ``PYTHON benchmarks/peers/mapping_<peer>.py --cells CELLS.h5ad --atlas
ATLAS.h5ad --seed S --output OUT [--variant NAME]`` with the peer's own interpreter. ``CELLS``
holds raw counts without coordinates; ``ATLAS`` raw counts with ``obsm['spatial']``. The runner
maps every cell onto the atlas locations and writes ``OUT.npz`` (the probability/coupling matrix
P, cells x atlas, as a scipy sparse CSR matrix with rows summing to 1) and ``OUT`` (JSON:
``seconds`` = the method's own wall time, reading excluded, and any extra fields). Entries below
1e-9 of their row's total are dropped before writing (at most ``n_atlas * 1e-9`` of a row's mass).

The expression space every OT peer shares (:func:`expression_space`): the genes both sides have,
each cell library-size normalised to 1e4 and log1p-transformed, then the principal components
(``N_COMPS`` or fewer when the panel is small) fitted on the atlas and the cells together.
Only numpy, scipy, scikit-learn and anndata are assumed (every environment has them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.sparse as sp

N_COMPS = 30
DROP_BELOW = 1e-9


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cells", required=True, help="cells without coordinates (.h5ad, raw counts)")
    p.add_argument("--atlas", required=True, help="atlas with obsm['spatial'] (.h5ad, raw counts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="OUT (JSON) and OUT.npz (the matrix P) are written")
    p.add_argument("--variant", default="")
    return p.parse_args()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass


def shared_genes(cells, atlas) -> list[str]:
    """Genes both sides have, in the atlas's order."""
    have = set(cells.var_names)
    return [g for g in atlas.var_names if g in have]


def log_normalise(x) -> np.ndarray:
    """Dense ``log1p(1e4 * x / rowsum)`` (rows without counts stay 0)."""
    x = np.asarray(x.todense() if sp.issparse(x) else x, dtype=np.float64)
    tot = x.sum(axis=1, keepdims=True)
    return np.log1p(1e4 * x / np.where(tot > 0, tot, 1.0))


def expression_space(cells, atlas, n_comps: int = N_COMPS) -> dict[str, Any]:
    """Log-normalised shared genes of both sides and their joint principal components.

    Returns ``{"genes", "cells_log", "atlas_log", "cells_pc", "atlas_pc"}``.
    """
    from sklearn.decomposition import PCA

    genes = shared_genes(cells, atlas)
    lc = log_normalise(cells[:, genes].X)
    la = log_normalise(atlas[:, genes].X)
    k = int(min(n_comps, len(genes) - 1, lc.shape[0] + la.shape[0] - 1))
    pca = PCA(n_components=k, random_state=0).fit(np.vstack([la, lc]))
    return {"genes": genes, "cells_log": lc, "atlas_log": la, "cells_pc": pca.transform(lc),
            "atlas_pc": pca.transform(la)}


def expression_cost(cells_pc: np.ndarray, atlas_pc: np.ndarray) -> np.ndarray:
    """Euclidean distance cells x atlas in the shared PC space, divided by its maximum: the one
    expression cost the POT peers share (as POT FGW's ``M`` in ``benchmarks/alignment.py``)."""
    from scipy.spatial.distance import cdist

    c = cdist(cells_pc, atlas_pc)
    return c / max(float(c.max()), 1e-12)


def normalise_rows(p) -> sp.csr_matrix:
    """CSR copy of ``p`` with entries below ``DROP_BELOW`` of their row's total dropped and every
    row scaled to sum to 1 (a row without mass stays empty)."""
    p = sp.csr_matrix(p, dtype=np.float64)
    p.data[~np.isfinite(p.data)] = 0.0
    p.data = np.clip(p.data, 0.0, None)
    tot = np.asarray(p.sum(axis=1)).ravel()
    thr = np.repeat(DROP_BELOW * tot, np.diff(p.indptr))
    p.data[p.data < thr] = 0.0
    p.eliminate_zeros()
    tot = np.asarray(p.sum(axis=1)).ravel()
    return sp.csr_matrix(sp.diags(1.0 / np.where(tot > 0, tot, 1.0)) @ p)


def run(method: Callable[[Any, Any, int, str], dict[str, Any]]) -> None:
    """Parse the arguments, read the inputs, time ``method(cells, atlas, seed, variant)`` (which
    returns ``{"P": matrix cells x atlas, ...}``) and write ``OUT.npz`` and ``OUT``."""
    import anndata as ad

    args = parse_args()
    cells, atlas = ad.read_h5ad(args.cells), ad.read_h5ad(args.atlas)
    seed_everything(args.seed)
    t0 = time.perf_counter()
    out = method(cells, atlas, args.seed, args.variant)
    seconds = time.perf_counter() - t0
    p = normalise_rows(out.pop("P"))
    if p.shape != (cells.n_obs, atlas.n_obs):
        raise SystemExit(f"P has shape {p.shape}, expected {(cells.n_obs, atlas.n_obs)}")
    sp.save_npz(args.output + ".npz", p)
    out["seconds"] = seconds
    with open(args.output, "w") as fh:
        json.dump(out, fh, default=lambda o: o.tolist() if hasattr(o, "tolist") else float(o))
