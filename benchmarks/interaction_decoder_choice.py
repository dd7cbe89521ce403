"""Which states the edge decoder's posterior is drawn at, chosen on simulations held apart from
the scored ones (issue 23 item 2).

    OMP_NUM_THREADS=1 python benchmarks/interaction_decoder_choice.py [--seeds 100,...,107] [--out benchmarks/results]

The default posterior leaves the cell graph out; :mod:`pyrospatial.methods.edge_decoder_posterior`
draws the edge decoder from its posterior given the graph (Laplace, every edge, sampled non-edges).
Three ways to combine it with the states' posterior, on the all-pairs simulations of
``benchmarks/interaction_calibration.py`` (seeds 100-107: never the scored seeds 0-4):

- ``per_draw``: one decoder per draw of the states, the entry read at that draw (the cut
  posterior taken literally);
- ``posterior_mean``: every decoder fitted at the states' posterior mean and the entries read
  there (regression calibration; what ``CORAL.interactions()`` does);
- ``mean_fit_draw_read``: decoders fitted at the posterior mean, entries read at each draw;
- ``held_decoder``: the trained point decoder held, entries read at each draw (the former
  default).

Writes ``OUT/interaction_decoder_choice.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import pyrospatial
from pyrospatial import criticism as dg
from pyrospatial.data.dataset import SpatialDataset
from pyrospatial.methods.analysis import interaction_matrix
from pyrospatial.methods.coral import CORAL
from pyrospatial.methods.edge_decoder_posterior import EdgeDecoderDraws, coral_edge_decoder_posterior

from _results import command_line, write_results  # noqa: E402
from interaction_calibration import true_interactions  # noqa: E402

VARIANTS = ("per_draw", "posterior_mean", "mean_fit_draw_read", "held_decoder")


def _probabilities(z: np.ndarray, pairs: np.ndarray, decoders: EdgeDecoderDraws) -> np.ndarray:
    """(S, P) edge probabilities, draw s read at z[s] (z: (S, n, K)) with decoder s."""
    i, j = pairs
    logits = np.einsum("spk,skl,spl->sp", z[:, i], decoders.weight, z[:, j]) + decoders.bias[:, None]
    return 1.0 / (1.0 + np.exp(-logits))


def run_case(seed: int, n_cells: int, num_samples: int) -> dict:
    tissue = pyrospatial.data.sim.simulate_tissue(n_cells=n_cells, n_types=3, n_proteins=10, n_genes=30, seed=seed,
                                                  edge_candidates="all", edge_z_scale=1.0, edge_bias=-4.0)
    dataset = SpatialDataset.from_anndata(tissue.cells, tissue.spots, cell_type_key="cell_type",
                                          spot_diameter=55.0).with_edges(tissue.truth["edge_index"])
    T, upper = dataset.n_types, np.triu_indices(dataset.n_types)
    truth = true_interactions(tissue, dataset.edges, dataset.cell_type, T)[upper]
    coral = CORAL(tissue.cells, tissue.spots, dataset=dataset)
    coral.train(max_epochs=150, batch_size=None, seed=seed, progress=False)
    coral.sample(num_samples, seed=seed)
    z = coral.posterior.samples["z"]
    S = z.shape[0]
    zbar = np.broadcast_to(z.mean(0, keepdims=True), z.shape)
    record: dict = {"seed": seed, "n_cells": n_cells, "n_edges": int(dataset.n_edges), "truth": truth.tolist()}
    for variant in VARIANTS:
        t0 = time.perf_counter()
        decoders = None
        if variant == "held_decoder":
            prob = coral.posterior.edge_prob
        elif variant == "per_draw":
            fits = [coral_edge_decoder_posterior(coral.model, dataset, z[s], 1, seed=seed * 1000 + s) for s in range(S)]
            decoders = EdgeDecoderDraws(weight=np.concatenate([f.weight for f in fits]),
                                        bias=np.concatenate([f.bias for f in fits]),
                                        newton_iterations=max(f.newton_iterations for f in fits),
                                        converged=all(f.converged for f in fits),
                                        nonedges_per_draw=fits[0].nonedges_per_draw,
                                        nonedge_weight=fits[0].nonedge_weight)
            prob = _probabilities(z, dataset.edges, decoders)
        else:
            decoders = coral_edge_decoder_posterior(coral.model, dataset, zbar[0], S, seed=seed)
            prob = _probabilities(zbar if variant == "posterior_mean" else z, dataset.edges, decoders)
        draws = interaction_matrix(prob, dataset.edges, dataset.cell_type, T, keep_draws=True)["draws"][:, upper[0], upper[1]]
        record[variant] = {
            "interval": dg.interval_coverage_by_level(draws, truth, (0.5, 0.9)).tolist(),
            "pit": dg.pit_coverage_by_level(draws, truth, (0.5, 0.9)).tolist(),
            "abs_error_mean": float(np.abs(draws.mean(0) - truth).mean()),
            "sd_mean": float(draws.std(0).mean()),
            "seconds": time.perf_counter() - t0,
            # Newton's method reached its tolerance for every draw's decoder (None: no decoder fitted)
            "converged": None if decoders is None else bool(decoders.converged),
        }
    print(record, flush=True)
    return record


def markdown(result: dict) -> str:
    lines = ["# Edge decoder's posterior: at which states (chosen on held-apart simulations)", "",
             f"Command: `{result['command']}`", "",
             f"Simulations: seeds {result['settings']['seeds']} (never the scored seeds 0-4 of "
             "`interaction_calibration.py`), 400 cells, 3 types (6 entries each), edges over all pairs with "
             "probability sigmoid(-4 + z.z'/K); CORAL trained 150 epochs, `sample()` (the default posterior, "
             f"{result['settings']['num_samples']} draws). Coverage pooled over the {len(result['records'])} "
             "simulations' entries; target for 90%: [0.85, 0.95].", "",
             "| variant | 90% interval | 90% PIT | 50% interval | mean abs. error | mean sd | seconds (mean) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for variant, row in result["pooled"].items():
        lines.append(f"| {variant} | {row['interval_90']:.3f} | {row['pit_90']:.3f} | {row['interval_50']:.3f} | "
                     f"{row['abs_error_mean']:.4f} | {row['sd_mean']:.4f} | {row['seconds']:.1f} |")
    lines += ["", "`per_draw`: one decoder per draw of the states, entries read at that draw; `posterior_mean`: "
              "decoders fitted at the states' posterior mean, entries read there (what `CORAL.interactions()` "
              "does); `mean_fit_draw_read`: fitted at the mean, read at each draw; `held_decoder`: the trained "
              "decoder held, read at each draw (the former default). Seconds: the decoder's posterior and the "
              "entries, after the states' posterior.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="100,101,102,103,104,105,106,107")
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    records = [run_case(seed, 400, args.num_samples) for seed in seeds]
    weights = np.array([len(r["truth"]) for r in records], dtype=float)

    def pooled(variant: str, kind: str, level: int) -> float:
        return float(np.average([r[variant][kind][level] for r in records], weights=weights))

    result = {
        "command": command_line("interaction_decoder_choice.py", argv),
        "settings": {"seeds": seeds, "num_samples": args.num_samples},
        "pooled": {v: {"interval_90": pooled(v, "interval", 1), "pit_90": pooled(v, "pit", 1),
                       "interval_50": pooled(v, "interval", 0),
                       "abs_error_mean": float(np.mean([r[v]["abs_error_mean"] for r in records])),
                       "sd_mean": float(np.mean([r[v]["sd_mean"] for r in records])),
                       "seconds": float(np.mean([r[v]["seconds"] for r in records]))} for v in VARIANTS},
        "records": records,
        "versions": pyrospatial.engine.infer.versions(),
    }
    write_results(Path(args.out), "interaction_decoder_choice", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
