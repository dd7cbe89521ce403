"""The three costly parts of CORAL's export, timed on the same inputs for two checkouts.

``CORAL.export`` at 100k cells spent most of its time in three places (cProfile, 2026-12-07):
the edge decoder's posterior (one Newton fit per draw), the count split (Dirichlet and
multinomial draws per cell, gene and draw) and the quantiles of the cells x genes summaries.
This script times each part on inputs built the same way for every checkout:

- ``edge_decoder``: :func:`pyrospatial.methods.edge_decoder_posterior.edge_decoder_posterior` on
  a simulated tissue's cell graph (``simulate_tissue``, as ``benchmarks/scaling.py``) with the
  cells' true states as ``z``, CORAL's decoder prior (``upper(I / sqrt(K))``, sd ``1 / sqrt(K)``;
  bias 0, sd 2), 1 non-edge per edge, Newton started at the prior mean;
- ``count_split``: :func:`pyrospatial.methods.analysis.split_spot_counts` (``dispersion="cell"``,
  CORAL's default) with that tissue's spots and the cells inside them, random rates, 100
  draws, every spot-gene count positive with probability ``--density``;
- ``quantiles``: :func:`pyrospatial.engine.summary.summarise` of those rates, (100, cells inside
  spots, 200) float32 draws.

``--against REV`` also runs every part, in a separate process, from a git worktree of ``REV``
(made under a temporary folder, removed after), so the two checkouts are compared in the same
run on the same machine: ``OMP_NUM_THREADS=1 python benchmarks/export_parts.py --sizes
30000,100000 --against 1a92edb``. Results: ``OUT/export_parts.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("edge_decoder", "count_split", "quantiles")


def _use_checkout(source: Path) -> None:
    """Import ``pyrospatial`` from ``source`` instead of the installed (editable) checkout."""
    for name in ("models", "guides"):  # installed as pyrospatial.models / .guides
        link = source / "pyrospatial" / name
        if not link.exists():
            link.symlink_to(source / name)
    sys.meta_path[:] = [finder for finder in sys.meta_path if "editable" not in type(finder).__module__
                        and "editable" not in getattr(finder, "__name__", "")]
    sys.path.insert(0, str(source))


def run_worker(n_cells: int, num_samples: int, density: float, seed: int) -> list[dict]:
    import numpy as np
    import torch

    import pyrospatial
    from pyrospatial.data.dataset import SpatialDataset
    from pyrospatial.engine.summary import summarise
    from pyrospatial.methods.analysis import split_spot_counts
    from pyrospatial.methods.edge_decoder_posterior import edge_decoder_posterior

    tissue = pyrospatial.data.sim.simulate_tissue(n_cells=n_cells, n_types=5, n_proteins=30, n_genes=200,
                                                  cells_per_spot=8.0, seed=seed, edge_z_scale=1.0)
    ds = SpatialDataset.from_anndata(tissue.cells, tissue.spots, cell_type_key="cell_type", spot_diameter=55.0)
    rng = np.random.default_rng(seed)
    records = []

    def timed(part: str, call, extra) -> None:
        start, cpu = time.perf_counter(), time.process_time()
        out = call()
        records.append({"part": part, "n_cells": n_cells, "seconds": time.perf_counter() - start,
                        "cpu_seconds": time.process_time() - cpu, **extra(out)})

    z = np.asarray(tissue.truth["z"], dtype=np.float64)
    K = z.shape[1]
    rows, cols = torch.triu_indices(K, K)
    prior_loc = torch.where(rows == cols, K ** -0.5, 0.0).double()
    timed("edge_decoder", lambda: edge_decoder_posterior(
        z, ds.edges, ds.sample_nonedges, ds.n_nonedges, num_samples,
        prior_weight_loc=prior_loc, prior_weight_scale=K ** -0.5,
        prior_bias_loc=0.0, prior_bias_scale=2.0, nonedge_ratio=1.0, seed=seed),
        extra=lambda d: {"newton_iterations_max": int(d.newton_iterations), "converged": bool(d.converged),
                         "edges": int(ds.edges.shape[1]), "bias_mean": float(d.bias.mean()),
                         "bias_sd": float(d.bias.std())})
    counts = rng.poisson(20.0, (ds.n_spots, 200)) * (rng.random((ds.n_spots, 200)) < density)
    inside = ds.cell_spot[ds.cell_spot >= 0]  # the cells the split concerns (the others get NaN)
    rates = rng.gamma(2.0, 1.0, (num_samples, inside.size, 200)).astype(np.float32)
    timed("count_split", lambda: split_spot_counts(counts, inside, rates, inverse_dispersion=np.full(200, 3.0),
                                                   dispersion="cell", seed=seed),
          extra=lambda split: {"density": density, "cells_in_spots": int((ds.cell_spot >= 0).sum()),
                               "mean_count": float(np.nanmean(split.mean)),
                               "max_abs_spot_error": float(split.max_abs_spot_error)})
    timed("quantiles", lambda: summarise({"x": rates}),
          extra=lambda s: {"q95_mean": float(s["x"]["q95"].mean())})
    del rates
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for record in records:
        record["process_peak_rss_mb"] = peak
    return records


def _run(args: argparse.Namespace, n: int, source: Path | None) -> list[dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(n), "--num-samples", str(args.num_samples),
           "--density", str(args.density), "--seed", str(args.seed)] + (["--source", str(source)] if source else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({n} cells, {source or 'this checkout'}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_driver(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "pyrospatial", "models", "guides"], cwd=ROOT).returncode:
        head += "+uncommitted"  # the working tree's code is what runs
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        if args.against:
            reference = Path(tmp) / "reference"
            subprocess.run(["git", "worktree", "add", "--detach", str(reference), args.against], cwd=ROOT, check=True,
                           capture_output=True)
        try:
            for n in [int(s) for s in args.sizes.split(",")]:
                for label, source in ((head, None), (args.against, reference)):
                    if label is None:
                        continue
                    for record in _run(args, n, source):
                        records.append({"checkout": label, **record})
                        print(json.dumps(records[-1]), flush=True)
        finally:
            if reference is not None:
                subprocess.run(["git", "worktree", "remove", "--force", str(reference)], cwd=ROOT, check=False)
    payload = {"command": "OMP_NUM_THREADS=1 python benchmarks/export_parts.py " + " ".join(sys.argv[1:]),
               "settings": {"num_samples": args.num_samples, "density": args.density, "seed": args.seed,
                            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
               "records": records}
    (out / "export_parts.json").write_text(json.dumps(payload, indent=1) + "\n")
    lines = ["# The export's costly parts, two checkouts side by side", "",
             f"Command: `{payload['command']}` (one process per checkout and size, one after the other).", "",
             "| cells | part | checkout | CPU s | wall s | ratio to " + head + " (CPU) | notes |",
             "|---:|---|---|---:|---:|---:|---|"]
    for r in records:
        mine = next(x for x in records if x["checkout"] == head and x["part"] == r["part"] and x["n_cells"] == r["n_cells"])
        notes = {k: v for k, v in r.items() if k not in ("checkout", "part", "n_cells", "seconds", "cpu_seconds",
                                                           "process_peak_rss_mb")}
        lines.append(f"| {r['n_cells']} | {r['part']} | {r['checkout']} | {r['cpu_seconds']:.1f} | {r['seconds']:.1f} | "
                     f"{r['cpu_seconds'] / max(mine['cpu_seconds'], 1e-9):.2f} | "
                     + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in notes.items()) + " |")
    (out / "export_parts.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'export_parts.json'} and .md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="30000,100000", help="comma-separated cell counts")
    parser.add_argument("--against", default=None, help="git revision to compare with (run from a temporary worktree)")
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--density", type=float, default=0.9, help="fraction of positive spot-gene counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--source", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        if args.source:
            _use_checkout(Path(args.source))
        print(json.dumps(run_worker(args.worker, args.num_samples, args.density, args.seed)))
    else:
        run_driver(args)


if __name__ == "__main__":
    main()
