"""``pyrospatial demo``: CORAL end to end on a simulated tissue with known truth.

A layered tissue is simulated by :func:`pyrospatial.data.sim.simulate_tissue` (cell types in
layers, a protein panel per cell, Visium-like spot RNA, a cell graph); CORAL is fitted;
every result is exported with its uncertainty; the results are scored against the truth and
against two simple baselines; figures, ``metrics.json`` and ``report.md`` are written. The
simulated inputs are written too (``inputs/cells.h5ad``, ``inputs/spots.h5ad``: what
``pyrospatial coral`` reads), and ``report.md`` ends with the command that refits them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anndata import AnnData

import pyrospatial
from pyrospatial.methods.baselines import spot_broadcast, type_split
from pyrospatial.methods.coral import CORAL
from pyrospatial.data.dataset import SpatialDataset
from pyrospatial.criticism.metrics import domain_ari, edge_auc, gene_mean_pearson, interval_coverage, within_type_abs_spearman
from pyrospatial.plotting import (
    central_interval_coverage,
    plot_calibration,
    plot_domains,
    plot_elbo,
    plot_interactions,
    plot_spatial_panels,
)
from pyrospatial.data.sim import simulate_tissue

__all__ = ["DemoConfig", "run_demo", "deconvolution_metrics", "split_edges", "coverage_by_quantity",
           "write_inputs", "refit_command"]

METRIC_KEYS = (
    "imputation_pearson_gene_mean",
    "baseline_spot_broadcast_pearson",
    "baseline_type_split_pearson",
    "interval_coverage_90",
    "spot_sum_max_abs_error",
    "domain_ari",
    "edge_auc",
    "v_spearman_abs",
    "elbo_final",
    "fit_seconds",
    "posterior_seconds",
    "n_cells",
    "n_spots",
    "cells_per_spot",
    "n_cells_outside_spots",
    "device",
    "seed",
    "version",
    "ppc_extreme_pvalue_fraction",
    "coverage_90_by_quantity",
    "coverage_90_pit_by_quantity",
)


@dataclass
class DemoConfig:
    """Size of the simulated tissue and the training budget."""

    n_cells: int = 3000
    n_types: int = 5
    n_proteins: int = 20
    n_genes: int = 100
    spot_diameter: float = 55.0
    n_layers: int = 4
    edge_z_scale: float = 1.0
    holdout_edge_fraction: float = 0.1
    max_epochs: int = 300
    batch_size: int | None = 32
    lr: float = 1e-2
    num_samples: int = 100

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(n_cells=1200, max_epochs=300, batch_size=None, num_samples=100)


def split_edges(edges: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out a random ``fraction`` of undirected edges (2, E): (train, held_out)."""
    rng = np.random.default_rng(seed)
    held = rng.random(edges.shape[1]) < fraction
    return edges[:, ~held], edges[:, held]


def random_nonedges(n_cells: int, edges: np.ndarray, size: int, seed: int) -> np.ndarray:
    """``size`` uniformly random pairs (i < j) that are not in ``edges``."""
    rng = np.random.default_rng(seed)
    taken = set((edges[0] * n_cells + edges[1]).tolist()) | set((edges[1] * n_cells + edges[0]).tolist())
    out: list[int] = []
    while len(out) < size:
        i, j = rng.integers(0, n_cells, 2)
        key = min(i, j) * n_cells + max(i, j)
        if i != j and key not in taken:
            taken.add(key)
            out.append(key)
    keys = np.asarray(out, dtype=np.int64)
    return np.stack([keys // n_cells, keys % n_cells])


def deconvolution_metrics(
    dataset: SpatialDataset, cells_out: AnnData, truth: np.ndarray, *, truth_kind: str = "expected"
) -> dict[str, float]:
    """Per-cell RNA accuracy and calibration against a truth, with both baselines.

    Evaluated over the cells inside a spot (where the baselines are defined).
    ``truth_kind="expected"``: the truth is per-cell expected expression; estimate and
    interval are those of ``expected_rna``. ``"counts"``: the truth is per-cell counts;
    estimate and interval are those of the spot-consistent counts (``counts_*`` layers), the
    posterior of exactly that quantity (like the type-split baseline, it divides the observed
    spot counts).
    """
    inside = dataset.cell_spot >= 0
    truth = np.asarray(truth, dtype=np.float64)[inside]
    kind = "expected_rna" if truth_kind == "expected" else "counts"
    # the posterior mean of the very quantity the truth measures: expected expression, or the
    # cell's counts (split from its spot's observed counts under every draw)
    predicted = np.asarray(cells_out.layers[f"{kind}_mean"])[inside]
    lower = np.asarray(cells_out.layers[f"{kind}_q05"])[inside]
    upper = np.asarray(cells_out.layers[f"{kind}_q95"])[inside]
    args = (dataset.spot_counts, dataset.cell_spot)
    return {
        "imputation_pearson_gene_mean": gene_mean_pearson(predicted, truth),
        "baseline_spot_broadcast_pearson": gene_mean_pearson(spot_broadcast(*args)[inside], truth),
        "baseline_type_split_pearson": gene_mean_pearson(
            type_split(*args, dataset.cell_type, dataset.n_types)[inside], truth
        ),
        "interval_coverage_90": interval_coverage(lower, upper, truth),
        "spot_sum_max_abs_error": float(cells_out.uns["pyrospatial"]["spot_sum_max_abs_error"]),
    }


def _device_name(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def write_inputs(tissue, folder: Path) -> dict[str, Path]:
    """The simulated tissue as the inputs of ``pyrospatial coral``: ``folder/cells.h5ad`` (protein
    panel in ``X``, ``obs["cell_type"]``, ``obsm["spatial"]`` in µm) and ``folder/spots.h5ad``
    (raw counts in ``X``, ``obsm["spatial"]``), without the simulator's truth."""
    folder.mkdir(parents=True, exist_ok=True)
    cells = AnnData(X=np.asarray(tissue.cells.X), obs=tissue.cells.obs[["cell_type"]].copy(),
                    var=tissue.cells.var[[]].copy())
    cells.obsm["spatial"] = np.asarray(tissue.cells.obsm["spatial"], dtype=np.float64)
    spots = AnnData(X=np.asarray(tissue.spots.X), obs=tissue.spots.obs[[]].copy(), var=tissue.spots.var[[]].copy())
    spots.obsm["spatial"] = np.asarray(tissue.spots.obsm["spatial"], dtype=np.float64)
    paths = {"cells": folder / "cells.h5ad", "spots": folder / "spots.h5ad"}
    cells.write_h5ad(paths["cells"])
    spots.write_h5ad(paths["spots"])
    return paths


def refit_command(config: DemoConfig, *, n_spots: int, seed: int, out: str = "refit") -> str:
    """The ``pyrospatial coral`` command (run in the demo's output folder) that fits the written
    inputs with the demo's settings (the CLI's default posterior, which is ``CORAL.sample``'s)."""
    batch_size = config.batch_size if config.batch_size is not None else n_spots  # None: all spots at once
    return (f"pyrospatial coral --cells inputs/cells.h5ad --spots inputs/spots.h5ad --cell-type-key cell_type "
            f"--spot-diameter {config.spot_diameter:g} --max-epochs {config.max_epochs} --batch-size {batch_size} "
            f"--lr {config.lr:g} --num-samples {config.num_samples} --n-domains {config.n_layers} --seed {seed} "
            f"--out {out}")


def run_demo(out: str | Path, *, quick: bool = False, device: str = "auto", seed: int = 0,
             config: DemoConfig | None = None, progress: bool = True, full_netcdf: bool = False) -> dict[str, Any]:
    """Simulate, fit CORAL, export, score and report into ``out``; returns the metrics.

    ``full_netcdf``: keep every posterior variable in ``inference_data.nc`` (default: only what
    ``pyrospatial check`` reads; see :func:`pyrospatial.criticism.arviz.write_inference_data`).
    """
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    config = config or (DemoConfig.quick() if quick else DemoConfig())
    torch.manual_seed(seed)

    # 1. a tissue with known truth
    tissue = simulate_tissue(
        n_cells=config.n_cells, n_types=config.n_types, n_proteins=config.n_proteins,
        n_genes=config.n_genes, spot_diameter=config.spot_diameter, seed=seed,
        n_layers=config.n_layers, edge_z_scale=config.edge_z_scale,
    )
    truth = tissue.truth
    write_inputs(tissue, out / "inputs")
    full = SpatialDataset.from_anndata(
        tissue.cells, tissue.spots, cell_type_key="cell_type", spot_diameter=config.spot_diameter
    ).with_edges(truth["edge_index"])
    train_edges, held_edges = split_edges(full.edges, config.holdout_edge_fraction, seed)
    dataset = full.with_edges(train_edges)

    # 2. fit
    coral = CORAL(tissue.cells, tissue.spots, dataset=dataset)
    started = time.perf_counter()
    result = coral.train(max_epochs=config.max_epochs, batch_size=config.batch_size, lr=config.lr,
                         device=device, seed=seed, progress=progress)
    fit_seconds = time.perf_counter() - started

    # 3. posterior, export
    started = time.perf_counter()
    coral.sample(config.num_samples, seed=seed, progress=progress)
    posterior_seconds = time.perf_counter() - started
    cells_out, spots_out = coral.export(n_domains=config.n_layers, seed=seed)
    cells_out.write_h5ad(out / "cells.h5ad")
    spots_out.write_h5ad(out / "spots.h5ad")

    # 4. metrics against the truth
    metrics = deconvolution_metrics(dataset, cells_out, truth["expected_rna"])
    held_prob = coral.edge_probabilities(held_edges).mean(0)
    negatives = random_nonedges(dataset.n_cells, full.edges, held_edges.shape[1], seed)
    neg_prob = coral.edge_probabilities(negatives).mean(0)
    v_mean = cells_out.obsm["v_mean"]
    cells_in_spots = dataset.cell_spot >= 0
    metrics.update(
        domain_ari=domain_ari(cells_out.obs["domain"].to_numpy(), truth["layer"]),
        edge_auc=edge_auc(held_prob, neg_prob),
        v_spearman_abs=within_type_abs_spearman(v_mean, truth["v"], dataset.cell_type),
        elbo_final=float(np.mean(result.elbo_history[-10:])),
        fit_seconds=float(fit_seconds),
        posterior_seconds=float(posterior_seconds),
        n_cells=int(dataset.n_cells),
        n_spots=int(dataset.n_spots),
        cells_per_spot=float(cells_in_spots.sum() / max(dataset.n_spots, 1)),
        n_cells_outside_spots=int((~cells_in_spots).sum()),
        device=_device_name(device),
        seed=int(seed),
        version=pyrospatial.__version__,
    )

    # 5. model criticism: posterior predictive checks (inference_data.nc, check.md, figures/ppc_*.png)
    check = _model_check(out, coral, dataset, seed, full_netcdf=full_netcdf)
    metrics["ppc_extreme_pvalue_fraction"] = check["ppc_extreme_pvalue_fraction"]
    metrics["coverage_90_by_quantity"] = coverage_by_quantity(coral, dataset, truth, seed=seed)
    metrics["coverage_90_pit_by_quantity"] = coverage_by_quantity(coral, dataset, truth, seed=seed, pit=True)
    metrics = {key: metrics[key] for key in METRIC_KEYS}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    # 6. figures
    figures = _figures(out / "figures", coral, cells_out, dataset, truth, result.elbo_history)
    _report(out / "report.md", metrics, config, figures, check=check, posterior=coral.posterior, seed=seed)
    return metrics


def _model_check(out: Path, coral: CORAL, dataset: SpatialDataset, seed: int, *,
                 full_netcdf: bool = False) -> dict[str, Any]:
    """Posterior predictive checks under the demo's own posterior draws.

    The draws of ``coral.posterior`` hold ``expected_rna``, through which alone the model uses
    the global ``rna_weight``, so replicating under them needs no further sampling.
    """
    from pyrospatial.criticism.report import check_results

    coral.to_inference_data(path=out / "inference_data.nc", seed=seed, full_netcdf=full_netcdf)
    return check_results(out)


def coverage_by_quantity(coral: CORAL, dataset: SpatialDataset, truth: dict, *, seed: int = 0,
                         level: float = 0.9, pit: bool = False) -> dict[str, float]:
    """Coverage of the truth by the central ``level`` intervals of each exported per-cell quantity.

    ``expected_rna`` (vs the simulated ``E[x_ig]``) and ``counts`` (the spot-consistent counts
    vs the simulated counts) over cells inside spots; ``v`` over all cells, each cell type's
    truth standardised within each cell type and the draws sign-aligned to it (v's sign, and its
    location and scale within a type, are fixed only by its prior:
    :func:`~pyrospatial.criticism.calibration.standardize_within_groups`).

    ``pit=False``: the interval read off the draws (what a user reports; it under-covers with
    few draws and over-covers for integer counts). ``pit=True``: the randomised-PIT score of
    :func:`pyrospatial.criticism.calibration.pit_coverage_by_level`, free of both effects.
    """
    from pyrospatial.criticism.calibration import (align_sign, interval_coverage_by_level, pit_coverage_by_level,
                                                   standardize_within_groups)

    score = pit_coverage_by_level if pit else interval_coverage_by_level
    samples = coral.posterior.samples
    inside = dataset.cell_spot >= 0
    out = {"expected_rna": score(samples["expected_rna"][:, inside], np.asarray(truth["expected_rna"])[inside], [level])[0]}
    if "counts" in truth:
        split = coral.split_spot_counts(seed=seed, keep_draws=True)
        out["counts"] = score(split.draws[:, inside], np.asarray(truth["counts"])[inside], [level])[0]
    if "v" in truth:
        v_true = standardize_within_groups(np.asarray(truth["v"]).reshape(dataset.n_cells, -1), dataset.cell_type)
        v = align_sign(samples["v"], v_true, dataset.cell_type)
        out["v"] = score(v, v_true, [level])[0]
    return {k: float(v) for k, v in out.items()}


def _figures(folder: Path, coral: CORAL, cells_out: AnnData, dataset: SpatialDataset,
             truth: dict, history: np.ndarray) -> dict[str, str]:
    xy = dataset.cell_coords
    figures = {"elbo": plot_elbo(history, folder / "elbo.png").name}
    expected = truth["expected_rna"]
    # the three genes with the largest spread of truth across cells
    genes = np.argsort(-np.std(np.log1p(expected), axis=0))[:3]
    for g in genes:
        name = str(dataset.gene_names[g])
        figures[f"gene_{name}"] = plot_spatial_panels(
            xy,
            [(f"{name}: truth E[x]", expected[:, g]),
             ("posterior mean", cells_out.layers["expected_rna_mean"][:, g]),
             ("posterior sd", cells_out.layers["expected_rna_sd"][:, g])],
            folder / f"gene_{name}.png", shared_scale=(0, 1), spatial_unit="µm",
            colorbar_labels=("E[x]: expected RNA count", "E[x]: expected RNA count", "sd of E[x] (counts)"),
            suptitle=f"{name}: per-cell expected RNA, truth vs posterior",
        ).name
    figures["interactions"] = plot_interactions(cells_out.uns["pyrospatial"]["interactions"], folder / "interactions.png").name
    figures["domains"] = plot_domains(xy, cells_out.obs["domain"].to_numpy(), cells_out.obs["domain_confidence"].to_numpy(),
                                      folder / "domains.png", truth=truth["layer"], truth_title="true layer",
                                      spatial_unit="µm").name
    levels = np.linspace(0.1, 0.9, 9)
    inside = dataset.cell_spot >= 0
    draws = coral.posterior.samples["expected_rna"][:, inside]
    coverage = {
        "per-cell expected RNA (cells in spots)": central_interval_coverage(draws, expected[inside], levels),
    }
    outside = ~inside
    if outside.any():
        coverage["per-cell expected RNA (cells outside spots)"] = central_interval_coverage(
            coral.posterior.samples["expected_rna"][:, outside], expected[outside], levels)
    figures["calibration"] = plot_calibration(levels, coverage, folder / "calibration.png").name
    return figures


#: the calibration check passes when a 90% interval's coverage of the truth (randomised PIT)
#: lies within this distance of 0.90
COVERAGE_TOLERANCE = 0.05
#: the posterior predictive check passes when at most this share of features has an extreme
#: p-value: at level 0.05 with four statistics per feature, the union bound 4 x 0.05 (posterior
#: predictive p-values of a well-specified model are conservative, so it gives fewer)
PPC_MAX_EXTREME = 0.20


def _verdict(passed: bool | None) -> str:
    return "not assessed" if passed is None else ("passed" if passed else "**failed**")


def _report(path: Path, metrics: dict, config: DemoConfig, figures: dict[str, str], *, check: dict,
            posterior: Any, seed: int) -> None:
    """``report.md``: what was fitted, the checks that passed and failed in plain words, the
    figures inline, the files, and (last) the command that refits the written inputs."""
    from pyrospatial.criticism.report import POSTERIOR_METHODS, convergence_summary

    m = metrics
    n_out = m["n_cells_outside_spots"]
    converged, convergence_lines = convergence_summary(posterior.diagnostics)
    rhats = [r for r in (posterior.diagnostics.get("rhat_max") or {}).values() if np.isfinite(r)]
    ppc = m["ppc_extreme_pvalue_fraction"]
    groups = dict(check.get("ppc_extreme_pvalue_fraction_by_group", {}))
    by_group = ", ".join(f"{g} {v:.2f}" for g, v in groups.items())
    misfit = [g for g, v in groups.items() if v > PPC_MAX_EXTREME] or ([] if ppc <= PPC_MAX_EXTREME else ["all"])
    coverage = m["coverage_90_pit_by_quantity"]
    off = [k for k, v in coverage.items() if abs(v - 0.9) > COVERAGE_TOLERANCE]
    graph = bool(posterior.diagnostics.get("graph", False))
    method = POSTERIOR_METHODS.get(posterior.method, posterior.method)
    lines = [
        "# CORAL on a simulated tissue: summary",
        "",
        f"**What was fitted.** {m['n_cells']} simulated cells ({config.n_types} cell types in {config.n_layers} layers),",
        f"each with {config.n_proteins} proteins, and {config.n_genes} genes measured only in {m['n_spots']} Visium-like spots",
        f"({config.spot_diameter:g} µm across, {m['cells_per_spot']:.1f} cells per spot on average). {n_out} cells",
        f"({100 * n_out / max(m['n_cells'], 1):.0f}%) lie outside every spot: they have proteins but no RNA, so their RNA is",
        "predicted from their proteins alone and their spot-consistent counts (`layers[\"counts_*\"]` of `cells.h5ad`)",
        "are NaN. The model is CORAL (`pyrospatial.models.CoralModel`): each cell's type and proteins inform a latent",
        "state, the state sets the cell's expected RNA, a spot's counts are the sum over its cells (negative binomial),",
        "and neighbouring cells' states explain the cell graph. It was fitted by stochastic variational inference",
        f"({config.max_epochs} epochs, {m['fit_seconds']:.0f} s on {m['device']}); the posterior is {method},",
        f"{config.num_samples} draws. The simulator's truth is known, so the answers are scored against it",
        f"({100 * config.holdout_edge_fraction:.0f}% of the graph's edges were held out from the fit to score edge prediction).",
        "",
        "## Checks at a glance",
        "",
        "| check | what it asks | result | verdict |",
        "|---|---|---|---|",
        f"| convergence | do the MCMC chains agree? (split-R-hat, bulk ESS) | largest R-hat "
        f"{max(rhats) if rhats else float('nan'):.2f} | {_verdict(converged)} |",
        f"| posterior predictive | could the model have made these data? (share of features with an extreme "
        f"p-value, at most {PPC_MAX_EXTREME:.2f} in each group) | {ppc:.2f} ({by_group}) | {_verdict(not misfit)}"
        f"{' for ' + ', '.join(misfit) if misfit else ''} |",
        f"| calibration | do 90% intervals hold the truth 90% of the time? ({0.9 - COVERAGE_TOLERANCE:.2f}-"
        f"{0.9 + COVERAGE_TOLERANCE:.2f}) | " + ", ".join(f"{k} {v:.2f}" for k, v in coverage.items())
        + f" | {_verdict(not off)}{' for ' + ', '.join(off) if off else ''} |",
    ]
    if check.get("edge_ece") is not None:
        lines.append(f"| edge probabilities | are predicted edge probabilities right on average? (expected "
                     f"calibration error; see the figure) | {check['edge_ece']:.4f} | read the figure |")
    lines += ["", "**Convergence.** " + " ".join(convergence_lines), ""]
    lines.append(
        f"**Posterior predictive checks.** Data replicated from the fitted model are compared with the observed spots and "
        f"proteins (mean, variance, zero fraction and dispersion per gene or protein; Bayesian p-values). A share of "
        f"{ppc:.2f} of the features has an extreme p-value ({by_group}); "
        + ("this is within what a well-specified model gives." if not misfit else
           f"for {', '.join(misfit)} that is more than a well-specified model gives: `check.md` lists the features "
           "and says what their p-values mean.")
        + " Details: `check.md` (re-create it with `pyrospatial check --results .`).")
    lines += ["", "**Calibration.** " + (
        "Every quantity's 90% intervals hold the truth at close to the nominal rate." if not off else
        "Intervals off the nominal rate: " + ", ".join(
            f"{k} ({coverage[k]:.2f}: {'too narrow' if coverage[k] < 0.9 else 'too wide'})" for k in off) + ".")
        + " Scored by the randomised PIT of the truth among the draws (free of finite-draw shrinkage and of the"
          " over-coverage of integer counts by closed intervals); read off the draws directly: "
        + ", ".join(f"{k} {v:.2f}" for k, v in m["coverage_90_by_quantity"].items()) + "."
        + " The state v is scored against the truth standardised within each cell type: the model's prior"
          " v ~ Normal(0, 1) fixes v's mean and spread within a type, so only each cell's place within its type"
          " is identified (`pyrospatial.criticism.standardize_within_groups`).", ""]
    lines += [
        "## How well are single-cell RNA profiles recovered?",
        "",
        "Pearson correlation across cells, averaged over genes, between the estimate and the true expected",
        "expression of each cell (cells inside spots):",
        "",
        "| method | Pearson |",
        "|---|---|",
        f"| CORAL (posterior mean) | {m['imputation_pearson_gene_mean']:.3f} |",
        f"| type split (per-type NNLS signatures, spot counts split by type) | {m['baseline_type_split_pearson']:.3f} |",
        f"| spot broadcast (each cell gets its spot's mean) | {m['baseline_spot_broadcast_pearson']:.3f} |",
        "",
        f"The 90% intervals of the expected RNA contain the truth for {100 * m['interval_coverage_90']:.1f}% of (cell, gene)",
        "pairs. The calibration plot shows every level: points under the diagonal mean intervals too narrow.",
        f"Per-cell counts split from the spots add up to each spot exactly (largest discrepancy: {m['spot_sum_max_abs_error']:g}).",
        "",
        f"![calibration](figures/{figures['calibration']})",
        "",
        "## Does the model fit the data?",
        "",
    ]
    lines += [f"![{name}]({fig})" for name, fig in check.get("figures", {}).items()]
    lines += ["", "## Genes in space: truth, posterior mean and posterior sd", ""]
    lines += [f"![{k}](figures/{v})" for k, v in figures.items() if k.startswith("gene_")]
    lines += [
        "",
        "## Domains, latent state and interactions",
        "",
        f"- Spatial domains from the posterior cell states agree with the true layers with ARI {m['domain_ari']:.2f};",
        "  each cell's confidence is the fraction of posterior draws that put it in the same domain.",
        f"- The within-type continuous state v correlates with the truth at |Spearman| {m['v_spearman_abs']:.2f}",
        "  (its sign is not identifiable).",
        f"- Held-out graph edges are told apart from random non-adjacent pairs with AUC {m['edge_auc']:.2f}.",
    ]
    if not graph:
        lines.append("- The interaction intervals come from the edge decoder's posterior given the cell graph, drawn at "
                     "the states' posterior mean (this posterior leaves the graph out; `CORAL.interactions` says how).")
    lines += [
        "",
        f"![domains](figures/{figures['domains']})",
        "",
        f"![interactions](figures/{figures['interactions']})",
        "",
        f"![elbo](figures/{figures['elbo']})",
        "",
        "## Files",
        "",
        "- `inputs/cells.h5ad` (proteins in `X`, `obs['cell_type']`, `obsm['spatial']` in µm) and `inputs/spots.h5ad`",
        "  (raw counts in `X`, `obsm['spatial']`): the simulated data, as `pyrospatial coral` reads them.",
        "- `cells.h5ad`: cells x genes; `X` and `layers['expected_rna_*']` (mean, sd, q05, q50, q95),",
        f"  `layers['counts_*']` (spot-consistent counts; NaN for the {n_out} cells outside every spot), `obsm['z_*']`,",
        "  `obsm['v_*']`, `obs['domain']`, `obs['domain_confidence']`, `obsp['edge_prob_mean'|'edge_prob_sd'|'attention']`,",
        "  `uns['pyrospatial']` (`globals`, `interactions`, `settings`, `n_cells_outside_spots`).",
        "- `spots.h5ad`: the spots with `layers['expected_counts_*']`.",
        "- `inference_data.nc`: ArviZ InferenceData, compressed, with what `pyrospatial check` reads (`--full-netcdf`",
        "  keeps the per-cell draws too); `check.md`, `ppc_summary.csv`, `figures/ppc_*.png`: the posterior predictive checks.",
        "- `metrics.json`: the numbers above.",
        "",
        f"Settings: `{json.dumps(asdict(config))}`",
        "",
        "## Refit from the inputs",
        "",
        "Run in this folder: it fits the same model with the same settings to `inputs/` and writes `refit/`. The demo",
        "used the simulator's cell graph with some edges held out; the command builds the nearest-neighbour graph",
        "from the coordinates, so its numbers differ slightly.",
        "",
        "```bash",
        refit_command(config, n_spots=m["n_spots"], seed=seed),
        "```",
        "",
    ]
    path.write_text("\n".join(lines))
