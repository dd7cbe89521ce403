"""Mapping benchmark (issue 20): dissociated cells onto a spatial atlas, ``pyrospatial.map_cells``
against Tangram, novoSpaRc and plain POT (EMD and FGW) in the same run.

    python benchmarks/mapping.py --out DIR [--datasets osmfish sim] [--depths 1.0 0.5 0.2]
        [--methods ...] [--timeout S] [--peer-python PY]
    (make bench-env-mapping; make bench-mapping)

Data. Every data set is split in half at random (``numpy.random.default_rng(0)``): the *atlas*
half keeps its coordinates; the other half, the *cells*, loses them and its counts are thinned
binomially (each molecule kept with probability ``depth``, one fixed generator per depth) at the
depths 1.0, 0.5 and 0.2. The true positions of the cells stay in this process.

``osmfish``
    osmFISH mouse somatosensory cortex (Codeluppi et al. 2018) through
    ``pyrospatial.data.datasets.load_osmfish``: the 4,839 valid cells less the 476 duplicated
    records (identical counts and position; the loader drops them), i.e. 4,363 cells, 33 genes, µm.
``sim``
    ``pyrospatial.data.sim.simulate_tissue`` (``--sim-cells`` cells, 100 genes, seed 0): the cells'
    own RNA counts (``truth["counts"]``) and true positions.

Methods (each in its own process, one thread, one after the other, ``--timeout`` each; the
runners are ``benchmarks/peers/mapping_<name>.py``): ``pyrospatial`` (``map_cells`` with its
defaults, this interpreter), ``tangram`` (tangram-sc, ``mode="cells"``), ``novosparc`` (novoSpaRc
with the atlas), ``pot_emd`` and ``pot_fgw`` (POT on the shared expression cost; the peers in the
``--peer-python`` environment). Every method hands back its cells x atlas probability (or
coupling) matrix P; :func:`mapping_metrics` scores every P the same way.

Metrics, per cell, from its row of P (normalised to sum 1): the posterior-mean location
``m = sum_j P_ij s_j``; its distance to the truth; whether that distance is at most the distance
from the truth to its 10th nearest atlas location (``frac_within_10nn``); the radius ``r90`` of
the smallest disc around ``m`` holding at least 90% of the row's mass, and whether the truth lies
in that disc (``coverage_90``). ``seconds`` is the method's own wall time (reading the input
excluded), ``peak_rss_mb`` its process's peak resident memory. A method that is not installed,
fails or passes the time limit is recorded with ``finished: false`` and the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import command_line, write_results

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"
REPO = HERE.parent

# method -> (runner script, variant, environment: "self" = this interpreter, "peer" = --peer-python,
#            the pip package it needs in the peer environment)
METHODS: dict[str, tuple[str, str, str, str]] = {
    "pyrospatial": ("mapping_pyrospatial.py", "", "self", "pyrospatial"),
    "tangram": ("mapping_tangram.py", "", "peer", "tangram-sc"),
    "novosparc": ("mapping_novosparc.py", "", "peer", "novosparc"),
    "pot_emd": ("mapping_pot.py", "emd", "peer", "pot"),
    "pot_fgw": ("mapping_pot.py", "fgw", "peer", "pot"),
}
PEER_METHODS = ("tangram", "novosparc", "pot_emd", "pot_fgw")
DEPTHS = (1.0, 0.5, 0.2)
SPLIT_SEED = 0
K_NEIGHBOURS = 10
MASS = 0.9


# ------------------------------------------------------------------------------------------
# metrics: one function for every method
# ------------------------------------------------------------------------------------------
def _as_rows(p) -> sp.csr_matrix:
    p = sp.csr_matrix(p, dtype=np.float64)
    if p.nnz and (p.data < 0).any():
        raise ValueError("P has negative entries: expected probabilities or a coupling")
    tot = np.asarray(p.sum(axis=1)).ravel()
    if (tot <= 0).any():
        raise ValueError(f"P has {int((tot <= 0).sum())} rows without mass: every cell needs a distribution")
    return sp.csr_matrix(sp.diags(1.0 / tot) @ p)


def knn_radius(atlas_xy: np.ndarray, true_xy: np.ndarray, k: int = K_NEIGHBOURS) -> np.ndarray:
    """Distance from each true location to its ``k``-th nearest atlas location."""
    from scipy.spatial import cKDTree

    k = min(k, len(atlas_xy))
    d, _ = cKDTree(atlas_xy).query(true_xy, k=k)
    return np.asarray(d).reshape(len(true_xy), -1)[:, -1]


def cell_metrics(p, atlas_xy: np.ndarray, true_xy: np.ndarray, k: int = K_NEIGHBOURS,
                 mass: float = MASS) -> dict[str, np.ndarray]:
    """Per-cell scores of the cells x atlas matrix ``p`` (rows are normalised here).

    Returns ``mean_xy`` (posterior-mean location), ``distance`` (to the truth), ``knn_radius``
    (truth to its ``k``-th nearest atlas location), ``radius`` (smallest radius around
    ``mean_xy`` holding at least ``mass`` of the row) and ``covered`` (truth within ``radius``).
    """
    atlas_xy = np.asarray(atlas_xy, dtype=np.float64)
    true_xy = np.asarray(true_xy, dtype=np.float64)
    p = _as_rows(p)
    if p.shape != (len(true_xy), len(atlas_xy)):
        raise ValueError(f"P has shape {p.shape}, expected (cells, atlas) = {(len(true_xy), len(atlas_xy))}")
    mean_xy = np.asarray(p @ atlas_xy)
    dist = np.linalg.norm(mean_xy - true_xy, axis=1)
    radius = np.empty(len(true_xy))
    for i in range(p.shape[0]):
        lo, hi = p.indptr[i], p.indptr[i + 1]
        w, j = p.data[lo:hi], p.indices[lo:hi]
        d = np.linalg.norm(atlas_xy[j] - mean_xy[i], axis=1)
        order = np.argsort(d, kind="stable")
        cum = np.cumsum(w[order])
        at = min(int(np.searchsorted(cum, mass * cum[-1] - 1e-12)), len(cum) - 1)
        radius[i] = d[order][at]
    r10 = knn_radius(atlas_xy, true_xy, k)
    return {"mean_xy": mean_xy, "distance": dist, "knn_radius": r10, "radius": radius,
            "covered": dist <= radius + 1e-12}


def mapping_metrics(p, atlas_xy: np.ndarray, true_xy: np.ndarray, k: int = K_NEIGHBOURS,
                    mass: float = MASS) -> dict[str, float]:
    """The benchmark's scores of one cells x atlas probability/coupling matrix ``p``:
    ``mean_distance``, ``median_distance``, ``frac_within_10nn``, ``coverage_90`` and
    ``mean_radius_90`` (see :func:`cell_metrics`)."""
    c = cell_metrics(p, atlas_xy, true_xy, k, mass)
    return {"mean_distance": float(c["distance"].mean()), "median_distance": float(np.median(c["distance"])),
            "frac_within_10nn": float(np.mean(c["distance"] <= c["knn_radius"])),
            "coverage_90": float(c["covered"].mean()), "mean_radius_90": float(c["radius"].mean())}


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
def split_half(n: int, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(atlas indices, cell indices): a random half and the rest, both sorted."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2:])


def thinning_seed(depth: float) -> int:
    """The generator seed of the cells' thinning at ``depth``: 1000 + its index in :data:`DEPTHS`
    (1000, 1001, 1002), so a run of some of the depths thins them exactly as the full run does;
    another depth gets 2000 + round(1000 depth)."""
    for i, d in enumerate(DEPTHS):
        if abs(float(depth) - d) < 1e-9:
            return 1000 + i
    return 2000 + int(round(1000 * float(depth)))


def thin(counts: np.ndarray, depth: float, seed: int) -> np.ndarray:
    """Binomial thinning: each molecule of the integer ``counts`` kept with probability ``depth``."""
    counts = np.asarray(counts)
    if depth >= 1.0:
        return counts.astype(np.float32)
    n = np.rint(counts).astype(np.int64)
    return np.random.default_rng(seed).binomial(n, depth).astype(np.float32)


def load_dataset(name: str, sim_cells: int) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """(counts cells x genes, positions, gene names, description) of a data set."""
    if name == "osmfish":
        from pyrospatial.data.datasets import load_osmfish

        a = load_osmfish()
        x = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
        xy = np.asarray(a.obsm["spatial"], float)
        dropped = int(a.uns["pyrospatial_dataset"]["n_duplicates_dropped"])
        return x, xy, list(a.var_names), {
            "source": "osmFISH SScortex (Codeluppi et al. 2018), valid cells, duplicated records dropped",
            "units": "µm", "duplicated_records_dropped": dropped, "n_records": len(x) + dropped}
    if name == "sim":
        from pyrospatial.data.sim import simulate_tissue

        t = simulate_tissue(n_cells=sim_cells, n_genes=100, seed=0)
        x = np.asarray(t.truth["counts"], dtype=np.float32)
        return x, np.asarray(t.cells.obsm["spatial"], float), [f"gene{g}" for g in range(x.shape[1])], {
            "source": f"pyrospatial.data.sim.simulate_tissue(n_cells={sim_cells}, n_genes=100, seed=0), "
                      "the cells' RNA counts", "units": "µm"}
    raise SystemExit(f"unknown data set {name!r}: osmfish or sim")


def prepare(work: Path, datasets: list[str], depths: list[float], sim_cells: int) -> dict[str, dict[str, Any]]:
    """Write ``{ds}_atlas.h5ad`` and ``{ds}_cells_d{depth}.h5ad`` under ``work``; return per data set
    the paths, the atlas positions and the cells' true positions (kept in this process)."""
    import anndata as ad
    import pandas as pd

    out = {}
    for ds in datasets:
        x, xy, genes, info = load_dataset(ds, sim_cells)
        ia, ic = split_half(len(x))
        var = pd.DataFrame(index=genes)
        atlas = ad.AnnData(X=sp.csr_matrix(x[ia].astype(np.float32)), var=var,
                           obs=pd.DataFrame(index=[f"atlas{i}" for i in ia]))
        atlas.obsm["spatial"] = xy[ia]
        apath = work / f"{ds}_atlas.h5ad"
        atlas.write_h5ad(apath)
        cells = {}
        for depth in depths:
            q = ad.AnnData(X=sp.csr_matrix(thin(x[ic], depth, seed=thinning_seed(depth))), var=var.copy(),
                           obs=pd.DataFrame(index=[f"cell{i}" for i in ic]))
            path = work / f"{ds}_cells_d{depth:g}.h5ad"
            q.write_h5ad(path)
            cells[depth] = {"path": str(path), "mean_counts": float(np.asarray(q.X.sum(axis=1)).mean())}
        r10 = knn_radius(xy[ia], xy[ic])
        out[ds] = {"atlas": str(apath), "atlas_xy": xy[ia], "true_xy": xy[ic], "cells": cells,
                   "n_atlas": len(ia), "n_cells": len(ic), "n_genes": x.shape[1],
                   "median_10nn_radius": float(np.median(r10)), **info}
    return out


# ------------------------------------------------------------------------------------------
# running one method in its own process
# ------------------------------------------------------------------------------------------
def peer_environment(peer_python: str, package: str) -> tuple[str | None, str]:
    """The peer interpreter, or (None, why not usable): absent, or pip failed for ``package``
    (``make bench-env-mapping`` writes ``FAILED: <package>`` and pip's output to install.log)."""
    py = Path(peer_python)
    venv = py.parent.parent
    log = venv / "install.log"
    if not py.exists():
        return None, f"not installed: run `make bench-env-mapping` ({venv.name} missing)"
    if not (venv / ".installed").exists():
        return None, f"not installed: `make bench-env-mapping` did not finish ({venv.name}/.installed missing)"
    if log.exists():
        text = log.read_text(errors="replace")
        if f"FAILED: {package}" in text:
            lines = [ln for ln in text.splitlines() if ln.strip() and "is ignored" not in ln]
            tail = " | ".join(ln for ln in lines if "ERROR" in ln or "FAILED" in ln)[-600:]
            return None, f"pip install {package} failed (see {venv.name}/install.log): {tail}"
    return str(py), ""


def run_method(method: str, ds: str, depth: float, case: dict, work: Path, peer_python: str,
               timeout: float, seed: int) -> dict[str, Any]:
    """One run; returns {"finished", "reason", "P", "out", "seconds", "wall", "peak_rss_mb"}."""
    # the process runner (own process group, timeout, peak RSS) the benchmarks share
    from domains import failure_reason, run_process

    script, variant, env, package = METHODS[method]
    if env == "self":
        py, why = sys.executable, ""
    else:
        py, why = peer_environment(peer_python, package)
    if py is None:
        return {"finished": False, "reason": why}
    tag = f"{method}_{ds}_d{depth:g}"
    out, log = work / f"{tag}.json", work / f"{tag}.log"
    for f in (out, Path(str(out) + ".npz")):
        f.unlink(missing_ok=True)
    cmd = [py, str(PEERS / script), "--cells", case["cells"][depth]["path"], "--atlas", case["atlas"],
           "--seed", str(seed), "--output", str(out), "--variant", variant]
    print(f"[{time.strftime('%H:%M:%S')}] {tag} ...", flush=True)
    code, wall, rss = run_process(cmd, log, timeout)
    if code != 0 or not out.exists():
        reason = scrub(failure_reason(log, code, timeout))
        print(f"    failed: {reason}", flush=True)
        return {"finished": False, "reason": reason, "wall": wall, "peak_rss_mb": rss}
    res = json.loads(out.read_text())
    print(f"    done in {res['seconds']:.1f} s (process {wall:.1f} s, {rss:.0f} MB)", flush=True)
    return {"finished": True, "reason": "", "out": res, "P": sp.load_npz(str(out) + ".npz"),
            "seconds": res["seconds"], "wall": wall, "peak_rss_mb": rss}


def scrub(text: str) -> str:
    """Absolute paths of this checkout and its parent replaced by relative ones."""
    for root, rel in ((str(REPO), "."), (str(REPO.parent), "..")):
        text = text.replace(root + os.sep, rel + "/").replace(root, rel)
    return text


# ------------------------------------------------------------------------------------------
# records, tables, targets
# ------------------------------------------------------------------------------------------
def record(ds: str, depth: float, method: str, r: dict, case: dict) -> dict[str, Any]:
    rec: dict[str, Any] = {"dataset": ds, "depth": depth, "method": method, "mean_distance": None,
                           "frac_within_10nn": None, "coverage_90": None, "seconds": r.get("seconds"),
                           "peak_rss_mb": r.get("peak_rss_mb"), "finished": r["finished"], "reason": r["reason"],
                           "process_seconds": r.get("wall")}
    if r["finished"]:
        rec.update(mapping_metrics(r["P"], case["atlas_xy"], case["true_xy"]))
        rec["nnz_per_cell"] = float(r["P"].nnz / r["P"].shape[0])
        own = r["out"]
        if "spatial_mapped" in own and "map_radius_90" in own:  # the method's own credible region
            d = np.linalg.norm(np.asarray(own["spatial_mapped"], float) - case["true_xy"], axis=1)
            rad = np.asarray(own["map_radius_90"], float)
            rec["own_coverage_90"] = float(np.mean(d <= rad))
            rec["own_mean_radius_90"] = float(rad.mean())
            rec["own_mean_distance"] = float(d.mean())
    return rec


def reference_record(ds: str, depth: float, case: dict) -> dict[str, Any]:
    """Every cell given the uniform row (the atlas centroid): the score of knowing nothing."""
    n, m = case["n_cells"], case["n_atlas"]
    rec = {"dataset": ds, "depth": depth, "method": "uniform (reference)",
           **mapping_metrics(np.full((n, m), 1.0 / m), case["atlas_xy"], case["true_xy"]),
           "seconds": None, "peak_rss_mb": None, "finished": True,
           "reason": "reference: every row uniform over the atlas (no method)"}
    return rec


def key(r: dict) -> tuple:
    return (r["dataset"], float(r["depth"]), r["method"])


def fmt(v: Any, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown(result: dict) -> str:
    recs = result["records"]
    lines = ["# Mapping benchmark (issue 20)", "", f"Command: `{result['command']}`", "",
             ("Cells mapped onto an atlas (the other random half of the same tissue) by expression. "
              "Distances in µm; `within 10-NN` = fraction of cells whose posterior-mean location lies "
              "within the distance from the truth to its 10th nearest atlas location; `coverage 90` = "
              "fraction whose truth lies in the smallest disc around the mean holding 90% of the row's "
              "mass (the same computation on every method's P); seconds = the method's own wall time "
              "on one thread, `x pyrospatial` its ratio to pyrospatial's in the same data set and depth."),
             ""]
    for ds, info in result["settings"]["datasets"].items():
        lines += [f"## {ds}: {info['source']}", "",
                  (f"{info['n_atlas']} atlas locations, {info['n_cells']} cells, {info['n_genes']} genes; "
                   f"median distance from a cell to its 10th nearest atlas location "
                   f"{info['median_10nn_radius']:.1f} µm."), "",
                  ("| depth | method | mean distance | within 10-NN | coverage 90 | mean r90 | seconds | "
                   "x pyrospatial | peak RSS MB | note |"),
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for depth in sorted({r["depth"] for r in recs if r["dataset"] == ds}, reverse=True):
            sel = [r for r in recs if r["dataset"] == ds and r["depth"] == depth]
            ours = next((r for r in sel if r["method"] == "pyrospatial" and r["finished"]), None)
            order = list(METHODS) + ["uniform (reference)"]
            for r in sorted(sel, key=lambda r: order.index(r["method"]) if r["method"] in order else 99):
                ratio = (r["seconds"] / ours["seconds"] if ours and r["finished"] and r.get("seconds")
                         else None)
                note = r["reason"]
                if r.get("own_coverage_90") is not None:
                    note = (f"own map_radius_90: coverage {r['own_coverage_90']:.3f}, "
                            f"mean radius {r['own_mean_radius_90']:.1f}")
                lines.append(f"| {depth:g} | {r['method']} | {fmt(r['mean_distance'], 1)} | "
                             f"{fmt(r['frac_within_10nn'], 3)} | {fmt(r['coverage_90'], 3)} | "
                             f"{fmt(r.get('mean_radius_90'), 1)} | {fmt(r['seconds'], 1)} | {fmt(ratio, 2)} | "
                             f"{fmt(r['peak_rss_mb'], 0)} | {note} |")
        lines.append("")
    lines += ["## Targets", ""] + [f"- {t}" for t in result["targets"]] + [""]
    lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(lines)


def targets(recs: list[dict]) -> list[str]:
    """Issue 20's targets: mean distance <= the best peer at every depth; coverage_90 in [0.85, 0.95]."""
    out = []
    for ds, depth in sorted({(r["dataset"], r["depth"]) for r in recs}, key=lambda t: (t[0], -t[1])):
        sel = {r["method"]: r for r in recs if (r["dataset"], r["depth"]) == (ds, depth) and r["finished"]}
        ours = sel.get("pyrospatial")
        peers = [sel[m] for m in PEER_METHODS if m in sel]
        if ours is None:
            out.append(f"{ds} depth {depth:g}: pyrospatial did not finish; targets not measured")
            continue
        if peers:
            best = min(peers, key=lambda r: r["mean_distance"])
            gap = ours["mean_distance"] - best["mean_distance"]
            out.append(f"{ds} depth {depth:g}: mean distance {ours['mean_distance']:.1f} vs best peer "
                       f"{best['method']} {best['mean_distance']:.1f} ({'met' if gap <= 0 else f'missed by {gap:.1f}'})")
        c = ours["coverage_90"]
        out.append(f"{ds} depth {depth:g}: coverage_90 {c:.3f} (target [0.85, 0.95]: "
                   f"{'met' if 0.85 <= c <= 0.95 else 'missed'})")
        if ours.get("own_coverage_90") is not None:
            c = ours["own_coverage_90"]
            out.append(f"{ds} depth {depth:g}: coverage of pyrospatial's own map_radius_90 {c:.3f} "
                       f"(same target: {'met' if 0.85 <= c <= 0.95 else 'missed'})")
    return out


def load_records(paths: list[str]) -> dict[tuple, dict]:
    found: dict[tuple, dict] = {}
    for p in paths:
        for r in json.loads(Path(p).read_text()).get("records", []):
            found[key(r)] = r
    return found


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--datasets", nargs="+", default=["osmfish", "sim"])
    p.add_argument("--depths", nargs="+", type=float, default=list(DEPTHS))
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--sim-cells", type=int, default=3000)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per method run")
    p.add_argument("--seed", type=int, default=0, help="seed handed to every method")
    p.add_argument("--peer-python", default=str(REPO / ".bench-venv-mapping" / "bin" / "python"))
    p.add_argument("--work", default=None, help="folder for the inputs and runner outputs (default: a temp dir)")
    p.add_argument("--merge", nargs="*", default=[], help="earlier mapping JSON files whose records are kept "
                                                           "unless this run redoes them")
    p.add_argument("--note", action="append", default=[])
    args = p.parse_args(argv)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}: choose from {list(METHODS)}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mapping_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out)

    cases = prepare(work, args.datasets, args.depths, args.sim_cells)
    records = load_records(args.merge)
    for ds, case in cases.items():
        for depth in args.depths:
            ref = reference_record(ds, depth, case)
            records[key(ref)] = ref
            for method in args.methods:
                r = run_method(method, ds, depth, case, work, args.peer_python, args.timeout, args.seed)
                rec = record(ds, depth, method, r, case)
                records[key(rec)] = rec
                out_dir.mkdir(parents=True, exist_ok=True)
                (out_dir / "mapping.partial.json").write_text(
                    json.dumps({"records": list(records.values())}, indent=1, default=float))

    order = list(METHODS) + ["uniform (reference)"]
    recs = sorted(records.values(), key=lambda r: (r["dataset"], -r["depth"],
                                                   order.index(r["method"]) if r["method"] in order else 99))
    result = {
        "command": scrub(command_line("mapping.py", argv).replace(str(work), "WORK")),
        "records": recs,
        "targets": targets(recs),
        "settings": {
            "split_seed": SPLIT_SEED, "depths": args.depths, "thinning_seeds": {f"{d:g}": thinning_seed(d) for d in args.depths},
            "method_seed": args.seed, "timeout_s": args.timeout, "k_neighbours": K_NEIGHBOURS, "mass": MASS,
            "datasets": {ds: {k: v for k, v in c.items() if k not in ("atlas", "atlas_xy", "true_xy", "cells")}
                         | {"mean_counts_per_cell": {f"{d:g}": c["cells"][d]["mean_counts"] for d in c["cells"]}}
                         for ds, c in cases.items()},
        },
        "notes": base_notes() + list(args.note),
    }
    write_results(out_dir, "mapping", result, markdown(result))
    (out_dir / "mapping.partial.json").unlink(missing_ok=True)


def base_notes() -> list[str]:
    return [
        ("Split: numpy default_rng(0) permutation, first half = atlas (keeps coordinates), second half = cells; "
         "the cells' counts thinned binomially per depth (generator seeds 1000, 1001, 1002)."),
        ("Shared expression space of the OT peers (benchmarks/peers/mapping_common.py): shared genes, "
         "library size 1e4 + log1p, up to 30 PCs fitted on atlas and cells together; POT EMD and FGW use "
         "the Euclidean PC distance / its max as M; FGW's structures are the cells' PC distances and the "
         "atlas's spatial distances (alpha 0.5). Tangram and novoSpaRc get the same log-normalised genes."),
        ("pyrospatial gets the raw counts and chooses its own preprocessing (package defaults); no method "
         "sees the cells' positions or any label."),
        ("Entries of P below 1e-9 of their row's total are dropped before scoring (at most n_atlas x 1e-9 "
         "of a row's mass)."),
        ("`uniform (reference)` is no method: every row uniform over the atlas, i.e. the atlas centroid for "
         "every cell: the score of knowing nothing."),
        ("One thread per method on 2 CPU cores shared with other work: compare the time ratios within a row "
         "group, not absolute seconds."),
    ]


if __name__ == "__main__":
    main()
