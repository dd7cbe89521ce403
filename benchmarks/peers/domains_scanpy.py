"""scanpy peers of the domains benchmark: log-normalise, 3000 HVGs, 30 PCs, then Leiden (resolution
bisected to K clusters) or KMeans (K clusters). No spatial information: the non-spatial baseline.

    python benchmarks/peers/domains_scanpy.py --variant leiden|kmeans --input A.h5ad --n-domains K ...
"""

from __future__ import annotations

import numpy as np
from domains_common import leiden_k, log_normalise, run


def method(adatas, n_domains: int, seed: int, variant: str) -> dict:
    import scanpy as sc
    from sklearn.cluster import KMeans

    labels = []
    for adata in adatas:
        a = log_normalise(adata)
        sc.pp.scale(a, max_value=10)
        sc.pp.pca(a, n_comps=min(30, a.n_vars - 1), random_state=seed)
        if variant == "kmeans":
            lab = KMeans(n_domains, n_init=10, random_state=seed).fit_predict(a.obsm["X_pca"])
        elif variant == "leiden":
            lab = leiden_k(a, n_domains, seed)
        else:
            raise SystemExit(f"unknown --variant {variant!r}: leiden or kmeans")
        labels.append(np.asarray(lab))
    return {"labels": labels}


if __name__ == "__main__":
    run(method)
