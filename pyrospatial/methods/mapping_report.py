"""Files of a mapping (:meth:`~pyrospatial.methods.mapping.MappingResult.write`): the two h5ad
files, a short ``report.md`` and one figure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_mapping", "write_mapping"]


def plot_mapping(result: Any, path: Path, *, label_key: str | None = None, n_circles: int = 40,
                 seed: int = 0) -> Path:
    """Atlas locations (grey), the cells at their posterior mean location coloured by
    ``obs[f"{label_key}_mapped"]`` (else by their 90% radius), and the 90% credible circle of
    ``n_circles`` random cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    cells, atlas = result.cells, result.atlas
    xy_atlas = np.asarray(atlas.obsm[result.settings["spatial_key"]])
    mapped, radius = np.asarray(cells.obsm["spatial_mapped"]), cells.obs["map_radius_90"].to_numpy()
    fig, ax = plt.subplots(figsize=(6.5, 6))
    ax.scatter(xy_atlas[:, 0], xy_atlas[:, 1], s=3, c="0.85", label="atlas", rasterized=True)
    column = f"{label_key}_mapped" if label_key else None
    if column in cells.obs and hasattr(cells.obs[column], "cat"):
        labels = cells.obs[column]
        cmap = plt.get_cmap("tab20")
        for i, cat in enumerate(labels.cat.categories):
            sel = (labels == cat).to_numpy()
            ax.scatter(mapped[sel, 0], mapped[sel, 1], s=5, color=cmap(i % 20), label=str(cat), rasterized=True)
        ax.legend(markerscale=3, fontsize=7, loc="upper right", title=label_key)
    else:
        sc = ax.scatter(mapped[:, 0], mapped[:, 1], s=5, c=radius, cmap="viridis", rasterized=True)
        fig.colorbar(sc, ax=ax, label="90% credible radius")
    rng = np.random.default_rng(seed)
    for i in rng.choice(len(mapped), size=min(n_circles, len(mapped)), replace=False):
        ax.add_patch(Circle(mapped[i], radius[i], fill=False, lw=0.6, color="k", alpha=0.5))
    ax.set_aspect("equal")
    ax.set_title("cells at their posterior mean location (circles: 90% credible radius)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_mapping(result: Any, folder: str | Path, *, label_key: str | None = None) -> dict[str, str]:
    """Write ``cells_mapped.h5ad``, ``atlas_projected.h5ad``, ``mapping.json``, ``report.md`` and
    ``figures/mapping.png`` into ``folder``; return the paths by name."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"cells": out / "cells_mapped.h5ad", "atlas": out / "atlas_projected.h5ad",
             "summary": out / "mapping.json", "report": out / "report.md", "figure": out / "figures" / "mapping.png"}
    result.cells.write_h5ad(paths["cells"])
    (result.projected if result.projected is not None else result.atlas).write_h5ad(paths["atlas"])
    keys = list(result.settings.get("label_keys", []))
    label_key = label_key or (keys[0] if keys else None)
    plot_mapping(result, paths["figure"], label_key=label_key)
    diag = result.diagnostics
    summary = {"settings": result.settings,
               "diagnostics": {k: v for k, v in diag.items() if k not in ("tau", "slope", "tau_atlas")}}
    paths["summary"].write_text(json.dumps(summary, indent=2, default=float))
    cells = result.cells
    lines = [
        "# Mapping of dissociated cells onto the atlas",
        "",
        (f"- {result.settings['n_cells']} cells onto {result.settings['n_atlas']} atlas locations over "
        f"{result.settings['n_shared_genes']} shared genes ({result.settings['n_components']} principal components, "
        f"{result.settings['k']} candidate locations per cell)."),
        (f"- Temperature (noise multiplier) {diag['temperature']['mean']:.3f} ± {diag['temperature']['sd']:.3f}, "
        f"from {diag['n_heldout']} held-out atlas locations (their 90% discs cover "
        f"{diag['heldout_coverage_90']:.3f}); spread within a location {diag['spatial_bandwidth']:.3g} (atlas units)."),
        (f"- Mean posterior entropy {diag['mean_entropy']:.2f} nats; mean probability of the best location "
        f"{diag['mean_best_prob']:.3f}; mean 90% credible radius {diag['mean_radius_90']:.3g}."),
        (f"- Mass possibly outside the candidates (upper bound): mean {diag['truncation_bound_mean']:.3f} "
        f"({100 * diag['truncation_frac_over_0.05']:.1f}% of cells above 0.05: raise k if large)."),
        f"- Cells with no location in the atlas (mean probability): {diag['mean_p_unmatched']:.4f}.",
        f"- {diag['seconds']:.1f} s.",
    ]
    for key in keys:
        column = f"{key}_mapped"
        if column in cells.obs and hasattr(cells.obs[column], "cat"):
            counts = cells.obs[column].value_counts()
            lines.append(f"- `{key}` carried to the cells: " + ", ".join(f"{c} {n}" for c, n in counts.items()) + ".")
    lines += ["", ("Files: `cells_mapped.h5ad` (obsm `map_prob`, `spatial_mapped`, `spatial_mapped_sd`; obs "
              "`map_radius_90`, labels), `atlas_projected.h5ad` (expected single-cell profile per location: "
              "layers `mean`, `sd`), `mapping.json`."), "", "![mapping](figures/mapping.png)", ""]
    paths["report"].write_text("\n".join(lines))
    return {name: str(p) for name, p in paths.items()}
