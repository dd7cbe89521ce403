"""Figures of an alignment result.
"""

from __future__ import annotations

from typing import Any

import anndata as ad
import numpy as np

from pyrospatial.methods.alignment import AlignmentResult

__all__ = ["plot_alignment"]


# ------------------------------------------------------------------------------------------
# figures
# ------------------------------------------------------------------------------------------
def plot_alignment(result: AlignmentResult, a: ad.AnnData, b: ad.AnnData, out_dir: str | Any,
                   *, spatial_key: str = "spatial", spatial_unit: str = "") -> dict[str, str]:
    """Write ``overlay.png`` (a and b before and after alignment) and ``match_confidence.png``
    (a's cells at their aligned positions coloured by the probability of their best match,
    and by the probability of being unmatched) into ``out_dir``. Returns the paths.

    The axes are the sections' coordinates; ``spatial_unit`` (e.g. ``"µm"``) names their unit."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    xa, xb = np.asarray(a.obsm[spatial_key]), np.asarray(b.obsm[spatial_key])
    size = float(np.clip(15000.0 / max(len(xa), 1), 2.0, 25.0))
    suffix = f" ({spatial_unit})" if spatial_unit else ""

    def name_axes(ax) -> None:
        ax.set_xlabel(f"x{suffix}")
        ax.set_ylabel(f"y{suffix}")
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    panels = ((axes[0], xa, "before: a as given"), (axes[1], result.aligned, "after: a moved onto b (posterior mean)"))
    for ax, coords, title in panels:
        ax.scatter(xb[:, 0], xb[:, 1], s=size, c="tab:blue", alpha=0.5, label="b (reference)", linewidths=0)
        ax.scatter(coords[:, 0], coords[:, 1], s=size, c="tab:red", alpha=0.5, label="a", linewidths=0)
        ax.set_title(title)
        ax.set_aspect("equal")
        name_axes(ax)
        ax.legend(loc="upper right", markerscale=3)
    ang = result.transform["angle_deg"]
    fig.suptitle(f"alignment of a onto b: rotation {ang['mean']:.2f}° "
                 f"(90% interval {ang['q05']:.2f}° to {ang['q95']:.2f}°)")
    fig.tight_layout()
    overlay = out / "overlay.png"
    fig.savefig(overlay, dpi=120)
    plt.close(fig)

    best_p = np.asarray(result.match_prob.max(axis=1).todense()).ravel()
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    for ax, values, title, cmap, label in (
        (axes[0], best_p, "P(best match)", "viridis", "probability of its most likely match in b"),
        (axes[1], result.p_unmatched, "P(unmatched)", "magma", "probability of no match in b"),
    ):
        ax.scatter(xb[:, 0], xb[:, 1], s=size, c="lightgrey", linewidths=0, label="b's cells")
        sc = ax.scatter(result.aligned[:, 0], result.aligned[:, 1], s=size, c=values, cmap=cmap, vmin=0, vmax=1,
                        linewidths=0)
        fig.colorbar(sc, ax=ax, shrink=0.8).set_label(label)
        ax.set_title(f"a's cells coloured by {title}")
        ax.set_aspect("equal")
        name_axes(ax)
        ax.legend(loc="upper right", markerscale=3, fontsize=8)
    fig.suptitle("match confidence of a's cells at their aligned positions")
    fig.tight_layout()
    confidence = out / "match_confidence.png"
    fig.savefig(confidence, dpi=120)
    plt.close(fig)
    return {"overlay": str(overlay), "match_confidence": str(confidence)}
