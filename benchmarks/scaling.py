"""Cost of every CORAL stage against tissue size: wall time, peak memory, coverage (issue 23).

    python benchmarks/scaling.py [--sizes 10000,30000,100000] [--device cpu|cuda] [--quick]
                                 [--out benchmarks/results]

Each size runs in a fresh subprocess (``--worker``), so that one size's memory does not count
against the next and the peak resident set size (RSS) is that of one run. On simulated tissues
(:func:`pyrospatial.data.sim.simulate_tissue`: about 8 cells per spot, 30 proteins, 200 genes,
5 cell types) the stages are:

``simulate``
    the simulator itself (not part of a user's run; reported for completeness);
``dataset``
    :meth:`pyrospatial.SpatialDataset.from_anndata` (graph, spot assignment, sparse counts);
``fit``
    :meth:`CORAL.train` on minibatches of ``--batch-spots`` spots (so the cost of one step does
    not grow with the tissue), stopped by the convergence rule below or at ``--max-epochs``;
``posterior``
    ``CORAL.sample(num_samples)`` with the default method of ``CORAL.sample`` *at run time*
    (the record names it), coverage of the 90% intervals of expected RNA and v;
``posterior_guide``
    the mean-field guide's draws (``method="guide"``), for contrast;
``export``
    :meth:`CORAL.export` of the default posterior and ``write_h5ad`` of both AnnData objects.

Convergence rule of ``fit`` (stated, not tuned on the scored quantities): after every epoch,
the mean loss of the last ``W = 10`` epochs is compared with that of the ``W`` epochs before;
training stops once it improved by less than ``1e-3`` of its magnitude (relative ELBO change
per window), at the earliest after ``2 W`` epochs.

Peak RSS per stage: the kernel's high-water mark ``VmHWM`` of the worker, reset before each
stage by writing ``5`` to ``/proc/self/clear_refs`` (Linux); where that is not allowed, the
process's ``ru_maxrss`` so far (then monotone across stages; the record says which). On cuda
the peak allocated GPU memory of each stage too (``torch.cuda.max_memory_allocated`` after a
reset).

Coverage (the simulator gives the truth): the fraction of the 90% central intervals of the
posterior draws that contain the truth (:func:`pyrospatial.criticism.interval_coverage_by_level`,
as in ``benchmarks/calibration.py``), and the same level scored by the randomised PIT
(``*_pit``, :func:`pyrospatial.criticism.pit_coverage_by_level`: free of the under-coverage of an
interval read off 100 draws, about 0.88 for exact draws): ``expected_rna`` over the cells inside
spots and all genes, ``v`` against the truth standardised within each cell type and the draws
sign-aligned to it (:func:`pyrospatial.criticism.standardize_within_groups`,
:func:`pyrospatial.criticism.align_sign`: v's sign, mean and sd within a type are fixed by its
prior alone).

Output: ``OUT/scaling.json`` (``records``: one per (stage, n_cells, device) with ``seconds``,
``peak_rss_mb``, ``coverage_90`` (null where not applicable) and more; ``exponents``: the
least-squares slope of log seconds against log cells per (stage, device); ``settings``) and
``OUT/scaling.md``. Records of sizes/devices not run this time are kept from an earlier
``scaling.json``, so the CPU and GPU runs (``make bench-scaling``, ``make bench-gpu``) add up.
Run with ``OMP_NUM_THREADS=1`` (the Makefile targets do).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

import numpy as np

STAGES = ("simulate", "dataset", "fit", "posterior_guide", "posterior", "export")
CPU_SIZES = (10_000, 30_000, 100_000)
GPU_SIZES = (300_000, 1_000_000)
WINDOW, REL_TOL = 10, 1e-3
#: cells (inside spots, a fixed random subset) whose expected-RNA draws are scored for coverage
COVERAGE_CELLS = 5000


# ------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------
def _vm_hwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark of this process; False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _vm_hwm_mb() is not None
    except OSError:
        return False


def _peak_rss_mb(resettable: bool) -> float:
    if resettable:
        value = _vm_hwm_mb()
        if value is not None:
            return value
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


class Stage:
    """Times one stage and measures its peak RSS (and peak GPU memory on cuda)."""

    def __init__(self, name: str, cuda: bool) -> None:
        self.name, self.cuda = name, cuda

    def __enter__(self) -> Self:
        import torch

        self.resettable = _reset_peak_rss()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start
        self.peak_rss_mb = _peak_rss_mb(self.resettable)
        self.gpu_peak_mb = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else None


# ------------------------------------------------------------------------------------------
# the worker: one size, in its own process
# ------------------------------------------------------------------------------------------
def _convergence_callback(window: int, rel_tol: float):
    import lightning as L

    class RelativeConvergence(L.Callback):
        """Stop when the mean loss of the last ``window`` epochs improved on the ``window``
        before by less than ``rel_tol`` of its magnitude (at the earliest after 2 windows)."""

        def __init__(self) -> None:
            self.epoch_means: list[float] = []
            self.start = 0
            self.converged_at: int | None = None

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.start = len(pl_module.elbo_history)

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            losses = pl_module.elbo_history[self.start:]
            if not losses:
                return
            self.epoch_means.append(float(np.mean(losses)))
            if len(self.epoch_means) >= 2 * window:
                last = float(np.mean(self.epoch_means[-window:]))
                before = float(np.mean(self.epoch_means[-2 * window:-window]))
                if (before - last) < rel_tol * abs(last):
                    self.converged_at = len(self.epoch_means)
                    trainer.should_stop = True

    return RelativeConvergence()


def _coverage(draws: np.ndarray, truth: np.ndarray, *, pit: bool = False) -> float:
    from pyrospatial import criticism as dg

    score = dg.pit_coverage_by_level if pit else dg.interval_coverage_by_level
    return float(score(draws, truth, (0.9,))[0])


def _posterior_coverage(coral, tissue) -> dict[str, float]:
    from pyrospatial import criticism as dg

    inside = np.flatnonzero(coral.dataset.cell_spot >= 0)
    # a fixed random subset of the cells inside spots: the draws of all cells' expected RNA
    # are not held on large tissues (CORAL.sample's max_draws_mb), they are recomputed
    scored = np.sort(np.random.default_rng(0).choice(inside, size=min(inside.size, COVERAGE_CELLS), replace=False))
    samples = coral.posterior.samples
    # v's mean and sd within a type are fixed by its prior alone: scored against the standardised truth
    v_true = dg.standardize_within_groups(tissue.truth["v"].reshape(coral.dataset.n_cells, -1), coral.dataset.cell_type)
    v = dg.align_sign(samples["v"], v_true, coral.dataset.cell_type)
    rna, rna_true = coral.site_draws("expected_rna", scored), tissue.truth["expected_rna"][scored]
    return {"expected_rna": _coverage(rna, rna_true), "expected_rna_pit": _coverage(rna, rna_true, pit=True),
            "v": _coverage(v, v_true), "v_pit": _coverage(v, v_true, pit=True)}


def _draws_mb(coral) -> float:
    return float(sum(np.asarray(a).nbytes for a in coral.posterior.samples.values()) / 2**20
                 + coral.posterior.edge_prob.nbytes / 2**20)


def run_worker(args: argparse.Namespace) -> None:
    """One size: every stage, one JSON line per stage appended to ``args.record`` as it ends."""
    import torch

    import pyrospatial
    from pyrospatial.data.dataset import SpatialDataset
    from pyrospatial.methods.coral import CORAL

    n_cells, device, cuda = int(args.worker), args.device, args.device == "cuda"
    common = {"n_cells": n_cells, "device": device, "torch_threads": torch.get_num_threads()}

    def emit(stage: Stage, **extra) -> None:
        record = {"stage": stage.name, **common, "seconds": stage.seconds, "cpu_seconds": stage.cpu_seconds,
                  "peak_rss_mb": stage.peak_rss_mb,
                  "rss_measure": "VmHWM reset per stage" if stage.resettable else "ru_maxrss (process so far)",
                  "gpu_peak_mb": stage.gpu_peak_mb, "coverage_90": None, **extra}
        with open(args.record, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)

    with Stage("simulate", cuda) as st:
        tissue = pyrospatial.data.sim.simulate_tissue(
            n_cells=n_cells, n_types=5, n_proteins=30, n_genes=200, cells_per_spot=8.0,
            seed=args.seed, edge_z_scale=1.0)
    emit(st)
    with Stage("dataset", cuda) as st:
        dataset = SpatialDataset.from_anndata(tissue.cells, tissue.spots, cell_type_key="cell_type", spot_diameter=55.0)
    emit(st, n_spots=int(dataset.n_spots), n_edges=int(dataset.n_edges),
         cells_per_spot=float((dataset.cell_spot >= 0).sum() / max(dataset.n_spots, 1)))

    coral = CORAL(tissue.cells, tissue.spots, dataset=dataset, seed=args.seed)
    stop = _convergence_callback(WINDOW, REL_TOL)
    with Stage("fit", cuda) as st:
        result = coral.train(max_epochs=args.max_epochs, batch_size=args.batch_spots, device=device,
                             seed=args.seed, progress=False, callbacks=[stop])
        if cuda:  # Lightning's teardown moves the trained module back to the CPU: sample where it trained
            coral.model.to("cuda")
            coral.guide.to("cuda")
    emit(st, epochs=int(result.settings["epochs"]), steps=int(result.settings["steps"]),
         converged=stop.converged_at is not None, batch_spots=args.batch_spots,
         criterion=f"relative change of the {WINDOW}-epoch mean loss < {REL_TOL} (max_epochs {args.max_epochs})")

    with Stage("posterior_guide", cuda) as st:
        coral.sample(args.num_samples, method="guide", seed=args.seed)
    emit(st, coverage_90=_posterior_coverage(coral, tissue), method="guide", num_samples=args.num_samples,
         draws_mb=_draws_mb(coral), replayed=list(coral.posterior.replayed))

    if "posterior" in args.skip_stages:  # the export below then exports the guide's draws
        with open(args.record, "a") as handle:
            handle.write(json.dumps({"stage": "posterior", **common, "seconds": None, "cpu_seconds": None,
                                     "peak_rss_mb": None, "gpu_peak_mb": None, "coverage_90": None,
                                     "skipped": "--skip-stages posterior (export uses the guide's draws)"}) + "\n")
    else:
        coral.posterior = None
        with Stage("posterior", cuda) as st:
            # the default method, whatever it is now; --short-posterior: 2 warm-up iterations and
            # every state kept, which gives draws of the same shapes (so the export's memory)
            short = {"num_warmup": 2, "thin": 1} if args.short_posterior else {}
            coral.sample(args.num_samples, seed=args.seed, **short, **json.loads(args.sampler_options))
        diagnostics = {k: v for k, v in coral.posterior.diagnostics.items()
                       if isinstance(v, (int, float, str, bool)) or v is None}
        emit(st, coverage_90=_posterior_coverage(coral, tissue), method=coral.posterior.method,
             short_posterior=bool(args.short_posterior), sampler_options=json.loads(args.sampler_options),
             num_samples=args.num_samples, draws_mb=_draws_mb(coral), diagnostics=diagnostics,
             replayed=list(coral.posterior.replayed))

    with tempfile.TemporaryDirectory() as tmp, Stage("export", cuda) as st:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the interactions' narrow-interval warning
            cells_rna, spots_out = coral.export(seed=args.seed)
        cells_rna.write_h5ad(Path(tmp) / "cells.h5ad")
        if spots_out is not None:
            spots_out.write_h5ad(Path(tmp) / "spots.h5ad")
        h5ad_mb = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 2**20
    emit(st, h5ad_mb=h5ad_mb)


# ------------------------------------------------------------------------------------------
# the driver: sizes in subprocesses, exponents, json + markdown
# ------------------------------------------------------------------------------------------
def _slope(rows: list[tuple[int, float]]) -> float | None:
    rows = [(n, s) for n, s in rows if s is not None and s > 0]
    if len({n for n, _ in rows}) < 2:
        return None
    return float(np.polyfit(np.log([n for n, _ in rows]), np.log([s for _, s in rows]), 1)[0])


def fitted_exponents(records: list[dict]) -> dict[str, dict]:
    """Least-squares slope of log(seconds) against log(n_cells) per (stage, device), of the wall
    time (``exponent``) and of the process's CPU time (``exponent_cpu``: less sensitive to other
    load on a shared machine), with the sizes used (at least two)."""
    out: dict[str, dict] = {}
    for stage in STAGES:
        for device in sorted({r["device"] for r in records}):
            rows = sorted((r["n_cells"], r["seconds"], r.get("cpu_seconds")) for r in records
                          if r["stage"] == stage and r["device"] == device and r["seconds"] is not None)
            wall = _slope([(n, s) for n, s, _ in rows])
            if wall is None:
                continue
            out[f"{stage}/{device}"] = {"stage": stage, "device": device, "exponent": wall,
                                        "exponent_cpu": _slope([(n, c) for n, _, c in rows]),
                                        "sizes": [int(n) for n, _, _ in rows]}
    return out


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v:.3f}" for k, v in value.items())
    return f"{value:.{digits}f}"


def write_markdown(path: Path, payload: dict) -> None:
    lines = ["# Scaling of CORAL's stages (issue 23)", "",
             ("`python benchmarks/scaling.py` (`make bench-scaling`, CPU; `make bench-gpu`, cuda). Simulated tissues, "
              "about 8 cells per spot, 30 proteins, 200 genes; each size in a fresh process; "
              f"fit stopped by: {payload['settings']['convergence']}."), "",
             "| stage | device | cells | wall s | CPU s | peak RSS (MB) | GPU peak (MB) | 90% coverage | notes |",
             "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in sorted(payload["records"], key=lambda r: (r["device"], r["n_cells"], STAGES.index(r["stage"]))):
        notes = []
        for key in ("method", "epochs", "converged", "num_samples", "draws_mb", "h5ad_mb", "torch_threads", "skipped"):
            if r.get(key) is not None:
                notes.append(f"{key} {r[key]:.0f}" if isinstance(r[key], float) else f"{key} {r[key]}")
        if r.get("sampler_options"):
            notes.append(f"options {json.dumps(r['sampler_options'])}")
        lines.append(f"| {r['stage']} | {r['device']} | {r['n_cells']} | {_fmt(r['seconds'])} | {_fmt(r.get('cpu_seconds'))} | {_fmt(r['peak_rss_mb'], 0)} | "
                     f"{_fmt(r.get('gpu_peak_mb'), 0)} | {_fmt(r.get('coverage_90'))} | {'; '.join(notes)} |")
    lines += ["", "Fitted exponent of seconds against cells (log-log least squares):", "",
              "| stage | device | exponent (wall) | exponent (CPU) | sizes |", "|---|---|---:|---:|---|"]
    for e in payload["exponents"].values():
        lines.append(f"| {e['stage']} | {e['device']} | {e['exponent']:.2f} | {_fmt(e.get('exponent_cpu'), 2)} | "
                     f"{', '.join(map(str, e['sizes']))} |")
    if payload.get("failures"):
        lines += ["", "Sizes that did not finish:", ""]
        lines += [f"- {f['n_cells']} cells on {f['device']}: {f['reason']}" for f in payload["failures"]]
    lines += ["", f"Machine: {payload['settings']['machine']}.", ""]
    path.write_text("\n".join(lines))


def run_driver(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(CPU_SIZES if args.device == "cpu" else GPU_SIZES)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               MKL_NUM_THREADS=os.environ.get("MKL_NUM_THREADS", "1"))
    new: list[dict] = []
    failures: list[dict] = []
    for n in sizes:
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as handle:
            record_path = handle.name
        cmd = ([sys.executable, str(Path(__file__).resolve()), "--worker", str(n), "--device", args.device,
               "--record", record_path, "--max-epochs", str(args.max_epochs), "--num-samples", str(args.num_samples),
               "--batch-spots", str(args.batch_spots), "--seed", str(args.seed),
               "--skip-stages", ",".join(args.skip_stages), "--sampler-options", args.sampler_options]
               + (["--short-posterior"] if args.short_posterior else []))
        print(f"[scaling] {n} cells on {args.device}", flush=True)
        try:
            proc = subprocess.run(cmd, check=False, env=env, timeout=args.timeout or None)
            reason = None if proc.returncode == 0 else f"worker exited with status {proc.returncode}"
        except subprocess.TimeoutExpired:
            reason = f"worker stopped after the --timeout of {args.timeout} s"
        rows = [json.loads(line) for line in Path(record_path).read_text().splitlines() if line.strip()]
        os.unlink(record_path)
        new.extend(rows)
        if reason:
            done = [r["stage"] for r in rows]
            failures.append({"n_cells": n, "device": args.device, "reason": f"{reason} (stages done: {', '.join(done)})"})
    json_path = out / "scaling.json"
    kept: list[dict] = []
    old_failures: list[dict] = []
    if json_path.exists():
        old = json.loads(json_path.read_text())
        ran = {(n, args.device) for n in sizes}
        kept = [r for r in old.get("records", []) if (r["n_cells"], r["device"]) not in ran]
        old_failures = [f for f in old.get("failures", []) if (f["n_cells"], f["device"]) not in ran]
    records = kept + new
    payload = {
        "records": records,
        "exponents": fitted_exponents(records),
        "failures": old_failures + failures,
        "settings": {
            "convergence": f"relative change of the {WINDOW}-epoch mean loss below {REL_TOL}, at most {args.max_epochs} epochs",
            "batch_spots": args.batch_spots, "num_samples": args.num_samples, "seed": args.seed, "quick": args.quick,
            "short_posterior": bool(args.short_posterior),
            "sampler_options": json.loads(args.sampler_options),
            "simulator": "simulate_tissue(n_types=5, n_proteins=30, n_genes=200, cells_per_spot=8, edge_z_scale=1)",
            "omp_num_threads": env["OMP_NUM_THREADS"],
            "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
        },
    }
    json_path.write_text(json.dumps(payload, indent=1))
    write_markdown(out / "scaling.md", payload)
    print(f"[scaling] wrote {json_path} and {out / 'scaling.md'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=None, help="comma-separated cell counts (default: 10k,30k,100k on cpu; 300k,1M on cuda)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="fewer epochs and draws: 10k cells, 60 epochs, 20 draws")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--max-epochs", type=int, default=None, help="cap of the fit (default 200; 60 with --quick)")
    parser.add_argument("--num-samples", type=int, default=None, help="posterior draws (default 100; 20 with --quick)")
    parser.add_argument("--batch-spots", type=int, default=128, help="spots per minibatch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=0, help="seconds per size before its worker is stopped (0: none)")
    parser.add_argument("--skip-stages", default="", help="comma-separated stages not run (only 'posterior': the "
                        "default posterior; the export then uses the guide's draws), recorded as skipped")
    parser.add_argument("--short-posterior", action="store_true",
                        help="the default posterior with 2 warm-up iterations and thin 1: draws of the default's "
                             "shapes in a fraction of its time, to measure the export's memory; the posterior's "
                             "seconds and coverage are then not the default's (records say short_posterior); "
                             "write them to their own --out")
    parser.add_argument("--sampler-options", default="{}",
                        help="JSON of extra CORAL.sample options for the posterior stage, e.g. "
                             "'{\"block_steps\": true, \"step_window\": 10}' (default: none, the default posterior)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--record", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.skip_stages = [stage for stage in args.skip_stages.split(",") if stage]
    if set(args.skip_stages) - {"posterior"}:
        parser.error(f"--skip-stages accepts only 'posterior', got {args.skip_stages}")
    if args.max_epochs is None:
        args.max_epochs = 60 if args.quick else 200
    if args.num_samples is None:
        args.num_samples = 20 if args.quick else 100
    if args.quick and args.sizes is None:
        args.sizes = "10000"
    if args.worker is not None:
        run_worker(args)
    else:
        run_driver(args)


if __name__ == "__main__":
    main()
