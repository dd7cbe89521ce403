"""Cost of the graph terms in a graph-conditioned refinement, and the edge decoder's two paths.

    python benchmarks/graph_cost.py [--cells 400,1500,3000] [--chains 20] [--out benchmarks/results]

``refine_posterior(graph=True)`` evaluates, at every leapfrog step, the Bernoulli log-likelihood
of every observed edge and of the non-adjacent pairs (all of them up to ``max_nonedges`` = 2M),
for ``C`` chains at once, with its gradient. This times that evaluation (forward + backward,
one CPU thread unless told otherwise) on random states: ``z`` ``(C, n, 8)``, one symmetric
decoder per chain, about 12 edges per cell and min(all, 2M) non-edges.

Two implementations of the same logits ``z_i^T W z_j + b`` are timed side by side:

- ``decoder``: :class:`pyrospatial.models.blocks.EdgeDecoder`, which switches to one dense
  product ``z W z^T`` and a scalar gather when the pairs outnumber ``n^2 / 8``;
- ``gather``: the per-pair formula (gather ``z_i`` and ``z_j``, then ``(z_i W) . z_j``), which the
  decoder uses for few pairs. Skipped where its pair vectors would pass ``--max-gather-gb``.

The figures per evaluation multiply by ``num_steps x (num_warmup + kept x thin)`` evaluations in
a refinement (:func:`default_evaluations`). Writes ``OUT/graph_cost.json`` and ``OUT/graph_cost.md``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import pyrospatial
from pyrospatial.models.blocks import EdgeDecoder
from pyrospatial.engine.refine import refine_posterior
from _results import command_line, write_results  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

K = 8
EDGES_PER_CELL = 12
MAX_NONEDGES = 2_000_000


def random_pairs(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """About ``EDGES_PER_CELL * n / 2`` distinct edges and min(all other pairs, 2M) non-edges (i < j)."""
    total = n * (n - 1) // 2
    n_edges = min(EDGES_PER_CELL * n // 2, total // 10)
    n_nonedges = min(total - n_edges, MAX_NONEDGES)
    keys = rng.choice(total, size=n_edges + n_nonedges, replace=False)
    # pair key -> (i, j), i < j, by the row offsets of the upper triangle
    offsets = np.cumsum(np.r_[0, np.arange(n - 1, 0, -1)])
    i = np.searchsorted(offsets, keys, side="right") - 1
    j = keys - offsets[i] + i + 1
    pairs = torch.as_tensor(np.stack([i, j]))
    return pairs[:, :n_edges], pairs[:, n_edges:]


def default_evaluations(num_samples: int = 200) -> int:
    """Leapfrog evaluations of a default ``refine_posterior`` run drawing ``num_samples``:
    ``num_steps x (num_warmup + ceil(num_samples / num_chains) x thin)``."""
    defaults = {k: v.default for k, v in inspect.signature(refine_posterior).parameters.items()}
    kept = math.ceil(num_samples / defaults["num_chains"])
    return defaults["num_steps"] * (defaults["num_warmup"] + kept * defaults["thin"])


def gather_logits(z: torch.Tensor, pairs: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    zi, zj = z.index_select(-2, pairs[0]), z.index_select(-2, pairs[1])
    return ((zi @ W) * zj).sum(-1) + b


def time_evaluation(logits_fn, z, W, b, edges, nonedges, repeats: int) -> float:
    """Median seconds of one forward + backward of the edge and non-edge log-likelihood."""
    times = []
    for _ in range(repeats):
        for t in (z, W, b):
            t.grad = None
        start = time.perf_counter()
        loglik = F.logsigmoid(logits_fn(z, edges, W, b)).sum() + F.logsigmoid(-logits_fn(z, nonedges, W, b)).sum()
        loglik.backward()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def run(n: int, C: int, repeats: int, max_gather_gb: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    edges, nonedges = random_pairs(n, rng)
    z = torch.randn(C, n, K, requires_grad=True)
    upper = torch.randn(C, K, K) / np.sqrt(K)
    W = (0.5 * (upper + upper.transpose(-1, -2))).requires_grad_(True)
    b = torch.full((C, 1), -3.0, requires_grad=True)
    decoder = EdgeDecoder(K, point_estimates=False)
    record = {"n_cells": n, "chains": C, "edges": int(edges.shape[1]), "nonedges": int(nonedges.shape[1]),
              "dense_path": bool(nonedges.shape[1] * 8 > n * n)}
    record["decoder_s"] = time_evaluation(decoder, z, W, b, edges, nonedges, repeats)
    gather_gb = 3 * C * nonedges.shape[1] * K * 4 / 1e9  # z_i, z_j and z_i W, float32
    if gather_gb <= max_gather_gb:
        record["gather_s"] = time_evaluation(gather_logits, z, W, b, edges, nonedges, repeats)
        record["gather_over_decoder"] = record["gather_s"] / record["decoder_s"]
    else:
        record["gather_s"] = None
        record["gather_skipped"] = f"pair vectors would take {gather_gb:.1f} GB > --max-gather-gb {max_gather_gb}"
    record["refinement_minutes_default"] = record["decoder_s"] * default_evaluations() / 60
    print(json.dumps(record), flush=True)
    return record


def markdown(result: dict) -> str:
    lines = ["# Cost of the graph terms per HMC evaluation", "", f"Command: `{result['command']}`", "",
             f"Forward + backward of the edge and non-edge Bernoulli log-likelihood for {result['chains']} chains, "
             f"z_dim {K}, about {EDGES_PER_CELL} edges per cell, min(all, 2M) non-edges; {result['threads']} CPU thread(s), "
             "median of repeats. `decoder`: `EdgeDecoder` (dense `z W z^T` when the pairs outnumber n^2/8); `gather`: the "
             f"per-pair formula. The last column multiplies by the {default_evaluations()} evaluations of a default "
             "refinement of 200 draws (`num_steps x (num_warmup + kept x thin)`); the graph terms only.", "",
             "| cells | edges | non-edges | dense path | decoder s | gather s | gather / decoder | refinement, min |",
             "|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in result["records"]:
        gather = f"{r['gather_s']:.3f}" if r["gather_s"] is not None else "skipped"
        ratio = f"{r['gather_over_decoder']:.1f}" if r.get("gather_over_decoder") else "-"
        lines.append(f"| {r['n_cells']} | {r['edges']} | {r['nonedges']} | {'yes' if r['dense_path'] else 'no'} | "
                     f"{r['decoder_s']:.3f} | {gather} | {ratio} | {r['refinement_minutes_default']:.1f} |")
    skipped = [r for r in result["records"] if r.get("gather_skipped")]
    lines += [""] + [f"- {r['n_cells']} cells, gather: {r['gather_skipped']}." for r in skipped]
    lines += ["", f"Versions: {json.dumps(result['versions'])}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default="400,1500,3000")
    parser.add_argument("--chains", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-gather-gb", type=float, default=6.0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    records = [run(int(n), args.chains, args.repeats, args.max_gather_gb) for n in args.cells.split(",")]
    command = command_line("graph_cost.py", argv, env="")
    result = {"command": command, "chains": args.chains, "threads": args.threads, "records": records,
              "versions": pyrospatial.engine.infer.versions()}
    write_results(args.out, "graph_cost", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
