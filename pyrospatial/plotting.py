"""Figures (matplotlib): ELBO curves, spatial maps of posterior summaries, interaction
matrices with interval widths, domains with confidence, interval calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = [
    "plot_elbo",
    "plot_spatial_panels",
    "plot_interactions",
    "plot_domains",
    "plot_calibration",
    "central_interval_coverage",
]


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_elbo(history: np.ndarray, path: str | Path, *, title: str = "SVI training") -> Path:
    """Loss (negative ELBO) per step, with a running mean."""
    history = np.asarray(history, dtype=float)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(history, lw=0.6, alpha=0.5, label="per step")
    window = max(1, len(history) // 50)
    if window > 1:
        smooth = np.convolve(history, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window - 1, len(history)), smooth, lw=1.5, label=f"running mean ({window})")
    ax.set_yscale("symlog" if (history <= 0).any() else "log")
    ax.set_xlabel("step")
    ax.set_ylabel("-ELBO")
    ax.set_title(title)
    ax.legend(frameon=False)
    return _save(fig, path)


def plot_spatial_panels(
    xy: np.ndarray,
    panels: Sequence[tuple[str, np.ndarray]],
    path: str | Path,
    *,
    suptitle: str = "",
    shared_scale: Sequence[int] = (),
    size: float = 6.0,
) -> Path:
    """One scatter map per (title, values) panel; panels whose indices are in
    ``shared_scale`` share one colour range (e.g. truth and posterior mean)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    shared = [np.asarray(panels[i][1]) for i in shared_scale]
    vmin = min(np.nanmin(v) for v in shared) if shared else None
    vmax = max(np.nanmax(v) for v in shared) if shared else None
    for i, (ax, (title, values)) in enumerate(zip(axes[0], panels)):
        kw = {"vmin": vmin, "vmax": vmax} if i in shared_scale else {}
        im = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=size, cmap="viridis", linewidths=0, **kw)
        ax.set_title(title, fontsize=9)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, shrink=0.75)
    if suptitle:
        fig.suptitle(suptitle)
    return _save(fig, path)


def plot_interactions(interactions: dict, path: str | Path) -> Path:
    """Heatmaps of the interaction matrix's posterior mean and 90% interval width (the width's
    title names a recalibration's widening when one was applied: ``recalibration_factor`` of the
    export, or ``recalibration`` of :meth:`~pyrospatial.methods.coral.CORAL.interactions`)."""
    names = [str(n) for n in interactions["cell_types"]]
    mean = np.asarray(interactions["mean"], dtype=float)
    width = np.asarray(interactions["q95"], dtype=float) - np.asarray(interactions["q05"], dtype=float)
    recalibration = interactions.get("recalibration")
    factor = float(recalibration["factor"]) if recalibration else float(interactions.get("recalibration_factor", 1.0))
    width_title = "90% interval width (q95 - q05)" + (f", widened x{factor:.2f}" if factor != 1.0 else "")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, values, title in ((axes[0], mean, "edge probability: posterior mean"),
                              (axes[1], width, width_title)):
        im = ax.imshow(np.where(values < 0, np.nan, values), cmap="magma")
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, path)


def plot_domains(xy: np.ndarray, labels: np.ndarray, confidence: np.ndarray, path: str | Path) -> Path:
    """Domains (categorical) next to their assignment confidence."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    codes = np.unique(labels, return_inverse=True)[1]
    axes[0].scatter(xy[:, 0], xy[:, 1], c=codes, s=6, cmap="tab10", linewidths=0)
    axes[0].set_title("spatial domains", fontsize=9)
    im = axes[1].scatter(xy[:, 0], xy[:, 1], c=confidence, s=6, cmap="viridis", vmin=0, vmax=1, linewidths=0)
    axes[1].set_title("assignment confidence (co-clustering over draws)", fontsize=9)
    fig.colorbar(im, ax=axes[1], shrink=0.8)
    for ax in axes:
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)


def central_interval_coverage(draws: np.ndarray, truth: np.ndarray, levels: Sequence[float]) -> np.ndarray:
    """Empirical coverage of central posterior intervals at each nominal level."""
    out = []
    for level in levels:
        lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2], axis=0)
        out.append(np.mean((truth >= lo) & (truth <= hi)))
    return np.asarray(out)


def plot_calibration(levels: Sequence[float], coverage: dict[str, np.ndarray], path: str | Path) -> Path:
    """Empirical vs nominal coverage of central intervals (one line per quantity)."""
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="ideal")
    for name, values in coverage.items():
        ax.plot(levels, values, marker="o", label=name)
    ax.set_xlabel("nominal coverage of the central interval")
    ax.set_ylabel("empirical coverage of the truth")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(frameon=False, fontsize=8)
    return _save(fig, path)
