"""Figures and files of a domains run: the domain map with confidence as transparency, the
tissue image beside it, and what ``pyrospatial domains`` writes into its output folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from anndata import AnnData

__all__ = ["plot_domains", "write_domains_report"]


def _image_of(adata: AnnData, spatial_key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The first image in ``uns['spatial']`` and the spot centres in its pixels, or None."""
    spatial = adata.uns.get("spatial")
    if not isinstance(spatial, dict):
        return None
    for lib in spatial.values():
        images, factors = dict(lib.get("images", {})), dict(lib.get("scalefactors", {}))
        for name in ("lowres", "hires"):
            if name in images and f"tissue_{name}_scalef" in factors and np.ndim(images[name]) >= 2:
                xy = np.asarray(adata.obsm[spatial_key])[:, :2] * float(factors[f"tissue_{name}_scalef"])
                return np.asarray(images[name]), xy
    return None


def plot_domains(outs: Sequence[AnnData], path: str | Path, *, titles: Sequence[str] | None = None,
                 spatial_key: str = "spatial", truth_key: str | None = None) -> Path:
    """One row per section: the tissue image (when ``uns['spatial']`` holds one), the domain map
    with ``domain_confidence`` as transparency, and (``truth_key``) the reference labels."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n_cols = 2 + (truth_key is not None)
    fig, axes = plt.subplots(len(outs), n_cols, figsize=(4.2 * n_cols, 4.0 * len(outs)), squeeze=False)
    cmap = plt.get_cmap("tab10" if outs[0].obs["domain"].cat.categories.size <= 10 else "tab20")
    for row, out in enumerate(outs):
        title = titles[row] if titles else f"section {row}"
        image = _image_of(out, spatial_key)
        ax = axes[row, 0]
        if image is not None:
            ax.imshow(image[0])
            ax.set_xlim(image[1][:, 0].min() - 5, image[1][:, 0].max() + 5)
            ax.set_ylim(image[1][:, 1].max() + 5, image[1][:, 1].min() - 5)
            ax.set_title(f"{title}: tissue image")
        else:
            ax.text(0.5, 0.5, "no image in uns['spatial']", ha="center", va="center")
        ax.axis("off")
        xy = np.asarray(out.obsm[spatial_key])[:, :2]
        colours = cmap(out.obs["domain"].cat.codes.to_numpy() % cmap.N)
        colours[:, 3] = np.clip(out.obs["domain_confidence"].to_numpy(), 0.05, 1.0)
        ax = axes[row, 1]
        ax.scatter(xy[:, 0], xy[:, 1], c=colours, s=8, linewidths=0)
        ax.set_title(f"{title}: domain (opacity = confidence)")
        ax.invert_yaxis()
        ax.set_aspect("equal")
        ax.axis("off")
        if truth_key is not None:
            ax = axes[row, 2]
            codes = out.obs[truth_key].astype("category").cat.codes.to_numpy()
            ax.scatter(xy[:, 0], xy[:, 1], c=np.where(codes < 0, 0, codes) % cmap.N, cmap=cmap, s=8,
                       linewidths=0, vmin=0, vmax=cmap.N - 1)
            ax.set_title(f"{title}: {truth_key}")
            ax.invert_yaxis()
            ax.set_aspect("equal")
            ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_domains_report(outs: Sequence[AnnData], out: Path, *, names: Sequence[str]) -> dict:
    """Write ``domains_<i>.h5ad`` per section, ``figures/domains.png`` and ``domains.json``
    (spots per domain and mean confidence per section; the restarts' agreement); return the summary."""
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    summary: dict = {"sections": []}
    for i, (adata, name) in enumerate(zip(outs, names)):
        adata.write_h5ad(out / f"domains_{i}.h5ad")
        counts = adata.obs["domain"].value_counts().sort_index()
        summary["sections"].append({
            "input": str(name), "file": f"domains_{i}.h5ad", "n_obs": int(adata.n_obs),
            "spots_per_domain": {str(k): int(v) for k, v in counts.items()},
            "mean_confidence": float(adata.obs["domain_confidence"].mean()),
        })
    restarts = outs[0].uns.get("domains", {}).get("restarts")
    if restarts is not None:  # how far the pooled fits agreed with the reference (lowest loss) one
        summary["restarts"] = {"restarts": int(restarts["restarts"]), "reference": int(restarts["reference"]),
                               "agreement": [float(a) for a in np.atleast_1d(restarts["agreement"])]}
        for key in ("rhat_max", "rhat_above"):  # between-restart R-hat of the domain probabilities
            if key in restarts and np.isfinite(float(restarts[key])):
                summary["restarts"][key] = float(restarts[key])
    plot_domains(outs, out / "figures" / "domains.png", titles=[str(n) for n in names])
    summary["figures"] = ["figures/domains.png"]
    import json

    (out / "domains.json").write_text(json.dumps(summary, indent=2))
    return summary
