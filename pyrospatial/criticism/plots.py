"""Figures of model criticism: PPC densities, p-value histograms, reliability and coverage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pyrospatial.errors import InputError
from pyrospatial.criticism.ppc import PPCSummary, STATISTICS
from pyrospatial.criticism.calibration import expected_calibration_error, reliability_curve

__all__ = ["plot_ppc", "plot_pvalues", "plot_reliability", "plot_coverage", "edge_reliability_inputs"]


# ------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def plot_ppc(idata, var_name: str, features: Sequence[str], path: str | Path, *, num_pp_samples: int = 50) -> Path:
    """ArviZ posterior predictive density plots (``az.plot_ppc``), one panel per feature."""
    import arviz as az

    plt = _plt()
    if var_name not in idata.observed_data:
        raise InputError(f"'{var_name}' is not in idata.observed_data (have {list(idata.observed_data.data_vars)}).")
    dim = idata.observed_data[var_name].dims[-1]
    features = [str(f) for f in features]
    fig, axes = plt.subplots(1, len(features), figsize=(3.2 * len(features), 2.8), squeeze=False)
    n_draws = idata.posterior_predictive.sizes["draw"] * idata.posterior_predictive.sizes["chain"]
    for ax, feature in zip(axes[0], features):
        az.plot_ppc(
            idata, var_names=[var_name], coords={dim: [feature]}, ax=ax,
            num_pp_samples=min(num_pp_samples, n_draws), random_seed=0, legend=False,
        )
        ax.set_title(f"{var_name}: {feature}", fontsize=9)
    return _save(fig, path)


def plot_pvalues(summary: PPCSummary, path: str | Path, *, title: str = "") -> Path:
    """Histogram of the Bayesian p-values per statistic, and their QQ plot against Uniform(0, 1)."""
    plt = _plt()
    fig, (ax_h, ax_q) = plt.subplots(1, 2, figsize=(8, 3.2))
    bins = np.linspace(0, 1, 21)
    for stat in STATISTICS:
        col = f"p_{stat}"
        if col not in summary.table:
            continue
        p = summary.table[col].to_numpy(dtype=float)
        p = p[np.isfinite(p)]
        if not len(p):
            continue
        ax_h.hist(p, bins=bins, histtype="step", lw=1.5, label=stat)
        q = np.sort(p)
        ax_q.plot((np.arange(len(q)) + 0.5) / len(q), q, marker=".", lw=0.8, label=stat)
    a = summary.alpha
    for x in (a / 2, 1 - a / 2):
        ax_h.axvline(x, color="grey", ls=":", lw=1)
    ax_h.set_xlabel("Bayesian p-value")
    ax_h.set_ylabel("features")
    ax_h.set_title(title or f"extreme fraction {summary.extreme_fraction:.2f}", fontsize=9)
    ax_h.legend(frameon=False, fontsize=8)
    ax_q.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
    ax_q.set_xlabel("Uniform quantile")
    ax_q.set_ylabel("p-value quantile")
    ax_q.set_title("QQ against Uniform(0, 1)", fontsize=9)
    return _save(fig, path)


def plot_reliability(
    prob: np.ndarray, outcome: np.ndarray, path: str | Path, *, weights: np.ndarray | None = None,
    n_bins: int = 10, title: str = "edge probabilities",
) -> Path:
    """Reliability diagram: observed frequency vs mean predicted probability per bin, with the ECE."""
    plt = _plt()
    pred, freq, tot = reliability_curve(prob, outcome, weights=weights, n_bins=n_bins)
    ece = expected_calibration_error(prob, outcome, weights=weights, n_bins=n_bins)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="ideal")
    size = 20 + 200 * np.sqrt(tot / tot.max()) if len(tot) else 20
    ax.scatter(pred, freq, s=size, zorder=3, label="bins (area ~ weight)")
    ax.plot(pred, freq, lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted probability (posterior mean)")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"{title}: ECE {ece:.3f}", fontsize=9)
    ax.legend(frameon=False, fontsize=8)
    return _save(fig, path)


def plot_coverage(levels: Sequence[float], coverage: Mapping[str, np.ndarray], path: str | Path, *,
                  title: str = "interval coverage") -> Path:
    """Empirical vs nominal coverage of central intervals, one line per quantity."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="ideal")
    ax.fill_between([0, 1], [-0.05, 0.95], [0.05, 1.05], color="grey", alpha=0.12, lw=0)
    for name, values in coverage.items():
        ax.plot(levels, values, marker="o", ms=3, label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("nominal level of the central interval")
    ax.set_ylabel("empirical coverage")
    ax.set_title(title, fontsize=9)
    ax.legend(frameon=False, fontsize=7)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------
# a check of a results directory (used by ``pyrospatial check``)
# ------------------------------------------------------------------------------------------
def edge_reliability_inputs(idata) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(posterior-mean probability, outcome, weight) over the pair-level binary observed sites
    (e.g. a graph's edges and its sampled non-edges): every one-dimensional 0/1 variable of
    ``observed_data`` whose likelihood mean is in the posterior (``observed_data.attrs
    ["likelihood_means"]``, written by :func:`~pyrospatial.criticism.arviz.to_inference_data`).
    Each entry weighs ``constant_data[f"{dim}_weight"]`` (the pairs it stands for), else 1."""
    post, obs = idata.posterior, idata.observed_data
    means = dict(item.split(":", 1) for item in str(obs.attrs.get("likelihood_means", "")).split(",") if ":" in item)
    constants = idata.constant_data if "constant_data" in idata.groups() else {}
    probs, outcomes, weights = [], [], []
    for name, var in obs.data_vars.items():
        outcome = var.to_numpy()
        if var.ndim != 1 or means.get(name) not in post or not np.isin(outcome, (0.0, 1.0)).all():
            continue
        p = post[means[name]].mean(("chain", "draw")).to_numpy()
        key = f"{var.dims[0]}_weight"
        w = float(constants[key]) if key in constants else 1.0
        probs.append(p), outcomes.append(outcome.astype(p.dtype)), weights.append(np.full_like(p, w))
    if not probs:
        raise InputError("idata has no pair-level binary observed site with its likelihood mean (a model without edges).")
    return np.concatenate(probs), np.concatenate(outcomes), np.concatenate(weights)
