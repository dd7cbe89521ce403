"""pyrospatial runner of the mapping benchmark: ``pyrospatial.map_cells`` with the package's
defaults on the raw counts (it chooses its own preprocessing); P is ``obsm['map_prob']``. Also
hands back its own posterior-mean locations and 90% radii (``obsm['spatial_mapped']``,
``obs['map_radius_90']``) so that the coverage of its own credible region is scored too.
"""

from __future__ import annotations

import numpy as np
from mapping_common import run


def method(cells, atlas, seed: int, variant: str) -> dict:
    try:
        from pyrospatial import map_cells
    except ImportError:  # before the top-level export exists
        from pyrospatial.methods.mapping import map_cells

    res = map_cells(cells, atlas, seed=seed, device="cpu", progress=False)
    out = res.cells
    mapped = np.asarray(out.obsm["spatial_mapped"], dtype=float)[:, :2]
    return {"P": out.obsm["map_prob"], "spatial_mapped": mapped,
            "map_radius_90": np.asarray(out.obs["map_radius_90"], dtype=float)}


if __name__ == "__main__":
    run(method)
