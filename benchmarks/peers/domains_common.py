"""What every peer runner of ``benchmarks/domains.py`` shares (imported from the runner's folder).

A runner is started as ``PYTHON benchmarks/peers/domains_<peer>.py --input A.h5ad [B.h5ad ...]
--n-domains K --seed S --output OUT.json [--variant NAME]`` with the peer's own interpreter; it
reads the prepared AnnData (raw counts in ``X``, ``obsm['spatial']``, and for Visium
``obs['array_row'/'array_col']``, ``uns['spatial']`` with the lowres image and ``obsm['morphology']``),
runs the method, and writes ``{"labels": [[...] per input], "seconds": s, ...}``. Labels are
computed without the ground truth; ``seconds`` is the method's own wall time (reading excluded).
Only numpy, pandas, anndata and scanpy are assumed (every peer environment has them).
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


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--input", nargs="+", required=True, help="prepared .h5ad file(s), one per section")
    p.add_argument("--n-domains", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True)
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


def read(paths: list[str]):
    import anndata as ad

    return [ad.read_h5ad(p) for p in paths]


def log_normalise(adata, n_top_genes: int | None = 3000):
    """Library-size normalise to 1e4, log1p, keep ``n_top_genes`` highly variable genes (all genes
    when the panel is smaller): the preprocessing every expression-only peer starts from."""
    import scanpy as sc

    adata = adata.copy()
    adata.layers["counts"] = adata.X.copy()
    if n_top_genes is not None and adata.n_vars > n_top_genes:
        sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=n_top_genes, layer="counts")
        adata = adata[:, adata.var["highly_variable"]].copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


def leiden_k(adata, n_clusters: int, seed: int, use_rep: str = "X_pca", n_neighbors: int = 15,
             key: str = "leiden") -> np.ndarray:
    """Leiden with the resolution bisected (at most 20 tries) until it gives ``n_clusters``
    clusters; the closest count found is used when none matches exactly."""
    import scanpy as sc

    sc.pp.neighbors(adata, n_neighbors=n_neighbors, use_rep=use_rep, random_state=seed)
    lo, hi, best = 0.01, 3.0, None
    for _ in range(20):
        res = 0.5 * (lo + hi)
        sc.tl.leiden(adata, resolution=res, random_state=seed, key_added=key,
                     flavor="igraph", n_iterations=2, directed=False)
        k = adata.obs[key].nunique()
        if best is None or abs(k - n_clusters) < abs(best[0] - n_clusters):
            best = (k, res, adata.obs[key].to_numpy().copy())
        if k == n_clusters:
            break
        if k < n_clusters:
            lo = res
        else:
            hi = res
    return np.asarray(pd_codes(best[2]))


def pd_codes(values) -> np.ndarray:
    import pandas as pd

    return pd.Categorical(values).codes.astype(int)


def run(method: Callable[[list, int, int, str], dict[str, Any]]) -> None:
    """Parse the arguments, read the inputs, time ``method(adatas, n_domains, seed, variant)``
    (which returns ``{"labels": [array per input], ...}``) and write the output JSON."""
    args = parse_args()
    adatas = read(args.input)
    seed_everything(args.seed)
    t0 = time.perf_counter()
    out = method(adatas, args.n_domains, args.seed, args.variant)
    seconds = time.perf_counter() - t0
    out["labels"] = [np.asarray(pd_codes(np.asarray(l).astype(str))).tolist() for l in out["labels"]]
    out["seconds"] = seconds
    with open(args.output, "w") as fh:
        json.dump(out, fh, default=lambda o: o.tolist() if hasattr(o, "tolist") else float(o))
