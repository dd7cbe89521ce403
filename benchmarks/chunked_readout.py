"""Does the default posterior keep its calibration when the tissue is sampled in chunks?

    OMP_NUM_THREADS=1 python benchmarks/chunked_readout.py [--cells 3000] [--seed 11] [--chunk 1000] [--out benchmarks/results]

``CORAL.sample()`` samples the cells a chunk of whole spots at a time once a tissue holds more
than ``max_cells_per_chunk`` cells (20,000 by default), so memory is bounded by the chunk.
Until now each chunk was an independent run and the global RNA read-out ``omega`` stayed at
its guide draws there (``benchmarks/results/scaling.md``: 30k cells, two chunks, expected-RNA
coverage 0.69 against 0.88 at 10k cells in one chunk). Now every chunk runs in the same Gibbs
sweep and the read-out's HMC step sums the log density and its gradient chunk by chunk
(``pyrospatial/engine/local.py``).

This benchmark runs the default sampler on the tissue of
``benchmarks/posterior_error_sources.py`` (seed 11, which no scored benchmark uses) three ways,
after one fit: in one chunk; in chunks of ``--chunk`` cells with the read-out sampled across
them (the new default); and in the same chunks with the read-out held at its guide draws (the
former behaviour, ``sample_globals=False``). It records the 90% coverage (interval and
randomised PIT) of per-cell expected RNA on the scored cells, the split-R-hat of ``omega``, the
number of chunks and the CPU seconds. Writes ``OUT/chunked_readout.{json,md}``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import command_line, write_results  # noqa: E402

from posterior_error_sources import fit, rna_scores, study_tissue  # noqa: E402

VARIANTS = {
    "one chunk": {},
    "chunks, read-out sampled across them (default)": {"chunked": True},
    "chunks, read-out held at guide draws (before)": {"chunked": True, "sample_globals": False},
}


def run(coral, label: str, chunk: int, seed: int, scored: np.ndarray, truth: np.ndarray) -> dict:
    options = dict(VARIANTS[label])
    kwargs = {"max_cells_per_chunk": chunk} if options.pop("chunked", False) else {"max_cells_per_chunk": 10**9}
    kwargs.update(options)
    coral.posterior = None
    start = time.process_time()
    coral.sample(100, seed=seed, **kwargs)
    cpu = time.process_time() - start
    d = coral.posterior.diagnostics
    omega = np.asarray(coral.posterior.samples["rna_weight"])
    return {"variant": label, "chunks": int(d["chunks"]), "cpu_s": cpu,
            "rhat_max_omega": float(d["rhat_max"].get("rna_weight", float("nan"))),
            "omega_sd_mean": float(omega.std(0).mean()),
            "omega_distinct_draws": int(np.unique(omega.reshape(omega.shape[0], -1), axis=0).shape[0]),
            **rna_scores(coral.site_draws("expected_rna", scored), truth)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--chunk", type=int, default=1000)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tissue, dataset, scored, truth = study_tissue(args.cells, args.seed)
    coral, fit_info = fit(tissue, dataset, args.seed)
    rows = [run(coral, label, args.chunk, args.seed, scored, truth) for label in VARIANTS]
    command = command_line("chunked_readout.py", argv)
    result = {"command": command, "n_cells": args.cells, "seed": args.seed, "chunk_cells": args.chunk,
              "fit": fit_info, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rows": rows}
    lines = ["# The default posterior in chunks: the read-out sampled across them (issue 23)", "",
             f"`{result['command']}` ({args.cells} cells, seed {args.seed}; chunks of about {args.chunk} cells; "
             f"`CORAL.sample(100)` defaults otherwise: 10 chains, 40 warm-up iterations; fit "
             f"{fit_info['fit_cpu_s']:.0f} CPU s, {fit_info['epochs']} epochs).", "",
             "| sampler | chunks | expected RNA cov90 | PIT90 | omega split-R-hat max | omega posterior sd (mean) | distinct omega draws | CPU s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['chunks']} | {r['expected_rna_cov90']:.3f} | {r['expected_rna_pit90']:.3f} | "
                     f"{r['rhat_max_omega']:.2f} | {r['omega_sd_mean']:.4f} | {r['omega_distinct_draws']} | {r['cpu_s']:.0f} |")
    write_results(args.out, "chunked_readout", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
