"""SpaGCN peer of the domains benchmark, following its DLPFC tutorial: the adjacency from spot
positions plus the histology colour axis (lowres H&E here, the only image available; beta 5 lowres
px ~ the tutorial's 49 full-resolution px, alpha 1), genes filtered (min 3 cells, no ERCC/MT-),
normalise per cell, log1p; ``l`` searched for p = 0.5, resolution searched to give K clusters,
SpaGCN trained (louvain init, 200 epochs), then the hexagon refinement on Visium. On cell-level
data (no image) the adjacency uses positions only and no refinement is done; with a panel of
<= 50 genes (osmFISH: 33) SpaGCN's fixed 50 PCs are capped at n_genes - 1.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from domains_common import run


def method(adatas, n_domains: int, seed: int, variant: str) -> dict:
    import random

    import scanpy as sc
    import SpaGCN as spg
    import torch

    torch.set_num_threads(1)
    labels = []
    for adata in adatas:
        a = adata.copy()
        a.var_names_make_unique()
        visium = "array_row" in a.obs and "spatial" in a.uns
        if a.n_vars <= 50:  # SpaGCN's fixed 50 PCs (also inside search_res) need > 50 genes
            _cap_num_pcs(spg.SpaGCN, a.n_vars - 1)
        with contextlib.redirect_stdout(io.StringIO()):
            if visium:
                lib = next(iter(a.uns["spatial"]))
                img = np.asarray(a.uns["spatial"][lib]["images"]["lowres"])
                if img.dtype != np.uint8:
                    img = np.clip(img * 255.0, 0, 255).astype(np.uint8)
                sf = float(a.uns["spatial"][lib]["scalefactors"]["tissue_lowres_scalef"])
                px = np.round(a.obsm["spatial"][:, 1] * sf).astype(int).tolist()  # image row
                py = np.round(a.obsm["spatial"][:, 0] * sf).astype(int).tolist()  # image col
                adj = spg.calculate_adj_matrix(x=px, y=py, x_pixel=px, y_pixel=py, image=img,
                                               beta=5, alpha=1, histology=True)
            else:
                x = a.obsm["spatial"][:, 0].tolist()
                y = a.obsm["spatial"][:, 1].tolist()
                adj = spg.calculate_adj_matrix(x=x, y=y, histology=False)
            spg.prefilter_genes(a, min_cells=3)
            spg.prefilter_specialgenes(a)
            sc.pp.normalize_per_cell(a)
            sc.pp.log1p(a)
            if hasattr(a.X, "toarray"):  # SpaGCN 1.2.7 calls the .A of scipy < 1.14 on sparse X
                a.X = np.asarray(a.X.toarray())
            l_val = spg.search_l(0.5, adj, start=0.01, end=1000, tol=0.01, max_run=100)
            res = spg.search_res(a, adj, l_val, n_domains, start=0.7, step=0.1, tol=5e-3, lr=0.05,
                                 max_epochs=20, r_seed=seed, t_seed=seed, n_seed=seed)
            clf = spg.SpaGCN()
            clf.set_l(l_val)
            random.seed(seed)
            torch.manual_seed(seed)
            np.random.seed(seed)
            clf.train(a, adj, init_spa=True, init="louvain", res=res, tol=5e-3, lr=0.05, max_epochs=200)
            pred, _prob = clf.predict()
            if visium:
                adj_2d = spg.calculate_adj_matrix(x=a.obs["array_row"].tolist(),
                                                  y=a.obs["array_col"].tolist(), histology=False)
                pred = spg.refine(sample_id=a.obs_names.tolist(), pred=np.asarray(pred).tolist(),
                                  dis=adj_2d, shape="hexagon")
        labels.append(np.asarray(pred))
    return {"labels": labels}


def _cap_num_pcs(cls, n: int) -> None:
    train = cls.train

    def capped(self, adata, adj, *args, num_pcs: int = n, **kwargs):
        return train(self, adata, adj, *args, num_pcs=min(num_pcs, n), **kwargs)

    cls.train = capped


if __name__ == "__main__":
    run(method)
