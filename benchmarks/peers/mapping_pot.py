"""POT peers of the mapping benchmark, on the shared expression cost (``mapping_common``):

``--variant emd``: exact optimal transport ``ot.emd`` between uniform weights on the cells and on
the atlas locations with ``M`` = Euclidean distance of the joint PCs (divided by its maximum).
``--variant fgw``: ``ot.gromov.fused_gromov_wasserstein`` (square loss, alpha 0.5, POT's default and
the setting of the alignment benchmark) with the same ``M``, ``C1`` = the cells' expression
distances (PC space) and ``C2`` = the atlas's spatial distances, each divided by its maximum.
The coupling's rows, normalised, are the cells' probabilities over atlas locations.
"""

from __future__ import annotations

import numpy as np
from mapping_common import expression_cost, expression_space, run
from scipy.spatial.distance import cdist


def method(cells, atlas, seed: int, variant: str) -> dict:
    import ot

    space = expression_space(cells, atlas)
    m = expression_cost(space["cells_pc"], space["atlas_pc"])
    p = np.full(cells.n_obs, 1.0 / cells.n_obs)
    q = np.full(atlas.n_obs, 1.0 / atlas.n_obs)
    if variant == "emd":
        g, log = ot.emd(p, q, m, numItermax=10_000_000, log=True)
        return {"P": g, "warning": str(log.get("warning") or ""), "cost": float(log["cost"])}
    if variant == "fgw":
        c1 = cdist(space["cells_pc"], space["cells_pc"])
        c2 = cdist(np.asarray(atlas.obsm["spatial"], dtype=float), np.asarray(atlas.obsm["spatial"], dtype=float))
        g, log = ot.gromov.fused_gromov_wasserstein(m, c1 / c1.max(), c2 / c2.max(), p, q, loss_fun="square_loss",
                                                    alpha=0.5, log=True)
        return {"P": g, "fgw_dist": float(log["fgw_dist"])}
    raise SystemExit(f"unknown --variant {variant!r}: emd or fgw")


if __name__ == "__main__":
    run(method)
