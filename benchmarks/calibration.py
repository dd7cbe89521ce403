"""Calibration of every exported CORAL quantity, SBC of SVI, and SVI against NUTS.

    python benchmarks/calibration.py [--quick] [--out benchmarks/results] [--no-osmfish]

What is measured (issue 6):

1. Interval coverage on repeated simulations from the model family
   (:func:`pyrospatial.data.sim.simulate_tissue`, several seeds and sizes) for the default
   posterior (``CORAL.sample()``, ``method="local"``: HMC per spot from the guide, the global
   latents sampled in turn, Monte Carlo EM) and, for contrast, one HMC over the whole tissue
   (``method="hmc"``, suffix ``_hmc``, the former default) and the raw mean-field guide draws
   (suffix ``_guide``), each with its cost relative to the SVI fit (``*_cost_vs_fit``):
   ``expected_rna`` (per-cell expected expression vs the simulated ``E[x_ig]``, cells inside
   spots), ``counts`` (the spot-consistent per-cell counts vs the simulated counts), ``v``
   (the within-type state; its sign is not identified, so each cell type's draws are
   sign-aligned to the truth by the sign of the correlation of their posterior mean -- the
   only use of the truth), pooled over simulations.
2. Edge probabilities: expected calibration error of the posterior-mean probability over the
   graph's edges and a sample of non-adjacent pairs, each non-edge weighted by the number of
   pairs it stands for (10 equal-width bins), mean over simulations.
3. osmFISH pseudo-spots (real single-cell data binned into 100 µm squares; the truth is each
   cell's held-out counts): coverage of the per-cell counts (``counts_osmfish``). Skipped
   with a note when ``../shared/data/osmfish_sscortex`` is absent or with ``--no-osmfish``.
4. Reference-based deconvolution (:func:`pyrospatial.deconvolve`, issue 5) on the same
   osmFISH pseudo-spots as ``benchmarks/deconvolution.py`` (its split, 100 and 50 µm squares;
   the truth is each spot's cell-type counts): coverage of the per-spot cell-type counts
   (``cell_type_counts_osmfish_{100,50}um``), also split into truly present and absent types.
5. Simulation-based calibration (:func:`benchmarks.sbc_toy.sbc_toy`) of SVI's global
   parameter on two one-parameter models (conjugate Normal mean; Poisson log-rate), and the
   same check for a deliberately broken guide with its scale fixed at 0.01 (must fail).
6. A tiny CORAL problem: NUTS (``pyro.infer.MCMC``) on the model's joint density, with the
   point-estimated parameters of the trained SVI fit held fixed, is the reference posterior of
   every latent entry (``z``, ``v``, ``cell_size``, ``rna_weight``); ``sd_ratio_median`` is the
   median over entries of sd(SVI guide) / sd(NUTS), ``mean_abs_diff_median`` the median of
   |mean(SVI) - mean(NUTS)| / sd(NUTS). The same numbers for the HMC refinement are in
   ``settings["refine_vs_nuts"]``.

Measured elsewhere: interaction-matrix entries need simulations whose edges are drawn among
all pairs by the model's own rule (the default simulator's graph is a thinned kNN graph, with
no truth for them): ``benchmarks/interaction_calibration.py``.

Writes ``OUT/calibration.json`` (keys ``coverage_90``, ``coverage_50``, ``edge_ece``,
``sbc_ks_pvalues``, ``svi_vs_nuts``, ``settings``) and ``OUT/calibration.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import pyrospatial
from pyrospatial import criticism as dg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sbc_toy as sbc  # noqa: E402  (the SBC toy lives beside the benchmarks)
from pyrospatial.methods.coral import CORAL
from pyrospatial.demo import random_nonedges
from pyrospatial.models import CoralModel

LEVELS = (0.5, 0.9)


class _Pool:
    """Covered / total counts per (quantity, level), pooled over simulations."""

    def __init__(self) -> None:
        self.hits: dict[tuple[str, float], float] = {}
        self.pit_hits: dict[tuple[str, float], float] = {}
        self.total: dict[tuple[str, float], float] = {}

    def add(self, name: str, draws: np.ndarray, truth: np.ndarray) -> dict[float, float]:
        """Pool one simulation's interval coverage and PIT coverage; returns the former per level
        (and the latter under ``"pit"``)."""
        ok = np.isfinite(truth)
        n = float(ok.sum())
        cov = dg.interval_coverage_by_level(draws, truth, LEVELS)
        pit = dg.pit_coverage_by_level(draws, truth, LEVELS)
        for level, c, u in zip(LEVELS, cov, pit):
            self.hits[(name, level)] = self.hits.get((name, level), 0.0) + c * n
            self.pit_hits[(name, level)] = self.pit_hits.get((name, level), 0.0) + u * n
            self.total[(name, level)] = self.total.get((name, level), 0.0) + n
        out: dict = dict(zip(LEVELS, cov.tolist()))
        out["pit"] = dict(zip(LEVELS, pit.tolist()))
        return out

    def coverage(self, level: float, pit: bool = False) -> dict[str, float]:
        hits = self.pit_hits if pit else self.hits
        return {name: hits[(name, lv)] / self.total[(name, lv)] for (name, lv) in hits if lv == level}


def _edge_ece(coral: CORAL, seed: int) -> float:
    """ECE of posterior-mean edge probabilities over the graph's edges and weighted random non-edges."""
    ds = coral.dataset
    pos = coral.posterior.edge_prob.mean(0)
    n_neg = min(ds.edges.shape[1], ds.n_cells * (ds.n_cells - 1) // 2 - ds.n_edges)
    negatives = random_nonedges(ds.n_cells, ds.edges, n_neg, seed)
    neg = coral.edge_probabilities(negatives).mean(0)
    weight = (ds.n_cells * (ds.n_cells - 1) / 2 - ds.n_edges) / n_neg
    prob = np.concatenate([pos, neg])
    outcome = np.concatenate([np.ones_like(pos), np.zeros_like(neg)])
    w = np.concatenate([np.ones_like(pos), np.full_like(neg, weight)])
    return dg.expected_calibration_error(prob, outcome, weights=w)


def simulation_records(settings: dict, pool: _Pool) -> tuple[list[dict], list[float]]:
    records, eces = [], []
    runs = [(n, s) for n in settings["sim_sizes"] for s in settings["sim_seeds"]]
    for n_cells, seed in tqdm(runs, desc="simulations"):
        t0 = time.perf_counter()
        tissue = pyrospatial.data.sim.simulate_tissue(
            n_cells=n_cells, n_types=settings["sim_types"], n_proteins=settings["sim_proteins"],
            n_genes=settings["sim_genes"], seed=seed, edge_z_scale=1.0,
        )
        truth = tissue.truth
        coral = CORAL(tissue.cells, tissue.spots, cell_type_key="cell_type", spot_diameter=55.0)
        t_fit = time.perf_counter()
        coral.train(max_epochs=settings["epochs"], batch_size=None, seed=seed, progress=False)
        fit_seconds = time.perf_counter() - t_fit
        inside = coral.dataset.cell_spot >= 0
        record = {"n_cells": n_cells, "seed": seed, "cells_per_spot": float(inside.sum() / coral.dataset.n_spots),
                  "fit_seconds": fit_seconds}
        trained = {k: v.detach().clone() for k, v in coral.model.state_dict().items()}
        for method in settings["posteriors"]:
            # every posterior starts from the same trained state (EM of the default moves parameters)
            coral.model.load_state_dict(trained)
            coral.refined = False
            t1 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                post = coral.sample(settings["num_samples"], method=method, seed=seed)
            record[f"{method}_unconverged"] = post.diagnostics.get("unconverged", {})
            record[f"{method}_warned"] = any("not converged" in str(w.message) for w in caught)
            suffix = "" if method == "local" else f"_{method}"
            rna = post.samples["expected_rna"]
            record[f"expected_rna{suffix}"] = pool.add(f"expected_rna{suffix}", rna[:, inside], truth["expected_rna"][inside])
            split = coral.split_spot_counts(seed=seed, keep_draws=True)
            record[f"counts{suffix}"] = pool.add(f"counts{suffix}", split.draws[:, inside], truth["counts"][inside])
            # v's location and scale within a type are fixed by its prior alone (docs/calibration.md)
            v_true = dg.standardize_within_groups(truth["v"].reshape(len(inside), -1), coral.dataset.cell_type)
            v = dg.align_sign(post.samples["v"], v_true, coral.dataset.cell_type)
            record[f"v{suffix}"] = pool.add(f"v{suffix}", v, v_true)
            if method == "local":
                record["edge_ece"] = _edge_ece(coral, seed)
                theta = coral.model.rna_inverse_dispersion.detach().cpu().numpy()
                record["theta_median"] = float(np.median(theta))  # after Monte Carlo EM
                record["theta_true_median"] = float(np.median(tissue.params["rna_inverse_dispersion"]))
                eces.append(record["edge_ece"])
            record[f"{method}_seconds"] = time.perf_counter() - t1
            record[f"{method}_cost_vs_fit"] = record[f"{method}_seconds"] / fit_seconds
        record["seconds"] = time.perf_counter() - t0
        print(json.dumps(record), flush=True)
        records.append(record)
    return records, eces


def osmfish_record(settings: dict, pool: _Pool) -> dict | None:
    from pyrospatial.data.dataset import SpatialDataset
    from pyrospatial.data.datasets import load_osmfish, shared_data_dir
    from pyrospatial.models.coral_variants import CoralCountPanelModel
    from pyrospatial.data.sim import pseudo_spots

    root = shared_data_dir()
    folder = None if root is None else Path(root) / "osmfish_sscortex"
    if folder is None or not folder.exists():
        return {"skipped": "osmFISH data not found under the shared data folder"}
    t0 = time.perf_counter()
    cells, spots = pseudo_spots(load_osmfish(folder), settings["osmfish_spot_um"], grid="square",
                                cell_type_key="cell_type", feature_split=0.5, seed=0)
    truth = cells.obsm["true_spot_gene_counts"]
    truth = np.asarray(truth.todense() if hasattr(truth, "todense") else truth, dtype=np.float64)
    dataset = SpatialDataset.from_anndata(cells, spots, cell_type_key="cell_type", assignment="nearest")
    coral = CORAL(cells, spots, dataset=dataset, model_cls=CoralCountPanelModel)
    coral.train(max_epochs=settings["osmfish_epochs"], batch_size=64, seed=0, progress=False)
    coral.sample(settings["osmfish_num_samples"], seed=0)
    split = coral.split_spot_counts(seed=0, keep_draws=True)
    inside = dataset.cell_spot >= 0
    record = {"n_cells": int(dataset.n_cells), "n_spots": int(dataset.n_spots),
              "counts_osmfish": pool.add("counts_osmfish", split.draws[:, inside], truth[inside]),
              "edge_ece": _edge_ece(coral, 0), "seconds": time.perf_counter() - t0}
    print(json.dumps(record), flush=True)
    return record


def abundance_records(settings: dict, pool: _Pool) -> dict:
    """Coverage of the reference-based model's per-spot cell-type counts on osmFISH pseudo-spots
    (the deconvolution benchmark's split and spots; API defaults): pooled as
    ``cell_type_counts_{dataset}``, with the truly present / absent types apart."""
    from pyrospatial.data.datasets import shared_data_dir

    root = shared_data_dir()
    if root is None or not (Path(root) / "osmfish_sscortex").exists():
        return {"skipped": "osmFISH data not found under the shared data folder"}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from deconvolution import make_datasets
    from deconvolution_pit import abundance_draws, subset_coverage

    records = {}
    for name, (reference, spots) in make_datasets(settings["quick"]).items():
        draws, truth, seconds = abundance_draws(reference, spots)
        record: dict = {"all": pool.add(f"cell_type_counts_{name}", draws, truth), "seconds": seconds,
                        "zero_fraction_of_truth": float(np.mean(truth == 0))}
        record.update(subset_coverage(draws, truth, ("present", "absent")))
        print(json.dumps({name: record}, default=float), flush=True)
        records[name] = record
    return records


def interaction_summary(out: Path) -> dict:
    """The interaction-matrix entries' coverage, measured by ``benchmarks/interaction_calibration.py``
    (it needs simulations with all-pair edges): read from ``OUT/interaction_calibration.json``
    when that run's results are there, per posterior (pooled 90% / 50%, interval and PIT)."""
    path = out / "interaction_calibration.json"
    if not path.exists():
        return {"not_measured": "run benchmarks/interaction_calibration.py --out OUT first"}
    other = json.loads(path.read_text())
    # its rows "refine"/"bayes_edge_refine" run the default posterior (method="local", the graph left out of
    # its target), read by CORAL.interactions() with the edge decoder drawn from its posterior given the graph
    return {"source": other["command"],
            "default_posterior": "local (the default: graph left out; read by CORAL.interactions() with the edge "
                                 "decoder drawn from its posterior given the graph); rows 'refine'",
            "coverage": other["coverage"]}


#: interaction posteriors copied into the coverage tables: the default ``sample()``, the graph-conditioned
#: Bayesian-decoder posterior as sampled, and as ``CORAL.interactions()`` reports it (recalibrated)
INTERACTION_ROWS = ("refine", "refine_held_decoder", "bayes_edge_refine_graph", "bayes_edge_refine_graph_recalibrated")


def add_interaction_coverage(result: dict) -> None:
    """Copy the interaction entries' coverage (``result["interaction_matrix"]``) into the coverage tables,
    as ``interaction_entries[<posterior>]``."""
    coverage = (result.get("interaction_matrix") or {}).get("coverage", {})
    for method in INTERACTION_ROWS:
        if method not in coverage:
            continue
        c = coverage[method]
        for key, kind, level in (("coverage_90", "interval", "0.9"), ("coverage_50", "interval", "0.5"),
                                 ("coverage_90_pit", "pit", "0.9"), ("coverage_50_pit", "pit", "0.5")):
            result[key][f"interaction_entries[{method}]"] = c[kind][level]


def sbc_pvalues(settings: dict) -> dict[str, float]:
    out = {}
    for toy in sbc.SBC_TOYS:
        out[toy] = sbc.sbc_toy(toy, num_replicates=settings["sbc_replicates"], num_draws=settings["sbc_draws"], seed=0).ks_pvalue
    out["normal_mean[broken guide, scale fixed at 0.01]"] = sbc.sbc_toy(
        "normal_mean", num_replicates=settings["sbc_replicates"], num_draws=settings["sbc_draws"],
        fixed_scale=0.01, seed=0).ks_pvalue
    return out


def _nuts_draws(model, batch, num_warmup: int, num_samples: int, seed: int) -> dict[str, np.ndarray]:
    import pyro
    from pyro.infer import MCMC, NUTS

    pyro.set_rng_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    kernel = NUTS(model, max_tree_depth=7, target_accept_prob=0.8)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=num_warmup, disable_progbar=False)
    mcmc.run(batch)
    for p in model.parameters():
        p.requires_grad_(True)
    return {k: v.detach().numpy() for k, v in mcmc.get_samples().items()}


def _compare(draws: dict, reference: dict, sites: list[str]) -> dict[str, float]:
    ratios, diffs = [], []
    for s in sites:
        a = draws[s].reshape(draws[s].shape[0], -1)
        b = reference[s].reshape(reference[s].shape[0], -1)
        sd_b = b.std(0)
        ratios.append(a.std(0) / sd_b)
        diffs.append(np.abs(a.mean(0) - b.mean(0)) / sd_b)
    return {"sd_ratio_median": float(np.median(np.concatenate(ratios))),
            "mean_abs_diff_median": float(np.median(np.concatenate(diffs)))}


def svi_vs_nuts(settings: dict) -> tuple[dict, dict]:
    """Tiny CORAL: the guide's and the HMC refinement's draws against NUTS."""
    from pyrospatial.models import CoralModel

    tissue = pyrospatial.data.sim.simulate_tissue(n_cells=settings["nuts_cells"], n_types=2, n_proteins=5,
                                             n_genes=settings["nuts_genes"], seed=0, edge_z_scale=1.0,
                                             spot_layout="square_tiles", cells_per_spot=4.0)
    coral = CORAL(tissue.cells, tissue.spots, cell_type_key="cell_type", assignment="nearest",
                  model_kwargs={"z_dim": 2, "hidden": 8})
    assert isinstance(coral.model, CoralModel)
    coral.train(max_epochs=settings["nuts_epochs"], batch_size=None, seed=0, progress=False)
    ds = coral.dataset
    sites = ["z", "v", "cell_size", "rna_weight"]
    svi = pyrospatial.sample_posterior(coral.model, coral.guide, ds, settings["nuts_samples"], seed=0)
    refined = pyrospatial.refine_posterior(coral.model, coral.guide, ds, settings["nuts_samples"], seed=0,
                                           sites=sites, em_params=())
    batch = ds.full_batch()
    nuts = _nuts_draws(coral.model, batch, settings["nuts_warmup"], settings["nuts_samples"], seed=0)
    # NUTS returns local sites in the batch's row order; the others in dataset order
    order = np.argsort(batch.cell_index.numpy())
    for s in ("z", "v", "cell_size"):
        nuts[s] = nuts[s][:, order]
    return _compare(svi, nuts, sites), _compare(refined, nuts, sites)


def _level(d: dict, level: float) -> float:
    """A coverage dict's value at ``level`` (float keys in memory, string keys once read from JSON)."""
    return d[level] if level in d else d[str(level)]


def markdown(result: dict, records: list[dict], command: str) -> str:
    s = result["settings"]
    lines = [
        "# Calibration of CORAL's exported quantities",
        "",
        f"Command: `{command}`",
        "",
        f"Simulations: {len(s['sim_seeds'])} seeds x sizes {s['sim_sizes']} cells ({s['sim_genes']} genes, "
        f"{s['sim_proteins']} proteins, {s['sim_types']} types, {s['epochs']} epochs, {s['num_samples']} draws).",
        "Coverage = fraction of true values inside the central interval read off the draws (what a user",
        "reports), pooled over simulations; target for 90% intervals: [0.85, 0.95]. PIT coverage = the same",
        "level scored by the randomised probability integral transform of the truth among the draws",
        "(`pyrospatial.criticism.calibration.pit_coverage_by_level`): it is free of the two biases of a read-off",
        "interval that are not the posterior's fault, finite draws (with 40 exact draws a 90% interval covers",
        "~0.86) and integer quantities (a closed interval [q05, q95] of counts holds its endpoints' mass, so a",
        "calibrated count posterior over-covers). `_guide`: raw mean-field draws (`method=\"guide\"`); `_hmc`:",
        "one HMC over every latent of the tissue (`method=\"hmc\"`, the audit option, formerly the default); no",
        "suffix: the default posterior (`method=\"local\"`, HMC per spot with the globals sampled in turn, from the",
        "guide, with Monte Carlo EM of",
        f"{', '.join(s.get('em_params_default', []))}). theta: median over genes of the RNA inverse dispersion",
        "after EM, next to the simulator's.",
        "`interaction_entries[...]`: the cell-type interaction matrix's entries, measured by",
        "`benchmarks/interaction_calibration.py` on its own simulations (edges over all pairs), for the default",
        "posterior (`refine`, as `CORAL.interactions()` reads it: the edge decoder drawn from its posterior given the",
        "graph at the states' posterior mean; `refine_held_decoder`: the trained decoder held, as before), the",
        "graph-conditioned posterior with a Bayesian edge decoder as sampled, and the same",
        "`_recalibrated`: widened by a post-hoc factor fitted on held-apart simulations",
        "(`benchmarks/results/interaction_recalibration.md`), as `CORAL.interactions()` reports it.",
        "Times (s) are wall-clock seconds on a shared 2-core machine (loaded by other jobs), not CPU time.",
        "",
        "| quantity | coverage 50% | coverage 90% | PIT coverage 50% | PIT coverage 90% | 90% in [0.85, 0.95] (interval / PIT) |",
        "|---|---:|---:|---:|---:|:---:|",
    ]
    pit90, pit50 = result.get("coverage_90_pit", {}), result.get("coverage_50_pit", {})
    for q, c90 in result["coverage_90"].items():
        c50 = result["coverage_50"][q]
        p90, p50 = pit90.get(q, float("nan")), pit50.get(q, float("nan"))
        ok = "yes" if 0.85 <= c90 <= 0.95 else "no"
        ok_pit = "yes" if 0.85 <= p90 <= 0.95 else "no"
        lines.append(f"| {q} | {c50:.3f} | {c90:.3f} | {p50:.3f} | {p90:.3f} | {ok} / {ok_pit} |")
    lines += [
        "",
        f"Edge probabilities, expected calibration error (weighted non-edges): **{result['edge_ece']:.4f}** (target <= 0.05).",
        "",
        "| SBC (KS p-value of rank uniformity) | p |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.3g} |" for k, v in result["sbc_ks_pvalues"].items()]
    nv = result["svi_vs_nuts"]
    rv = s.get("refine_vs_nuts", {})
    lines += [
        "",
        f"Tiny CORAL ({s['nuts_cells']} cells, {s['nuts_genes']} genes) against NUTS ({s['nuts_warmup']} warm-up, "
        f"{s['nuts_samples']} draws): median over latent entries of sd ratio and of |mean difference| / sd(NUTS).",
        "",
        "| posterior | sd ratio (median) | abs. mean difference / sd(NUTS) (median) |",
        "|---|---:|---:|",
        f"| SVI guide | {nv['sd_ratio_median']:.3f} | {nv['mean_abs_diff_median']:.3f} |",
    ]
    if rv:
        lines.append(f"| HMC refinement | {rv['sd_ratio_median']:.3f} | {rv['mean_abs_diff_median']:.3f} |")
    lines += ["", "## Per simulation (90%: interval / PIT)", "",
              "Cost = posterior seconds / SVI fit seconds (same process); unconverged = sites the R-hat/ESS check "
              "names (`criticism.convergence.unconverged_sites`).", "",
              "| cells | seed | cells/spot | expected_rna | counts | v | expected_rna_hmc | expected_rna_guide | "
              "theta (true) | edge ECE | cost local | cost hmc | unconverged (local) | s |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]

    def c90(r: dict, q: str) -> str:  # level keys are floats in memory, strings once read from JSON
        def at(d: dict) -> float:
            return d[0.9] if 0.9 in d else d["0.9"]
        pit = r[q].get("pit")
        return f"{at(r[q]):.3f}" + (f" / {at(pit):.3f}" if pit else "")

    for r in records:
        lines.append(f"| {r['n_cells']} | {r['seed']} | {r['cells_per_spot']:.1f} | {c90(r, 'expected_rna')} | "
                     f"{c90(r, 'counts')} | {c90(r, 'v')} | {c90(r, 'expected_rna_hmc') if 'expected_rna_hmc' in r else '-'} | "
                     f"{c90(r, 'expected_rna_guide')} | "
                     f"{r.get('theta_median', float('nan')):.1f} ({r.get('theta_true_median', float('nan')):.1f}) | "
                     f"{r['edge_ece']:.4f} | {r.get('local_cost_vs_fit', float('nan')):.2f} | "
                     f"{r.get('hmc_cost_vs_fit', float('nan')):.2f} | "
                     f"{', '.join(sorted(r.get('local_unconverged', {}))) or 'none'} | {r['seconds']:.0f} |")
    osm = s.get("osmfish")
    if osm:
        lines += ["", f"osmFISH: {json.dumps(osm)}"]
    abundance = s.get("abundance") or {}
    if abundance and all(isinstance(r, dict) and "all" in r for r in abundance.values()):
        lines += ["", "Reference-based deconvolution, per-spot cell-type counts on osmFISH (90%: interval / PIT; "
                  "in brackets the PIT coverage a perfectly calibrated posterior of the same sharpness would score "
                  "on a subset chosen by the truth, see `benchmarks/deconvolution_pit.py`):", "",
                  "| dataset | all entries | truly present types | absent types | zero fraction of truth |",
                  "|---|---:|---:|---:|---:|"]
        for name, r in abundance.items():
            cells = []
            for subset in ("all", "present", "absent"):
                c = r[subset]  # "all": as pooled (levels + "pit"); the others: "interval" and "pit"
                interval = c if subset == "all" else c["interval"]
                reference = f" [{_level(c['pit_if_calibrated'], 0.9):.3f}]" if "pit_if_calibrated" in c else ""
                cells.append(f"{_level(interval, 0.9):.3f} / {_level(c['pit'], 0.9):.3f}{reference}")
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['zero_fraction_of_truth']:.3f} |")
    elif abundance:
        lines += ["", f"Reference-based deconvolution: {json.dumps(abundance)}"]
    inter = result.get("interaction_matrix") or {}
    if "coverage" in inter:
        lines += ["", f"Cell-type interaction-matrix entries (from `{inter['source']}`; 90% PIT coverage per posterior): "
                  + ", ".join(f"{m} {_level(c['pit'], 0.9):.3f}" for m, c in inter["coverage"].items())
                  + f". The default posterior is `{inter['default_posterior']}`; see "
                  "`benchmarks/results/interaction_calibration.md`."]
    lines += ["", f"Settings: {json.dumps({k: v for k, v in s.items() if k not in ('per_simulation', 'osmfish', 'abundance')})}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small simulation, short fits, few draws")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--no-osmfish", action="store_true", help="skip the osmFISH pseudo-spots")
    parser.add_argument("--posteriors", default="local,guide",
                        help="posteriors scored on every simulation, the default first (add hmc for the whole-tissue "
                             "HMC: several times the cost)")
    parser.add_argument("--markdown-only", action="store_true",
                        help="only re-write OUT/calibration.md from an existing OUT/calibration.json")
    args = parser.parse_args(argv)
    if args.markdown_only:
        result = json.loads((Path(args.out) / "calibration.json").read_text())
        result["interaction_matrix"] = interaction_summary(Path(args.out))
        add_interaction_coverage(result)
        (Path(args.out) / "calibration.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
        s = result["settings"]
        command = "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/calibration.py" + \
            (" --quick" if s["quick"] else "") + " --out " + str(args.out)
        (Path(args.out) / "calibration.md").write_text(markdown(result, s["per_simulation"], command))
        return 0
    started = time.perf_counter()
    q = args.quick
    settings = {
        "quick": q,
        "sim_sizes": [300] if q else [300, 600],
        "sim_seeds": [0] if q else [0, 1, 2],
        "sim_genes": 30, "sim_proteins": 10, "sim_types": 3,
        "epochs": 60 if q else 150,
        "num_samples": 40 if q else 200,
        "posterior_default": "local",
        "posteriors": args.posteriors.split(","),
        "em_params_default": list(CoralModel.contract.em_parameters),
        "osmfish_spot_um": 100.0, "osmfish_epochs": 40 if q else 60, "osmfish_num_samples": 40 if q else 200,
        "sbc_replicates": 100 if q else 300, "sbc_draws": 99,
        "nuts_cells": 30, "nuts_genes": 6, "nuts_epochs": 100 if q else 300,
        "nuts_warmup": 60 if q else 200, "nuts_samples": 60 if q else 200,
        "edge_ece_bins": 10,
        "v_sign_alignment": "per cell type, the truth standardised (mean 0, sd 1: what the prior fixes) and "
                            "the draws sign-aligned to it (sign of corr(posterior mean, truth))",
        "svi_vs_nuts_definition": "median over latent entries of sd(SVI)/sd(NUTS) and |mean(SVI)-mean(NUTS)|/sd(NUTS); "
                                  "model parameters fixed at the SVI point estimates",
        "measured_elsewhere": {"interaction-matrix entries": "benchmarks/interaction_calibration.py (key interaction_matrix)"},
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "python": sys.version.split()[0], "versions": pyrospatial.engine.infer.versions(),
    }
    pool = _Pool()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state: dict = {"sbc": {}, "svi_nuts": {}, "eces": [], "records": []}

    def write() -> dict:
        """(Re)write calibration.json after every stage, so a partial run leaves its numbers."""
        settings["seconds"] = time.perf_counter() - started
        settings["per_simulation"] = state["records"]
        result = {
            "coverage_90": pool.coverage(0.9),
            "coverage_50": pool.coverage(0.5),
            "coverage_90_pit": pool.coverage(0.9, pit=True),
            "coverage_50_pit": pool.coverage(0.5, pit=True),
            "edge_ece": float(np.mean(state["eces"])) if state["eces"] else None,
            "sbc_ks_pvalues": state["sbc"],
            "svi_vs_nuts": state["svi_nuts"],
            "interaction_matrix": interaction_summary(out),
            "settings": settings,
        }
        add_interaction_coverage(result)
        (out / "calibration.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
        return result

    state["records"], state["eces"] = simulation_records(settings, pool)
    write()
    state["sbc"] = sbc_pvalues(settings)
    print(json.dumps({"sbc_ks_pvalues": state["sbc"]}), flush=True)
    write()
    state["svi_nuts"], settings["refine_vs_nuts"] = svi_vs_nuts(settings)
    print(json.dumps({"svi_vs_nuts": state["svi_nuts"], "refine_vs_nuts": settings["refine_vs_nuts"]}), flush=True)
    write()
    if args.no_osmfish:
        settings["osmfish"] = {"skipped": "--no-osmfish"}
    else:
        try:
            settings["osmfish"] = osmfish_record(settings, pool)
        except Exception as error:  # recorded, not hidden: the other results stand
            settings["osmfish"] = {"failed": f"{type(error).__name__}: {error}"}
        write()
        try:
            settings["abundance"] = abundance_records(settings, pool)
        except Exception as error:  # recorded, not hidden: the other results stand
            settings["abundance"] = {"failed": f"{type(error).__name__}: {error}"}
    result = write()
    records = state["records"]
    command = "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/calibration.py" + (" --quick" if q else "") + \
        (" --no-osmfish" if args.no_osmfish else "") + " --out " + str(args.out)
    (out / "calibration.md").write_text(markdown(result, records, command))
    print(f"wrote {out / 'calibration.json'} in {settings['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
