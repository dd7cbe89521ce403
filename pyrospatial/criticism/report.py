"""``pyrospatial check``: PPC, calibration figures and a markdown report for a results folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pyrospatial.errors import InputError
from pyrospatial.criticism.ppc import PPCSummary, ppc_summary
from pyrospatial.criticism.plots import edge_reliability_inputs, plot_ppc, plot_pvalues, plot_reliability
from pyrospatial.criticism.calibration import expected_calibration_error
from pyrospatial.criticism.arviz import load_inference_data

__all__ = ["check_results", "convergence_summary", "POSTERIOR_METHODS"]


#: how each posterior of the methods is made, in words (``posterior.method`` -> sentence)
POSTERIOR_METHODS = {
    "local": "Hamiltonian Monte Carlo per spot (every spot at once), started from the trained variational guide",
    "hmc": "Hamiltonian Monte Carlo over every latent of the tissue at once, started from the trained guide",
    "refine": "Hamiltonian Monte Carlo over every latent of the tissue at once, started from the trained guide",
    "guide": "draws of the trained mean-field variational guide (fast; per-cell intervals too narrow where "
             "cells share a spot)",
}


def convergence_summary(diagnostics: dict) -> tuple[bool | None, list[str]]:
    """Whether the MCMC draws behind ``diagnostics`` passed the convergence check, and the
    plain-word lines saying so (largest split-R-hat and smallest bulk ESS per site, and the
    Pareto k-hat when the run reports one). ``None`` when the run reports no R-hat (draws of
    a variational guide: no chains to compare)."""
    from pyrospatial.criticism.convergence import ESS_BULK_MIN, RHAT_MAX, unconverged_sites

    rhats = {k: v for k, v in (diagnostics.get("rhat_max") or {}).items() if np.isfinite(v)}
    esses = diagnostics.get("ess_bulk_min") or {}
    khat = diagnostics.get("khat", diagnostics.get("pareto_k"))
    if not rhats:
        lines = ["No chains to compare (draws of a variational guide, or too few draws per chain): "
                 "convergence is not assessed."]
        return None, lines
    failing = unconverged_sites(diagnostics)
    per_site = ", ".join(f"{name} {r:.2f} (ESS {esses.get(name, float('nan')):.0f})" for name, r in sorted(rhats.items()))
    lines = [f"Largest split-R-hat per quantity, with its smallest bulk ESS: {per_site}. "
             f"The check asks for R-hat at most {RHAT_MAX} and ESS at least {ESS_BULK_MIN:.0f}."]
    if failing:
        lines.append("**Failed** for " + "; ".join(f"{k} ({v})" for k, v in failing.items())
                     + ": the intervals of these quantities are not reliable; draw more (num_warmup, num_samples) "
                     "or train longer.")
    else:
        lines.append("**Passed**: the chains agree for every quantity.")
    if isinstance(khat, (int, float)) and np.isfinite(khat):
        lines.append(f"Pareto k-hat {khat:.2f} ({'below' if khat < 0.7 else '**above**'} 0.7, the level above which "
                     "importance weights are unreliable).")
    return not failing, lines


def _top_features(summary: PPCSummary, group: str, k: int) -> list[str]:
    """The ``k`` features of ``group`` with the most extreme p-values (ties: table order)."""
    t = summary.table[summary.table["group"] == group]
    if t.empty:
        return []
    p = t[[c for c in t.columns if c.startswith("p_")]].to_numpy(dtype=float)
    dist = np.nanmax(np.abs(np.nan_to_num(p, nan=0.5) - 0.5), axis=1)
    return t["feature"].to_numpy()[np.argsort(-dist, kind="stable")[:k]].tolist()


def check_results(results: str | Path, *, out: str | Path | None = None, n_features: int = 3,
                  alpha: float = 0.05) -> dict[str, Any]:
    """Criticise a demo / fit output directory holding ``inference_data.nc``.

    Writes ``figures/ppc_{group}.png`` for every checked observed site (CORAL:
    ``ppc_spot_counts.png``, ``ppc_proteins.png``), ``figures/ppc_pvalues.png``,
    ``figures/edge_reliability.png`` (when the model has pair-level sites), ``ppc_summary.csv`` and
    ``check.md`` into ``out`` (default: ``results``; created with its parents when missing);
    returns the headline numbers (``ppc_extreme_pvalue_fraction``, per-group fractions,
    ``edge_ece``).
    """
    results = Path(results)
    out = Path(out) if out is not None else results
    path = results / "inference_data.nc"
    if not path.exists():
        raise InputError(
            f"{path} does not exist: --results must be a folder written by `pyrospatial demo` or "
            "`pyrospatial fit` (they write inference_data.nc)."
        )
    idata = load_inference_data(path)
    out.mkdir(parents=True, exist_ok=True)
    figures = out / "figures"
    summary = ppc_summary(idata, alpha=alpha)
    summary.table.to_csv(out / "ppc_summary.csv", index=False)
    written = {"pvalues": plot_pvalues(summary, figures / "ppc_pvalues.png")}
    for group in summary.by_group:
        feats = _top_features(summary, group, n_features)
        if feats:
            written[group] = plot_ppc(idata, group, feats, figures / f"ppc_{group}.png")
    result: dict[str, Any] = {
        "ppc_extreme_pvalue_fraction": summary.extreme_fraction,
        "ppc_extreme_pvalue_fraction_by_group": summary.by_group,
        "edge_ece": None,
    }
    try:
        prob, outcome, weight = edge_reliability_inputs(idata)
        result["edge_ece"] = expected_calibration_error(prob, outcome, weights=weight)
        written["edge_reliability"] = plot_reliability(prob, outcome, figures / "edge_reliability.png", weights=weight)
    except InputError:
        pass
    _check_report(out / "check.md", idata, summary, result, written, out)
    result["figures"] = {k: str(Path(v).relative_to(out)) for k, v in written.items()}
    return result


def _check_report(path: Path, idata, summary: PPCSummary, result: dict, figures: dict, root: Path) -> None:
    t = summary.table
    worst = t.assign(_d=(t[[c for c in t.columns if c.startswith("p_")]].fillna(0.5) - 0.5).abs().max(axis=1))
    worst = worst.sort_values("_d", ascending=False).head(10)
    method = idata.posterior.attrs.get("method", "?")
    lines = [
        "# Model check: posterior predictive checks",
        "",
        f"Posterior draws: {idata.posterior.sizes['draw']} ({method}). For every gene (over spots) and",
        "protein (over cells) the observed mean, variance, zero fraction and dispersion (mean squared residual",
        "over the likelihood variance, per draw) are compared with the same",
        "statistics of data replicated from the fitted model (Bayesian p-value = P(T_rep > T_obs); near 0 or 1",
        f"is a misfit). A feature is *extreme* when any p-value lies outside [{summary.alpha / 2:g}, {1 - summary.alpha / 2:g}].",
        "",
        f"- fraction of features with an extreme p-value: **{summary.extreme_fraction:.3f}**",
    ]
    lines += [f"  - {g}: {v:.3f}" for g, v in summary.by_group.items()]
    mixed = [m for m in str(idata.posterior_predictive.attrs.get("mixed_replicates", "")).split(",") if m]
    if mixed:
        lines.append(
            f"- {', '.join(mixed)}: *mixed* replicates, with {idata.posterior_predictive.attrs.get('mixed_sites')} "
            "redrawn from its prior given the other draws (each cell's own posterior state was fitted to its "
            "proteins, so posterior replicates would hug the data). They check the population model "
            "(learned prior of the cell states, decoder, likelihood); the dispersion statistic needs replicates "
            "around the posterior mean and is not computed for them."
        )
    if result.get("edge_ece") is not None:
        lines.append(f"- edge probabilities, expected calibration error (graph edges + weighted non-edges): "
                     f"**{result['edge_ece']:.4f}**")
    lines += [
        "",
        "How to read it: a well-specified model gives few extreme features (posterior predictive p-values",
        "cluster around 0.5). p = P(T_rep > T_obs), so p near 0 means the data exceed the replicates and p near",
        "1 means the replicates exceed the data. p(var) near 0: the data are more variable than the model",
        "allows; near 1, the model is noisier than the data (for proteins, typically a Gamma concentration",
        "estimated too low). p(zero_frac) near 0: more zeros than the model predicts. p(dispersion) near 0:",
        "residuals larger than the likelihood's variance (e.g. a Poisson model of over-dispersed counts).",
        "",
        "## Most extreme features",
        "",
        "| group | feature | obs mean | rep mean | p mean | obs var | rep var | p var | obs zeros | rep zeros | p zeros "
        "| obs dispersion | rep dispersion | p dispersion |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in worst.iterrows():
        lines.append(
            f"| {r['group']} | {r['feature']} | {r['observed_mean']:.3g} | {r['replicated_mean']:.3g} | {r['p_mean']:.3f} "
            f"| {r['observed_var']:.3g} | {r['replicated_var']:.3g} | {r['p_var']:.3f} "
            f"| {r['observed_zero_frac']:.3f} | {r['replicated_zero_frac']:.3f} | {r['p_zero_frac']:.3f} "
            f"| {r.get('observed_dispersion', np.nan):.3g} | {r.get('replicated_dispersion', np.nan):.3g} "
            f"| {r.get('p_dispersion', np.nan):.3f} |"
        )
    lines += ["", "## Figures", ""]
    for name, fig in figures.items():
        lines.append(f"![{name}]({Path(fig).relative_to(root).as_posix()})")
    lines += ["", "Full table: `ppc_summary.csv`.", ""]
    path.write_text("\n".join(lines))
