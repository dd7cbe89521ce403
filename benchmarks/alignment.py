"""Alignment benchmark: pyrospatial.align against PASTE, moscot and POT fused Gromov-Wasserstein.

    python benchmarks/alignment.py [--quick] --out DIR        (make bench-alignment)

Run it with the peer environment's python (``make bench-env-align`` builds
``.bench-venv-align``: CPU torch, paste-bio, moscot, POT and pyrospatial itself); a method
whose package is missing is recorded as not run with the reason.

Cases (one JSON record per run; see ``--help`` and the settings block of the output):

``stahl_sim``
    PASTE's published simulation on the four Ståhl breast-cancer sections
    (``shared/data/paste_stahl_bc``): the section's spot coordinates are rotated by pi/3 about
    (15, 15) and moved to the nearest node of a 40 x 40 integer grid (spots landing on an
    occupied node are dropped), then the counts are resampled: per-spot totals from a negative
    binomial with the section's mean and variance of totals, genes from a multinomial with
    probabilities proportional to counts + pseudocount (0..5). The original section is aligned
    to the simulated one (genes intersected); accuracy = coupling mass on the true spot pairs,
    with each method's coupling scaled so that a row (an original spot) carries 1/n
    (so the best possible accuracy is the fraction of spots kept, ~0.87, as in the paper).
``stahl_real``
    The consecutive real pairs 1-2, 2-3, 3-4. No truth: spots of both sections are clustered
    together (k-means, 5 clusters, on the joint principal components of the shared genes) and
    accuracy = fraction of coupling mass between spots of the same cluster.
``scaling``
    Two views of a tissue simulated by ``pyrospatial.data.sim.simulate_tissue`` (see
    ``pyrospatial.methods.alignment.simulate_pair``: 10% of cells dropped, rotation 0.5 rad,
    translation, jitter, feature noise), with N cells per side. Every method runs in its own
    process with a wall-time limit; a method that fails or passes the limit at one size is
    not run at larger sizes (recorded with ``finished: false`` and the reason).

Reference (``--methods expression_emd``, not a peer: never a target's "best peer"): exact OT on
the distances of 30 joint principal components alone, the coordinates never read; on the
labelled real pairs it shows how much of the label-mass score expression alone earns.

Seconds are wall time of the alignment call (data preparation included, process start-up
excluded) on one thread (``OMP_NUM_THREADS=1``); ``peak_mem_mb`` is the worker process's peak
resident memory during the run (Linux ``VmHWM``, reset before each run), libraries included.
For pyrospatial also ``match_ece`` (expected calibration error, 10 bins, of the probability of
each spot's most probable outcome, a partner or "unmatched", against the truth) and
``angle_covered`` (true angle inside the 90% interval).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

METHODS = ("pyrospatial", "paste", "moscot", "pot_fgw")
#: references, not peers (never the "best peer" of a target; run them with --methods): what the
#: label-mass metric gives a coupling that ignores the coordinates altogether
REFERENCES = ("expression_emd",)
PSEUDOCOUNTS = (0, 1, 2, 3, 4, 5)
STAHL_ANGLE = math.pi / 3


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------
def shared_folder(name: str) -> Path:
    """``shared/data/NAME``, or exit saying how to point at it."""
    from pyrospatial.data.datasets import shared_data_dir

    root = shared_data_dir()
    if root is None or not (root / name).is_dir():
        raise SystemExit(f"shared data folder {name} not found (set PYROSPATIAL_SHARED_DATA)")
    return root / name


def stahl_dir() -> Path:
    return shared_folder("paste_stahl_bc")


def load_stahl(i: int):
    import anndata as ad
    import pandas as pd

    d = stahl_dir()
    X = pd.read_csv(d / f"slice{i}.csv.gz", index_col=0)
    a = ad.AnnData(X.to_numpy(dtype=np.float32), obs=pd.DataFrame(index=[f"s{i}_{k}" for k in range(len(X))]),
                   var=pd.DataFrame(index=X.columns.astype(str)))
    a.var_names_make_unique()
    a.obsm["spatial"] = np.loadtxt(d / f"slice{i}_coor.csv", delimiter=",")
    return a


def rotate_to_grid(xy: np.ndarray, angle: float, grid_size: int = 40, centre: float = 15.0):
    """PASTE's spatial perturbation: rotate about (centre, centre), snap to the integer grid,
    keep the first spot per node. Returns (new coordinates, indices of kept spots)."""
    R = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    rotated = (xy - centre) @ R.T + centre
    snapped = np.clip(np.rint(rotated), 0, grid_size - 1)
    _, first = np.unique(snapped, axis=0, return_index=True)
    kept = np.sort(first)
    return snapped[kept], kept


def resample_counts(X: np.ndarray, pseudocount: float, rng: np.random.Generator) -> np.ndarray:
    """Totals ~ NB(mean, var of the section's totals); genes ~ Multinomial(total, (X + pc) / sum)."""
    totals = X.sum(1)
    mean, var = totals.mean(), totals.var()
    r, p = mean**2 / (var - mean), mean / var
    n = rng.negative_binomial(r, p, size=len(totals)).astype(np.int64)
    n[n == 0] = 1
    alpha = X.astype(np.float64) + pseudocount
    alpha /= alpha.sum(1, keepdims=True)
    return np.stack([rng.multinomial(n[i], alpha[i]) for i in range(len(n))]).astype(np.float32)


def stahl_sim_pair(slice_id: int, pseudocount: float, run: int):
    """(original, simulated, truth) with truth[i] = row of the simulated spot of original spot i or -1."""
    a = load_stahl(slice_id)
    rng = np.random.default_rng([slice_id, int(pseudocount), run])
    xy, kept = rotate_to_grid(a.obsm["spatial"], STAHL_ANGLE)
    b = a[kept].copy()
    b.obs_names = [f"sim_{k}" for k in range(len(kept))]
    b.obsm["spatial"] = xy
    b.X = resample_counts(np.asarray(a.X)[kept], pseudocount, rng)
    truth = -np.ones(a.n_obs, dtype=np.int64)
    truth[kept] = np.arange(len(kept))
    return a, b, truth


def shared_genes(a, b):
    genes = [g for g in a.var_names if g in set(b.var_names)]
    return a[:, genes].copy(), b[:, genes].copy()


DLPFC_PAIR = ("151673", "151674")


def load_dlpfc(section: str):
    """One DLPFC Visium section (``shared/data/dlpfc_visium``) with its manual layer labels,
    restricted to the labelled spots (``obs["layer"]``; full-resolution pixel coordinates)."""
    import anndata as ad
    import pandas as pd
    import scipy.io

    from pyrospatial.data.datasets import shared_data_dir

    root = shared_data_dir()
    if root is None or not (root / "dlpfc_visium").is_dir():
        raise SystemExit("shared data folder dlpfc_visium not found (set PYROSPATIAL_SHARED_DATA)")
    d = root / "dlpfc_visium"
    X = scipy.io.mmread(d / section / "counts.mtx.gz").tocsr().astype(np.float32)
    bc = pd.read_csv(d / section / "barcodes.tsv", header=None)[0].astype(str).to_numpy()
    genes = pd.read_csv(d / section / "genes.tsv", header=None)[0].astype(str).to_numpy()
    pos = pd.read_csv(d / section / "tissue_positions_list.txt", header=None, index_col=0,
                      names=["barcode", "in_tissue", "array_row", "array_col", "pxl_row", "pxl_col"]).loc[bc]
    lab = pd.read_csv(d / "barcode_level_layer_map.tsv", sep="\t", header=None, names=["barcode", "sample", "layer"])
    layer = lab[lab["sample"] == int(section)].set_index("barcode")["layer"].reindex(bc)
    a = ad.AnnData(X=X, obs=pd.DataFrame({"layer": layer.to_numpy(dtype=object)}, index=bc),
                   var=pd.DataFrame(index=genes))
    a.obsm["spatial"] = pos[["pxl_col", "pxl_row"]].to_numpy().astype(np.float64)
    keep = a.obs["layer"].notna().to_numpy()
    return a[keep].copy()


def joint_clusters(a, b, k: int = 5, seed: int = 0):
    from sklearn.cluster import KMeans

    from pyrospatial.methods.alignment_features import prepare_features

    za, zb, _, _ = prepare_features(a, b, features="shared", n_components=20, seed=seed)
    labels = KMeans(k, n_init=10, random_state=seed).fit_predict(np.vstack([za, zb]))
    return labels[: a.n_obs], labels[a.n_obs:]


# ------------------------------------------------------------------------------------------
# methods: each returns (coupling as dense or sparse (n_a, n_b) with rows carrying <= 1/n_a, extras)
# ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def paste_pot_compat():
    """POT 0.9.7's conditional-gradient solver calls the line search with one more positional
    argument (``df_G``) than PASTE 1.4's line-search functions accept; drop it (benchmark only)."""
    import ot

    original = ot.optim.cg

    def cg(a, b, M, reg, f, df, G0=None, line_search=None, *args, **kwargs):
        if line_search is not None:
            inner = line_search

            def line_search(cost, G, deltaG, Mi, cost_G, df_G=None, **kw):  # noqa: F811
                return inner(cost, G, deltaG, Mi, cost_G, **kw)

        return original(a, b, M, reg, f, df, G0, line_search, *args, **kwargs)

    ot.optim.cg = cg
    try:
        yield
    finally:
        ot.optim.cg = original


def run_paste(a, b, **_):
    import paste

    with paste_pot_compat():
        G = paste.pairwise_align(a, b, alpha=0.1, backend=__import__("ot").backend.NumpyBackend(), verbose=False)
    return np.asarray(G), {}


def run_moscot(a, b, **_):
    import anndata as ad
    from moscot.problems.space import AlignmentProblem

    joint = ad.concat({"a": a, "b": b}, label="batch", index_unique="-")
    joint.obs["batch"] = joint.obs["batch"].astype("category")
    import scanpy as sc

    sc.pp.normalize_total(joint)
    sc.pp.log1p(joint)
    sc.pp.pca(joint, n_comps=min(30, joint.n_vars - 1, joint.n_obs - 1))
    ap = AlignmentProblem(joint).prepare(batch_key="batch", joint_attr="X_pca", policy="sequential")
    ap = ap.solve()
    sol = next(iter(ap.solutions.values()))
    G = np.asarray(sol.transport_matrix)
    return G / G.sum(), {}


def run_pot_fgw(a, b, **_):
    import ot
    from scipy.spatial.distance import cdist

    from pyrospatial.methods.alignment_features import prepare_features

    za, zb, _, _ = prepare_features(a, b, features="shared", n_components=30)
    M = cdist(za, zb)
    C1 = cdist(a.obsm["spatial"], a.obsm["spatial"])
    C2 = cdist(b.obsm["spatial"], b.obsm["spatial"])
    p, q = ot.unif(a.n_obs), ot.unif(b.n_obs)
    G = ot.gromov.fused_gromov_wasserstein(M / M.max(), C1 / C1.max(), C2 / C2.max(), p, q, loss_fun="square_loss",
                                           alpha=0.5)
    return np.asarray(G), {}


def run_pyrospatial(a, b, *, quick: bool = False, labels_b: np.ndarray | None = None, **_):
    from pyrospatial.methods.alignment import align

    label_keys = None
    if labels_b is not None:  # b is the reference: its labels are transferred to a (a's are never seen)
        b = b.copy()
        b.obs["bench_label"] = np.asarray(labels_b).astype(str)
        label_keys = ["bench_label"]
    res = align(a, b, features="shared" if len(set(a.var_names) & set(b.var_names)) >= 2 else "separate",
                num_samples=20 if quick else 30, progress=False, seed=0, label_keys=label_keys)
    extras = {"angle_q05": res.transform["angle"]["q05"], "angle_q95": res.transform["angle"]["q95"],
              "angle_mean": res.transform["angle"]["mean"], "best": np.asarray(res.match_prob.argmax(1)).ravel(),
              "best_p": np.asarray(res.match_prob.max(1).todense()).ravel(), "p_unmatched": res.p_unmatched,
              "sigma_xy_spacings": res.settings["sigma_xy"] / res.settings["unit"], "power": res.settings["power"],
              "p_unmatched_mean": float(np.mean(res.p_unmatched))}
    if label_keys:
        probs = res.adata.obsm["align_bench_label_probs"]
        extras["label_probs"], extras["label_categories"] = probs.to_numpy(), np.asarray(probs.columns)
    return (res.match_prob / a.n_obs).tocsr(), extras


def run_expression_emd(a, b, **_):
    """Reference: exact OT (``ot.emd``, uniform masses) on the distances of 30 joint principal
    components alone, as POT FGW's feature cost, the coordinates never read. On pairs labelled
    by expression clusters it shows how much of a label-mass score expression alone earns."""
    import ot
    from scipy.spatial.distance import cdist

    from pyrospatial.methods.alignment_features import prepare_features

    za, zb, _, _ = prepare_features(a, b, features="shared", n_components=30)
    M = cdist(za, zb)
    return np.asarray(ot.emd(ot.unif(a.n_obs), ot.unif(b.n_obs), M / M.max())), {}


RUNNERS = {"pyrospatial": run_pyrospatial, "paste": run_paste, "moscot": run_moscot, "pot_fgw": run_pot_fgw,
           "expression_emd": run_expression_emd}


# ------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------
def mass_on_pairs(G, rows: np.ndarray, cols: np.ndarray) -> float:
    if hasattr(G, "tocsr"):
        return float(np.asarray(G.tocsr()[rows, cols]).sum())
    return float(np.asarray(G)[rows, cols].sum())


def truth_accuracy(G, truth: np.ndarray) -> float:
    i = np.flatnonzero(truth >= 0)
    return mass_on_pairs(G, i, truth[i])


def top1_accuracy(G, truth: np.ndarray) -> float:
    """Fraction of kept spots whose row maximum of the coupling is the true partner."""
    best = np.asarray(G.argmax(axis=1)).ravel()
    i = np.flatnonzero(truth >= 0)
    return float((best[i] == truth[i]).mean())


def neighbour_label_agreement(xy: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of adjacent spot pairs of one section (0.5-1.5 of its median nearest-neighbour
    spacing apart) that share a label: about the label mass of a coupling that places every spot
    one spacing off, i.e. how fast the labels change from spot to spot."""
    from scipy.spatial import cKDTree

    tree = cKDTree(xy)
    unit = float(np.median(tree.query(xy, k=2)[0][:, 1]))
    pairs = tree.query_pairs(1.5 * unit, output_type="ndarray")
    pairs = pairs[np.linalg.norm(xy[pairs[:, 0]] - xy[pairs[:, 1]], axis=1) > 0.5 * unit]
    labels = np.asarray(labels)
    return float(np.mean(labels[pairs[:, 0]] == labels[pairs[:, 1]])) if len(pairs) else float("nan")


def label_agreement(G, la: np.ndarray, lb: np.ndarray) -> float:
    G = G.tocoo() if hasattr(G, "tocsr") else __import__("scipy.sparse", fromlist=["x"]).coo_matrix(np.asarray(G))
    same = la[G.row] == lb[G.col]
    total = G.data.sum()
    return float(G.data[same].sum() / total) if total > 0 else float("nan")


def match_ece(best: np.ndarray, best_p: np.ndarray, p_unmatched: np.ndarray, truth: np.ndarray, bins: int = 10) -> float:
    """ECE of the most probable outcome (a partner or unmatched) of each a cell."""
    pred_unmatched = p_unmatched > best_p
    conf = np.where(pred_unmatched, p_unmatched, best_p)
    correct = np.where(pred_unmatched, truth < 0, best == truth)
    return ece(conf, correct, bins)


def ece(conf: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: equal-width bins of ``conf``, mass-weighted |accuracy - confidence|
    (:func:`pyrospatial.criticism.calibration.expected_calibration_error`)."""
    from pyrospatial.criticism.calibration import expected_calibration_error

    return expected_calibration_error(conf, np.asarray(correct, dtype=np.float64), n_bins=bins)


def overconfidence(conf: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """One-sided ECE: the same 10 bins as :func:`ece`, mass-weighted ``max(0, confidence - accuracy)``
    (only the bins where the probability exceeds the observed frequency count)."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for k in range(bins):
        sel = which == k
        if sel.any():
            total += sel.mean() * max(0.0, conf[sel].mean() - correct[sel].astype(float).mean())
    return float(total)


def label_metrics(G, la: np.ndarray, lb: np.ndarray, label_probs: np.ndarray | None = None,
                  categories: np.ndarray | None = None) -> dict:
    """Calibration of a coupling against labels on both sides (the same for every method).

    The coupling is row-normalised (each a spot's distribution over b's spots given a
    partner). ``match_ece``: ECE of the best partner's probability against "the best partner
    has a's label"; ``label_transfer_accuracy`` and ``label_ece``: the transferred label
    (argmax of ``sum_j P_ij [l_j = c]``, or the method's own ``label_probs`` over
    ``categories``) and its probability against a's label. Rows without mass count as wrong
    with confidence 0.

    "The best partner has a's label" contains "the best partner is a's partner" (whenever
    the labels of true partners agree), so a best-match probability calibrated for the
    partner's identity lies at or below the agreement: ``match_ece`` mixes that expected
    gap (under-confidence for this event) with miscalibration. ``match_overconfidence`` is
    the one-sided part (bins where the best-match probability exceeds the agreement: the
    collapse of issue 20), ``best_label_ece`` the ECE of the probability of the best
    partner's label (``sum_j P_ij [l_j = l_best]``), the calibrated forecast of that event.
    """
    import scipy.sparse as sp

    P = G.tocsr() if sp.issparse(G) else sp.csr_matrix(np.asarray(G))
    rows = np.asarray(P.sum(1)).ravel()
    Pn = sp.diags(1.0 / np.maximum(rows, 1e-300)) @ P
    best = np.asarray(Pn.argmax(axis=1)).ravel()
    best_p = np.where(rows > 0, np.asarray(Pn.max(axis=1).todense()).ravel(), 0.0)
    agree = (la == lb[best]) & (rows > 0)
    if label_probs is None:
        categories, codes = np.unique(lb, return_inverse=True)
        onehot = sp.csr_matrix((np.ones(len(lb)), (np.arange(len(lb)), codes)), shape=(len(lb), len(categories)))
        label_probs = np.asarray((Pn @ onehot).todense())
    categories = np.asarray(categories).astype(str)
    pred = categories[label_probs.argmax(1)]
    conf = label_probs.max(1)
    hit = (pred == la.astype(str)) & (conf > 0)
    index = {c: i for i, c in enumerate(categories)}
    code_best = np.array([index.get(str(lab), -1) for lab in lb[best]])
    best_label_p = np.where((rows > 0) & (code_best >= 0),
                            label_probs[np.arange(len(best)), np.maximum(code_best, 0)], 0.0)
    return {"match_ece": ece(best_p, agree), "match_overconfidence": overconfidence(best_p, agree),
            "best_label_ece": ece(best_label_p, agree), "best_match_prob_mean": float(best_p.mean()),
            "best_match_agreement": float(agree.mean()), "label_transfer_accuracy": float(hit.mean()),
            "label_ece": ece(conf, hit), "label_prob_mean": float(conf.mean())}


# ------------------------------------------------------------------------------------------
# worker (one process per method and group of runs)
# ------------------------------------------------------------------------------------------
def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_mb() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_case(spec: dict):
    if spec["case"] == "stahl_sim":
        a, b, truth = stahl_sim_pair(spec["slice"], spec["noise"], spec["run"])
        a, b = shared_genes(a, b)
        return a, b, {"truth": truth, "true_angle": STAHL_ANGLE}
    if spec["case"] == "dlpfc":
        a, b = shared_genes(load_dlpfc(spec["slices"][0]), load_dlpfc(spec["slices"][1]))
        la, lb = a.obs["layer"].astype(str).to_numpy(), b.obs["layer"].astype(str).to_numpy()
        a.obs, b.obs = a.obs.drop(columns="layer"), b.obs.drop(columns="layer")
        return a, b, {"labels": (la, lb)}
    if spec["case"] == "stahl_real":
        a, b = shared_genes(load_stahl(spec["slices"][0]), load_stahl(spec["slices"][1]))
        la, lb = joint_clusters(a, b)
        return a, b, {"labels": (la, lb)}
    from pyrospatial.methods.alignment import simulate_pair

    a, b, truth = simulate_pair(spec["n_cells"], angle=0.5, translation=(40.0, -25.0), drop_fraction=0.1,
                                seed=spec.get("run", 0))
    return a, b, {"truth": truth, "true_angle": 0.5}


def worker(method: str, specs: list[dict], quick: bool, out_path: Path) -> None:
    with open(out_path, "a") as out:
        for spec in specs:
            record = {k: spec.get(k) for k in ("case", "noise", "slice", "slices", "run")}
            record.update({"method": method, "accuracy": None, "seconds": None, "peak_mem_mb": None,
                           "finished": False, "match_ece": None, "angle_covered": None})
            try:
                a, b, truth = make_case(spec)
                record["n_cells"] = int(a.n_obs)
                record["n_cells_b"] = int(b.n_obs)
                _reset_peak()
                start, cpu_start = time.perf_counter(), time.process_time()
                labels_b = truth["labels"][1] if "labels" in truth else None
                G, extras = RUNNERS[method](a, b, quick=quick, labels_b=labels_b)
                record["seconds"] = time.perf_counter() - start
                record["cpu_seconds"] = time.process_time() - cpu_start
                record["peak_mem_mb"] = _peak_mb()
                if "truth" in truth:
                    record["accuracy"] = truth_accuracy(G, truth["truth"])
                    record["top1_accuracy"] = top1_accuracy(G, truth["truth"])
                else:
                    la, lb = truth["labels"]
                    record["accuracy"] = label_agreement(G, la, lb)
                    record.update(label_metrics(G, la, lb, extras.get("label_probs"), extras.get("label_categories")))
                    if method in REFERENCES:  # a property of the pair, recorded once
                        record["b_neighbour_agreement"] = neighbour_label_agreement(b.obsm["spatial"], lb)
                    for key in ("sigma_xy_spacings", "power", "p_unmatched_mean"):
                        if key in extras:
                            record[key] = extras[key]
                if method == "pyrospatial":
                    record["angle_mean"] = extras["angle_mean"]
                    if "true_angle" in truth:
                        ang = truth["true_angle"]
                        record["angle_covered"] = bool(extras["angle_q05"] <= ang <= extras["angle_q95"])
                        record["match_ece"] = match_ece(extras["best"], extras["best_p"], extras["p_unmatched"],
                                                        truth["truth"])
                record["finished"] = True
            except Exception as error:  # noqa: BLE001 - a failure is a result
                record["error"] = f"{type(error).__name__}: {error}"[:500]
                record["traceback"] = traceback.format_exc()[-1500:]
            out.write(json.dumps(record) + "\n")
            out.flush()


# ------------------------------------------------------------------------------------------
# orchestration
# ------------------------------------------------------------------------------------------
def _available(method: str) -> str | None:
    module = {"pyrospatial": "pyrospatial", "paste": "paste", "moscot": "moscot", "pot_fgw": "ot",
              "expression_emd": "ot"}[method]
    try:
        __import__(module)
    except Exception as error:  # noqa: BLE001
        return f"{module} not importable: {type(error).__name__}: {error}"
    return None


def run_group(method: str, specs: list[dict], quick: bool, tmp: Path, timeout: float | None,
              mem_limit_gb: float) -> list[dict]:
    out_path = tmp / f"{method}_{abs(hash(json.dumps(specs))) % 10**8}.jsonl"
    out_path.unlink(missing_ok=True)
    job = tmp / f"job_{out_path.stem}.json"
    job.write_text(json.dumps({"method": method, "specs": specs, "quick": quick, "out": str(out_path),
                               "mem_limit_gb": mem_limit_gb}))
    reason = None
    try:
        subprocess.run([sys.executable, __file__, "--worker", str(job)], timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        reason = f"passed the {timeout:.0f} s limit"
    done = [json.loads(l) for l in out_path.read_text().splitlines()] if out_path.exists() else []
    for spec in specs[len(done):]:
        rec = {k: spec.get(k) for k in ("case", "noise", "slice", "slices", "run")}
        rec.update({"method": method, "n_cells": spec.get("n_cells"), "accuracy": None,
                    "seconds": timeout if reason else None, "peak_mem_mb": None, "finished": False,
                    "match_ece": None, "angle_covered": None,
                    "error": reason or "worker process died (killed, e.g. out of memory)"})
        done.append(rec)
    return done


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="1 run per level, 2 sections, scaling at 2k only")
    parser.add_argument("--runs", type=int, default=None, help="simulation runs per section and noise level")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sizes", default=None, help="scaling sizes, cells per side (comma separated)")
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds per scaling run")
    parser.add_argument("--dlpfc-time-limit", type=float, default=600.0,
                        help="wall seconds per DLPFC run (~3,600 spots a side)")
    parser.add_argument("--mem-limit-gb", type=float, default=12.0, help="address-space cap of a worker")
    parser.add_argument("--skip", default="", help="cases to skip (comma separated: stahl_sim, dlpfc, stahl_real, "
                        "scaling)")
    parser.add_argument("--name", default="alignment", help="stem of the output files (NAME.json, NAME.md)")
    parser.add_argument("--note", default=None, help="with --merge: settings['note'] of the merged file (how the "
                        "parts were run)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--collect", default=None,
                        help="write --out/alignment.json from the finished runs of a stopped run whose output folder "
                             "is given here; its remaining runs are recorded as not run")
    parser.add_argument("--merge", nargs="+", default=None,
                        help="combine alignment.json files of partial runs (e.g. --skip scaling and "
                             "--skip stahl_sim,stahl_real run side by side) into --out")
    args = parser.parse_args(argv)

    if args.worker:
        job = json.loads(Path(args.worker).read_text())
        import resource

        limit = int(job["mem_limit_gb"] * 2**30)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        worker(job["method"], job["specs"], job["quick"], Path(job["out"]))
        return 0

    from tqdm.auto import tqdm

    out = Path(args.out)
    if args.collect:
        tmp_dir = Path(args.collect) / "_alignment_tmp"
        results = []
        for job_path in sorted(tmp_dir.glob("job_*.json")):
            job = json.loads(job_path.read_text())
            done_path = Path(job["out"])
            done = [json.loads(l) for l in done_path.read_text().splitlines()] if done_path.exists() else []
            for spec in job["specs"][len(done):]:
                rec = {k: spec.get(k) for k in ("case", "noise", "slice", "slices", "run")}
                rec.update({"method": job["method"], "n_cells": spec.get("n_cells"), "accuracy": None, "seconds": None,
                            "peak_mem_mb": None, "finished": False, "match_ece": None, "angle_covered": None,
                            "error": "no result: its worker process was stopped (the per-run wall-time limit "
                                     "of a scaling run, or the benchmark's overall time budget) before it finished"})
                done.append(rec)
            results += done
        for r in results:
            r.pop("traceback", None)
        payload = {"settings": {"collected_from_stopped_run": True, "methods": sorted({r["method"] for r in results})},
                   "results": results}
        out.mkdir(parents=True, exist_ok=True)
        (out / "alignment.json").write_text(json.dumps(payload, indent=1, default=float))
        print(markdown(payload))
        return 0
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        settings = dict(max(parts, key=lambda p: len(p["settings"]))["settings"])
        settings["merged_from"] = [dict(p["settings"], skip=p["settings"].get("skip")) for p in parts]
        if args.note:
            settings["note"] = args.note
        # the same run (case, method, noise, slice, pair, size) may appear in several parts (e.g. a
        # method run side by side in its own process): keep the first finished record of each
        merged: dict = {}
        for r in (r for p in parts for r in p["results"]):
            key = (r["case"], r["method"], r.get("noise"), r.get("slice"), str(r.get("slices")),
                   r.get("n_cells") if r["case"] == "scaling" else None, r.get("run"))
            if key not in merged or (r["finished"] and not merged[key]["finished"]):
                merged[key] = r
        payload = {"settings": settings, "results": list(merged.values())}
        out.mkdir(parents=True, exist_ok=True)
        (out / "alignment.json").write_text(json.dumps(payload, indent=1, default=float))
        (out / "alignment.md").write_text(markdown(payload))
        print(markdown(payload))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "_alignment_tmp"
    tmp.mkdir(exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    runs = args.runs or (1 if args.quick else 3)
    slices = (1, 2) if args.quick else (1, 2, 3, 4)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([2000] if args.quick else [2000, 10000, 30000])
    skip = set(filter(None, args.skip.split(",")))
    settings = {
        "quick": args.quick, "runs_per_level": runs, "stahl_slices": list(slices), "pseudocounts": list(PSEUDOCOUNTS),
        "rotation": "pi/3 about (15, 15), snapped to a 40x40 grid", "scaling_sizes": sizes,
        "scaling_time_limit_s": args.time_limit, "dlpfc_time_limit_s": args.dlpfc_time_limit, "worker_address_space_limit_gb": args.mem_limit_gb,
        "threads": 1, "skip": sorted(skip), "paste": "pairwise_align(alpha=0.1), numpy backend, POT 0.9.7 line-search wrapper",
        "moscot": "AlignmentProblem defaults (joint_attr=X_pca of log1p-normalised counts, 30 PCs)",
        "pot_fgw": "ot.gromov.fused_gromov_wasserstein(alpha=0.5, square loss), M = distances of 30 joint PCs, "
                   "C = spatial distances, each / max",
        "pyrospatial": "align(features='shared', num_samples=30) (API defaults otherwise: steps=60, k=12, radius=3, "
                       "rho=0.1, lam=10, n_components=20, spatial_weight=embedding_weight=1)" if not args.quick
        else "align(features='shared', num_samples=20) (API defaults otherwise)",
        "timing": "seconds = wall time of the call; cpu_seconds = CPU time of the worker process over the call "
                  "(all its threads); the machine (2 cores) was shared with other jobs, so cpu_seconds is the "
                  "fairer comparison; the scaling limit is on wall time",
        "stahl_real_metric": "mass between spots of the same joint k-means cluster (k=5), coupling normalised to 1",
        "dlpfc": "151673 -> 151674 (labelled spots only, shared genes), labels = manual layers",
        "label_metrics": "coupling row-normalised for every method: match_ece = ECE (10 bins) of the best partner's "
                         "probability vs 'best partner has a's label'; label_transfer_accuracy / label_ece = argmax of "
                         "the transferred label distribution and its probability vs a's label (pyrospatial: its own "
                         "label transfer, averaged over posterior draws)",
        "machine": {"cpu_count": os.cpu_count(), "python": sys.version.split()[0]},
    }
    versions = {}
    for mod, name in (("torch", "torch"), ("ot", "POT"), ("paste", "paste-bio"), ("moscot", "moscot"), ("pyro", "pyro-ppl")):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # noqa: BLE001
            versions[name] = "not installed"
    settings["versions"] = versions
    results: list[dict] = []
    unavailable = {m: _available(m) for m in methods}

    def record_unavailable(method, specs):
        for spec in specs:
            rec = {k: spec.get(k) for k in ("case", "noise", "slice", "slices", "run")}
            rec.update({"method": method, "n_cells": spec.get("n_cells"), "accuracy": None, "seconds": None,
                        "peak_mem_mb": None, "finished": False, "match_ece": None, "angle_covered": None,
                        "error": unavailable[method]})
            results.append(rec)

    sim_specs = [{"case": "stahl_sim", "slice": s, "noise": pc, "run": r}
                 for s in slices for pc in PSEUDOCOUNTS for r in range(runs)]
    real_specs = [{"case": "stahl_real", "slices": [i, i + 1], "noise": None} for i in ((1,) if args.quick else (1, 2, 3))]
    groups = []
    if "stahl_sim" not in skip:
        groups += [("stahl_sim", m, sim_specs) for m in methods]
    dlpfc_specs = [{"case": "dlpfc", "slices": list(DLPFC_PAIR), "noise": None}]
    if "dlpfc" not in skip:
        groups += [("dlpfc", m, dlpfc_specs) for m in methods]
    if "stahl_real" not in skip:
        groups += [("stahl_real", m, real_specs) for m in methods]
    for case, method, specs in tqdm(groups, desc="stahl cases"):
        if unavailable[method]:
            record_unavailable(method, specs)
            continue
        # the DLPFC pair (~3,600 spots a side) runs under a wall-time limit of its own
        results += run_group(method, specs, args.quick, tmp, args.dlpfc_time_limit if case == "dlpfc" else None,
                             args.mem_limit_gb)
    if "scaling" not in skip:
        for method in tqdm(methods, desc="scaling"):
            stop_reason = unavailable[method]
            for n in sizes:
                spec = {"case": "scaling", "n_cells": n, "noise": None, "run": 0}
                if stop_reason:
                    rec = {"case": "scaling", "noise": None, "n_cells": n, "method": method, "accuracy": None,
                           "seconds": None, "peak_mem_mb": None, "finished": False, "match_ece": None,
                           "angle_covered": None, "error": f"not run: {stop_reason}"}
                    results.append(rec)
                    continue
                rec = run_group(method, [spec], args.quick, tmp, args.time_limit, args.mem_limit_gb)[0]
                rec["n_cells"] = n
                results.append(rec)
                if not rec["finished"]:
                    stop_reason = f"failed or passed the limit at {n} cells per side ({rec.get('error', '')[:120]})"

    for r in results:
        r.pop("traceback", None)
        r.pop("slice", None) if r.get("case") != "stahl_sim" else None
    payload = {"settings": settings, "results": results}
    (out / f"{args.name}.json").write_text(json.dumps(payload, indent=1, default=float))
    (out / f"{args.name}.md").write_text(markdown(payload))
    print(markdown(payload))
    return 0


def _fmt(x, nd=3):
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def markdown(payload: dict) -> str:
    res = payload["results"]
    methods = sorted({r["method"] for r in res}, key=lambda m: METHODS.index(m) if m in METHODS else 99)
    lines = ["# Alignment benchmark", "", "Settings: `" + json.dumps({k: v for k, v in payload["settings"].items()
                                                                   if k not in ("versions", "machine")}) + "`", "",
             "Versions: `" + json.dumps(payload["settings"].get("versions", {})) + "`", ""]
    sim = [r for r in res if r["case"] == "stahl_sim"]
    if sim:
        methods_run = [m for m in methods if any(r["method"] == m for r in sim)]
        lines += ["## Ståhl simulation: accuracy (mass on true pairs; mean over sections and runs)", "",
                  "| method | " + " | ".join(f"pc {p}" for p in PSEUDOCOUNTS) + " | seconds wall / CPU (median) | peak MB (max) | failed |",
                  "|---" * (len(PSEUDOCOUNTS) + 4) + "|"]
        for m in methods_run:
            rows = [r for r in sim if r["method"] == m]
            accs = []
            for p in PSEUDOCOUNTS:
                v = [r["accuracy"] for r in rows if r["noise"] == p and r["accuracy"] is not None]
                accs.append(_fmt(float(np.mean(v))) if v else "–")
            secs = [r["seconds"] for r in rows if r["seconds"] is not None and r["finished"]]
            cpu = [r["cpu_seconds"] for r in rows if r.get("cpu_seconds") is not None and r["finished"]]
            mem = [r["peak_mem_mb"] for r in rows if r["peak_mem_mb"] is not None]
            failed = sum(not r["finished"] for r in rows)
            lines.append(f"| {m} | " + " | ".join(accs) + f" | {_fmt(float(np.median(secs)) if secs else None, 2)} / "
                         f"{_fmt(float(np.median(cpu)) if cpu else None, 2)} | "
                         f"{_fmt(max(mem) if mem else None, 0)} | {failed}/{len(rows)} |")
        py = [r for r in sim if r["method"] == "pyrospatial" and r["finished"]]
        if py:
            lines += ["", "Top-1 accuracy (row maximum of the coupling is the true partner), mean over runs: " + "; ".join(
                f"{m} " + "/".join(_fmt(float(np.mean([r['top1_accuracy'] for r in sim if r['method'] == m and r['noise'] == p
                                                       and r.get('top1_accuracy') is not None])), 2)
                                   if any(r['method'] == m and r['noise'] == p and r.get('top1_accuracy') is not None for r in sim) else "–"
                                   for p in PSEUDOCOUNTS) for m in methods_run) + " (pc 0/1/2/3/4/5)"]
            lines += ["", "pyrospatial calibration: " + ", ".join(
                f"pc {p}: ECE {_fmt(float(np.mean([r['match_ece'] for r in py if r['noise'] == p])))}, "
                f"angle covered {sum(r['angle_covered'] for r in py if r['noise'] == p)}/"
                f"{sum(1 for r in py if r['noise'] == p)}" for p in PSEUDOCOUNTS if any(r['noise'] == p for r in py))
                + f"; overall angle coverage {np.mean([r['angle_covered'] for r in py]):.3f}, "
                f"mean ECE {np.mean([r['match_ece'] for r in py]):.3f}"]
    labelled = [r for r in res if r["case"] in ("dlpfc", "stahl_real")]
    if labelled:
        lines += ["", "## Real labelled pairs: label mass, label transfer and calibration", "",
                  ("| case | pair | method | accuracy | label transfer acc. | match ECE | match over-confidence | "
                   "best-label ECE | label ECE | best-match p (mean) | best-match agreement | seconds | finished |"),
                  "|---" * 13 + "|"]
        for r in sorted(labelled, key=lambda r: (r["case"], str(r["slices"]),
                                                 METHODS.index(r["method"]) if r["method"] in METHODS else 99)):
            lines.append(f"| {r['case']} | {'-'.join(map(str, r['slices']))} | {r['method']} | {_fmt(r['accuracy'])} | "
                         f"{_fmt(r.get('label_transfer_accuracy'))} | {_fmt(r.get('match_ece'))} | "
                         f"{_fmt(r.get('match_overconfidence'))} | {_fmt(r.get('best_label_ece'))} | "
                         f"{_fmt(r.get('label_ece'))} | {_fmt(r.get('best_match_prob_mean'))} | "
                         f"{_fmt(r.get('best_match_agreement'))} | {_fmt(r['seconds'], 1)} | {r['finished']} |"
                         + ("" if r["finished"] else f" {(r.get('error') or '')[:100]}"))
    real = [r for r in res if r["case"] == "stahl_real"]
    if real:
        lines += ["", "## Ståhl consecutive pairs: same-cluster mass after alignment", "",
                  "| method | " + " | ".join(f"{a}-{b}" for a, b in sorted({tuple(r['slices']) for r in real})) + " | seconds (median) |",
                  "|---" * (2 + len({tuple(r['slices']) for r in real})) + "|"]
        pairs = sorted({tuple(r["slices"]) for r in real})
        for m in methods:
            rows = {tuple(r["slices"]): r for r in real if r["method"] == m}
            secs = [r["seconds"] for r in rows.values() if r["seconds"] is not None and r["finished"]]
            lines.append(f"| {m} | " + " | ".join(_fmt(rows[k]["accuracy"]) if k in rows else "–"
                                                  for k in pairs) + f" | {_fmt(float(np.median(secs)) if secs else None, 2)} |")
    scal = [r for r in res if r["case"] == "scaling"]
    if scal:
        lines += ["", "## Scaling (simulated tissue, cells per side)", "",
                  "| method | cells per side | accuracy | top-1 | seconds wall / CPU | peak MB | finished | note |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in scal:
            lines.append(f"| {r['method']} | {r['n_cells']} | {_fmt(r['accuracy'])} | {_fmt(r.get('top1_accuracy'))} | "
                         f"{_fmt(r['seconds'], 1)} / {_fmt(r.get('cpu_seconds'), 1)} | "
                         f"{_fmt(r['peak_mem_mb'], 0)} | {r['finished']} | {(r.get('error') or '')[:100]} |")
    lines += targets(res)
    return "\n".join(lines) + "\n"


def targets(res: list[dict]) -> list[str]:
    """Issue 20's targets computed from the records (no hand-entered figure)."""
    out = []
    sim = [r for r in res if r["case"] == "stahl_sim" and r["finished"]]

    def med(method, key):
        v = [r[key] for r in sim if r["method"] == method and r.get(key) is not None]
        return float(np.median(v)) if v else None

    rows = []
    if med("pyrospatial", "seconds") and med("paste", "seconds"):
        wall = med("pyrospatial", "seconds") / med("paste", "seconds")
        cpu = (med("pyrospatial", "cpu_seconds") / med("paste", "cpu_seconds")
               if med("pyrospatial", "cpu_seconds") and med("paste", "cpu_seconds") else None)
        rows.append(f"| small pairs (Ståhl simulation): wall time within 20x PASTE's (median over runs) | "
                    f"{wall:.1f}x wall ({med('pyrospatial', 'seconds'):.2f} s vs {med('paste', 'seconds'):.2f} s); "
                    f"CPU {_fmt(cpu, 1)}x | {'met' if wall <= 20 else f'missed by {wall - 20:.1f}x-points'} |")
        diffs = []
        for p in PSEUDOCOUNTS:
            acc = {m: [r["accuracy"] for r in sim if r["method"] == m and r["noise"] == p] for m in ("pyrospatial", "paste")}
            if acc["pyrospatial"] and acc["paste"]:
                diffs.append(float(np.mean(acc["pyrospatial"]) - np.mean(acc["paste"])))
        if diffs:
            rows.append("| small pairs: accuracy kept (pyrospatial - PASTE, pc 0..5) | "
                        + ", ".join(f"{d:+.3f}" for d in diffs) + f" | {'>= PASTE at every level' if min(diffs) >= 0 else 'below PASTE at ' + str(sum(d < 0 for d in diffs)) + ' of ' + str(len(diffs)) + ' levels'} |")
    labelled = [r for r in res if r["case"] in ("dlpfc", "stahl_real")]
    for key in sorted({(r["case"], tuple(map(str, r["slices"]))) for r in labelled}):
        pair = [r for r in labelled if (r["case"], tuple(map(str, r["slices"]))) == key]
        ours = next((r for r in pair if r["method"] == "pyrospatial" and r["finished"]), None)
        peers = [r for r in pair if r["method"] not in ("pyrospatial",) + REFERENCES and r["finished"]
                 and r["accuracy"] is not None]
        reference = next((r for r in pair if r["method"] in REFERENCES and r["finished"]), None)
        if ours is None:
            continue
        best = max(peers, key=lambda r: r["accuracy"]) if peers else None
        if ours.get("match_ece") is None:  # a record from before the label metrics
            continue
        ece_ok = ours["match_ece"] <= 0.05
        acc_ok = best is None or ours["accuracy"] >= best["accuracy"]
        peer_txt = f"best peer {best['method']} {best['accuracy']:.3f}" if best else "no peer finished"
        rows.append(f"| {key[0]} {'-'.join(key[1])}: match ECE <= 0.05, label mass >= best peer | match ECE "
                    f"{ours['match_ece']:.3f} (over-confidence {_fmt(ours.get('match_overconfidence'))}, best-label ECE "
                    f"{_fmt(ours.get('best_label_ece'))}, label ECE {_fmt(ours.get('label_ece'))}); label mass "
                    f"{ours['accuracy']:.3f} vs {peer_txt} | ECE {'met' if ece_ok else 'missed by %.3f' % (ours['match_ece'] - 0.05)}"
                    f", accuracy {'met' if acc_ok else 'missed by %.3f' % (best['accuracy'] - ours['accuracy'])}"
                    + (f" (coordinates ignored, {reference['method']}: {reference['accuracy']:.3f}"
                       + (f"; adjacent spots of b share a label {reference['b_neighbour_agreement']:.3f}"
                          if reference.get("b_neighbour_agreement") is not None else "") + ")" if reference else "")
                    + " |")
    if rows:
        out += ["", "## Targets (issue 20) against these records", "", "| target | figures | status |", "|---|---|---|"] + rows
    return out


if __name__ == "__main__":
    sys.exit(main())
