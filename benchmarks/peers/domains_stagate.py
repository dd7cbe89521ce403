"""STAGATE peer (the ``stagate-modern`` PyTorch distribution) of the domains benchmark: 3000 HVGs,
normalise, log1p; spatial net by radius 150 full-resolution pixels on Visium (its DLPFC tutorial
setting) or the 6 nearest cells otherwise; the graph-attention autoencoder (default 1000 epochs,
CPU); clustering of its embedding by Leiden with the resolution bisected to K clusters (its
tutorial's mclust needs R, not installed here).
"""

from __future__ import annotations

from domains_common import leiden_k, log_normalise, run


def method(adatas, n_domains: int, seed: int, variant: str) -> dict:
    import STAGATE_pyG
    import torch

    torch.set_num_threads(1)
    labels = []
    for adata in adatas:
        a = log_normalise(adata)
        if "array_row" in a.obs:
            STAGATE_pyG.Cal_Spatial_Net(a, rad_cutoff=150, verbose=False)
        else:
            STAGATE_pyG.Cal_Spatial_Net(a, k_cutoff=6, model="KNN", verbose=False)
        a = STAGATE_pyG.train_STAGATE(a, verbose=False, random_seed=seed, device="cpu")
        labels.append(leiden_k(a, n_domains, seed, use_rep="STAGATE"))
    return {"labels": labels}


if __name__ == "__main__":
    run(method)
