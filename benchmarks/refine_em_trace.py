"""Does the Monte Carlo EM of the HMC refinement settle? Traces of the re-estimated globals.

    python benchmarks/refine_em_trace.py [--warmup 400] [--em-params a,b] [--tag NAME] [--out benchmarks/results]

On simulated tissues (:func:`pyrospatial.data.sim.simulate_tissue`, 30 genes, 10 proteins, 3 types,
the calibration benchmark's settings) CORAL is trained by SVI, then refined with a long
warm-up during which Monte Carlo EM re-estimates ``--em-params`` (default: the refinement's
default, ``CoralModel.contract.em_parameters``). Each global's value is recorded every 25 warm-up steps next to the
simulator's truth where one exists (``size_scale`` vs ``size_factor_sd``,
``rna_inverse_dispersion`` and ``protein_concentration`` vs the median of the per-gene /
per-protein truths). The default refinement warms up for 100 steps.

Writes ``OUT/refine_em_trace{TAG}.json`` and ``OUT/refine_em_trace{TAG}.md``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import pyrospatial
from pyrospatial import criticism as dg
from pyrospatial.methods.coral import CORAL
from pyrospatial.models import CoralModel
from _results import write_results  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

CASES = ((600, 0), (300, 1))


def _coverage(coral: CORAL, tissue) -> dict[str, float]:
    """90% PIT coverage of the simulated per-cell expected RNA and counts (cells inside spots)
    under the current posterior."""
    inside = coral.dataset.cell_spot >= 0
    rna = coral.posterior.samples["expected_rna"][:, inside]
    counts = coral.split_spot_counts(seed=0, keep_draws=True).draws[:, inside]
    return {
        "expected_rna": float(dg.pit_coverage_by_level(rna, tissue.truth["expected_rna"][inside], (0.9,))[0]),
        "counts": float(dg.pit_coverage_by_level(counts, tissue.truth["counts"][inside], (0.9,))[0]),
    }


def trace_case(n_cells: int, seed: int, warmup: int, every: int, em_params: tuple[str, ...]) -> dict:
    tissue = pyrospatial.data.sim.simulate_tissue(n_cells=n_cells, n_types=3, n_proteins=10, n_genes=30, seed=seed,
                                             edge_z_scale=1.0)
    coral = CORAL(tissue.cells, tissue.spots, cell_type_key="cell_type", spot_diameter=55.0)
    coral.train(max_epochs=150, batch_size=None, seed=seed, progress=False)
    t0 = time.perf_counter()
    present = {name.removesuffix("_unconstrained") for name, _ in coral.model.named_parameters()}
    em_params = [name for name in em_params if name in present]
    with tempfile.TemporaryDirectory() as tmp:
        trained = str(Path(tmp) / "trained.pt")
        coral.save(trained)
        post = coral.sample(100, method="refine", seed=seed, num_warmup=warmup, em_params=em_params)
        coverage = {f"warmup_{warmup}": _coverage(coral, tissue)}
        coral.load(trained)  # the default warm-up, from the same trained model
        coral.sample(100, method="refine", seed=seed, em_params=em_params)
        coverage["warmup_default"] = _coverage(coral, tissue)
    em = post.diagnostics["em"]
    steps = list(range(0, len(next(iter(em.values()))), every))
    truth = {
        "size_scale": float(tissue.settings.get("size_factor_sd", np.nan)),
        "rna_inverse_dispersion": float(np.median(tissue.params["rna_inverse_dispersion"])),
        "protein_concentration": float(np.median(tissue.params["protein_concentration"])),
    }
    return {
        "n_cells": n_cells, "seed": seed, "warmup": warmup,
        "trace_steps": steps,
        "trace": {name: [float(values[i]) for i in steps] + [float(values[-1])] for name, values in em.items()},
        "truth": truth, "coverage_90_pit": coverage, "seconds": time.perf_counter() - t0,
    }


def markdown(result: dict) -> str:
    lines = ["# Monte Carlo EM traces of the HMC refinement", "",
             f"Command: `{result['command']}`", "",
             f"Re-estimated by EM: {', '.join(result['em_params'])}.", "",
             "Value of each re-estimated global every 25 EM steps (last column: end of warm-up); `truth`: the",
             "simulator's value (median over genes / proteins). SVI's estimate is the first column. The default",
             "refinement warms up for 100 steps (about 90 EM steps).", "",
             "How to read it: an estimate that keeps moving after 100 steps has not converged, and the default",
             "warm-up then acts as early stopping (see the Monte Carlo EM section of `pyrospatial/refine.py`).",
             "`refine_em_trace_readout_scales.md` holds the earlier default, which also re-estimated the RNA",
             "read-out's prior scales; they shrank steadily.", ""]
    for case in result["cases"]:
        steps = case["trace_steps"]
        lines += [f"## {case['n_cells']} cells, seed {case['seed']} ({case['warmup']} warm-up steps)", "",
                  "| parameter | truth | " + " | ".join(f"step {s}" for s in steps) + " | end |",
                  "|---|---:|" + "---:|" * (len(steps) + 1)]
        for name, values in case["trace"].items():
            t = case["truth"].get(name)
            t = "–" if t is None or not np.isfinite(t) else f"{t:.3g}"
            lines.append(f"| {name} | {t} | " + " | ".join(f"{v:.3g}" for v in values) + " |")
        cov = case.get("coverage_90_pit")
        if cov:
            lines += ["", "90% PIT coverage of the simulated truth (cells in spots), after this warm-up and after the "
                      "default one (same trained model): " + "; ".join(
                          f"{label.replace('_', ' ')}: expected RNA {c['expected_rna']:.3f}, counts {c['counts']:.3f}"
                          for label, c in cov.items()) + "."]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=400)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--em-params", default=",".join(CoralModel.contract.em_parameters),
                        help="comma-separated model parameters re-estimated by EM")
    parser.add_argument("--tag", default="", help="suffix of the output files' names")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    em_params = tuple(name for name in args.em_params.split(",") if name)
    cases = [trace_case(n, s, args.warmup, args.every, em_params) for n, s in CASES]
    command = (f"OMP_NUM_THREADS=1 python benchmarks/refine_em_trace.py --warmup {args.warmup} "
               f"--em-params {','.join(em_params)}" + (f" --tag {args.tag}" if args.tag else "") + f" --out {args.out}")
    result = {"command": command, "em_params": list(em_params), "cases": cases,
              "versions": pyrospatial.engine.infer.versions()}
    write_results(args.out, f"refine_em_trace{args.tag}", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
