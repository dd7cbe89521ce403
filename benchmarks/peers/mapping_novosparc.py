"""novoSpaRc peer of the mapping benchmark, with the atlas as its reference: ``Tissue`` over the
atlas locations, every shared gene a marker with the atlas's expression as ``atlas_matrix`` (the
linear term), the cells' and locations' 5-nearest-neighbour graph costs (its defaults), and
``reconstruct(alpha_linear=0.8, epsilon=5e-3)`` (the setting of novoSpaRc's tutorial with a
reference atlas; epsilon raised by its own search when it hits numerical errors). Both sides are
given the shared expression space's log-normalised genes (``mapping_common``). The transport
plan ``tissue.gw`` (cells x locations), rows normalised, is P.
"""

from __future__ import annotations

import contextlib
import io

import anndata as ad
import numpy as np
import pandas as pd
from mapping_common import expression_space, run


def method(cells, atlas, seed: int, variant: str) -> dict:
    import novosparc

    space = expression_space(cells, atlas)
    dataset = ad.AnnData(X=space["cells_log"], var=pd.DataFrame(index=space["genes"]),
                         obs=pd.DataFrame(index=cells.obs_names))
    locations = np.asarray(atlas.obsm["spatial"], dtype=float)
    markers = np.arange(len(space["genes"]))
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        tissue = novosparc.cm.Tissue(dataset=dataset, locations=locations, atlas_matrix=space["atlas_log"],
                                     markers_to_use=markers)
        tissue.setup_reconstruction(markers_to_use=markers, atlas_matrix=space["atlas_log"],
                                    num_neighbors_s=5, num_neighbors_t=5, verbose=False)
        tissue.reconstruct(alpha_linear=0.8, epsilon=5e-3, verbose=False)
    return {"P": np.asarray(tissue.gw, dtype=np.float64), "epsilon_used": float(tissue.epsilon)}


if __name__ == "__main__":
    run(method)
