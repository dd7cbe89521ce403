"""Step-size adaptation of CORAL's per-spot HMC: one step size per block, and a final window.

    OMP_NUM_THREADS=1 python benchmarks/block_step_sizes.py --seeds 11 12 [--cells 3000]
        [--out benchmarks/results]
    # or one process per seed, then merged:
    OMP_NUM_THREADS=1 python benchmarks/block_step_sizes.py --seeds 11 --part DIR/11.json
    python benchmarks/block_step_sizes.py --merge DIR/11.json DIR/12.json --out benchmarks/results

The default posterior (:func:`pyrospatial.engine.local.local_posterior`) accepts or rejects
each block (a spot with its cells, or a cell outside every spot) on its own, but all blocks
of a chunk share one step size, adapted to their *mean* acceptance. On the simulated tissues
most blocks are lone cells held only by their proteins, while a spot's counts pin its cells'
sum: the shared step serves the many loose blocks and the spots reject most proposals. And
the last mass update came at 90% of the 40-iteration warm-up, so the step size's dual
averaging restarted 4 iterations before sampling. This script measured the two changes that
are now the default (``block_steps=True``, ``step_window`` a quarter of the warm-up).

This script fits one simulated tissue per seed (the simulator and minibatch fit of
``benchmarks/scaling.py``; seeds 11 and 12 are not scored by any calibration or scaling
benchmark) and samples it four ways with the same fit and seed:

``shared``            the former default (one step size per chunk, last mass update at 90%
                      of warm-up: ``block_steps=False, step_window=4``);
``per_block``         ``block_steps=True``: one step size per block, each adapted to its own
                      acceptance rate;
``final_window``      ``step_window=10``: the last mass update 10 iterations before sampling;
``per_block_final``   both: the default since the scored benchmarks were rerun with them
                      (``docs/posterior.md``).

Reported per variant: 90% coverage (interval and PIT) of per-cell expected RNA, its total and
profile (``benchmarks/posterior_error_sources.py``'s split) and of the within-type state ``v``
(scored as ``benchmarks/scaling.py`` scores it: since 2026-12-07 against the truth
standardised within cell types, sign-aligned before); split-R-hat (largest, and the fraction of
coordinates above 1.1) of every returned site and of log cell size, ``v`` and ``z[0]`` split
into spot means, deviations within spots and cells outside spots; the mean acceptance (target
0.7); CPU seconds of the sampler. Writes ``OUT/block_step_sizes.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_results  # noqa: E402
from posterior_error_sources import fit, rna_scores, study_tissue  # noqa: E402
from scaling import _posterior_coverage  # noqa: E402

from pyrospatial.criticism.convergence import convergence_detail  # noqa: E402

VARIANTS = {  # the settings of 40 warm-up iterations, spelled out (the default is the last)
    "shared": {"block_steps": False, "step_window": 4},
    "per_block": {"block_steps": True, "step_window": 4},
    "final_window": {"block_steps": False, "step_window": 10},
    "per_block_final": {"block_steps": True, "step_window": 10},
}


def _split_rhat(samples: dict, cell_spot: np.ndarray, n_spots: int, chains: int) -> dict:
    """R-hat of log size, v and z[0]: spot means, deviations within spots, cells outside spots."""
    inside = cell_spot >= 0
    counts = np.maximum(np.bincount(cell_spot[inside], minlength=n_spots), 1)
    out = {}
    S = np.asarray(samples["v"]).shape[0]
    quantities = {"log_cell_size": np.log(np.asarray(samples["cell_size"]).reshape(S, -1)),
                  "v": np.asarray(samples["v"]).reshape(S, cell_spot.size, -1)[..., 0],
                  "z0": np.asarray(samples["z"]).reshape(S, cell_spot.size, -1)[..., 0]}
    for name, draws in quantities.items():
        spot_mean = np.zeros((S, n_spots))
        np.add.at(spot_mean.T, cell_spot[inside], draws[:, inside].T)
        spot_mean /= counts
        parts = {"spot_mean": spot_mean, "within_spot": draws[:, inside] - spot_mean[:, cell_spot[inside]],
                 "outside": draws[:, ~inside]}
        out[name] = {}
        for label, values in parts.items():
            detail = convergence_detail(values, chains)
            out[name][label] = {"rhat_max": detail["rhat_max"], "rhat_above": detail["rhat_above"],
                                "n": int(values.shape[1])}
    return out


def run_seed(seed: int, n_cells: int, variants: dict[str, dict] | None = None, num_samples: int = 100,
             restore_fit: bool = False) -> dict:
    """Fit the tissue of ``seed`` once and sample it with each variant's ``CORAL.sample`` options
    (default: :data:`VARIANTS`). ``restore_fit``: every variant starts from the trained weights
    and runs its own Monte Carlo EM, as a fresh default run does; without it (the committed
    ``block_step_sizes`` results) the variants after the first keep the first's EM estimates
    (``CORAL.sample`` runs EM once per fit)."""
    tissue, dataset, scored, truth = study_tissue(n_cells, seed)
    coral, fit_info = fit(tissue, dataset, seed)
    trained = {k: v.detach().clone() for k, v in coral.model.state_dict().items()}
    result = {"seed": seed, "n_cells": n_cells, "fit": fit_info, "cells_inside_spots": int((dataset.cell_spot >= 0).sum()),
              "n_spots": int(dataset.n_spots), "variants": {}}
    for name, kwargs in (VARIANTS if variants is None else variants).items():
        coral.posterior = None
        if restore_fit:
            coral.model.load_state_dict(trained)
            coral.refined = False
        start = time.process_time()
        coral.sample(num_samples, seed=seed, **kwargs)
        cpu = time.process_time() - start
        post = coral.posterior
        d = post.diagnostics
        row = {"settings": kwargs, "cpu_s": cpu, **rna_scores(coral.site_draws("expected_rna", scored), truth),
               "v_cov90": _posterior_coverage(coral, tissue)["v"], "acceptance": d["acceptance"]["local"],
               "step_size": d["step_size"]["local"], "rhat_max": d["rhat_max"], "rhat_above": d["rhat_above"],
               "unconverged": sorted(d["unconverged"]),
               "split_rhat": _split_rhat(post.samples, dataset.cell_spot, dataset.n_spots, d["num_chains"])}
        result["variants"][name] = row
        print(json.dumps({"seed": seed, "variant": name, "cpu_s": round(cpu, 1),
                          "expected_rna_cov90": round(row["expected_rna_cov90"], 3),
                          "acceptance": round(row["acceptance"], 3),
                          "rhat_max": {k: round(v, 2) for k, v in d["rhat_max"].items()}}), flush=True)
    return result


def _f(x, digits=3) -> str:
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def markdown(payload: dict) -> str:
    lines = ["# Step-size adaptation of the per-spot HMC (issue 23)", "",
             f"`{payload['command']}`. Simulated tissues of {payload['n_cells']} cells (the simulator and minibatch "
             "fit of `benchmarks/scaling.py`; seeds not scored by any calibration or scaling benchmark), each fitted "
             "once and sampled four ways with the same seed: 10 chains, 40 warm-up iterations, 100 draws (the "
             "default budget). Variants: `shared` = the former default (one step size per chunk, last mass "
             "update at 90% of warm-up: `block_steps=False, step_window=4`); `per_block` = `block_steps=True`; "
             "`final_window` = `step_window=10`; `per_block_final` = both, the default now (docs/posterior.md).", "",
             "## Coverage, acceptance, cost", "",
             "| seed | variant | expected RNA 90% (interval / PIT) | total | profile | v | acceptance | CPU s |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for res in payload["seeds"]:
        for name, row in res["variants"].items():
            lines.append(f"| {res['seed']} | {name} | {_f(row['expected_rna_cov90'])} / {_f(row['expected_rna_pit90'])} | "
                         f"{_f(row['total_cov90'])} | {_f(row['profile_cov90'])} | {_f(row['v_cov90'])} | "
                         f"{_f(row['acceptance'], 2)} | {_f(row['cpu_s'], 0)} |")
    lines += ["", "## Convergence: largest split-R-hat (fraction of coordinates above 1.1)", "",
              "| seed | variant | cell_size | v | z | expected_rna | rna_weight | sites warned |",
              "|---|---|---|---|---|---|---|---|"]
    for res in payload["seeds"]:
        for name, row in res["variants"].items():
            cells = [f"{_f(row['rhat_max'].get(s), 2)} ({_f(row['rhat_above'].get(s), 2)})"
                     for s in ("cell_size", "v", "z", "expected_rna", "rna_weight")]
            lines.append(f"| {res['seed']} | {name} | " + " | ".join(cells) + f" | {', '.join(row['unconverged'])} |")
    lines += ["", "## Where the chains stick: log cell size, split into spot means, deviations within spots, "
              "cells outside spots (largest R-hat, fraction above 1.1)", "",
              "| seed | variant | spot means | within spots | outside spots |", "|---|---|---|---|---|"]
    for res in payload["seeds"]:
        for name, row in res["variants"].items():
            parts = row["split_rhat"]["log_cell_size"]
            lines.append(f"| {res['seed']} | {name} | " + " | ".join(
                f"{_f(parts[k]['rhat_max'], 2)} ({_f(parts[k]['rhat_above'], 2)})"
                for k in ("spot_mean", "within_spot", "outside")) + " |")
    lines += ["", f"Machine: {payload['platform']}, python {payload['python']}, one torch thread.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[11, 12])
    parser.add_argument("--cells", type=int, default=3000)
    parser.add_argument("--part", default=None, help="write this process's seeds to this JSON file only")
    parser.add_argument("--merge", nargs="*", default=None, help="part files to merge (no sampling)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.merge:
        seeds = [s for path in args.merge for s in json.loads(Path(path).read_text())["seeds"]]
    else:
        seeds = [run_seed(seed, args.cells) for seed in args.seeds]
    payload = {"command": "OMP_NUM_THREADS=1 python benchmarks/block_step_sizes.py --seeds "
                          + " ".join(str(s["seed"]) for s in seeds) + f" --cells {args.cells}",
               "n_cells": args.cells, "platform": platform.platform(), "python": platform.python_version(),
               "seeds": sorted(seeds, key=lambda s: s["seed"])}
    if args.part:
        Path(args.part).write_text(json.dumps(payload, indent=1) + "\n")
        return
    write_results(args.out, "block_step_sizes", payload, markdown(payload))


if __name__ == "__main__":
    main()
