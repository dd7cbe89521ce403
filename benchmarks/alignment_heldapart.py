"""Held-apart section pairs for choosing `align`'s settings (issue 20), never the scored ones.

`benchmarks/alignment.py` scores `align` on the Ståhl breast-cancer pairs and DLPFC
151673 -> 151674. A change to `align` must not be chosen on those pairs, so this script offers
other real pairs of the same kind: consecutive sections of the HER2+ breast tumours of
Andersson et al. 2021 (`../shared/data/her2_st`, legacy ST arrays like Ståhl's, 8 patients),
scored exactly as the Ståhl real pairs are (`alignment.py`'s `stahl_real` case):

- labels: a joint k-means (k = 5) of both sections' spots on their joint principal components
  of shared genes (`alignment.joint_clusters`);
- `accuracy`: the coupling's mass between spots of the same label, the coupling normalised to 1;
- `label_transfer_accuracy`, `label_ece`, `match_ece`, ...: `alignment.label_metrics`, the
  same computation on every method's coupling (pyrospatial: its own label transfer).

Methods: pyrospatial under one or more named settings (`--variants`, JSON: name -> keyword
arguments of `pyrospatial.align` on top of the benchmark's), POT's fused Gromov-Wasserstein
with `alignment.py`'s settings (the best peer on the Ståhl real pairs) and `alignment.py`'s
reference `expression_emd` (exact OT on expression alone, the coordinates never read). Each
pair runs in this process, one thread.

    OMP_NUM_THREADS=1 python benchmarks/alignment_heldapart.py --out benchmarks/results
    OMP_NUM_THREADS=1 python benchmarks/alignment_heldapart.py \
        --variants '{"default": {}, "embedding x2": {"embedding_weight": 2.0}}' --out /tmp/x

Output: `OUT/alignment_heldapart.{json,md}` (records: pair, method, variant, accuracy, ...,
seconds; a mean per method and variant).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import command_line, write_results  # noqa: E402

#: consecutive sections per patient: patients A-D have 6 sections, E-H have 3
PAIRS = tuple(f"{p}{i}-{p}{i + 1}" for p in "ABCDEFGH" for i in (1, 2))


def load_section(section: str):
    """One HER2 ST section: raw counts in `X`, array coordinates in `obsm["spatial"]` (spots of
    its cluster annotation, as the data set's README loads them)."""
    import anndata as ad
    import pandas as pd

    import alignment as bench

    folder = bench.shared_folder("her2_st")
    counts = pd.read_csv(folder / f"{section}.tsv.gz", sep="\t", index_col=0)
    annotation = pd.read_csv(folder / f"{section}-cluster-annotation.tsv.gz", sep="\t", index_col=0)
    annotation.index = [f"{x}x{y}" for x, y in zip(annotation.x, annotation.y)]
    counts = counts.loc[counts.index.intersection(annotation.index)]
    adata = ad.AnnData(counts.to_numpy(dtype=np.float32),
                       obs=pd.DataFrame(index=[f"{section}_{spot}" for spot in counts.index]),
                       var=pd.DataFrame(index=counts.columns.astype(str)))
    adata.var_names_make_unique()
    adata.obsm["spatial"] = annotation.loc[counts.index, ["x", "y"]].to_numpy(dtype=np.float64)
    return adata


def make_pair(pair: str):
    """(a, b, labels of a, labels of b): shared genes seen in both sections, joint k-means labels."""
    import alignment as bench

    first, second = pair.split("-")
    a, b = bench.shared_genes(load_section(first), load_section(second))
    seen = (np.asarray(a.X).sum(0) > 0) & (np.asarray(b.X).sum(0) > 0)
    a, b = a[:, seen].copy(), b[:, seen].copy()
    labels_a, labels_b = bench.joint_clusters(a, b)
    return a, b, labels_a, labels_b


def run_pyrospatial(a, b, labels_b, options: dict):
    """`align(a, b)` with `alignment.py`'s settings and `options`; b's labels transferred to a."""
    from pyrospatial.methods.alignment import align

    b = b.copy()
    b.obs["bench_label"] = np.asarray(labels_b).astype(str)
    kwargs = {"features": "shared", "num_samples": 30, "progress": False, "seed": 0, **options}
    res = align(a, b, label_keys=["bench_label"], **kwargs)
    probs = res.adata.obsm["align_bench_label_probs"]
    extras = {"sigma_xy_spacings": float(res.settings["sigma_xy"] / res.settings["unit"]),
              "power": float(res.settings["power"])}
    return (res.match_prob / a.n_obs).tocsr(), probs.to_numpy(), np.asarray(probs.columns), extras


def score(pair: str, method: str, variant: str | None, coupling, labels_a, labels_b, seconds: float,
          label_probs=None, categories=None, extras: dict | None = None) -> dict:
    import alignment as bench

    record = {"pair": pair, "method": method, "variant": variant,
              "accuracy": bench.label_agreement(coupling, labels_a, labels_b), "seconds": seconds}
    record.update(bench.label_metrics(coupling, labels_a, labels_b, label_probs, categories))
    record.update(extras or {})
    return record


def markdown(payload: dict) -> str:
    records = payload["records"]
    keys = sorted({(r["method"], r["variant"] or "") for r in records})
    pairs = list(dict.fromkeys(r["pair"] for r in records))
    lines = ["# Held-apart alignment pairs (HER2 ST), for choosing `align`'s settings", "",
             f"Command: `{payload['command']}`", "",
             "Consecutive sections of the HER2+ tumours (Andersson et al. 2021; `../shared/data/her2_st`), never "
             "scored by `benchmarks/alignment.py`. Labels: joint k-means (k = 5) of both sections, as for the "
             "Ståhl real pairs; accuracy = the coupling's mass between spots of the same label.", "",
             "## Mean over pairs", "",
             "| method | variant | accuracy | label transfer acc. | label ECE | match ECE | best-match p | "
             "best-match agreement | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for method, variant in keys:
        rows = [r for r in records if r["method"] == method and (r["variant"] or "") == variant]
        mean = {k: float(np.mean([r[k] for r in rows])) for k in
                ("accuracy", "label_transfer_accuracy", "label_ece", "match_ece", "best_match_prob_mean",
                 "best_match_agreement", "seconds")}
        lines.append(f"| {method} | {variant} | {mean['accuracy']:.3f} | {mean['label_transfer_accuracy']:.3f} | "
                     f"{mean['label_ece']:.3f} | {mean['match_ece']:.3f} | {mean['best_match_prob_mean']:.3f} | "
                     f"{mean['best_match_agreement']:.3f} | {mean['seconds']:.1f} |")
    lines += ["", "## Accuracy per pair", "",
              "`adjacent`: the fraction of adjacent spots of b (0.5-1.5 spacings apart) that share a label "
              "(`alignment.neighbour_label_agreement`): about the label mass of a coupling that places every spot one "
              "spacing off; a coupling that matches by expression does not lose it.",
              "", "| pair | adjacent | " + " | ".join(f"{m} {v}".strip() for m, v in keys) + " |",
              "|---|---|" + "---|" * len(keys)]
    for pair in pairs:
        cells = []
        for method, variant in keys:
            hit = [r for r in records if r["pair"] == pair and r["method"] == method and (r["variant"] or "") == variant]
            cells.append(f"{hit[0]['accuracy']:.3f}" if hit else "-")
        adjacent = [r["b_neighbour_agreement"] for r in records if r["pair"] == pair and "b_neighbour_agreement" in r]
        lines.append(f"| {pair} | {f'{adjacent[0]:.3f}' if adjacent else '-'} | " + " | ".join(cells) + " |")
    adjacent = [r["b_neighbour_agreement"] for r in records if "b_neighbour_agreement" in r]
    if adjacent:
        lines += ["", f"Mean adjacent-spot agreement: {np.mean(adjacent):.3f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", default=",".join(PAIRS), help="comma-separated section pairs, e.g. A1-A2,B1-B2")
    parser.add_argument("--variants", default='{"default": {}}',
                        help="JSON: variant name -> keyword arguments of pyrospatial.align")
    parser.add_argument("--no-peer", action="store_true", help="leave POT FGW and the expression-only reference out")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    import torch

    import alignment as bench

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    variants = json.loads(args.variants)
    records = []
    for pair in args.pairs.split(","):
        a, b, labels_a, labels_b = make_pair(pair)
        for name, options in variants.items():
            started = time.perf_counter()
            coupling, probs, categories, extras = run_pyrospatial(a, b, labels_b, options)
            records.append(score(pair, "pyrospatial", name, coupling, labels_a, labels_b,
                                 time.perf_counter() - started, probs, categories, extras))
            print(json.dumps(records[-1]), flush=True)
        for method in () if args.no_peer else ("pot_fgw", "expression_emd"):
            started = time.perf_counter()
            coupling, _ = bench.RUNNERS[method](a, b)
            extras = ({"b_neighbour_agreement": bench.neighbour_label_agreement(b.obsm["spatial"], labels_b)}
                      if method in bench.REFERENCES else None)
            records.append(score(pair, method, None, coupling, labels_a, labels_b, time.perf_counter() - started,
                                 extras=extras))
            print(json.dumps(records[-1]), flush=True)
    payload = {"command": command_line("alignment_heldapart.py", argv), "variants": variants, "records": records}
    write_results(args.out, "alignment_heldapart", payload, markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
