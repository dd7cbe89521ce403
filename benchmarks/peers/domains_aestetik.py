"""AESTETIK peer of the domains benchmark: transcriptomics = 15 PCs of log-normalised 3000 HVGs,
morphology = PCs (up to 15) of the same per-spot image features every method gets
(``obsm['morphology']``: lowres H&E colour/texture statistics and the nucleus count); grid
coordinates from the Visium array; the package defaults (morphology weight 1.5, 100 epochs,
Bayesian Gaussian mixture with K components, spatial refinement) except ``num_repeats_predict``
100 instead of 1000 stochastic passes (CPU time). Needs a morphology modality and a spot grid:
cell-level data without an image are not run (the benchmark records why).
"""

from __future__ import annotations

import numpy as np
from domains_common import log_normalise, run


def method(adatas, n_domains: int, seed: int, variant: str) -> dict:
    import scanpy as sc
    import torch
    from aestetik import AESTETIK
    from sklearn.decomposition import PCA

    torch.set_num_threads(1)
    labels = []
    for adata in adatas:
        if "morphology" not in adata.obsm or "array_row" not in adata.obs:
            raise SystemExit("AESTETIK needs obsm['morphology'] and a spot grid (obs array_row/array_col)")
        a = log_normalise(adata)
        sc.pp.scale(a, max_value=10)
        sc.pp.pca(a, n_comps=15, random_state=seed)
        a.obsm["X_pca_transcriptomics"] = np.asarray(a.obsm["X_pca"], dtype=np.float32)
        m = np.asarray(adata.obsm["morphology"], dtype=np.float64)
        m = (m - m.mean(0)) / np.maximum(m.std(0), 1e-8)
        n_comp = min(15, m.shape[1])
        a.obsm["X_pca_morphology"] = PCA(n_comp, random_state=seed).fit_transform(m).astype(np.float32)
        a.obs["x_array"] = a.obs["array_row"].astype(int).to_numpy()
        a.obs["y_array"] = a.obs["array_col"].astype(int).to_numpy()
        model = AESTETIK(n_cluster=n_domains, random_state=seed, num_repeats_predict=100,
                         clustering_method="bgm")
        model.fit(a)
        labels.append(np.asarray(model.labels_))
    return {"labels": labels}


if __name__ == "__main__":
    run(method)
