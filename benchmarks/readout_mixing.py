"""Does the per-spot sampler's step on CORAL's RNA read-out mix when the cells stand still?

    OMP_NUM_THREADS=1 python benchmarks/readout_mixing.py [--cells 3000] [--seed 11] [--out benchmarks/results]

``CORAL.sample()`` alternates an HMC step on the global read-out ``omega`` given the cells
with one on the cells given ``omega`` (``pyrospatial/engine/local.py``). Its chains of
``omega`` end with split-R-hat about 4 (``benchmarks/results/posterior_error_sources.md``).
There are two possible causes. The alternation may crawl along the ridge where the states and
the read-out trade off. Or the conditional step on ``omega`` may not mix by itself.

This diagnostic runs the default sampler twice on the tissue of
``benchmarks/posterior_error_sources.py``. In the first run everything is as usual. In the
second, every chain's cells are tied to the same guide draw (chain 0's) and never moved, so
only the ``omega`` step runs, on one fixed conditional. If the conditional step mixed, the
second run's R-hat of ``omega`` would be near 1. It records the R-hat, the ``omega`` step's
mean acceptance after warm-up (the target is 0.7) and its final step size.

It patches the sampler's private HMC class for the second run: it is a diagnostic, not an
API. Writes ``OUT/readout_mixing.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyrospatial  # noqa: E402
from pyrospatial.data.dataset import SpatialDataset  # noqa: E402
from pyrospatial.engine import hmc  # noqa: E402
from pyrospatial.methods.coral import CORAL  # noqa: E402
from scaling import REL_TOL, WINDOW, _convergence_callback  # noqa: E402


def run(coral: CORAL, seed: int, frozen_cells: bool) -> dict:
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
        coral.sample(100, seed=seed)
    finally:
        hmc._HMC.transition = original
    d = coral.posterior.diagnostics
    warmup = int(d["num_warmup"])
    steps = history.get("globals", [])
    return {"frozen_cells": frozen_cells, "rhat_max_omega": float(d["rhat_max"]["rna_weight"]),
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
    tissue = pyrospatial.data.sim.simulate_tissue(n_cells=args.cells, n_types=5, n_proteins=30, n_genes=200,
                                                 cells_per_spot=8.0, seed=args.seed, edge_z_scale=1.0)
    dataset = SpatialDataset.from_anndata(tissue.cells, tissue.spots, cell_type_key="cell_type", spot_diameter=55.0)
    coral = CORAL(tissue.cells, tissue.spots, dataset=dataset, seed=args.seed)
    coral.train(max_epochs=200, batch_size=128, seed=args.seed, progress=False,
                callbacks=[_convergence_callback(WINDOW, REL_TOL)])
    rows = [run(coral, args.seed, frozen_cells=False), run(coral, args.seed, frozen_cells=True)]
    command = "OMP_NUM_THREADS=1 python benchmarks/readout_mixing.py " + " ".join(argv or sys.argv[1:])
    result = {"command": command.strip(), "n_cells": args.cells, "seed": args.seed, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "readout_mixing.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Does the read-out step mix when the cells stand still? (issue 23)", "",
             f"`{result['command']}` ({args.cells} cells, seed {args.seed}; `CORAL.sample()` defaults: 10 chains, "
             "40 warm-up iterations, 100 draws).", "",
             "| cells | omega split-R-hat max | share of omega coordinates with R-hat > 1.1 | omega acceptance after warm-up (target 0.7) | omega step size | omega posterior sd (mean) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        label = "tied to one draw, not moved" if r["frozen_cells"] else "sampled (default)"
        lines.append(f"| {label} | {r['rhat_max_omega']:.2f} | {r['rhat_above_omega']:.3f} | "
                     f"{r['omega_accept_after_warmup']:.3f} | {r['omega_step_size']:.4f} | {r['omega_sd_mean']:.3f} |")
    (out / "readout_mixing.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
