"""Tangram (tangram-sc) peer of the mapping benchmark: ``tg.pp_adatas`` on the shared genes, then
``tg.map_cells_to_space(mode="cells")`` with its defaults (1000 epochs, learning rate 0.1, all
shared genes as training genes) except ``density_prior="uniform"``: every atlas location is one
cell, so the default RNA-count-based density (for spots holding several cells) does not apply.
Both sides are given the shared expression space's log-normalised genes (``mapping_common``).
Tangram's mapping matrix (cells x atlas, a softmax per cell) is P.
"""

from __future__ import annotations

import contextlib
import io

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from mapping_common import expression_space, run


def method(cells, atlas, seed: int, variant: str) -> dict:
    import tangram as tg

    space = expression_space(cells, atlas)
    var = pd.DataFrame(index=space["genes"])
    sc_ad = ad.AnnData(X=sp.csr_matrix(space["cells_log"].astype(np.float32)), var=var.copy(),
                       obs=pd.DataFrame(index=cells.obs_names))
    sp_ad = ad.AnnData(X=sp.csr_matrix(space["atlas_log"].astype(np.float32)), var=var.copy(),
                       obs=pd.DataFrame(index=atlas.obs_names))
    sp_ad.obsm["spatial"] = np.asarray(atlas.obsm["spatial"], dtype=float)
    with contextlib.redirect_stdout(io.StringIO()):
        tg.pp_adatas(sc_ad, sp_ad, genes=None)
        ad_map = tg.map_cells_to_space(sc_ad, sp_ad, mode="cells", density_prior="uniform", device="cpu",
                                       random_state=seed, verbose=False)
    return {"P": np.asarray(ad_map.X, dtype=np.float64), "n_training_genes": len(sc_ad.uns["training_genes"])}


if __name__ == "__main__":
    run(method)
