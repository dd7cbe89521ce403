"""Deconvolution outputs for people: held-out gene score, abundance maps and the markdown report.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from anndata import AnnData

from pyrospatial.errors import InputError
from pyrospatial.methods.deconvolution import UNS_KEY, deconvolve
from pyrospatial.methods.deconvolution_inputs import _matrix, _raw_counts, _reference_labels, _shared_genes, signature_prior

__all__ = ["heldout_gene_score", "plot_abundance_maps", "write_report"]


def heldout_gene_score(
    spots: AnnData,
    reference: AnnData,
    cell_type_key: str = "cell_type",
    *,
    n_folds: int = 3,
    seed: int = 0,
    **kwargs,
) -> dict:
    """Held-out-gene predictive score of a setting of :func:`deconvolve` (no ground truth).

    The shared genes are split at random (``seed``) into ``n_folds`` folds; for each fold the
    spots are deconvolved on the other genes only (``kwargs`` passed to :func:`deconvolve`),
    and the held-out genes are predicted from the posterior mean abundances and the reference
    signatures, ``x_hat_jg = sum_t w_jt s_tg`` rescaled so that each held-out gene's total over
    spots matches its observed total (platform effects of unseen genes are unknown). The score
    is the mean Poisson deviance per held-out count entry (lower is better): a composition that
    is right predicts genes it never saw. Use it to choose priors (e.g. ``concentration_mean``)
    by looking at the data only.

    Returns ``{"deviance": float, "per_fold": [...], "n_folds": int}``.
    """
    genes = _shared_genes(spots, reference)
    labels = _reference_labels(reference, cell_type_key, int(kwargs.get("min_cells_per_type", 5)))
    ref_counts = _raw_counts(_matrix(reference, kwargs.get("reference_layer"), "reference")[0], "reference")
    ref_counts = ref_counts[:, pd.Index(map(str, reference.var_names)).get_indexer(genes)]
    spot_counts = _raw_counts(_matrix(spots, kwargs.get("layer"), "spots")[0], "spots")
    spot_counts = spot_counts[:, pd.Index(map(str, spots.var_names)).get_indexer(genes)]
    shape, rate, _, _ = signature_prior(ref_counts, labels)
    signature = shape / rate
    folds = np.array_split(np.random.default_rng(seed).permutation(len(genes)), int(n_folds))
    kwargs.setdefault("progress", False)
    per_fold = []
    for held in folds:
        keep = np.setdiff1d(np.arange(len(genes)), held)
        sub = spots[:, [genes[g] for g in keep]].copy()
        keep_spots = np.asarray(spot_counts[:, keep].sum(1) > 0)
        out = deconvolve(sub[keep_spots], reference, cell_type_key, seed=seed, **kwargs)
        types = list(out.uns[UNS_KEY]["cell_types"])
        w = out.obsm["abundance_mean"][types].to_numpy()
        x = spot_counts[keep_spots][:, held]
        pred = w @ signature[:, held]
        pred = pred * (x.sum(0) / np.maximum(pred.sum(0), 1e-12))
        pred = np.maximum(pred, 1e-8)
        with np.errstate(divide="ignore", invalid="ignore"):
            term = np.where(x > 0, x * np.log(x / pred), 0.0)
        per_fold.append(float(np.mean(2.0 * (term - (x - pred)))))
    return {"deviance": float(np.mean(per_fold)), "per_fold": per_fold, "n_folds": int(n_folds)}


# ------------------------------------------------------------------------------------------
# figures and report (used by ``pyrospatial deconvolve``)
# ------------------------------------------------------------------------------------------
def plot_abundance_maps(result: AnnData, path, *, what: str = "mean", spatial_key: str = "spatial",
                        spatial_unit: str = ""):
    """One spatial map per cell type of the abundance posterior ``mean`` (``what="mean"``) or
    of its 90% interval width ``q95 - q05`` (``what="width"``), each with a labelled colour bar
    (cells per spot); ``spatial_unit`` (e.g. ``"µm"``) names the coordinates' unit. Returns the
    path written."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if what not in ("mean", "width"):
        raise InputError(f"what must be 'mean' or 'width', got {what!r}.")
    if spatial_key not in result.obsm:
        raise InputError(f"result.obsm['{spatial_key}'] is missing: spatial maps need spot coordinates.")
    xy = np.asarray(result.obsm[spatial_key])[:, :2]
    types = list(result.uns[UNS_KEY]["cell_types"])
    if what == "mean":
        values = result.obsm["abundance_mean"][types].to_numpy()
        label = "abundance per spot: posterior mean (cells)"
        bar_label = "cells per spot"
    else:
        values = (result.obsm["abundance_q95"][types] - result.obsm["abundance_q05"][types]).to_numpy()
        label = "abundance per spot: 90% interval width q95 - q05 (cells)"
        bar_label = "interval width (cells)"
    suffix = f" ({spatial_unit})" if spatial_unit else ""
    ncol = min(6, len(types))
    nrow = int(math.ceil(len(types) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol, 2.4 * nrow), squeeze=False)
    size = max(4.0, 4000.0 / max(len(xy), 1))
    for ax, t, col in zip(axes.ravel(), types, values.T):
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=col, s=size, marker="s", cmap="viridis", vmin=0)
        ax.set_title(str(t), fontsize=8)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("x" + suffix, fontsize=6)
        ax.set_ylabel("y" + suffix, fontsize=6)
        bar = fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02)
        bar.ax.tick_params(labelsize=6)
        bar.set_label(bar_label, fontsize=6)
    for ax in axes.ravel()[len(types):]:
        ax.axis("off")
    fig.suptitle(label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(result: AnnData, out_dir, *, spots_path: str = "", reference_path: str = "") -> dict:
    """Write ``result.h5ad``, ``figures/abundance_mean.png``, ``figures/abundance_interval_width.png``
    (when the spots have coordinates), ``figures/elbo.png`` and ``report.md`` into ``out_dir``.
    Returns a small summary dict (also written as ``summary.json``)."""
    import json
    from pathlib import Path

    from pyrospatial.plotting import plot_elbo

    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    result.write_h5ad(out / "result.h5ad")
    rec = result.uns[UNS_KEY]
    types = list(rec["cell_types"])
    figures = [str(plot_elbo(np.asarray(rec["elbo"]), out / "figures" / "elbo.png"))]
    if "spatial" in result.obsm:
        figures.append(str(plot_abundance_maps(result, out / "figures" / "abundance_mean.png", what="mean")))
        figures.append(str(plot_abundance_maps(result, out / "figures" / "abundance_interval_width.png", what="width")))
    prop = result.obsm["proportion_mean"][types]
    width = (result.obsm["cell_count_q95"][types] - result.obsm["cell_count_q05"][types])
    summary = {
        "n_spots": int(result.n_obs),
        "n_types": len(types),
        "n_genes": int(len(rec["genes"])),
        "fit_seconds": float(rec["fit_seconds"]),
        "mean_proportion": {t: float(v) for t, v in prop.mean(0).items()},
        "mean_count_interval_width": {t: float(v) for t, v in width.mean(0).items()},
        "figures": [str(Path(f).relative_to(out)) for f in figures],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [
        "# pyrospatial deconvolve",
        "",
        f"Spots: `{spots_path}` ({result.n_obs} spots); reference: `{reference_path}`; "
        f"{len(types)} cell types, {len(rec['genes'])} shared genes; fit and posterior "
        f"{rec['fit_seconds']:.1f} s.",
        "",
        "Results in `result.h5ad`: `obsm['abundance_{mean,sd,q05,q50,q95}']` (expected cells per type),",
        "`obsm['cell_count_*']` (integer cell counts; `[q05, q95]` is the 90% interval),",
        "`obsm['proportion_*']`, `uns['deconvolution']` (settings, globals, ELBO).",
        "",
        "| cell type | reference cells | mean proportion | mean 90% count-interval width |",
        "|---|---|---|---|",
    ]
    for t, n in zip(types, rec["n_reference_cells"]):
        lines.append(f"| {t} | {int(n)} | {summary['mean_proportion'][t]:.3f} | "
                     f"{summary['mean_count_interval_width'][t]:.2f} |")
    lines += [
        "",
        "How to read a wide interval: a spot whose 90% interval for a type spans several cells "
        "(e.g. 0 to 4) is one whose counts are explained about equally well by different mixtures "
        "(often similar types sharing marker genes); trust the sum over similar types more than "
        "the split between them.",
        "",
        "Figures: " + ", ".join(f"`{f}`" for f in summary["figures"]),
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    return summary
