"""Does the per-spot sampler's step on CORAL's RNA read-out mix when the cells stand still?

    OMP_NUM_THREADS=1 python benchmarks/readout_mixing.py [--cells 3000] [--seed 11] [--out benchmarks/results]

``CORAL.sample()`` alternates an HMC step on the global read-out ``omega`` given the cells
with one on the cells given ``omega`` (``pyrospatial/engine/local.py``). Its chains of
``omega`` end with split-R-hat about 4 (``benchmarks/results/posterior_error_sources.md``).
There are two possible causes. The alternation may crawl along the ridge where the states and
the read-out trade off. Or the conditional step on ``omega`` may not mix by itself.

This diagnostic runs the default sampler on the tissue of
``benchmarks/posterior_error_sources.py`` in four ways. The read-out step uses either the
diagonal mass of before (``dense_globals=False``) or the dense per-gene mass that is now the
default. The cells are either sampled as usual, or tied to the same guide draw (chain 0's)
in every chain and never moved, so that only the ``omega`` step runs, on one fixed
conditional. If the conditional step mixed, the tied run's R-hat of ``omega`` would be near 1.
It records the R-hat, the ``omega`` step's mean acceptance after warm-up (the target is 0.7),
its final step size, the CPU seconds, and, where the cells are sampled, the 90% coverage of
per-cell expected RNA over the cells inside spots.

It patches the sampler's private HMC class for the second run: it is a diagnostic, not an
API. Writes ``OUT/readout_mixing.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import command_line, write_results  # noqa: E402

from posterior_error_sources import fit, study_tissue  # noqa: E402
from pyrospatial.criticism.calibration import interval_coverage_by_level, pit_coverage_by_level  # noqa: E402
from pyrospatial.engine import hmc  # noqa: E402
from pyrospatial.methods.coral import CORAL  # noqa: E402


def run(coral: CORAL, seed: int, frozen_cells: bool, dense: bool, scored: np.ndarray, truth: np.ndarray) -> dict:
    original = hmc._HMC.transition
    history: dict[str, list[tuple[float, float]]] = {}

    def transition(self) -> float:
        if frozen_cells and self.part.label == "local":
            if not getattr(self, "_tied", False):  # every chain: chain 0's cells, for good
                for name, value in self.part.state.items():
                    self.part.state[name] = value[:1].expand_as(value).clone()
                self._tied = True
            self.accept_history.append(1.0)
            return 1.0
        rate = original(self)
        history.setdefault(self.part.label, []).append((rate, float(self.step)))
        return rate

    hmc._HMC.transition = transition
    try:
        coral.posterior = None
        start = time.process_time()
        coral.sample(100, seed=seed, dense_globals=dense)
        cpu = time.process_time() - start
    finally:
        hmc._HMC.transition = original
    draws = coral.site_draws("expected_rna", scored)
    d = coral.posterior.diagnostics
    warmup = int(d["num_warmup"])
    steps = history.get("globals", [])
    return {"frozen_cells": frozen_cells, "dense_readout_mass": dense, "cpu_s": cpu,
            "expected_rna_cov90": None if frozen_cells else float(interval_coverage_by_level(draws, truth, (0.9,))[0]),
            "expected_rna_pit90": None if frozen_cells else float(pit_coverage_by_level(draws, truth, (0.9,))[0]),
            "rhat_max_omega": float(d["rhat_max"]["rna_weight"]),
            "rhat_above_omega": float(d["rhat_above"]["rna_weight"]),
            "omega_accept_after_warmup": float(np.mean([r for r, _ in steps[warmup:]])) if steps else None,
            "omega_step_size": steps[-1][1] if steps else None,
            "omega_sd_mean": float(np.asarray(coral.posterior.samples["rna_weight"]).std(0).mean()),
            "iterations": len(steps)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tissue, dataset, scored, truth = study_tissue(args.cells, args.seed)
    coral, _ = fit(tissue, dataset, args.seed)
    rows = [run(coral, args.seed, frozen, dense, scored, truth) for dense in (False, True) for frozen in (False, True)]
    command = command_line("readout_mixing.py", argv)
    result = {"command": command, "n_cells": args.cells, "seed": args.seed, "rows": rows}
    lines = ["# Does the read-out step mix when the cells stand still? (issue 23)", "",
             f"`{result['command']}` ({args.cells} cells, seed {args.seed}; `CORAL.sample()` defaults: 10 chains, "
             "40 warm-up iterations, 100 draws).", "",
             "| read-out mass | cells | omega split-R-hat max | share of omega coordinates with R-hat > 1.1 | omega acceptance after warm-up (target 0.7) | omega step size | omega posterior sd (mean) | expected RNA cov90 / PIT90 | CPU s |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        label = "tied to one draw, not moved" if r["frozen_cells"] else "sampled"
        mass = "dense per gene (default)" if r["dense_readout_mass"] else "diagonal (before)"
        cov = "-" if r["frozen_cells"] else f"{r['expected_rna_cov90']:.3f} / {r['expected_rna_pit90']:.3f}"
        lines.append(f"| {mass} | {label} | {r['rhat_max_omega']:.2f} | {r['rhat_above_omega']:.3f} | "
                     f"{r['omega_accept_after_warmup']:.3f} | {r['omega_step_size']:.4f} | {r['omega_sd_mean']:.3f} | "
                     f"{cov} | {r['cpu_s']:.0f} |")
    write_results(args.out, "readout_mixing", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
