"""CPU cost and peak memory of the default posterior against its chunk size (issue 23).

    OMP_NUM_THREADS=1 python benchmarks/chunk_size.py [--cells 5000] [--chunks 1000000,2500,1000] [--out benchmarks/results]

Now that the RNA read-out is sampled across chunks (``benchmarks/chunked_readout.py``), the
chunk size of ``CORAL.sample()`` (``max_cells_per_chunk``) changes memory and speed, not the
target. This measures, on the tissue of ``benchmarks/posterior_error_sources.py`` (seed 11,
which no scored benchmark uses), the CPU seconds and the peak resident memory of
``CORAL.sample(20, num_warmup=16)`` for each chunk size, each in a fresh process (fit
included; the peak is reset before sampling), with the 90% coverage of expected RNA on the
scored cells. It chose ``pyrospatial.engine.local.CHUNK_CELLS_CPU``. Writes
``OUT/chunk_size.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import command_line, write_results  # noqa: E402


def worker(n_cells: int, chunk: int) -> dict:
    import torch

    from posterior_error_sources import fit, rna_scores, study_tissue

    torch.set_num_threads(1)
    tissue, dataset, scored, truth = study_tissue(n_cells, 11)
    coral, _ = fit(tissue, dataset, 11)

    def peak_mb() -> float:
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) / 1024 for line in handle if line.startswith("VmHWM"))

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (Linux)
    start = time.process_time()
    coral.sample(20, seed=11, num_warmup=16, max_cells_per_chunk=chunk)
    cpu = time.process_time() - start
    scores = rna_scores(coral.site_draws("expected_rna", scored), truth)
    return {"n_cells": n_cells, "max_cells_per_chunk": chunk, "chunks": coral.posterior.diagnostics["chunks"],
            "cpu_s": cpu, "peak_rss_mb": peak_mb(), "expected_rna_cov90": scores["expected_rna_cov90"],
            "expected_rna_pit90": scores["expected_rna_pit90"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=5000)
    parser.add_argument("--chunks", default="1000000,2500,1000")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.cells, args.worker)))
        return
    rows = []
    for chunk in [int(c) for c in args.chunks.split(",")]:
        proc = subprocess.run([sys.executable, __file__, "--cells", str(args.cells), "--worker", str(chunk)],
                              check=True, capture_output=True, text=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    command = command_line("chunk_size.py", argv)
    result = {"command": command, "rows": rows}
    lines = ["# Default posterior against its chunk size (issue 23)", "",
             f"`{result['command']}` ({args.cells} simulated cells, seed 11; `CORAL.sample(20, num_warmup=16)`; "
             "each row a fresh process, the peak reset before sampling).", "",
             "| cells per chunk (at most) | chunks | CPU s | peak RSS MB | expected RNA cov90 / PIT90 |",
             "|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['max_cells_per_chunk']} | {r['chunks']} | {r['cpu_s']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['expected_rna_cov90']:.3f} / {r['expected_rna_pit90']:.3f} |")
    write_results(args.out, "chunk_size", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
