"""SVI engine throughput and peak memory against batch size and number of cells.

    python benchmarks/engine_throughput.py [--quick] --out DIR [--device auto|cpu|cuda]

For each tissue size (simulated with :func:`pyrospatial.sim.simulate_tissue`) and each batch
size (a fraction of the spots; ``1`` = full batch), a toy model is trained with
:func:`pyrospatial.infer.fit` and an ``AutoNormal`` guide for a fixed number of steps:

    log s_i ~ Normal(0, 0.5)                                     per cell (local latent)
    y_ip ~ Gamma(mean = s_i exp(a_p), concentration 5)           per cell proteins
    X_jg ~ NB(mean = (sum_{i in U(j)} s_i) exp(b_g), theta_g)    per spot genes (sparse matmul)
    a_p, b_g, log theta_g ~ Normal(0, 1)                          global

Every configuration runs in its own subprocess so that the peak resident memory
(``ru_maxrss``) belongs to that configuration alone; on a GPU ``torch.cuda.max_memory_allocated``
is reported too. Steps/s is the median over the timed steps (after warm-up steps), measured with
a Lightning callback between consecutive ``on_train_batch_end`` calls. Ratios are relative to the
full-batch run of the same tissue: ``epoch_time_ratio`` compares the time of one pass over the
data (``n_batches`` minibatch steps vs one full-batch step).

Writes ``DIR/engine_throughput.json`` and ``DIR/engine_throughput.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

QUICK = {"n_cells": [1000, 4000], "fractions": [1.0, 0.5, 0.25, 0.125], "steps": 30, "warmup": 5}
FULL = {"n_cells": [2000, 8000, 32000], "fractions": [1.0, 0.25, 1 / 16, 1 / 64], "steps": 150, "warmup": 15}


# ------------------------------------------------------------------------------------------
# worker: one configuration
# ------------------------------------------------------------------------------------------
def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # pragma: no cover - non-Linux
        return float("nan")


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def run_worker(config: dict) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import lightning as L
    import numpy as np
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer.autoguide import AutoNormal
    from pyro.nn import PyroModule, PyroSample

    from pyrospatial.batch import batch_plates, cell_plate, spot_plate
    from pyrospatial.data import SpatialDataset
    from pyrospatial.infer import fit
    from pyrospatial.sim import simulate_tissue

    class ToyNB(PyroModule):
        def __init__(self, n_features: int, n_genes: int):
            super().__init__()
            self.a = PyroSample(dist.Normal(torch.zeros(n_features), 1.0).to_event(1))
            self.b = PyroSample(dist.Normal(torch.zeros(n_genes), 1.0).to_event(1))
            self.log_theta = PyroSample(dist.Normal(torch.ones(n_genes), 1.0).to_event(1))

        def forward(self, batch):
            a, b, theta = self.a, self.b, self.log_theta.exp()
            with cell_plate(batch):
                s = pyro.sample("log_s", dist.Normal(0.0, 0.5)).exp()
                mean_y = s.unsqueeze(-1) * a.exp() * batch.cell_library.mean().clamp(min=1e-6) / a.exp().sum()
                pyro.sample("y", dist.Gamma(5.0, 5.0 / mean_y).to_event(1), obs=batch.cell_features)
            if batch.n_spots > 0:
                total = torch.sparse.mm(batch.membership, s.unsqueeze(-1)).clamp(min=1e-3)  # (m, 1)
                mean_x = total * b.exp() * 10.0
                with spot_plate(batch):
                    pyro.sample("X", dist.GammaPoisson(theta, theta / mean_x).to_event(1), obs=batch.spot_counts)

    class StepTimer(L.Callback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if torch.cuda.is_available() and pl_module.device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    torch.set_num_threads(int(config.get("threads", 1)))
    sim = simulate_tissue(config["n_cells"], 4, 10, 50, 55.0, seed=0)
    ds = SpatialDataset.from_anndata(sim.cells, sim.spots, cell_type_key="cell_type", spot_diameter=55.0)
    batch_size = max(1, int(round(config["fraction"] * ds.n_spots)))
    n_batches = len(ds.dataloader(batch_size).sampler)
    cells_per_batch = float(np.mean([b.n_cells for b in ds.dataloader(batch_size)]))
    pyro.set_rng_seed(0)
    model = ToyNB(ds.n_features, ds.n_genes)
    guide = AutoNormal(model, create_plates=batch_plates)
    rss_before = _current_rss_mb()
    on_cuda = config["device"] == "cuda" or (config["device"] == "auto" and torch.cuda.is_available())
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer()
    steps = config["steps"] + config["warmup"]
    result = fit(model, guide, ds, max_steps=steps, batch_size=batch_size, lr=0.01, seed=0,
                 device=config["device"], progress=False, callbacks=[timer])
    deltas = np.diff(np.asarray(timer.times))[config["warmup"] - 1:]
    s_per_step = float(np.median(deltas))
    return {
        "n_cells": ds.n_cells,
        "n_spots": ds.n_spots,
        "n_genes": ds.n_genes,
        "fraction": config["fraction"],
        "batch_size_spots": batch_size,
        "n_batches": n_batches,
        "cells_per_batch": cells_per_batch,
        "timed_steps": int(deltas.size),
        "s_per_step": s_per_step,
        "steps_per_s": 1.0 / s_per_step,
        "epoch_s": s_per_step * n_batches,
        "fit_seconds_total": result.fit_seconds,
        "final_loss": float(result.elbo_history[-1]),
        "rss_before_fit_mb": rss_before,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_cuda_mb": float(torch.cuda.max_memory_allocated() / 2**20) if on_cuda else None,
        "device": result.settings["device"],
    }


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------
def _markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# Engine throughput (SVI steps/s and peak memory vs batch size)",
        "",
        f"Mode: {'quick' if report['quick'] else 'full'}; device: {env['device']}; threads: {env['threads']}; "
        f"torch {env['torch']}, pyro {env['pyro']}, lightning {env['lightning']}; {env['machine']}.",
        "Model: toy NB spot model with a per-cell latent size and Gamma proteins; AutoNormal guide.",
        "Ratios are relative to the full-batch run of the same tissue (`epoch` = one pass over all spots).",
        "",
        "| cells | spots | batch (spots) | batches/epoch | cells/batch | steps/s | steps/s ratio | epoch s | epoch time ratio | peak RSS MB | RSS ratio | training RSS growth MB | peak CUDA MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        cuda = "" if r["peak_cuda_mb"] is None else f"{r['peak_cuda_mb']:.1f}"
        lines.append(
            f"| {r['n_cells']} | {r['n_spots']} | {r['batch_size_spots']} | {r['n_batches']} | "
            f"{r['cells_per_batch']:.0f} | {r['steps_per_s']:.1f} | {r['steps_per_s_ratio']:.2f} | "
            f"{r['epoch_s']:.3f} | {r['epoch_time_ratio']:.2f} | {r['peak_rss_mb']:.0f} | "
            f"{r['peak_rss_ratio']:.2f} | {max(0.0, r['peak_rss_mb'] - r['rss_before_fit_mb']):.0f} | {cuda} |"
        )
    lines += ["", "Timing: median seconds between consecutive training steps after warm-up; "
              "peak RSS: ru_maxrss of a fresh process per configuration (includes Python/torch/Lightning, "
              "~0.5 GB); training RSS growth: peak minus the resident size just before `fit`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few steps (~1 min)")
    parser.add_argument("--out", required=False, default="benchmarks/results", help="output directory")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return 0

    import lightning
    import pyro
    import torch

    plan = QUICK if args.quick else FULL
    results = []
    start = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    for n_cells in plan["n_cells"]:
        for fraction in plan["fractions"]:
            config = {"n_cells": n_cells, "fraction": fraction, "steps": plan["steps"],
                      "warmup": plan["warmup"], "device": args.device, "threads": args.threads}
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps(config)],
                capture_output=True, text=True, env=env, check=False,
            )
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.stderr.write(proc.stdout + proc.stderr)
                raise SystemExit(f"worker failed for {config}")
            record = json.loads(line[len("RESULT "):])
            results.append(record)
            print(f"cells={record['n_cells']:>6} batch={record['batch_size_spots']:>5} spots "
                  f"steps/s={record['steps_per_s']:8.1f} epoch={record['epoch_s']:.3f}s "
                  f"peakRSS={record['peak_rss_mb']:.0f}MB", flush=True)
    for r in results:
        full = next(f for f in results if f["n_cells"] == r["n_cells"] and f["fraction"] == 1.0)
        r["steps_per_s_ratio"] = r["steps_per_s"] / full["steps_per_s"]
        r["epoch_time_ratio"] = r["epoch_s"] / full["epoch_s"]
        r["peak_rss_ratio"] = r["peak_rss_mb"] / full["peak_rss_mb"]
        r["peak_cuda_ratio"] = (
            r["peak_cuda_mb"] / full["peak_cuda_mb"] if r["peak_cuda_mb"] and full["peak_cuda_mb"] else None
        )
    report = {
        "benchmark": "engine_throughput",
        "quick": bool(args.quick),
        "plan": plan,
        "environment": {
            "device": results[0]["device"] if results else args.device,
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "machine": f"{platform.system()} {platform.machine()} Python {platform.python_version()}",
            "torch": torch.__version__,
            "pyro": pyro.__version__,
            "lightning": lightning.__version__,
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "wall_seconds": time.perf_counter() - start,
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine_throughput.json").write_text(json.dumps(report, indent=2))
    (out / "engine_throughput.md").write_text(_markdown(report))
    print(f"wrote {out / 'engine_throughput.json'} and {out / 'engine_throughput.md'} "
          f"in {report['wall_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
