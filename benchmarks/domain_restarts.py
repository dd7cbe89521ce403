"""Why ``ps.domains`` pools restarts: one fit's confidence against independent fits' agreement.

    OMP_NUM_THREADS=1 python benchmarks/domain_restarts.py [--section 151673] [--fits 6]
        [--out benchmarks/results]

One SVI fit of the domain model knows only the mode it found. This script fits one DLPFC section
(the inputs of ``benchmarks/domains.py --morphology simple``: shared genes, the 7 simple image
columns) ``--fits`` times with seeds 0.. (each a single fit, ``restarts=1``), splits the fits into
two halves A and B, and compares

- each single fit of A (B) with the fits of B (A), and
- the pool of A (B) (:func:`pyrospatial.methods.domain_restarts.pool_restarts`, as ``domains``
  with ``restarts=3`` does) with the fits of B (A),

by the **label-free** calibration error: the fit's confidence against the fraction of the other
half's fits that give the spot the same domain (Hungarian-matched). The check needs no labels,
so it was the criterion for the default; the manual layers' ARI and confidence ECE are
reported beside it, not used to choose.

Writes ``OUT/domain_restarts.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import command_line, write_results  # noqa: E402
from domains import binned_ece, confidence_ece, matched_agreement, prepare, scores  # noqa: E402

from pyrospatial.methods.domain_restarts import pool_restarts  # noqa: E402
from pyrospatial.methods.domains import Domains  # noqa: E402


def fit_once(adata, n_domains: int, seed: int) -> Domains:
    """One fit with the settings of ``ps.domains`` (its defaults, one restart)."""
    method = Domains(adata, n_domains, seed=seed)
    method.train(3000, seed=seed)
    method.sample(100, seed=seed)
    return method


def label_free(labels: np.ndarray, confidence: np.ndarray, others: list[np.ndarray]) -> dict[str, float]:
    """ECE of ``confidence`` against the fraction of ``others`` agreeing with ``labels`` (matched)."""
    agree = np.mean([matched_agreement(o, labels) for o in others], axis=0)
    return {"label_free_ece": binned_ece(confidence, agree.astype(float)), "mean_agreement": float(agree.mean())}


def summary_of(prob: np.ndarray, others: list[np.ndarray], truth: np.ndarray) -> dict[str, float]:
    labels, confidence = prob.argmax(1).astype(str), prob.max(1)
    return {**scores(labels, truth), **confidence_ece(labels, confidence, truth), "mean_confidence": float(confidence.mean()),
            **label_free(labels, confidence, others)}


def markdown(result: dict) -> str:
    lines = ["# One fit vs pooled restarts of the domain model", "", f"Command: `{result['command']}`", "",
             (f"DLPFC {result['section']}, {result['fits']} single fits (seeds 0-{result['fits'] - 1}) split into halves "
              f"A = {result['halves'][0]} and B = {result['halves'][1]}. Label-free ECE: confidence against the fraction "
              "of the other half's fits giving the spot the same domain (no labels). ARI and label ECE against the "
              "manual layers are reported, not used to choose."), "",
             "| fit | label-free ECE | mean confidence | mean agreement | ARI | label ECE | matched accuracy |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['fit']} | {r['label_free_ece']:.3f} | {r['mean_confidence']:.3f} | {r['mean_agreement']:.3f} | "
                     f"{r['ari']:.3f} | {r['confidence_ece']:.3f} | {r['matched_accuracy']:.3f} |")
    s, p = result["means"]["single"], result["means"]["pooled"]
    lines += ["", f"Means: single fits label-free ECE {s['label_free_ece']:.3f}, ARI {s['ari']:.3f}, label ECE "
              f"{s['confidence_ece']:.3f}; pools of {len(result['halves'][0])} label-free ECE {p['label_free_ece']:.3f}, "
              f"ARI {p['ari']:.3f}, label ECE {p['confidence_ece']:.3f}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--section", default="151673", choices=["151673", "151674"])
    ap.add_argument("--fits", type=int, default=6, help="single fits (an even number; halves pooled)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="domain-restarts-"))
    case = prepare(work, ["dlpfc"], "simple")[f"dlpfc_{args.section}"]
    adata, truth = ad.read_h5ad(case["path"]), np.asarray(case["labels"], dtype=object)
    fits = [fit_once(adata, case["n_domains"], seed) for seed in range(args.fits)]
    probs = [np.asarray(f.draws["domain_prob"]).mean(0) for f in fits]
    labels = [p.argmax(1).astype(str) for p in probs]
    half = args.fits // 2
    halves = [list(range(half)), list(range(half, 2 * half))]
    rows = []
    for h, members in enumerate(halves):
        others = [labels[i] for i in halves[1 - h]]
        for i in members:
            rows.append({"fit": f"single seed {i}", "kind": "single", **summary_of(probs[i], others, truth)})
        pooled = pool_restarts([fits[i] for i in members])
        rows.append({"fit": f"pool of seeds {members}", "kind": "pooled",
                     **summary_of(np.asarray(pooled.draws["domain_prob"]).mean(0), others, truth)})
    means = {kind: {k: float(np.mean([r[k] for r in rows if r["kind"] == kind]))
                    for k in ("label_free_ece", "ari", "confidence_ece", "mean_confidence", "mean_agreement")}
             for kind in ("single", "pooled")}
    result = {"command": command_line("domain_restarts.py", argv), "section": args.section, "fits": args.fits,
              "halves": halves, "rows": rows, "means": means}
    write_results(args.out, "domain_restarts", result, markdown(result))


if __name__ == "__main__":
    main()
