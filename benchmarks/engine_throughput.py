"""SVI engine throughput and peak memory against batch size and number of cells, side by side
with the plain Pyro training loop a user would otherwise write.

    python benchmarks/engine_throughput.py [--quick] --out DIR [--device auto|cpu|cuda]

For each tissue size (simulated with :func:`pyrospatial.data.sim.simulate_tissue`) and each batch
size (a fraction of the spots; ``1`` = full batch), a toy model with an ``AutoNormal`` guide is
trained for a fixed number of steps by each *method* (``method`` in every JSON record):

``pyrospatial.fit``
    :func:`pyrospatial.engine.infer.fit` (PyTorch Lightning ``Trainer``; Adam, lr 0.01, element-wise
    gradient clip 10, its defaults).
``plain_pyro_loop``
    The peer: a plain Python loop, no Lightning. ``pyro.infer.SVI`` cannot be used with Pyro's
    ``module_local_params`` (the parameters are not in the global param store), so the loop is
    what a user writes instead: ``Trace_ELBO().differentiable_loss(model, guide, batch)``,
    ``loss.backward()``, ``torch.nn.utils.clip_grad_value_(params, 10)`` (the same clip as
    ``fit``'s default, so both optimise the same objective the same way), ``torch.optim.Adam``
    (lr 0.01) and ``loss.item()`` per step, over the *same* ``dataset.dataloader(batch_size)``
    batches (``sampler.set_epoch(epoch)`` before every epoch, as ``fit`` does). The guide's
    lazily created parameters are made by one ``guide(batch)`` call on the first batch
    before the optimiser is built (``fit`` does the same in ``initialise``). What ``fit`` does
    on top: Lightning's loop and hooks, ``self.log`` of the step and epoch loss, the per-step
    reseeding of torch's RNG, the (here constant) lr scheduler, NaN checks.
``plain_pyro_loop_prebuilt``
    The same loop over the batches of the first epoch built once before training (cycled),
    so that its difference to ``plain_pyro_loop`` is the cost of building batches
    (``SpatialDataset.make_batch``: slicing, the membership matrix, the cell graph and
    non-edge sampling) and its difference to ``pyrospatial.fit`` is everything else.

The toy model:

    log s_i ~ Normal(0, 0.5)                                     per cell (local latent)
    y_ip ~ Gamma(mean = s_i exp(a_p), concentration 5)           per cell proteins
    X_jg ~ NB(mean = (sum_{i in U(j)} s_i) exp(b_g), theta_g)    per spot genes (sparse matmul)
    a_p, b_g, log theta_g ~ Normal(0, 1)                          global

Every (configuration, method) runs in its own subprocess so that the peak resident memory
(``ru_maxrss``) belongs to it alone; on a GPU ``torch.cuda.max_memory_allocated`` is reported
too. The methods of one configuration run back to back, so that they see the same load on a
shared machine. Steps/s is the median over the timed steps (after warm-up steps) of the time
between the ends of consecutive optimiser steps (for ``fit`` a Lightning callback at
``on_train_batch_end``; for the loops a timestamp after ``optimizer.step()`` and
``loss.item()``); it includes fetching/building the next batch.

Ratios (all within one run, so that they are comparable on a noisy machine):

* ``steps_per_s_ratio``, ``epoch_time_ratio``, ``peak_rss_ratio``, ``peak_cuda_ratio``: relative
  to the ``pyrospatial.fit`` full-batch run of the same tissue (``epoch_time_ratio`` compares
  the time of one pass over the data: ``n_batches`` minibatch steps vs one full-batch step).
* ``steps_per_s_vs_fit``, ``peak_rss_vs_fit``, ``rss_growth_vs_fit``: this method divided by
  ``pyrospatial.fit`` at the same configuration (1 for ``fit`` itself), and
  ``fit_extra_ms_per_step``: ``fit``'s seconds per step minus this method's, in ms.
* ``comparisons`` (one entry per configuration): ``fit_over_plain_steps_per_s`` (fit steps/s
  divided by plain-loop steps/s; < 1 means the engine is slower), ``fit_over_prebuilt_steps_per_s``,
  ``plain_over_prebuilt_steps_per_s`` and the per-step times and memory of each method.

The full grid (3 tissues x 4 batch sizes x 3 methods, 150 timed steps each; 36 subprocesses of
which ~7 s each is start-up: imports and simulation) took 391 s on 2 shared cores with one thread;
``--quick`` about 3 minutes. The takeaway paragraph of the committed
``engine_throughput.md`` is written by hand after looking at that run's numbers and added with
``--render --takeaway "..."`` (which re-writes the markdown from the JSON without re-running).

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

FIT = "pyrospatial.fit"
PLAIN = "plain_pyro_loop"
PREBUILT = "plain_pyro_loop_prebuilt"
METHODS = [FIT, PLAIN, PREBUILT]

QUICK = {"n_cells": [1000, 4000], "fractions": [1.0, 0.5, 0.25, 0.125], "steps": 30, "warmup": 5,
         "methods": METHODS}
FULL = {"n_cells": [2000, 8000, 32000], "fractions": [1.0, 0.25, 1 / 16, 1 / 64], "steps": 150, "warmup": 15,
        "methods": METHODS}

LR = 0.01
CLIP = 10.0  # fit's default gradient_clip_val (element-wise)


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


def _plain_loop(model, guide, ds, batch_size: int, steps: int, device, *, prebuilt: bool, sync) -> dict:
    """The peer: a plain Pyro/torch training loop over ``ds.dataloader(batch_size)`` batches."""
    import itertools

    import torch
    from pyro.infer import Trace_ELBO

    loader = ds.dataloader(batch_size, seed=0, shuffle=True)
    start = time.perf_counter()
    # lazily created guide parameters (AutoNormal) must exist before the optimiser is built
    first = next(iter(loader)).to(device)
    with torch.no_grad():
        guide(first)
    del first
    model.to(device)
    guide.to(device)
    params = [p for m in (model, guide) if isinstance(m, torch.nn.Module) for p in m.parameters()]
    optimizer = torch.optim.Adam(params, lr=LR)
    elbo = Trace_ELBO()

    def epochs():
        epoch = 0
        while True:
            loader.sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    if prebuilt:
        built = [b.to(device) for b in loader]  # epoch 0's partition, built once
        batches = itertools.cycle(built)
    else:
        batches = epochs()
    times: list[float] = []
    losses: list[float] = []
    for _, batch in zip(range(steps), batches):
        batch = batch.to(device)
        optimizer.zero_grad()
        loss = elbo.differentiable_loss(model, guide, batch)
        loss.backward()
        torch.nn.utils.clip_grad_value_(params, CLIP)
        optimizer.step()
        losses.append(loss.item())
        sync()
        times.append(time.perf_counter())
    return {"times": times, "losses": losses, "seconds": time.perf_counter() - start, "device": str(device)}


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

    from pyrospatial.engine.batch import batch_plates, cell_plate, spot_plate
    from pyrospatial.data.dataset import SpatialDataset
    from pyrospatial.engine.infer import fit
    from pyrospatial.data.sim import simulate_tissue

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

    on_cuda = config["device"] == "cuda" or (config["device"] == "auto" and torch.cuda.is_available())

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize()

    class StepTimer(L.Callback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync()
            self.times.append(time.perf_counter())

    method = config.get("method", FIT)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
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
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    steps = config["steps"] + config["warmup"]
    if method == FIT:
        timer = StepTimer()
        result = fit(model, guide, ds, max_steps=steps, batch_size=batch_size, lr=LR, seed=0,
                     gradient_clip_val=CLIP, device=config["device"], progress=False, callbacks=[timer])
        times, losses = timer.times, list(result.elbo_history)
        seconds, device = result.fit_seconds, result.settings["device"]
    else:
        out = _plain_loop(model, guide, ds, batch_size, steps, torch.device("cuda" if on_cuda else "cpu"),
                          prebuilt=method == PREBUILT, sync=sync)
        times, losses, seconds, device = out["times"], out["losses"], out["seconds"], out["device"]
    if len(times) != steps:
        raise RuntimeError(f"{method}: {len(times)} steps timed, expected {steps}")
    deltas = np.diff(np.asarray(times))[config["warmup"] - 1:]
    s_per_step = float(np.median(deltas))
    peak = _peak_rss_mb()
    return {
        "method": method,
        "n_cells": ds.n_cells,
        "n_spots": ds.n_spots,
        "n_genes": ds.n_genes,
        "fraction": config["fraction"],
        "batch_size_spots": batch_size,
        "n_batches": n_batches,
        "cells_per_batch": cells_per_batch,
        "timed_steps": int(deltas.size),
        "s_per_step": s_per_step,
        "s_per_step_p10": float(np.percentile(deltas, 10)),
        "s_per_step_p90": float(np.percentile(deltas, 90)),
        "steps_per_s": 1.0 / s_per_step,
        "epoch_s": s_per_step * n_batches,
        "fit_seconds_total": seconds,
        "final_loss": float(losses[-1]),
        "mean_loss_last_10": float(np.mean(losses[-10:])),
        "rss_before_fit_mb": rss_before,
        "peak_rss_mb": peak,
        "rss_growth_mb": max(0.0, peak - rss_before),
        "peak_cuda_mb": float(torch.cuda.max_memory_allocated() / 2**20) if on_cuda else None,
        "device": device,
    }


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - non-Linux
        pass
    return platform.processor() or "unknown CPU"


def _ratio(a, b):
    return a / b if a is not None and b else None


def _add_ratios(results: list[dict]) -> list[dict]:
    """Ratios vs the fit full-batch run of the tissue and vs fit at the same configuration."""
    def find(method, n_cells, fraction):
        return next((f for f in results if f["method"] == method and f["n_cells"] == n_cells
                     and f["fraction"] == fraction), None)

    for r in results:
        full = find(FIT, r["n_cells"], 1.0) or find(r["method"], r["n_cells"], 1.0)
        r["steps_per_s_ratio"] = r["steps_per_s"] / full["steps_per_s"]
        r["epoch_time_ratio"] = r["epoch_s"] / full["epoch_s"]
        r["peak_rss_ratio"] = r["peak_rss_mb"] / full["peak_rss_mb"]
        r["peak_cuda_ratio"] = _ratio(r["peak_cuda_mb"], full["peak_cuda_mb"])
        same = find(FIT, r["n_cells"], r["fraction"])
        if same is None:
            r["steps_per_s_vs_fit"] = r["peak_rss_vs_fit"] = r["rss_growth_vs_fit"] = None
            r["fit_extra_ms_per_step"] = None
            continue
        r["steps_per_s_vs_fit"] = r["steps_per_s"] / same["steps_per_s"]
        r["peak_rss_vs_fit"] = r["peak_rss_mb"] / same["peak_rss_mb"]
        r["rss_growth_vs_fit"] = _ratio(r["rss_growth_mb"], same["rss_growth_mb"])
        r["fit_extra_ms_per_step"] = 1e3 * (same["s_per_step"] - r["s_per_step"])

    comparisons = []
    seen = []
    for r in results:
        key = (r["n_cells"], r["fraction"])
        if key in seen:
            continue
        seen.append(key)
        by = {m: find(m, *key) for m in METHODS}
        f, p, b = by[FIT], by[PLAIN], by[PREBUILT]
        entry = {"n_cells": r["n_cells"], "n_spots": r["n_spots"], "fraction": r["fraction"],
                 "batch_size_spots": r["batch_size_spots"], "cells_per_batch": r["cells_per_batch"]}
        for m, rec in by.items():
            entry[f"ms_per_step[{m}]"] = None if rec is None else 1e3 * rec["s_per_step"]
            entry[f"peak_rss_mb[{m}]"] = None if rec is None else rec["peak_rss_mb"]
            entry[f"rss_growth_mb[{m}]"] = None if rec is None else rec["rss_growth_mb"]
        entry["fit_over_plain_steps_per_s"] = _ratio(f and f["steps_per_s"], p and p["steps_per_s"])
        entry["fit_over_prebuilt_steps_per_s"] = _ratio(f and f["steps_per_s"], b and b["steps_per_s"])
        entry["plain_over_prebuilt_steps_per_s"] = _ratio(p and p["steps_per_s"], b and b["steps_per_s"])
        entry["fit_extra_ms_per_step_vs_plain"] = (
            1e3 * (f["s_per_step"] - p["s_per_step"]) if f and p else None)
        entry["batch_build_ms_per_step"] = 1e3 * (p["s_per_step"] - b["s_per_step"]) if p and b else None
        entry["fit_over_plain_peak_rss"] = _ratio(f and f["peak_rss_mb"], p and p["peak_rss_mb"])
        comparisons.append(entry)
    return comparisons


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def _markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# Engine throughput: pyrospatial.fit vs a plain Pyro loop (SVI steps/s and peak memory vs batch size)",
        "",
        f"Mode: {'quick' if report['quick'] else 'full'}; device: {env['device']}; threads: {env['threads']} "
        f"(torch and OMP/MKL); machine: {env['cpu_model']}, {env['cpu_count']} cores, shared with other "
        f"work during the run (1-min load average {env['loadavg_start'][0]:.2f} at the start, "
        f"{env['loadavg_end'][0]:.2f} at the end); torch {env['torch']}, pyro {env['pyro']}, "
        f"lightning {env['lightning']}; {env['machine']}. Wall time of the run: {report['wall_seconds']:.0f} s.",
        "Model: toy NB spot model with a per-cell latent size and Gamma proteins; AutoNormal guide; "
        f"{report['plan']['steps']} timed steps after {report['plan']['warmup']} warm-up steps per run.",
        "Methods: `pyrospatial.fit` (Lightning engine); `plain_pyro_loop`: `Trace_ELBO().differentiable_loss` + "
        "`torch.optim.Adam` + the same element-wise gradient clip, in a Python loop over the same "
        "`dataset.dataloader(batch_size)` batches; `plain_pyro_loop_prebuilt`: the same loop over batches built "
        "once before training. Absolute times are noisy (shared cores); compare the ratios, which come from "
        "back-to-back runs in this one run.",
    ]
    if report.get("takeaway"):
        lines += ["", "**Takeaway.** " + report["takeaway"]]
    lines += [
        "",
        "## Side by side (same tissue, batch size and steps)",
        "",
        "fit/plain: steps/s of `pyrospatial.fit` divided by the plain loop's (< 1: the engine is slower); "
        "extra ms/step: fit's time per step minus the plain loop's; batch build ms/step: plain loop minus "
        "the pre-built loop.",
        "",
        "| cells | spots | batch (spots) | cells/batch | fit ms/step | plain ms/step | pre-built ms/step | "
        "fit/plain steps/s | fit/pre-built steps/s | fit extra ms/step | batch build ms/step | "
        "peak RSS MB fit / plain / pre-built | RSS growth MB fit / plain / pre-built |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in report["comparisons"]:
        ms = [c[f"ms_per_step[{m}]"] for m in METHODS]
        rss = " / ".join(_fmt(c[f"peak_rss_mb[{m}]"], ".0f") for m in METHODS)
        growth = " / ".join(_fmt(c[f"rss_growth_mb[{m}]"], ".0f") for m in METHODS)
        lines.append(
            f"| {c['n_cells']} | {c['n_spots']} | {c['batch_size_spots']} | {c['cells_per_batch']:.0f} | "
            f"{_fmt(ms[0], '.2f')} | {_fmt(ms[1], '.2f')} | {_fmt(ms[2], '.2f')} | "
            f"{_fmt(c['fit_over_plain_steps_per_s'], '.2f')} | {_fmt(c['fit_over_prebuilt_steps_per_s'], '.2f')} | "
            f"{_fmt(c['fit_extra_ms_per_step_vs_plain'], '.2f')} | {_fmt(c['batch_build_ms_per_step'], '.2f')} | "
            f"{rss} | {growth} |"
        )
    lines += [
        "",
        "## All runs",
        "",
        "Ratios (steps/s, epoch time, RSS) are relative to the `pyrospatial.fit` full-batch run of the same "
        "tissue (`epoch` = one pass over all spots); `vs fit` columns divide by `pyrospatial.fit` at the same "
        "configuration.",
        "",
        "| method | cells | spots | batch (spots) | batches/epoch | cells/batch | steps/s | steps/s ratio | "
        "steps/s vs fit | epoch s | epoch time ratio | peak RSS MB | RSS ratio | training RSS growth MB | "
        "peak CUDA MB |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        cuda = "" if r["peak_cuda_mb"] is None else f"{r['peak_cuda_mb']:.1f}"
        lines.append(
            f"| {r['method']} | {r['n_cells']} | {r['n_spots']} | {r['batch_size_spots']} | {r['n_batches']} | "
            f"{r['cells_per_batch']:.0f} | {r['steps_per_s']:.1f} | {r['steps_per_s_ratio']:.2f} | "
            f"{_fmt(r['steps_per_s_vs_fit'], '.2f')} | "
            f"{r['epoch_s']:.3f} | {r['epoch_time_ratio']:.2f} | {r['peak_rss_mb']:.0f} | "
            f"{r['peak_rss_ratio']:.2f} | {r['rss_growth_mb']:.0f} | {cuda} |"
        )
    lines += ["", "Timing: median seconds between the ends of consecutive optimiser steps after warm-up "
              "(includes fetching/building the next batch); peak RSS: ru_maxrss of a fresh process per "
              "configuration and method (includes Python/torch/Lightning, ~0.5 GB: the plain loops import "
              "pyrospatial, hence Lightning, too); training RSS growth: peak minus the resident size just "
              "before training (for the pre-built loop it includes the pre-built batches)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few steps (~3 min)")
    parser.add_argument("--out", required=False, default="benchmarks/results", help="output directory")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--takeaway", default=None,
                        help="a sentence or two written into the markdown (the conclusion of this run)")
    parser.add_argument("--render", action="store_true",
                        help="do not run: re-write DIR/engine_throughput.md (and the takeaway in the JSON) "
                             "from DIR/engine_throughput.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return 0
    if args.render:
        path = Path(args.out) / "engine_throughput.json"
        report = json.loads(path.read_text())
        if args.takeaway is not None:
            report["takeaway"] = args.takeaway
            path.write_text(json.dumps(report, indent=2))
        (Path(args.out) / "engine_throughput.md").write_text(_markdown(report))
        print(f"re-wrote {Path(args.out) / 'engine_throughput.md'}")
        return 0

    import lightning
    import pyro
    import torch

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {METHODS}")
    plan = dict(QUICK if args.quick else FULL, methods=methods)
    results = []
    loadavg_start = list(os.getloadavg())
    start = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    for n_cells in plan["n_cells"]:
        for fraction in plan["fractions"]:
            for method in methods:
                config = {"n_cells": n_cells, "fraction": fraction, "steps": plan["steps"], "method": method,
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
                print(f"{method:>25} cells={record['n_cells']:>6} batch={record['batch_size_spots']:>5} spots "
                      f"steps/s={record['steps_per_s']:8.1f} epoch={record['epoch_s']:.3f}s "
                      f"peakRSS={record['peak_rss_mb']:.0f}MB  [{time.perf_counter() - start:.0f}s]", flush=True)
    comparisons = _add_ratios(results)
    report = {
        "benchmark": "engine_throughput",
        "quick": bool(args.quick),
        "plan": plan,
        "environment": {
            "device": results[0]["device"] if results else args.device,
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "cpu_model": _cpu_model(),
            "loadavg_start": loadavg_start,
            "loadavg_end": list(os.getloadavg()),
            "machine": f"{platform.system()} {platform.machine()} Python {platform.python_version()}",
            "torch": torch.__version__,
            "pyro": pyro.__version__,
            "lightning": lightning.__version__,
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "wall_seconds": time.perf_counter() - start,
        "takeaway": args.takeaway,
        "comparisons": comparisons,
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
