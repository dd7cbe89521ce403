"""CellCharter peer of the domains benchmark: log-normalised HVGs -> 30 PCs (the package's scVI
reduction is optional and not installed; PCA is its documented alternative), squidpy spatial graph
(Visium grid with 6 neighbours; Delaunay with long links removed for cells), neighbourhood
aggregation over 3 layers, then CellCharter's Gaussian mixture with K components.
"""

from __future__ import annotations

import numpy as np
from domains_common import log_normalise, run


def method(adatas, n_domains: int, seed: int, variant: str) -> dict:
    import cellcharter as cc
    import scanpy as sc
    import squidpy as sq

    labels = []
    for adata in adatas:
        a = log_normalise(adata)
        sc.pp.scale(a, max_value=10)
        sc.pp.pca(a, n_comps=min(30, a.n_vars - 1), random_state=seed)
        if "array_row" in a.obs:
            sq.gr.spatial_neighbors(a, coord_type="grid", n_neighs=6, spatial_key="spatial")
        else:
            sq.gr.spatial_neighbors(a, coord_type="generic", delaunay=True, spatial_key="spatial")
            cc.gr.remove_long_links(a)
        cc.gr.aggregate_neighbors(a, n_layers=3, use_rep="X_pca", out_key="X_cellcharter")
        model = cc.tl.Cluster(n_clusters=n_domains, random_state=seed,
                              trainer_params={"accelerator": "cpu", "enable_progress_bar": False})
        model.fit(a, use_rep="X_cellcharter")
        labels.append(np.asarray(model.predict(a, use_rep="X_cellcharter")))
    return {"labels": labels}


if __name__ == "__main__":
    run(method)
