"""Figures of model criticism: PPC densities, p-value histograms, reliability and coverage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pyrospatial.errors import InputError
from pyrospatial.criticism.ppc import PPCSummary, STATISTICS

__all__ = ["edge_reliability_inputs", "plot_coverage", "plot_ppc", "plot_pvalues", "plot_reliability", "reliability_bins"]


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


def plot_ppc(idata, var_name: str, features: Sequence[str], path: str | Path, *, num_pp_samples: int = 50,
             xlabel: str | None = None) -> Path:
    """ArviZ posterior predictive density plots (``az.plot_ppc``), one panel per feature, with a
    legend for the observed data, the replicated draws and their mean, and labelled axes.

    ``xlabel`` names the observed quantity with its unit; by default "count" for integer data,
    else "value (units of the data)"."""
    import arviz as az

    plt = _plt()
    if var_name not in idata.observed_data:
        raise InputError(f"'{var_name}' is not in idata.observed_data (have {list(idata.observed_data.data_vars)}).")
    observed = idata.observed_data[var_name]
    dim = observed.dims[-1]
    unit = "count" if np.all(np.mod(observed.to_numpy(), 1) == 0) else "value (units of the data)"
    xlabel = xlabel or f"{var_name} per {observed.dims[0]}: {unit}"
    features = [str(f) for f in features]
    fig, axes = plt.subplots(1, len(features), figsize=(3.2 * len(features), 3.0), squeeze=False)
    n_draws = idata.posterior_predictive.sizes["draw"] * idata.posterior_predictive.sizes["chain"]
    shown = min(num_pp_samples, n_draws)
    for ax, feature in zip(axes[0], features):
        az.plot_ppc(
            idata, var_names=[var_name], coords={dim: [feature]}, ax=ax,
            num_pp_samples=shown, random_seed=0, legend=False,
        )
        ax.set_title(f"{var_name}: {feature}", fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("density", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.legend(handles=_ppc_legend_handles(axes[0][0], shown), loc="lower center", ncol=3, fontsize=8,
               frameon=False, bbox_to_anchor=(0.5, -0.12))
    fig.suptitle(f"posterior predictive check of {var_name} ({n_draws} draws)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _ppc_legend_handles(ax, n_shown: int) -> list:
    """Legend handles with the line styles ArviZ drew (its labelled lines), named plainly."""
    from matplotlib.lines import Line2D

    names = {"observed": "observed data", "posterior predictive": f"replicated data ({n_shown} draws)",
             "posterior predictive mean": "mean of the replicated data"}
    handles = []
    for line in ax.get_lines():
        label = line.get_label().lower()
        if label in names:
            handles.append(Line2D([], [], color=line.get_color(), ls=line.get_linestyle(), lw=line.get_linewidth(),
                                  label=names.pop(label)))
    if not handles:  # an ArviZ that labels nothing: its documented default styles
        handles = [Line2D([], [], color="k", label="observed data"),
                   Line2D([], [], color="C0", alpha=0.4, label=f"replicated data ({n_shown} draws)"),
                   Line2D([], [], color="C1", ls="--", label="mean of the replicated data")]
    return handles


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
    for k, x in enumerate((a / 2, 1 - a / 2)):
        ax_h.axvline(x, color="grey", ls=":", lw=1, label=f"extreme: p < {a / 2:g} or > {1 - a / 2:g}" if k == 0 else None)
    ax_h.set_xlabel("Bayesian p-value")
    ax_h.set_ylabel("features")
    ax_h.set_title(title or f"extreme fraction {summary.extreme_fraction:.2f}", fontsize=9)
    ax_h.legend(frameon=False, fontsize=7)
    ax_q.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="uniform (calibrated)")
    ax_q.set_xlabel("Uniform quantile")
    ax_q.set_ylabel("p-value quantile")
    ax_q.set_title("QQ against Uniform(0, 1)", fontsize=9)
    ax_q.legend(frameon=False, fontsize=7)
    fig.suptitle("posterior predictive p-values per feature and statistic", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def reliability_bins(
    prob: np.ndarray, outcome: np.ndarray, *, weights: np.ndarray | None = None, n_bins: int = 10,
    binning: str = "quantile",
) -> dict[str, np.ndarray]:
    """Per-bin reliability statistics, weighted and unweighted.

    ``binning="quantile"``: bin edges at quantiles of ``prob`` (each bin holds about the same
    number of pairs; tied quantiles merge bins); ``"uniform"``: equal-width bins on [0, 1].
    Returns ``bin_edges`` and, per non-empty bin, ``upper`` (its upper edge), ``count`` (pairs),
    ``weight`` (the pairs they stand for), ``pred``/``freq`` (unweighted mean prediction /
    observed frequency) and ``pred_w``/``freq_w`` (weighted)."""
    prob = np.asarray(prob, dtype=np.float64).ravel()
    outcome = np.asarray(outcome, dtype=np.float64).ravel()
    if prob.shape != outcome.shape or not len(prob):
        raise InputError(f"prob {prob.shape} and outcome {outcome.shape} must be non-empty and of the same length.")
    w = np.ones_like(prob) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if binning == "quantile":
        edges = np.unique(np.quantile(prob, np.linspace(0, 1, n_bins + 1)))
        edges = edges if len(edges) > 1 else np.array([edges[0], edges[0]])
    elif binning == "uniform":
        edges = np.linspace(0, 1, n_bins + 1)
    else:
        raise InputError(f"binning must be 'quantile' or 'uniform', got {binning!r}.")
    k = len(edges) - 1
    if binning == "uniform":  # the same bin of each pair as calibration.reliability_curve
        idx = np.clip((prob * n_bins).astype(int), 0, k - 1)
    else:
        idx = np.clip(np.searchsorted(edges[1:-1], prob, side="right"), 0, k - 1)

    def per_bin(values):
        return np.bincount(idx, weights=values, minlength=k)

    count, weight = per_bin(np.ones_like(prob)), per_bin(w)
    keep = count > 0
    out = {"bin_edges": edges, "upper": edges[1:][keep], "count": count[keep], "weight": weight[keep],
           "pred": per_bin(prob)[keep] / count[keep], "freq": per_bin(outcome)[keep] / count[keep]}
    safe = np.where(weight[keep] > 0, weight[keep], 1.0)
    out["pred_w"] = per_bin(w * prob)[keep] / safe
    out["freq_w"] = per_bin(w * outcome)[keep] / safe
    return out


def _ece(pred: np.ndarray, freq: np.ndarray, mass: np.ndarray) -> float:
    return float(np.sum(mass * np.abs(pred - freq)) / mass.sum()) if mass.sum() > 0 else float("nan")


def plot_reliability(
    prob: np.ndarray, outcome: np.ndarray, path: str | Path, *, weights: np.ndarray | None = None,
    n_bins: int = 10, title: str = "edge probabilities", binning: str = "quantile",
) -> Path:
    """Reliability diagram: observed frequency vs mean predicted probability per bin (quantile
    bins by default), weighted and unweighted, with the pairs and the weight per bin below.

    The title gives both ECEs on the bins shown: weighted (each pair counts for the pairs it
    stands for, e.g. a sampled non-edge for many; with ``binning="uniform"`` this is
    :func:`~pyrospatial.criticism.calibration.expected_calibration_error`) and unweighted (each
    pair counts once), so the number can be checked by eye against the points."""
    plt = _plt()
    b = reliability_bins(prob, outcome, weights=weights, n_bins=n_bins, binning=binning)
    ece_w = _ece(b["pred_w"], b["freq_w"], b["weight"])
    ece_u = _ece(b["pred"], b["freq"], b["count"])
    weighted = weights is not None and np.ptp(np.asarray(weights, dtype=float)) > 0
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(4.6, 6.2), gridspec_kw={"height_ratios": [3, 1.3]})
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="ideal (calibrated)")
    ax.plot(b["pred"], b["freq"], marker="o", ms=5, lw=1, color="C0", label="unweighted (each pair once)")
    for x, y, n in zip(b["pred"], b["freq"], b["count"]):
        ax.annotate(f"{int(n)}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6, color="C0")
    if weighted:
        size = 15 + 150 * np.sqrt(b["weight"] / b["weight"].max())
        ax.scatter(b["pred_w"], b["freq_w"], s=size, marker="s", color="C1", alpha=0.7, zorder=3,
                   label="weighted (area ~ pairs represented)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted probability (posterior mean)")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"{title}: ECE weighted {ece_w:.3f}, unweighted {ece_u:.3f}\n"
                 f"({len(b['count'])} {binning} bins; numbers: pairs per bin)", fontsize=9)
    ax.legend(frameon=False, fontsize=7, loc="upper left")
    pos = np.arange(len(b["count"]))
    ax_n.bar(pos - 0.2, b["count"], width=0.4, color="C0", label="pairs")
    if weighted:
        ax_n.bar(pos + 0.2, b["weight"], width=0.4, color="C1", label="weight (pairs represented)")
    ax_n.set_yscale("log")
    ax_n.set_ylim(bottom=0.3 * float(b["count"].min()))
    ax_n.yaxis.set_minor_formatter(plt.NullFormatter())
    ax_n.tick_params(axis="y", labelsize=7)
    ax_n.set_xticks(pos, [f"≤{u:.2g}" for u in b["upper"]], rotation=60, fontsize=6)
    ax_n.set_xlabel("bin (upper edge of predicted probability)", fontsize=8)
    ax_n.set_ylabel("pairs / weight (log)", fontsize=8)
    ax_n.set_title("pairs and weight per bin", fontsize=8)
    ax_n.legend(frameon=False, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return _save(fig, path)


def plot_coverage(levels: Sequence[float], coverage: Mapping[str, np.ndarray], path: str | Path, *,
                  title: str = "interval coverage") -> Path:
    """Empirical vs nominal coverage of central intervals, one line per quantity."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="ideal")
    ax.fill_between([0, 1], [-0.05, 0.95], [0.05, 1.05], color="grey", alpha=0.12, lw=0, label="ideal ± 0.05")
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
