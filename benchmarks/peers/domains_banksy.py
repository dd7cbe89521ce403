"""BANKSY (pybanksy) peer of the domains benchmark: log-normalised HVGs, the BANKSY matrix
(lambda 0.8, the published setting for domain segmentation; k_geom 18 neighbours with the scaled
Gaussian decay, max_m 1), 20 PCs, Leiden with the resolution searched by pybanksy to give K labels.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from domains_common import log_normalise, run


def method(adatas, n_domains: int, seed: int, variant: str) -> dict:
    from banksy.cluster_methods import run_Leiden_partition
    from banksy.embed_banksy import generate_banksy_matrix
    from banksy.initialize_banksy import initialize_banksy
    from banksy_utils.umap_pca import pca_umap

    labels = []
    for adata in adatas:
        a = log_normalise(adata, n_top_genes=2000)
        a.obs["xcoord"] = a.obsm["spatial"][:, 0]
        a.obs["ycoord"] = a.obsm["spatial"][:, 1]
        a.obsm["coord_xy"] = np.asarray(a.obsm["spatial"], dtype=float)
        with contextlib.redirect_stdout(io.StringIO()):
            bd = initialize_banksy(a, ("xcoord", "ycoord", "coord_xy"), num_neighbours=18,
                                   nbr_weight_decay="scaled_gaussian", max_m=1, plt_edge_hist=False,
                                   plt_nbr_weights=False, plt_agf_angles=False, plt_theta=False)
            bd, _ = generate_banksy_matrix(a, bd, [0.8], 1, verbose=False)
            pca_umap(bd, pca_dims=[20], plt_remaining_var=False, add_umap=False)
            df, _ = run_Leiden_partition(bd, resolutions=[], num_nn=50, num_iterations=-1,
                                         partition_seed=seed, match_labels=False, max_labels=n_domains)
        lab = df["labels"].iloc[0]
        labels.append(np.asarray(lab.dense))
    return {"labels": labels}


if __name__ == "__main__":
    run(method)
