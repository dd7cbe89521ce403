"""Calibration of CORAL's cell-type interaction matrix on simulations whose edges have a truth.

    python benchmarks/interaction_calibration.py [--quick] [--out benchmarks/results]

The main simulator's graph is a kNN graph thinned by an inner-product rule: its keep-probability
is conditional on two cells being neighbours, which is not the probability CORAL's edge
likelihood describes (any pair of cells, neighbours or not). Here the tissues are simulated with
``edge_candidates="all"`` (:func:`pyrospatial.data.sim.simulate_tissue`): every pair of cells is an
edge with probability ``sigmoid(b + s z_i . z_j / K)``, the form of CORAL's own edge decoder. The
truth of the interaction entry ``(a, b)`` is then the mean *true* probability over the graph's
edges joining a type-``a`` and a type-``b`` cell, which is exactly what
:func:`pyrospatial.methods.analysis.interaction_matrix` estimates from the posterior edge probabilities.

For each simulation: CORAL is trained on the true graph, then the coverage of the 90% and 50%
intervals of the T(T+1)/2 distinct entries is scored (interval read off the draws, and the
randomised PIT), pooled over simulations, for the default posterior (rows ``refine``:
``method="local"``, HMC per spot; until the fourth session of 2026-12-06 these rows ran
``method="refine"``, the whole-tissue HMC, under the name the default had before), the
refinement that also conditions on the graph (``graph=True``) and the guide's draws; each starts
from the same trained model. Also the expected calibration error of the per-edge probabilities (edges
and weighted non-edges) and the mean absolute error of the entries.

Writes ``OUT/interaction_calibration.json`` and ``OUT/interaction_calibration.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import pyrospatial
from pyrospatial import criticism as dg
from pyrospatial.methods.analysis import interaction_matrix
from pyrospatial.methods.coral import CORAL
from pyrospatial.methods.edge_decoder_posterior import edge_probabilities
from pyrospatial.data.dataset import SpatialDataset
from pyrospatial.criticism.recalibration import INTERACTION_RECALIBRATION, widen
from _results import command_line, write_results  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

LEVELS = (0.5, 0.9)
QUANTILES = (0.05, 0.25, 0.75, 0.95)
#: model variants trained per simulation (CORAL model_kwargs)
MODELS = {"point": {"bayesian_edge_decoder": False}, "bayes_edge": {"bayesian_edge_decoder": True}}
#: posteriors compared: the model variant, CORAL.sample's method and its keyword arguments; each is
#: scored on the draws CORAL.interactions() reads (graph-free posteriors: the edge decoder drawn
#: given the graph at the states' posterior mean, pyrospatial.methods.edge_decoder_posterior)
METHODS = {
    "refine": ("point", "local", {}),  # the default posterior (named before it was HMC per spot)
    "refine_graph": ("point", "refine", {"graph": True}),
    "guide": ("point", "guide", {}),
    "bayes_edge_refine": ("bayes_edge", "local", {}),
    "bayes_edge_refine_graph": ("bayes_edge", "refine", {"graph": True}),
    "bayes_edge_refine_graph_warmup300": ("bayes_edge", "refine", {"graph": True, "num_warmup": 300}),
}
#: graph-free posteriors also scored as read before the edge decoder's posterior existed: the
#: trained decoder (or the guide's draws of a Bayesian one) held, the states' draws
#: (``METHOD_held_decoder``; the posterior's own ``edge_prob``)
HELD_DECODER = ("refine", "bayes_edge_refine")
#: run by default (the longer warm-up is a separate study: --methods)
DEFAULT_METHODS = ["refine", "refine_graph", "guide", "bayes_edge_refine", "bayes_edge_refine_graph"]


def true_interactions(tissue, edges: np.ndarray, cell_type: np.ndarray, n_types: int) -> np.ndarray:
    """(T, T) mean true edge probability over the graph's edges of each type pair."""
    s = tissue.settings
    z = tissue.truth["z"]
    logits = s["edge_bias"] + s["edge_z_scale"] * np.einsum("ez,ez->e", z[edges[0]], z[edges[1]]) / z.shape[1]
    prob = 1.0 / (1.0 + np.exp(-logits))
    return interaction_matrix(prob[None], edges, cell_type, n_types)["mean"]


def run_case(n_cells: int, seed: int, settings: dict, methods: list[str]) -> dict:
    t0 = time.perf_counter()
    tissue = pyrospatial.data.sim.simulate_tissue(
        n_cells=n_cells, n_types=settings["n_types"], n_proteins=settings["n_proteins"], n_genes=settings["n_genes"],
        seed=seed, edge_candidates="all", edge_z_scale=settings["edge_z_scale"], edge_bias=settings["edge_bias"],
    )
    dataset = SpatialDataset.from_anndata(tissue.cells, tissue.spots, cell_type_key="cell_type",
                                          spot_diameter=55.0).with_edges(tissue.truth["edge_index"])
    T = dataset.n_types
    truth = true_interactions(tissue, dataset.edges, dataset.cell_type, T)
    upper = np.triu_indices(T)
    record = {"n_cells": n_cells, "seed": seed, "n_edges": int(dataset.n_edges),
              "truth": truth[upper].tolist()}
    fitted = {}
    for name in dict.fromkeys(METHODS[m][0] for m in methods):
        coral = CORAL(tissue.cells, tissue.spots, dataset=dataset, model_kwargs=MODELS[name])
        coral.train(max_epochs=settings["epochs"], batch_size=None, seed=seed, progress=False)
        fitted[name] = (coral, copy.deepcopy(coral.model.state_dict()))
    for method in methods:
        variant, kind, kwargs = METHODS[method]
        coral, trained = fitted[variant]
        coral.model.load_state_dict(trained)  # each posterior starts from the trained model (EM is in place)
        coral.refined = False
        t_method = time.perf_counter()
        coral.sample(settings["num_samples"], method=kind, seed=seed, **kwargs)
        reported = coral.interactions(recalibrate=False)  # draws the edge decoder given the graph if needed
        seconds = time.perf_counter() - t_method
        posterior = coral.posterior
        if posterior.edge_decoder is not None:  # what interactions() read
            edge_prob = edge_probabilities(posterior.samples["z"].mean(0), dataset.edges, posterior.edge_decoder)
        else:
            edge_prob = posterior.edge_prob
        readings = {method: edge_prob}
        if method in HELD_DECODER:
            readings[method + "_held_decoder"] = posterior.edge_prob
        for name, probabilities in readings.items():
            draws = interaction_matrix(probabilities, dataset.edges, dataset.cell_type, T,
                                       keep_draws=True)["draws"][:, upper[0], upper[1]]
            record[name] = {
                "interval": dg.interval_coverage_by_level(draws, truth[upper], LEVELS).tolist(),
                "pit": dg.pit_coverage_by_level(draws, truth[upper], LEVELS).tolist(),
                "abs_error_mean": float(np.abs(draws.mean(0) - truth[upper]).mean()),
                "sd_mean": float(draws.std(0).mean()),
                "posterior_mean": draws.mean(0).tolist(),
                # per entry, for refitting an interval recalibration (benchmarks/interaction_recalibration.py)
                "quantiles": {str(q): np.quantile(draws, q, axis=0).tolist() for q in QUANTILES},
                # the entries' largest split-R-hat across the refinement's chains (NaN for independent draws)
                "rhat_max": float(reported["rhat_max"]) if name == method else float("nan"),
                "seconds": seconds,
            }
        if kind == "refine" and kwargs.get("graph") and MODELS[variant]["bayesian_edge_decoder"]:
            # the posterior the package's interval recalibration was fitted for (on seeds 100-107)
            widened = widen(draws, INTERACTION_RECALIBRATION.factor)
            record[method + "_recalibrated"] = {
                **record[method],
                "interval": dg.interval_coverage_by_level(widened, truth[upper], LEVELS).tolist(),
                "pit": dg.pit_coverage_by_level(widened, truth[upper], LEVELS).tolist(),
                "sd_mean": float(widened.std(0).mean()),
                "factor": INTERACTION_RECALIBRATION.factor,
                "seconds": 0.0,
            }
            record[method + "_recalibrated"].pop("quantiles")
    record["seconds"] = time.perf_counter() - t0
    print(json.dumps(record), flush=True)
    return record


def pooled(records: list[dict], method: str, kind: str) -> dict[str, float]:
    """Coverage pooled over simulations, weighted by their number of entries."""
    weights = np.array([len(r["truth"]) for r in records], dtype=float)
    values = np.array([r[method][kind] for r in records])  # (sims, levels)
    return {str(level): float((values[:, i] * weights).sum() / weights.sum()) for i, level in enumerate(LEVELS)}


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = ["# Calibration of the cell-type interaction matrix", "", f"Command: `{result['command']}`", "",
             f"Simulations: seeds {s['seeds']} x {s['sizes']} cells ({s['n_types']} types, so {s['n_types'] * (s['n_types'] + 1) // 2} "
             f"distinct entries each; {s['n_genes']} genes, {s['n_proteins']} proteins, {s['epochs']} epochs, "
             f"{s['num_samples']} draws), edges among all pairs with probability sigmoid({s['edge_bias']} + "
             f"{s['edge_z_scale']} z.z'/K). Truth: mean true probability over each type pair's edges. Target for 90%: "
             "[0.85, 0.95].", "",
             "| posterior | 90% interval | 90% PIT | 50% interval | 50% PIT | mean abs. error | mean posterior sd |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    methods = list(result["coverage"])
    for method in methods:
        c = result["coverage"][method]
        lines.append(f"| {method} | {c['interval']['0.9']:.3f} | {c['pit']['0.9']:.3f} | {c['interval']['0.5']:.3f} | "
                     f"{c['pit']['0.5']:.3f} | {c['abs_error_mean']:.4f} | {c['sd_mean']:.4f} |")
    lines += ["", "Posteriors: `refine`, `sample()` (the default posterior, which leaves the graph out) with a "
              "point-estimated edge decoder; `refine_graph`, "
              "`sample(graph=True)`, which also conditions on the graph and re-estimates the edge decoder by EM; "
              "`guide`, the amortised guide's draws; `bayes_edge_*`, the same with "
              "`CORAL(..., model_kwargs={\"bayesian_edge_decoder\": True})` (the edge decoder a latent: "
              "with `graph=True` HMC samples it jointly with the cells). Each row scores the draws "
              "`CORAL.interactions()` reads: for a posterior that leaves the graph out, the edge decoder drawn "
              "from its posterior given the graph (every edge, the training ratio of sampled non-edges) at the "
              "states' posterior mean, entries read there (`pyrospatial.methods.edge_decoder_posterior`); "
              "`_held_decoder`: the same posterior read as before that existed, the trained decoder (or the "
              "guide's draws of a Bayesian one) held, over the states' draws; `_warmup300`: "
              "300 warm-up transitions (EM and adaptation) instead of the default 100; `_recalibrated`: the same draws "
              "widened around their mean by the factor of `pyrospatial.criticism.recalibration.INTERACTION_RECALIBRATION`, "
              "fitted on seeds 100-107 (`benchmarks/results/interaction_recalibration.md`), never on these seeds; "
              "what `CORAL.interactions()` reports by default for that posterior.", "",
              "Per simulation (90% PIT coverage, mean abs. error, the entries' largest split-R-hat across the "
              "refinement's chains where recorded, seconds of sampling):", "",
              "| cells | seed | edges | " + " | ".join(methods) + " |", "|---:|---:|---:|" + "---:|" * len(methods)]
    for r in result["records"]:
        cells = " | ".join(f"{r[m]['pit'][1]:.3f}, {r[m]['abs_error_mean']:.4f}, "
                           + (f"R-hat {r[m]['rhat_max']:.2f}, " if "rhat_max" in r[m] else "")
                           + f"{r[m]['seconds']:.0f}" for m in methods)
        lines.append(f"| {r['n_cells']} | {r['seed']} | {r['n_edges']} | {cells} |")
    lines += ["", f"Versions: {json.dumps(result['versions'])}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small simulation, a short fit")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated subset of {list(METHODS)}")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0-4, --quick: 0)")
    parser.add_argument("--cells", type=int, default=None, help="cells per simulation (default 400, --quick: 300)")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite OUT/interaction_calibration.md from its JSON")
    parser.add_argument("--tag", default="", help="write OUT/interaction_calibration_TAG.{json,md} instead")
    parser.add_argument("--merge", default=None,
                        help="comma-separated JSON files of this script (e.g. seeds split over processes): pool their "
                             "records into OUT/interaction_calibration[_TAG].{json,md} without simulating")
    parser.add_argument("--replace-from", default=None, metavar="JSON",
                        help="a JSON of this script run with a subset of --methods on some of the seeds: replace "
                             "those methods' rows (held-decoder rows included) seed by seed in OUT/"
                             "interaction_calibration[_TAG].json, keep every other row, and re-pool (no simulating)")
    args = parser.parse_args(argv)
    stem = "interaction_calibration" + (f"_{args.tag}" if args.tag else "")
    if args.replace_from:
        return replace_rows(Path(args.out), stem, Path(args.replace_from))
    if args.markdown_only:
        result = json.loads((Path(args.out) / f"{stem}.json").read_text())
        (Path(args.out) / f"{stem}.md").write_text(markdown(result))
        return 0
    if args.merge:
        parts = [json.loads(Path(path).read_text()) for path in args.merge.split(",")]
        records = sorted((r for part in parts for r in part["records"]), key=lambda r: (r["n_cells"], r["seed"]))
        settings = {**parts[0]["settings"], "seeds": sorted({r["seed"] for r in records})}
        commands = " ; ".join(part["command"] for part in parts)
        return write(Path(args.out), stem, f"{commands} (records pooled by --merge)", settings, records)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    torch.set_num_threads(1)
    q = args.quick
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else ([0] if q else [0, 1, 2, 3, 4])
    settings = {"sizes": [args.cells] if args.cells else ([300] if q else [400]), "seeds": seeds, "n_types": 3,
                "n_genes": 30, "n_proteins": 10, "epochs": 60 if q else 150, "num_samples": 40 if q else 200,
                "edge_bias": -4.0, "edge_z_scale": 1.0}
    records = [run_case(n, seed, settings, methods) for n in settings["sizes"] for seed in settings["seeds"]]
    command = command_line("interaction_calibration.py", argv)
    return write(Path(args.out), stem, command, settings, records)


def replace_rows(out: Path, stem: str, source: Path) -> int:
    """Replace, seed by seed, the rows of the methods ``source`` ran in ``OUT/STEM.json``."""
    old = json.loads((out / f"{stem}.json").read_text())
    new = json.loads(source.read_text())
    by_case = {(r["n_cells"], r["seed"]): r for r in new["records"]}
    missing = sorted(set(by_case) - {(r["n_cells"], r["seed"]) for r in old["records"]})
    if missing:
        raise SystemExit(f"--replace-from: (cells, seed) {missing} are not in {out / stem}.json; run them there first")
    methods = [m for m, value in new["records"][0].items() if isinstance(value, dict)]
    for record in old["records"]:
        fresh = by_case.get((record["n_cells"], record["seed"]))
        if fresh is not None:
            record.update({m: fresh[m] for m in methods})
            record["seconds_rerun"] = fresh["seconds"]
    command = (f"{old['command']} ; then rows {', '.join(methods)} of seeds {sorted(s for _, s in by_case)} "
               f"replaced by --replace-from with those of: {new['command']}")
    return write(out, stem, command, old["settings"], old["records"])


def write(out: Path, stem: str, command: str, settings: dict, records: list[dict]) -> int:
    """Pool the records' coverage and write OUT/STEM.json and .md."""
    scored = [m for m in records[0] if isinstance(records[0][m], dict)]  # methods, and the recalibrated ones
    coverage = {m: {"interval": pooled(records, m, "interval"), "pit": pooled(records, m, "pit"),
                    "abs_error_mean": float(np.mean([r[m]["abs_error_mean"] for r in records])),
                    "sd_mean": float(np.mean([r[m]["sd_mean"] for r in records]))} for m in scored}
    result = {"command": command, "settings": settings, "coverage": coverage, "records": records,
              "versions": pyrospatial.engine.infer.versions()}
    write_results(out, stem, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
