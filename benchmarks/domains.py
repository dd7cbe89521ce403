"""Domains benchmark (issue 19): ``pyrospatial.domains`` against the peers users use for the job.

    python benchmarks/domains.py --out DIR [--methods ...] [--datasets ...] [--seeds 0 1 2]
    (make bench-env-domains; make bench-domains)

Data (``shared/data``, read through ``pyrospatial.data.datasets.shared_data_dir()``):

``dlpfc`` 151673 and 151674
    10x Visium human DLPFC (Maynard et al. 2021): raw counts of the genes both sections have
    (each section ships its own top-5000 genes; intersected), manual layers L1-L6 + WM as labels
    (7 classes; spots without a layer are excluded from the scores, not from the fits), spot
    positions in full-resolution pixels, the 600 x 600 lowres H&E image, and the per-spot nucleus
    counts. Morphology = ``pyrospatial.image.add_image_features`` on the lowres image (colour and
    texture in each spot's footprint) with the nucleus count as an extra column; every method that
    takes morphology gets this same matrix (AESTETIK its PCs; SpaGCN uses the image itself).
``osmfish`` cortex
    osmFISH mouse somatosensory cortex (Codeluppi et al. 2018), cell level: 33 genes, the 4,363
    valid cells (``pyrospatial.data.datasets.load_osmfish``: 476 duplicated records dropped),
    positions in micrometres, the loom's ``Region`` as labels (11 classes). No image.

Every method is told the number of label classes as its number of domains (7 and 11), as in the
published comparisons; nothing else is chosen with the labels. Each method runs in its own
process with its own interpreter (``benchmarks/peers/domains_<peer>.py``; the peers each in their
own virtual environment ``.bench-venv-domains-<peer>``, scanpy and pyrospatial in this one) on one
thread, 3 seeds. ``seconds`` is the method's own wall time (reading the input excluded);
``peak_rss_mb`` the process's peak resident memory (libraries included). A peer that is not
installed, fails, or passes the time limit is recorded with ``finished: false`` and the reason.
ARI and NMI are computed over the labelled spots/cells. A peer whose first run takes longer than
``--slow-seconds`` is run with that one seed only (recorded in the notes).

For pyrospatial also: ARI with and without the morphology modality (DLPFC); the two DLPFC sections
fitted jointly vs separately, with the agreement of the domain labels of spots that
``pyrospatial.align`` matches between the sections (match-probability-weighted fraction of pairs
with the same label: the joint fit's labels are shared by construction, the separate fits' labels
of 151674 are first mapped to those of 151673 by the Hungarian matching that maximises that
agreement, which favours the separate fits; also the ARI between the labels of argmax-matched
pairs, which needs no mapping); and the calibration of ``obs['domain_confidence']``: expected
calibration error over 10 equal-width bins of "the spot's domain, mapped to a label class by the
Hungarian matching of domains to labels, equals its label".
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import command_line, write_results

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"
REPO = HERE.parent

# method -> (runner script, variant, venv name or None for this interpreter, modalities)
METHODS: dict[str, tuple[str, str, str | None, str]] = {
    "scanpy_leiden": ("domains_scanpy.py", "leiden", None, "counts"),
    "scanpy_kmeans": ("domains_scanpy.py", "kmeans", None, "counts"),
    "banksy": ("domains_banksy.py", "", "banksy", "counts+space"),
    "spagcn": ("domains_spagcn.py", "", "spagcn", "counts+space+histology"),
    "graphst": ("domains_graphst.py", "", "graphst", "counts+space"),
    "cellcharter": ("domains_cellcharter.py", "", "cellcharter", "counts+space"),
    "aestetik": ("domains_aestetik.py", "", "aestetik", "counts+space+morphology"),
    "stagate": ("domains_stagate.py", "", "stagate", "counts+space"),
    "pyrospatial": ("domains_pyrospatial.py", "all", None, "counts+space+morphology"),
    "pyrospatial_no_morphology": ("domains_pyrospatial.py", "counts", None, "counts+space"),
    "pyrospatial_joint": ("domains_pyrospatial.py", "all", None, "counts+space+morphology, 2 sections"),
}
PYROSPATIAL = ("pyrospatial", "pyrospatial_no_morphology", "pyrospatial_joint")
DLPFC_SECTIONS = ("151673", "151674")


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
def data_root() -> Path:
    from pyrospatial.data.datasets import shared_data_dir

    root = shared_data_dir()
    if root is None:
        raise SystemExit("shared data folder not found (set PYROSPATIAL_SHARED_DATA)")
    return root


def load_dlpfc_section(d: Path, s: str):
    """One DLPFC section as AnnData (raw counts, positions, lowres image, nuclei) and its labels."""
    import anndata as ad
    import pandas as pd
    import scipy.io
    from PIL import Image

    x = scipy.io.mmread(d / s / "counts.mtx.gz").tocsr().astype(np.float32)
    bc = pd.read_csv(d / s / "barcodes.tsv", header=None)[0].astype(str).to_numpy()
    genes = pd.read_csv(d / s / "genes.tsv", header=None)[0].astype(str).to_numpy()
    pos = pd.read_csv(d / s / "tissue_positions_list.txt", header=None, index_col=0,
                      names=["barcode", "in_tissue", "array_row", "array_col", "pxl_row", "pxl_col"]).loc[bc]
    lab = pd.read_csv(d / "barcode_level_layer_map.tsv", sep="\t", header=None, names=["barcode", "sample", "layer"])
    layer = lab[lab["sample"] == int(s)].set_index("barcode")["layer"].reindex(bc)
    nuclei = pd.read_csv(d / s / "tissue_spot_counts.csv").set_index("barcode")["count"].reindex(bc)
    sf = json.loads((d / s / "scalefactors_json.json").read_text())
    img = np.asarray(Image.open(d / s / "tissue_lowres_image.png").convert("RGB"), dtype=np.float32) / 255.0
    a = ad.AnnData(X=x, obs=pd.DataFrame(index=bc), var=pd.DataFrame(index=genes))
    a.obs["array_row"] = pos["array_row"].to_numpy()
    a.obs["array_col"] = pos["array_col"].to_numpy()
    a.obs["nuclei"] = nuclei.fillna(0).to_numpy().astype(np.float32)
    a.obsm["spatial"] = pos[["pxl_col", "pxl_row"]].to_numpy().astype(np.float64)
    a.uns["spatial"] = {s: {"images": {"lowres": img}, "scalefactors": sf}}
    return a, layer.to_numpy(dtype=object)


def add_morphology(a, section: str, how: str = "pyrospatial") -> str:
    """obsm['morphology']: pyrospatial's image features at the spots plus the nucleus count
    (``how="simple"``, or without ``pyrospatial.image``: the mean and sd of RGB in each spot's
    lowres disc and the nucleus count, standardised)."""
    try:
        from pyrospatial.image import add_image_features
    except ImportError:
        return _fallback_morphology(a, section)
    if how == "simple":
        return _fallback_morphology(a, section)
    add_image_features(a, key="morphology", library_id=section, image="lowres", obs_columns=("nuclei",))
    return "pyrospatial.image.add_image_features(lowres, obs_columns=('nuclei',))"


def _fallback_morphology(a, section: str) -> str:
    sp = a.uns["spatial"][section]
    img, sf = sp["images"]["lowres"], sp["scalefactors"]
    r = max(1, round(0.5 * sf["spot_diameter_fullres"] * sf["tissue_lowres_scalef"]))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disc = (yy**2 + xx**2) <= r * r
    feats = []
    for x, y in np.asarray(a.obsm["spatial"]) * sf["tissue_lowres_scalef"]:
        ci, cj = round(y), round(x)
        patch = img[max(ci - r, 0):ci + r + 1, max(cj - r, 0):cj + r + 1]
        m = disc[:patch.shape[0], :patch.shape[1]]
        px = patch[m] if m.any() else patch.reshape(-1, 3)
        feats.append(np.concatenate([px.mean(0), px.std(0)]))
    f = np.column_stack([np.asarray(feats), a.obs["nuclei"].to_numpy()])
    a.obsm["morphology"] = ((f - f.mean(0)) / np.maximum(f.std(0), 1e-8)).astype(np.float32)
    return "simple: RGB mean/sd in the lowres spot disc + nucleus count, standardised"


def load_osmfish(d: Path):
    """osmFISH through the package's loader (its 476 duplicated records dropped: 4,363 cells),
    the loom's ``Region`` as labels."""
    from pyrospatial.data.datasets import load_osmfish as load

    a = load(d)
    labels = a.obs["region"].astype(str).to_numpy(dtype=object)
    a.obs = a.obs[[]]
    return a, labels


def prepare(work: Path, datasets: list[str], morphology: str = "pyrospatial") -> dict[str, dict[str, Any]]:
    """Write one h5ad per section under ``work`` (labels stay in this process) and return
    {case: {"path", "labels", "n_domains", "dataset", "section"}}."""
    root = data_root()
    cases: dict[str, dict[str, Any]] = {}
    if "dlpfc" in datasets:
        d = root / "dlpfc_visium"
        loaded = {s: load_dlpfc_section(d, s) for s in DLPFC_SECTIONS}
        shared = sorted(set(loaded[DLPFC_SECTIONS[0]][0].var_names) & set(loaded[DLPFC_SECTIONS[1]][0].var_names))
        for s, (a, lab) in loaded.items():
            a = a[:, shared].copy()
            how = add_morphology(a, s, morphology)
            path = work / f"dlpfc_{s}.h5ad"
            a.write_h5ad(path)
            classes = sorted({v for v in lab if isinstance(v, str)})
            cases[f"dlpfc_{s}"] = {"dataset": "dlpfc", "section": s, "path": str(path), "labels": lab,
                                   "n_domains": len(classes), "n_obs": a.n_obs, "n_genes": a.n_vars,
                                   "morphology": how, "n_morphology": int(a.obsm["morphology"].shape[1])}
    if "osmfish" in datasets:
        a, lab = load_osmfish(root / "osmfish_sscortex")
        path = work / "osmfish_cortex.h5ad"
        a.write_h5ad(path)
        cases["osmfish_cortex"] = {"dataset": "osmfish", "section": "cortex", "path": str(path), "labels": lab,
                                   "n_domains": len(set(lab)), "n_obs": a.n_obs, "n_genes": a.n_vars,
                                   "morphology": None, "n_morphology": 0}
    return cases


# ------------------------------------------------------------------------------------------
# scores
# ------------------------------------------------------------------------------------------
def labelled(truth: np.ndarray) -> np.ndarray:
    return np.array([isinstance(v, str) and v != "nan" for v in truth])


def scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    m = labelled(truth)
    t, p = truth[m].astype(str), np.asarray(pred)[m]
    return {"ari": float(adjusted_rand_score(t, p)), "nmi": float(normalized_mutual_info_score(t, p))}


def hungarian_map(pred: np.ndarray, other: np.ndarray, weights: np.ndarray | None = None) -> dict:
    """Map each value of ``pred`` to a value of ``other`` maximising the (weighted) agreement."""
    from scipy.optimize import linear_sum_assignment

    pv, ov = np.unique(pred), np.unique(other)
    c = np.zeros((len(pv), len(ov)))
    w = np.ones(len(pred)) if weights is None else weights
    np.add.at(c, (np.searchsorted(pv, pred), np.searchsorted(ov, other)), w)
    r, k = linear_sum_assignment(-c)
    return {pv[i]: ov[j] for i, j in zip(r, k)}


def matched_agreement(other: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per spot, 1.0 where ``other``'s label, Hungarian-matched to ``labels``, equals ``labels``."""
    mapping = hungarian_map(other, labels)
    return np.array([mapping.get(v) == lab for v, lab in zip(other, labels)], dtype=float)


def binned_ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of ``confidence`` against the 0/1 (or fractional) ``correct``,
    over ``bins`` equal-width bins of confidence."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(ece)


def confidence_ece(pred: np.ndarray, confidence: np.ndarray, truth: np.ndarray, bins: int = 10) -> dict:
    """ECE of ``confidence`` for 'the spot's domain, Hungarian-matched to a label, is its label'."""
    m = labelled(truth)
    t, p, c = truth[m].astype(str), np.asarray(pred)[m], np.asarray(confidence, dtype=float)[m]
    mapping = hungarian_map(p, t)
    correct = np.array([mapping.get(v) == lab for v, lab in zip(p, t)], dtype=float)
    return {"confidence_ece": binned_ece(c, correct, bins), "mean_confidence": float(c.mean()),
            "matched_accuracy": float(correct.mean())}


def cross_seed_calibration(folders: list[str], cases: dict) -> list[dict]:
    """Label-free agreement between seeds: for each pyrospatial run (runner outputs
    ``{method}_{case}_s{seed}.json`` in ``folders``), the fraction of the *other* seeds' runs that
    give each spot the same domain (their labels Hungarian-matched to this run's), its mean, the
    run's mean confidence and the ECE of that confidence against the agreement. For single fits
    (``restarts=1``) the ECE is a calibration check that needs no labels; for pooled runs it is
    not (a pool's answer is steadier than one fit's), see ``benchmarks/domain_restarts.py``."""
    fits: dict[tuple[str, str], dict[int, dict]] = {}
    for method, names, seed, out in collect_outputs(folders, cases):
        for k, n in enumerate(names):
            fits.setdefault((method, n), {})[seed] = {"labels": np.asarray(out["labels"][k]).astype(str),
                                                      "confidence": np.asarray(out["confidence"][k], dtype=float)}
    rows = []
    for (method, n), by_seed in sorted(fits.items()):
        if len(by_seed) < 2:
            continue
        for seed, fit in sorted(by_seed.items()):
            agree = np.mean([matched_agreement(o["labels"], fit["labels"]) for s, o in by_seed.items() if s != seed],
                            axis=0)
            rows.append({"dataset": cases[n]["dataset"], "section": cases[n]["section"], "method": method, "seed": seed,
                         "cross_seed_ece": binned_ece(fit["confidence"], agree),
                         "mean_confidence": float(fit["confidence"].mean()), "mean_agreement": float(agree.mean())})
    return rows


# ------------------------------------------------------------------------------------------
# running one method in its own process
# ------------------------------------------------------------------------------------------
def interpreter(venv: str | None, prefix: str) -> tuple[str | None, str]:
    """The python of a method's environment, or (None, why it is not usable)."""
    if venv is None:
        return sys.executable, ""
    v = REPO / f"{prefix}-{venv}"
    py = v / "bin" / "python"
    if (v / ".installed").exists() and py.exists():
        return str(py), ""
    log = v / "install.log"
    if log.exists():
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip() and "is ignored" not in ln]
        tail = " | ".join(lines[-4:])[-600:]
        return None, f"not installed (make bench-env-domains failed): {tail}"
    return None, f"not installed: run `make bench-env-domains` ({v.name} missing)"


def run_process(cmd: list[str], log: Path, timeout: float) -> tuple[int, float, float]:
    """Run ``cmd`` (own process group), return (exit code, wall seconds, peak RSS MB); -9 on timeout."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                                     "OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
                                     "PYTHONPATH": str(PEERS), "MPLBACKEND": "Agg"})
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                code = os.waitstatus_to_exitcode(status)
                break
            if time.perf_counter() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                code = -9
                break
            time.sleep(0.5)
    proc.returncode = code
    return code, time.perf_counter() - t0, usage.ru_maxrss / 1024.0


def failure_reason(log: Path, code: int, timeout: float) -> str:
    if code == -9:
        return f"passed the time limit of {timeout:.0f} s"
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return f"exit {code}: " + " | ".join(lines[-3:])[-600:]


def run_method(method: str, inputs: list[str], n_domains: int, seed: int, work: Path, prefix: str,
               timeout: float) -> dict[str, Any]:
    """One run; returns {"finished", "reason", "out" (runner JSON), "seconds", "wall", "peak_rss_mb"}."""
    script, variant, venv, _ = METHODS[method]
    py, why = interpreter(venv, prefix)
    if py is None:
        return {"finished": False, "reason": why}
    tag = f"{method}_{'+'.join(Path(p).stem for p in inputs)}_s{seed}"
    out, log = work / f"{tag}.json", work / f"{tag}.log"
    cmd = [py, str(PEERS / script), "--input", *inputs, "--n-domains", str(n_domains), "--seed", str(seed),
           "--output", str(out), "--variant", variant]
    print(f"[{time.strftime('%H:%M:%S')}] {tag} ...", flush=True)
    code, wall, rss = run_process(cmd, log, timeout)
    if code != 0 or not out.exists():
        print(f"    failed: {failure_reason(log, code, timeout)}", flush=True)
        return {"finished": False, "reason": failure_reason(log, code, timeout), "wall": wall, "peak_rss_mb": rss}
    res = json.loads(out.read_text())
    print(f"    done in {res['seconds']:.1f} s (process {wall:.1f} s, {rss:.0f} MB)", flush=True)
    return {"finished": True, "reason": "", "out": res, "seconds": res["seconds"], "wall": wall, "peak_rss_mb": rss}


# ------------------------------------------------------------------------------------------
# cross-section agreement along pyrospatial.align
# ------------------------------------------------------------------------------------------
def alignment_pairs(cases: dict, seed: int = 0) -> dict[str, Any]:
    """Align 151673 onto 151674 with ``pyrospatial.align`` (log-normalised shared genes)."""
    import anndata as ad
    import scanpy as sc

    import pyrospatial as ps

    sides = []
    for s in DLPFC_SECTIONS:
        a = ad.read_h5ad(cases[f"dlpfc_{s}"]["path"])
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
        sides.append(a)
    t0 = time.perf_counter()
    res = ps.align(sides[0], sides[1], features="shared", seed=seed, progress=False)
    seconds = time.perf_counter() - t0
    p = res.match_prob.tocoo()
    best = np.asarray(res.match_prob.argmax(axis=1)).ravel()
    pmax = np.asarray(res.match_prob.max(axis=1).todense()).ravel()
    matched = pmax > np.asarray(res.p_unmatched)
    return {"rows": p.row, "cols": p.col, "w": p.data, "argmax": best, "matched": matched, "seconds": seconds,
            "angle_deg": float(res.transform["angle_deg"]["mean"])}


def agreement(pairs: dict, la: np.ndarray, lb: np.ndarray, remap: bool) -> dict[str, float]:
    """Match-probability-weighted same-label fraction (after mapping b's labels to a's when
    ``remap``) and the ARI between labels of argmax-matched pairs."""
    from sklearn.metrics import adjusted_rand_score

    ra, rb, w = la[pairs["rows"]], lb[pairs["cols"]], pairs["w"]
    if remap:
        mapping = hungarian_map(rb, ra, w)
        rb = np.array([mapping.get(v, -1) for v in rb])
    frac = float(np.sum(w * (ra == rb)) / np.sum(w))
    i = np.flatnonzero(pairs["matched"])
    ari = float(adjusted_rand_score(la[i], lb[pairs["argmax"][i]]))
    return {"label_agreement": frac, "pair_ari": ari}


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------
def key(r: dict) -> tuple:
    return (r["dataset"], r["section"], r["method"], r["seed"])


def load_previous(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {}


def summarise(records: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["section"], r["method"]), []).append(r)
    rows = []
    for (ds, sec, meth), rs in sorted(groups.items()):
        ok = [r for r in rs if r["finished"]]
        row = {"dataset": ds, "section": sec, "method": meth, "modalities": rs[0]["modalities"],
               "runs": len(rs), "finished": len(ok)}
        for f in ("ari", "nmi", "seconds", "peak_rss_mb", "confidence_ece"):
            vals = [r[f] for r in ok if r.get(f) is not None]
            if vals:
                row[f"{f}_mean"] = float(np.mean(vals))
                row[f"{f}_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        row["reason"] = "; ".join(sorted({r["reason"] for r in rs if r["reason"]}))[:300]
        rows.append(row)
    return rows


def fmt(row: dict, f: str, digits: int = 3) -> str:
    if f"{f}_mean" not in row:
        return "-"
    return f"{row[f'{f}_mean']:.{digits}f} ± {row[f'{f}_sd']:.{digits}f}"


def markdown(result: dict) -> str:
    rows = result["summary"]
    lines = ["# Domains benchmark (issue 19)", "", f"Command: `{result['command']}`", "",
             ("ARI / NMI over labelled spots or cells, mean ± sd over the seeds that finished; "
             "seconds = the method's own wall time on one thread; peak RSS = the process's peak "
             "resident memory. Every method gets the number of label classes as its number of "
             "domains (DLPFC 7, osmFISH 11)."), ""]
    for case in sorted({(r["dataset"], r["section"]) for r in rows}):
        lines += [f"## {case[0]} {case[1]}", "",
                  "| method | modalities | ARI | NMI | seconds | peak RSS MB | runs ok | note |",
                  "|---|---|---|---|---|---|---|---|"]
        sel = sorted([r for r in rows if (r["dataset"], r["section"]) == case],
                     key=lambda r: -r.get("ari_mean", -1))
        for r in sel:
            lines.append(f"| {r['method']} | {r['modalities']} | {fmt(r, 'ari')} | {fmt(r, 'nmi')} | "
                         f"{fmt(r, 'seconds', 1)} | {fmt(r, 'peak_rss_mb', 0)} | {r['finished']}/{r['runs']} | "
                         f"{r['reason']} |")
        lines.append("")
    if result.get("calibration"):
        lines += ["## Calibration of `domain_confidence` (pyrospatial)", "",
                  "| data set | section | method | ECE (10 bins) | mean confidence | matched accuracy |",
                  "|---|---|---|---|---|---|"]
        for c in result["calibration"]:
            lines.append(f"| {c['dataset']} | {c['section']} | {c['method']} | {c['confidence_ece']:.3f} ± "
                         f"{c['confidence_ece_sd']:.3f} | {c['mean_confidence']:.3f} | {c['matched_accuracy']:.3f} |")
        lines.append("")
    if result.get("cross_seed_calibration"):
        lines += ["## Agreement between the seeds' runs (no labels)", "",
                  ("For each pyrospatial run, the fraction of the other seeds' runs (labels Hungarian-matched to it) "
                   "that give a spot the same domain, beside the run's mean confidence. With the default restarts=3 "
                   "each run is a pool of 3 fits, so this measures how reproducible the pooled answer is, not the "
                   "calibration of its confidence: that is checked against single fits in "
                   "`benchmarks/results/domain_restarts.md`."), "",
                  "| data set | section | method | seeds | mean confidence | mean agreement with the other seeds |",
                  "|---|---|---|---|---|---|"]
        groups: dict[tuple, list[dict]] = {}
        for r in result["cross_seed_calibration"]:
            groups.setdefault((r["dataset"], r["section"], r["method"]), []).append(r)
        for (ds, sec, m), rs in sorted(groups.items()):
            lines.append(f"| {ds} | {sec} | {m} | {len(rs)} | {np.mean([r['mean_confidence'] for r in rs]):.3f} | "
                         f"{np.mean([r['mean_agreement'] for r in rs]):.3f} |")
        lines.append("")
    if result.get("cross_section"):
        cs = result["cross_section"]
        lines += ["## DLPFC 151673 vs 151674: joint vs separate fits, along `pyrospatial.align`", "",
                  f"Alignment: {cs['alignment']}; {cs.get('note', '')}", "",
                  "| fit | seed | label agreement (P-weighted) | ARI of matched pairs | mean ARI of the two sections |",
                  "|---|---|---|---|---|"]
        for r in cs["records"]:
            lines.append(f"| {r['fit']} | {r['seed']} | {r['label_agreement']:.3f} | {r['pair_ari']:.3f} | "
                         f"{r['mean_ari']:.3f} |")
        lines.append("")
    lines += ["## Targets", ""] + [f"- {t}" for t in result.get("targets", [])] + [""]
    lines += ["## Notes", ""] + [f"- {n}" for n in result.get("notes", [])] + [""]
    return "\n".join(lines)


def targets(result: dict) -> list[str]:
    rows = result["summary"]
    out = []
    peers = [m for m in METHODS if m not in PYROSPATIAL]
    for case in sorted({(r["dataset"], r["section"]) for r in rows}):
        sel = {r["method"]: r for r in rows if (r["dataset"], r["section"]) == case and "ari_mean" in r}
        best = max((sel[m] for m in peers if m in sel), key=lambda r: r["ari_mean"], default=None)
        ours = sel.get("pyrospatial")
        if best and ours:
            gap = ours["ari_mean"] - best["ari_mean"]
            out.append(f"{case[0]} {case[1]}: pyrospatial ARI {ours['ari_mean']:.3f} vs best peer "
                       f"{best['method']} {best['ari_mean']:.3f} ({'met' if gap >= 0 else f'missed by {-gap:.3f}'})")
    dl = [r["ari_mean"] for r in rows if r["dataset"] == "dlpfc" and r["method"] == "pyrospatial" and "ari_mean" in r]
    if len(dl) == 2:
        m = float(np.mean(dl))
        out.append(f"DLPFC mean ARI over the two sections {m:.3f} (target 0.55: "
                   f"{'met' if m >= 0.55 else f'missed by {0.55 - m:.3f}'})")
    for s in DLPFC_SECTIONS:
        sel = {r["method"]: r for r in rows if r["section"] == s and "ari_mean" in r}
        if "pyrospatial" in sel and "pyrospatial_no_morphology" in sel:
            d = sel["pyrospatial"]["ari_mean"] - sel["pyrospatial_no_morphology"]["ari_mean"]
            out.append(f"DLPFC {s}: morphology changes ARI by {d:+.3f} "
                       f"({'met' if d > 0 else 'missed'}: target an improvement)")
    cs = result.get("cross_section")
    if cs and cs.get("records"):
        j = [r["label_agreement"] for r in cs["records"] if r["fit"] == "joint"]
        s = [r["label_agreement"] for r in cs["records"] if r["fit"] == "separate"]
        if j and s:
            d = float(np.mean(j) - np.mean(s))
            out.append(f"cross-section label agreement joint {np.mean(j):.3f} vs separate {np.mean(s):.3f} "
                       f"({d:+.3f}; {'met' if d > 0 else 'missed'})")
    for c in result.get("calibration", []):
        if c["method"] == "pyrospatial":
            e = c["confidence_ece"]
            out.append(f"{c['dataset']} {c['section']}: confidence ECE {e:.3f} (target <= 0.05: "
                       f"{'met' if e <= 0.05 else f'missed by {e - 0.05:.3f}'})")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--datasets", nargs="+", default=["dlpfc", "osmfish"], choices=["dlpfc", "osmfish"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--venv-prefix", default=".bench-venv-domains")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run before it is killed")
    ap.add_argument("--slow-seconds", type=float, default=600.0,
                    help="a method whose first run takes longer is run with that one seed only")
    ap.add_argument("--work", default=None, help="folder for the prepared inputs and logs (default: a temp dir)")
    ap.add_argument("--fresh", action="store_true", help="drop the records of an earlier run instead of merging")
    ap.add_argument("--morphology", choices=["pyrospatial", "simple"], default="pyrospatial",
                    help="DLPFC image features: pyrospatial.image.add_image_features, or simple colour statistics")
    ap.add_argument("--cases", nargs="*", default=[], help="run only these cases (e.g. dlpfc_151674 osmfish_cortex)")
    ap.add_argument("--labels-from", nargs="*", default=[],
                    help="--work folders of other runs holding the separate pyrospatial fits' outputs")
    ap.add_argument("--collect", nargs="*", default=[],
                    help="--work folders whose pyrospatial runner outputs to score (runs finished outside this process)")
    ap.add_argument("--note", action="append", default=[], help="a note for the results (repeatable)")
    ap.add_argument("--merge", nargs="*", default=[],
                    help="domains.json files of other runs whose records to merge (a later file's records win)")
    ap.add_argument("--not-run", nargs="*", default=[], metavar="METHOD=REASON",
                    help="record the runs of METHOD that have no record yet as not run, with REASON")
    args = ap.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-domains-"))
    work.mkdir(parents=True, exist_ok=True)
    out_json = Path(args.out) / "domains.json"
    previous = {} if args.fresh else load_previous(out_json)
    records = {key(r): r for r in previous.get("records", [])}
    notes = dict(previous.get("notes_by_key", {}))
    calib_recs = {(c["dataset"], c["section"], c["method"], c["seed"]): c for c in previous.get("calibration_records", [])}
    for other in args.merge:  # results of runs made in parallel (other --out folders)
        prev = load_previous(Path(other))
        records.update({key(r): r for r in prev.get("records", [])})
        notes.update(prev.get("notes_by_key", {}))
        calib_recs.update({(c["dataset"], c["section"], c["method"], c["seed"]): c
                           for c in prev.get("calibration_records", [])})
        if prev.get("cross_section"):  # later files win, as for the records
            previous["cross_section"] = prev["cross_section"]
    pyro_labels: dict[tuple, np.ndarray] = {}

    cases = prepare(work, args.datasets, args.morphology)
    for name, case in cases.items():
        if args.cases and name not in args.cases:
            continue
        for method in args.methods:
            if method == "pyrospatial_joint":
                continue
            if method == "pyrospatial_no_morphology" and case["morphology"] is None:
                continue
            modalities = METHODS[method][3]
            if case["morphology"] is None:
                modalities = modalities.replace("+morphology", "").replace("+histology", "")
            for i, seed in enumerate(args.seeds):
                base = {"dataset": case["dataset"], "section": case["section"], "method": method, "seed": seed,
                        "modalities": modalities, "n_domains": case["n_domains"]}
                if method == "aestetik" and case["morphology"] is None:
                    records[key(base)] = {**base, "ari": None, "nmi": None, "seconds": None, "peak_rss_mb": None,
                                          "finished": False, "reason": "not run: AESTETIK needs a morphology "
                                          "modality and a spot grid; osmFISH has neither"}
                    continue
                r = run_method(method, [case["path"]], case["n_domains"], seed, work, args.venv_prefix, args.timeout)
                rec = {**base, "ari": None, "nmi": None, "seconds": r.get("seconds"),
                       "peak_rss_mb": r.get("peak_rss_mb"), "finished": r["finished"], "reason": r["reason"],
                       "process_seconds": r.get("wall")}
                if r["finished"]:
                    pred = np.asarray(r["out"]["labels"][0])
                    rec.update(scores(pred, case["labels"]))
                    rec["n_domains_found"] = len(np.unique(pred))
                    if method in PYROSPATIAL:
                        pyro_labels[(name, method, seed)] = pred
                        c = confidence_ece(pred, np.asarray(r["out"]["confidence"][0]), case["labels"])
                        calib_recs[(case["dataset"], case["section"], method, seed)] = {
                            "dataset": case["dataset"], "section": case["section"], "method": method, "seed": seed, **c}
                        rec["confidence_ece"] = c["confidence_ece"]
                records[key(rec)] = rec
                write_partial(out_json, records, calib_recs, notes)
                if i == 0 and r["finished"] and r["seconds"] > args.slow_seconds and len(args.seeds) > 1:
                    notes[f"{method}/{name}"] = (f"{method} on {name}: first run took {r['seconds']:.0f} s > "
                                                 f"{args.slow_seconds:.0f} s, so one seed only (2 shared cores)")
                    for s in args.seeds[1:]:
                        records.pop(key({**base, "seed": s}), None)
                    break
                if not r["finished"] and i == 0:
                    for s in args.seeds[1:]:
                        records[key({**base, "seed": s})] = {**rec, "seed": s, "reason": "not run: seed 0 " + rec["reason"][:200]}
                    break

    for item in args.not_run:  # METHOD=REASON: record the runs a time budget left out, not drop them
        method, _, why = item.partition("=")
        for name, case in cases.items():
            if method in ("pyrospatial_no_morphology", "pyrospatial_joint") and case["morphology"] is None:
                continue
            reason = why
            if method == "aestetik" and case["morphology"] is None:
                reason = "AESTETIK needs a morphology modality and a spot grid; osmFISH has neither"
            for seed in args.seeds:
                base = {"dataset": case["dataset"], "section": case["section"], "method": method, "seed": seed}
                if key(base) not in records:
                    mods = METHODS[method][3]
                    if case["morphology"] is None:
                        mods = mods.replace("+morphology", "").replace("+histology", "")
                    records[key(base)] = {**base, "modalities": mods, "n_domains": case["n_domains"],
                                          "ari": None, "nmi": None, "seconds": None, "peak_rss_mb": None,
                                          "finished": False, "reason": f"not run: {reason}"}

    collected = collect_outputs(args.collect, cases)
    for method, names, seed, out in collected:
        for k, n in enumerate(names):
            case = cases[n]
            base = {"dataset": case["dataset"], "section": case["section"], "method": method, "seed": seed,
                    "modalities": METHODS[method][3], "n_domains": case["n_domains"]}
            if records.get(key(base), {}).get("finished"):
                continue
            pred = np.asarray(out["labels"][k])
            c = confidence_ece(pred, np.asarray(out["confidence"][k]), case["labels"])
            records[key(base)] = {**base, **scores(pred, case["labels"]), "seconds": out["seconds"],
                                  "peak_rss_mb": None, "finished": True, "reason": "", "confidence_ece": c["confidence_ece"],
                                  "n_domains_found": len(np.unique(pred)),
                                  "note": "finished after the benchmark process that started it was stopped "
                                          "(to leave the 2 shared cores to it); peak RSS not measured"}
            calib_recs[(case["dataset"], case["section"], method, seed)] = {
                "dataset": case["dataset"], "section": case["section"], "method": method, "seed": seed, **c}

    cross = previous.get("cross_section")
    joint = {seed: out for method, names, seed, out in collected if method == "pyrospatial_joint"}
    if joint and not (cross and cross.get("records")):
        cross = cross_from_outputs(cases, joint, collected, records)
    if "pyrospatial_joint" in args.methods and all(f"dlpfc_{s}" in cases for s in DLPFC_SECTIONS):
        cross = cross_section(cases, args, work, records, calib_recs, pyro_labels)
        write_partial(out_json, records, calib_recs, notes)

    recs = sorted(records.values(), key=lambda r: (r["dataset"], r["section"], r["method"], r["seed"]))
    calib = summarise_calibration(list(calib_recs.values()))
    result = {"command": command_line("domains.py", argv), "records": recs, "summary": summarise(recs),
              "calibration": calib, "calibration_records": list(calib_recs.values()), "cross_section": cross,
              "notes_by_key": notes,
              "settings": {"seeds": args.seeds, "timeout_s": args.timeout, "slow_seconds": args.slow_seconds,
                           "cases": {n: {k: v for k, v in c.items() if k not in ("labels", "path")}
                                     for n, c in cases.items()}}}
    result["cross_seed_calibration"] = cross_seed_calibration([str(work), *args.labels_from, *args.collect], cases)
    result["targets"] = targets(result)
    result["notes"] = base_notes() + sorted(notes.values()) + list(args.note)
    write_results(args.out, "domains", result, markdown(result))


def base_notes() -> list[str]:
    return [
        "Number of domains = number of label classes for every method (DLPFC 7 layers, osmFISH 11 regions).",
        ("Peers run with their published defaults for these data where they have them (see each runner's "
        "docstring); GraphST and STAGATE cluster with Leiden (resolution searched to K) instead of R's mclust, "
        "which needs R (not installed), so their ARIs may be below their papers'."),
        ("DLPFC genes: the intersection of the two sections' top-5000 genes (the only genes shipped), not the "
        "full transcriptome the published DLPFC numbers use."),
        ("The only image is the 600 x 600 lowres H&E (~4 px per spot): histology features are coarse for "
        "SpaGCN, AESTETIK and pyrospatial alike."),
    ]


def summarise_calibration(recs: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for c in recs:
        groups.setdefault((c["dataset"], c["section"], c["method"]), []).append(c)
    out = []
    for (ds, sec, m), cs in sorted(groups.items()):
        e = [c["confidence_ece"] for c in cs]
        out.append({"dataset": ds, "section": sec, "method": m, "confidence_ece": float(np.mean(e)),
                    "confidence_ece_sd": float(np.std(e, ddof=1)) if len(e) > 1 else 0.0,
                    "mean_confidence": float(np.mean([c["mean_confidence"] for c in cs])),
                    "matched_accuracy": float(np.mean([c["matched_accuracy"] for c in cs])), "seeds": len(cs)})
    return out


def write_partial(path: Path, records: dict, calib: dict, notes: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.json")
    tmp.write_text(json.dumps({"records": list(records.values()), "calibration_records": list(calib.values()),
                               "notes_by_key": notes}, indent=1, default=float))


def collect_outputs(folders: list[str], cases: dict) -> list[tuple[str, list[str], int, dict]]:
    """Runner outputs ``{method}_{case[+case]}_s{seed}.json`` of pyrospatial runs found in ``folders``."""
    found = []
    for d in folders:
        for f in sorted(Path(d).glob("pyrospatial*_s*.json")):
            stem = f.stem
            method = next((m for m in sorted(PYROSPATIAL, key=len, reverse=True) if stem.startswith(m + "_")), None)
            if method is None:
                continue
            names_part, _, seed = stem[len(method) + 1:].rpartition("_s")
            names = names_part.split("+")
            if all(n in cases for n in names) and seed.isdigit():
                found.append((method, names, int(seed), json.loads(f.read_text())))
    return found


def cross_from_outputs(cases: dict, joint: dict, collected: list, records: dict) -> dict:
    """Cross-section agreement from joint and separate fits run earlier (their runner outputs)."""
    names = [f"dlpfc_{s}" for s in DLPFC_SECTIONS]
    sep = {(n, seed): np.asarray(out["labels"][0]) for m, ns, seed, out in collected if m == "pyrospatial" for n in ns}
    pairs = alignment_pairs(cases)
    out = {"alignment": f"pyrospatial.align 151673 -> 151674 (shared genes, seed 0): {pairs['seconds']:.1f} s, "
                        f"angle {pairs['angle_deg']:.1f} deg, {int(pairs['matched'].sum())} of "
                        f"{len(pairs['matched'])} spots matched", "records": []}
    ta, tb = (np.array([str(v) for v in cases[n]["labels"]]) for n in names)
    out["layers_along_alignment"] = agreement(pairs, ta, tb, remap=False)
    for seed, res in sorted(joint.items()):
        a = agreement(pairs, np.asarray(res["labels"][0]), np.asarray(res["labels"][1]), remap=False)
        out["records"].append({"fit": "joint", "seed": seed, **a, "mean_ari": float(np.mean(
            [records[("dlpfc", s, "pyrospatial_joint", seed)]["ari"] for s in DLPFC_SECTIONS]))})
        if all((n, seed) in sep for n in names):
            a = agreement(pairs, sep[(names[0], seed)], sep[(names[1], seed)], remap=True)
            out["records"].append({"fit": "separate", "seed": seed, **a, "mean_ari": float(np.mean(
                [records[("dlpfc", s, "pyrospatial", seed)]["ari"] for s in DLPFC_SECTIONS]))})
    la = out["layers_along_alignment"]
    out["note"] = (f"manual layers along the same alignment: label agreement {la['label_agreement']:.3f}, "
                   f"pair ARI {la['pair_ari']:.3f} (the ceiling)")
    return out


def separate_labels(folders: list[str], name: str, seed: int) -> np.ndarray | None:
    """Labels of a separate pyrospatial fit run by another invocation (its runner's output JSON)."""
    for d in folders:
        f = Path(d) / f"pyrospatial_{name}_s{seed}.json"
        if f.exists():
            return np.asarray(json.loads(f.read_text())["labels"][0])
    return None


def cross_section(cases: dict, args, work: Path, records: dict, calib_recs: dict, pyro_labels: dict) -> dict:
    """Joint fits of the two DLPFC sections, their per-section scores, and the agreement of joint
    and separate fits' labels along the alignment."""
    names = [f"dlpfc_{s}" for s in DLPFC_SECTIONS]
    pairs = alignment_pairs(cases)
    out = {"alignment": f"pyrospatial.align 151673 -> 151674 (shared genes, seed 0): {pairs['seconds']:.1f} s, "
                        f"angle {pairs['angle_deg']:.1f} deg, {int(pairs['matched'].sum())} of "
                        f"{len(pairs['matched'])} spots matched", "records": []}
    truth = [cases[n]["labels"] for n in names]
    # the manual layers themselves along the alignment: the ceiling of any method's agreement
    ta, tb = (np.array([str(v) for v in t]) for t in truth)
    out["layers_along_alignment"] = agreement(pairs, ta, tb, remap=False)
    for seed in args.seeds:
        r = run_method("pyrospatial_joint", [cases[n]["path"] for n in names], cases[names[0]]["n_domains"], seed,
                       work, args.venv_prefix, args.timeout)
        labs = []
        for k, n in enumerate(names):
            case = cases[n]
            base = {"dataset": "dlpfc", "section": case["section"], "method": "pyrospatial_joint", "seed": seed,
                    "modalities": METHODS["pyrospatial_joint"][3], "n_domains": case["n_domains"]}
            rec = {**base, "ari": None, "nmi": None, "seconds": r.get("seconds"), "peak_rss_mb": r.get("peak_rss_mb"),
                   "finished": r["finished"], "reason": r["reason"], "process_seconds": r.get("wall")}
            if r["finished"]:
                pred = np.asarray(r["out"]["labels"][k])
                rec.update(scores(pred, case["labels"]))
                c = confidence_ece(pred, np.asarray(r["out"]["confidence"][k]), case["labels"])
                rec["confidence_ece"] = c["confidence_ece"]
                calib_recs[("dlpfc", case["section"], "pyrospatial_joint", seed)] = {
                    "dataset": "dlpfc", "section": case["section"], "method": "pyrospatial_joint", "seed": seed, **c}
                labs.append(pred)
            records[key(rec)] = rec
        if len(labs) == 2:
            a = agreement(pairs, labs[0], labs[1], remap=False)
            out["records"].append({"fit": "joint", "seed": seed, **a, "mean_ari": float(np.mean(
                [records[("dlpfc", s, "pyrospatial_joint", seed)]["ari"] for s in DLPFC_SECTIONS]))})
        sep = [pyro_labels.get((n, "pyrospatial", seed), separate_labels(args.labels_from, n, seed)) for n in names]
        if all(s is not None for s in sep):
            a = agreement(pairs, sep[0], sep[1], remap=True)
            out["records"].append({"fit": "separate", "seed": seed, **a, "mean_ari": float(np.mean(
                [records[("dlpfc", s, "pyrospatial", seed)]["ari"] for s in DLPFC_SECTIONS]))})
    la = out["layers_along_alignment"]
    out["note"] = (f"manual layers along the same alignment: label agreement {la['label_agreement']:.3f}, "
                   f"pair ARI {la['pair_ari']:.3f} (the ceiling)")
    return out


if __name__ == "__main__":
    main()
