"""GraphST peer of the domains benchmark: GraphST's own preprocessing (3000 seurat_v3 HVGs,
normalise, log1p, scale; with a panel of <= 3000 genes every gene is kept and the same
normalisation applied), its contrastive graph autoencoder on CPU (default 600 epochs), then its
``clustering`` with the Leiden option (the default mclust needs R, which is not installed here),
resolution searched by GraphST to give K clusters, no refinement.
"""

from __future__ import annotations

import numpy as np
from domains_common import run


def method(adatas, n_domains: int, seed: int, variant: str) -> dict:
    import scanpy as sc
    import torch
    from GraphST import GraphST
    from GraphST.utils import clustering

    torch.set_num_threads(1)
    labels = []
    for adata in adatas:
        a = adata.copy()
        a.var_names_make_unique()
        if a.n_vars <= 3000:
            a.var["highly_variable"] = True
            sc.pp.normalize_total(a, target_sum=1e4)
            sc.pp.log1p(a)
            sc.pp.scale(a, zero_center=False, max_value=10)
        datatype = "10X" if "array_row" in a.obs else "Slide"
        model = GraphST.GraphST(a, device=torch.device("cpu"), random_seed=seed, datatype=datatype)
        a = model.train()
        clustering(a, n_domains, method="leiden", start=0.1, end=2.0, increment=0.02, refinement=False)
        labels.append(np.asarray(a.obs["domain"]))
    return {"labels": labels}


if __name__ == "__main__":
    run(method)
