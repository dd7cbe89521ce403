"""Figures (matplotlib): ELBO curves, spatial maps of posterior summaries, interaction
matrices with interval widths, domains with confidence, interval calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pyrospatial.errors import InputError

__all__ = [
    "central_interval_coverage",
    "interaction_interval_caveat",
    "plot_calibration",
    "plot_domains",
    "plot_elbo",
    "plot_interactions",
    "plot_spatial_panels",
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
    ax.set_ylabel("loss: -ELBO (nats)")
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
    colorbar_labels: str | Sequence[str] = "value",
    spatial_unit: str = "",
) -> Path:
    """One scatter map per (title, values) panel; panels whose indices are in
    ``shared_scale`` share one colour range (e.g. truth and posterior mean).

    ``colorbar_labels`` names what the colours are (one label for every panel, or one per
    panel, with units, e.g. ``"expected counts"``); ``spatial_unit`` is the unit of the
    coordinates (e.g. ``"µm"``) written on the axes."""
    labels = [colorbar_labels] * len(panels) if isinstance(colorbar_labels, str) else list(colorbar_labels)
    if len(labels) != len(panels):
        raise InputError(f"colorbar_labels has {len(labels)} labels for {len(panels)} panels: give one per panel.")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.6), squeeze=False, layout="constrained")
    shared = [np.asarray(panels[i][1]) for i in shared_scale]
    vmin = min(np.nanmin(v) for v in shared) if shared else None
    vmax = max(np.nanmax(v) for v in shared) if shared else None
    for i, (ax, (title, values), label) in enumerate(zip(axes[0], panels, labels)):
        kw = {"vmin": vmin, "vmax": vmax} if i in shared_scale else {}
        im = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=size, cmap="viridis", linewidths=0, **kw)
        ax.set_title(title, fontsize=9)
        _spatial_axes(ax, spatial_unit)
        bar = fig.colorbar(im, ax=ax, shrink=0.75)
        bar.set_label(label, fontsize=8)
        bar.ax.tick_params(labelsize=7)
    if suptitle:
        fig.suptitle(suptitle)
    return _save(fig, path)


def _spatial_axes(ax, unit: str = "") -> None:
    """Equal aspect, small ticks and the coordinate axes named (with their unit when known)."""
    suffix = f" ({unit})" if unit else ""
    ax.set_aspect("equal")
    ax.tick_params(labelsize=6)
    ax.set_xlabel("x" + suffix, fontsize=8)
    ax.set_ylabel("y" + suffix, fontsize=8)


def interaction_interval_caveat(interactions: dict) -> str | None:
    """Why the interaction intervals of ``interactions`` should not be read as calibrated, or
    None when they may be.

    ``interactions`` is the dict of :meth:`~pyrospatial.methods.coral.CORAL.interactions` or its
    export ``uns["pyrospatial"]["interactions"]``. An explicit ``intervals_calibrated`` (bool)
    or ``warning`` (str) entry decides when present (``CORAL.interactions`` sets
    ``intervals_calibrated`` for a graph-free posterior, whose edge decoder is drawn given the
    graph); otherwise the intervals are trusted only
    when the recalibration fitted for the graph-conditioned posterior with a Bayesian edge
    decoder was applied (``recalibration`` not None, or ``recalibration_factor`` not 1), and
    a largest split-R-hat ``rhat_max`` above 1.05 (chains that disagree) is a caveat too."""
    warning = interactions.get("warning")
    if isinstance(warning, str) and warning.strip():
        return warning.strip()
    flag = interactions.get("intervals_calibrated")
    if flag is not None:
        return None if bool(flag) else "the run marks these interaction intervals as not calibrated"
    recalibration = interactions.get("recalibration")
    factor = float(recalibration["factor"]) if recalibration else float(interactions.get("recalibration_factor", 1.0))
    posterior = str(interactions.get("posterior", ""))
    if factor == 1.0:
        if "graph=False" in posterior:  # an export written before the edge decoder's posterior existed
            return ("this posterior leaves the cell graph out and holds the edge decoder: its 90% intervals "
                    "cover about a third of simulated truths (far too narrow)")
        return ("these intervals are not recalibrated: only the graph-conditioned posterior with a Bayesian "
                "edge decoder, widened by its recalibration, has intervals that cover their level")
    rhat = float(interactions.get("rhat_max", float("nan")))
    if np.isfinite(rhat) and rhat > 1.05:
        return f"the refinement's chains disagree (largest split-R-hat {rhat:.2f} > 1.05)"
    return None


def plot_interactions(interactions: dict, path: str | Path, *, untrusted: str = "caveat") -> Path:
    """Heatmaps of the interaction matrix's posterior mean and 90% interval width (the width's
    title names a recalibration's widening when one was applied: ``recalibration_factor`` of the
    export, or ``recalibration`` of :meth:`~pyrospatial.methods.coral.CORAL.interactions`).

    When :func:`interaction_interval_caveat` finds a reason to distrust the intervals, the
    figure says so in red under the panels and the width panel is faded and titled "not
    calibrated" (``untrusted="caveat"``, default), or the width panel is left out
    (``untrusted="hide"``)."""
    if untrusted not in ("caveat", "hide"):
        raise InputError(f"untrusted must be 'caveat' or 'hide', got {untrusted!r}.")
    names = [str(n) for n in interactions["cell_types"]]
    mean = np.asarray(interactions["mean"], dtype=float)
    width = np.asarray(interactions["q95"], dtype=float) - np.asarray(interactions["q05"], dtype=float)
    recalibration = interactions.get("recalibration")
    factor = float(recalibration["factor"]) if recalibration else float(interactions.get("recalibration_factor", 1.0))
    caveat = interaction_interval_caveat(interactions)
    width_title = "90% interval width (q95 - q05)" + (f", widened x{factor:.2f}" if factor != 1.0 else "")
    panels = [(mean, "edge probability: posterior mean", "mean edge probability", 1.0)]
    if caveat is None:
        panels.append((width, width_title, "interval width (probability)", 1.0))
    elif untrusted == "caveat":
        panels.append((width, "NOT CALIBRATED: " + width_title, "interval width (probability; too narrow)", 0.35))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4.0), squeeze=False, layout="constrained")
    for ax, (values, title, label, alpha) in zip(axes[0], panels):
        shown = np.where(values < 0, np.nan, values)  # -1: type pairs without an edge
        im = ax.imshow(shown, cmap="magma", alpha=alpha)
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("cell type", fontsize=8)
        ax.set_ylabel("cell type", fontsize=8)
        ax.set_title(title, fontsize=9, color="tab:red" if alpha < 1 else "black")
        bar = fig.colorbar(im, ax=ax, shrink=0.8)
        bar.set_label(label, fontsize=8)
        bar.ax.tick_params(labelsize=7)
    fig.suptitle("cell-type interactions (mean edge probability over the graph's edges; blank: no edge)", fontsize=9)
    if caveat is not None:
        shown_how = "shown faded" if untrusted == "caveat" else "not shown"
        fig.text(0.5, -0.02, _wrap(f"Caveat: interval widths {shown_how}: {caveat}."), ha="center", va="top",
                 fontsize=8, color="tab:red", gid="interval-caveat",
                 bbox={"facecolor": "mistyrose", "edgecolor": "tab:red", "boxstyle": "round"})
    return _save(fig, path)


def _wrap(text: str, width: int = 110) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def plot_domains(xy: np.ndarray, labels: np.ndarray, confidence: np.ndarray, path: str | Path, *,
                 truth: np.ndarray | None = None, truth_title: str = "truth", spatial_unit: str = "") -> Path:
    """Domains (categorical, with a legend) next to their assignment confidence; with ``truth``
    (true labels per cell, e.g. a simulation's layers), the truth panel comes first and the
    domains' colours follow the truth label each domain overlaps most."""
    labels = np.asarray(labels).astype(str)
    domains = list(np.unique(labels))
    colour_of = {d: i for i, d in enumerate(domains)}
    n_panels = 3 if truth is not None else 2
    fig, axes = plt.subplots(1, n_panels, figsize=(4.2 * n_panels, 3.8))
    size = float(np.clip(15000.0 / max(len(xy), 1), 2.0, 12.0))
    cmap = plt.get_cmap("tab20" if len(domains) > 10 else "tab10")
    ax_iter = iter(axes)
    if truth is not None:
        truth = np.asarray(truth).astype(str)
        classes = list(np.unique(truth))
        colour_of = _match_colours(labels, domains, truth, classes)
        ax = next(ax_iter)
        for k, c in enumerate(classes):
            sel = truth == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=cmap(k % cmap.N), linewidths=0, label=c)
        ax.set_title(truth_title, fontsize=9)
        ax.legend(title=truth_title, fontsize=7, title_fontsize=7, markerscale=2, loc="upper left",
                  bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax = next(ax_iter)
    for d in domains:
        sel = labels == d
        ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=cmap(colour_of[d] % cmap.N), linewidths=0, label=d)
    ax.set_title("spatial domains" + (" (colours matched to the truth)" if truth is not None else ""), fontsize=9)
    ax.legend(title="domain", fontsize=7, title_fontsize=7, markerscale=2, loc="upper left",
              bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax = next(ax_iter)
    im = ax.scatter(xy[:, 0], xy[:, 1], c=confidence, s=size, cmap="viridis", vmin=0, vmax=1, linewidths=0)
    ax.set_title("assignment confidence (co-clustering over draws)", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8).set_label("confidence (fraction of draws)", fontsize=8)
    for ax in axes:
        _spatial_axes(ax, spatial_unit)
    fig.suptitle("spatial domains from posterior draws", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _match_colours(labels: np.ndarray, domains: list[str], truth: np.ndarray, classes: list[str]) -> dict[str, int]:
    """Colour index per domain: the truth class it overlaps most, one domain per class
    (Hungarian matching on the overlap table); unmatched domains get the colours after the classes."""
    from scipy.optimize import linear_sum_assignment

    overlap = np.array([[np.sum((labels == d) & (truth == c)) for c in classes] for d in domains])
    rows, cols = linear_sum_assignment(-overlap)
    colour_of = {domains[r]: int(c) for r, c in zip(rows, cols)}
    spare = iter(range(len(classes), len(classes) + len(domains)))
    return {d: colour_of[d] if d in colour_of else next(spare) for d in domains}


def central_interval_coverage(draws: np.ndarray, truth: np.ndarray, levels: Sequence[float]) -> np.ndarray:
    """Empirical coverage of central posterior intervals at each nominal level."""
    out = []
    for level in levels:
        lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2], axis=0)
        out.append(np.mean((truth >= lo) & (truth <= hi)))
    return np.asarray(out)


def plot_calibration(levels: Sequence[float], coverage: dict[str, np.ndarray], path: str | Path, *,
                     title: str = "calibration of posterior intervals against the truth") -> Path:
    """Empirical vs nominal coverage of central intervals (one line per quantity)."""
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="ideal")
    for name, values in coverage.items():
        ax.plot(levels, values, marker="o", label=name)
    ax.set_xlabel("nominal coverage of the central interval")
    ax.set_ylabel("empirical coverage of the truth")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(frameon=False, fontsize=8)
    return _save(fig, path)
