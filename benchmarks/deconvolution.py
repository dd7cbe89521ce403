"""Cell-type deconvolution of pseudo-spots: pyrospatial against peers and baselines.

Data sets (``--datasets``):

- ``osmfish_100um``, ``osmfish_50um``: the valid cells of ../shared/data/osmfish_sscortex (4,363
  cells after the loader drops 476 duplicated records, 33 genes, 31 types) are split at random (seed 0) into a labelled reference half and a
  spatial half; the spatial half is aggregated into square pseudo-spots of 100 µm and 50 µm
  (:func:`pyrospatial.data.sim.pseudo_spots`). The truth is each spot's cell-type counts (31
  types, and 7 major classes);
- ``osmfish_broad_100um``, ``osmfish_broad_50um``: the same split and spots with the 31 types
  merged into broad classes (:data:`BROAD`), in reference and truth alike, so that every type
  varies inside (issue 21);
- ``sim_gradient``: :func:`pyrospatial.data.sim_deconvolution.simulate_deconvolution` with
  :data:`SIM_GRADIENT`: 6 types whose expression shifts smoothly with x (a per-type low-rank
  log-expression shift), half of the cells the reference, the rest in 100 µm spots.

Methods, each in its own process (its peak resident memory is its own):

- ``prior_mean``: every spot gets the reference's global type frequencies (the floor);
- ``nnls``: non-negative least squares of the spot counts on the reference's mean type
  signatures (:func:`pyrospatial.methods.deconvolution.nnls_abundance`);
- ``pyrospatial``: :func:`pyrospatial.deconvolve` with its defaults (``model="states"``,
  ``max_steps=250``, ``concentration_mean=0.3``), chosen by held-out genes on another split
  (``choose_settings``; ``--select`` below for the signatures settings), never by the truth;
- ``pyrospatial_signatures``, ``pyrospatial_states``: :func:`pyrospatial.deconvolve` with
  ``model="signatures"`` (fixed per-type signatures) and ``model="states"`` (a continuous
  state per spot and type);
- ``cell2location``, ``stereoscope``, ``destvi`` (scvi-tools), ``tangram`` (cluster mode):
  run with the Python of ``--peer-python`` (default ``.bench-venv/bin/python``, made by
  ``make bench-env``), never in pyrospatial's environment.

Metrics (per dataset and method): ``rmse`` and ``pearson`` of per-spot proportions over all
spot x type entries, ``jsd`` the mean per-spot Jensen-Shannon divergence (base 2),
``coverage_90`` the fraction of true integer counts inside the method's 90% interval (null
when the method gives none), ``pit_coverage_90`` the same level scored by the randomised PIT
of the true count among the method's count draws (pyrospatial only: nominal for a calibrated
posterior; the closed integer interval over-covers where most counts are 0), the ``_nonzero``
variants over the entries with a true count > 0, ``seconds`` (wall time of fit + prediction, no data loading),
``cpu_seconds`` (the process's CPU time over the same span: comparable when the machine is
shared), ``peak_mem_mb``
(the process's maximum resident set size); ``rmse_major``/``pearson_major`` on the 7 classes.

    python benchmarks/deconvolution.py [--quick] [--methods nnls prior_mean pyrospatial ...] --out DIR
        [--out-name NAME] [--method-timeouts '{"destvi": 2400}']

writes ``DIR/NAME.json`` and ``DIR/NAME.md`` (NAME defaults to ``deconvolution``). Methods run in the order
given, one process each, in one invocation per dataset, so that time ratios within a dataset
compare like with like (``cpu_seconds`` stays comparable when other jobs share the machine).

    python benchmarks/deconvolution.py --select [--datasets ...] [--select-grid JSON] --out DIR

scores settings of pyrospatial by held-out-gene prediction
(:func:`pyrospatial.methods.deconvolution_report.heldout_gene_score`) on the pseudo-spots of another split
(``--split-seed``, default 1) with the truth deleted first, and appends to
``DIR/deconvolution_selection.json``.

    python benchmarks/deconvolution.py --merge DIR1 DIR2 ... --out DIR [--selection FILE] [--note TEXT]

merges invocations (a later one's row replaces an earlier one's for the same dataset and
method; each row keeps the number of its invocation).
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

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ALL_METHODS = ["prior_mean", "nnls", "pyrospatial", "pyrospatial_signatures", "pyrospatial_states", "tangram",
               "stereoscope", "destvi", "cell2location"]
#: pyrospatial's rows: its defaults, and each model variant by name
PYROSPATIAL_MODELS = {"pyrospatial": None, "pyrospatial_signatures": "signatures", "pyrospatial_states": "states"}
PEERS = {"tangram", "stereoscope", "destvi", "cell2location"}
#: data sets: the 31 osmFISH types, the same cells with the types merged into broad classes, and the
#: simulator whose types shift their expression across the tissue (issue 21)
ALL_DATASETS = ["osmfish_100um", "osmfish_50um", "sim_gradient", "osmfish_broad_100um", "osmfish_broad_50um"]
#: the simulator's settings for ``sim_gradient`` (pyrospatial.data.sim_deconvolution defaults, spelt out)
SIM_GRADIENT = {"n_cells": 6000, "n_types": 6, "n_genes": 60, "width": 1500.0, "spot_size": 100.0,
                "gradient_strength": 1.0, "state_dim": 2, "seed": 0}
#: osmFISH's 31 ClusterName types merged into broad classes (``osmfish_broad_*``). Ependymal cells
#: and the choroid plexus line the ventricles and belong to none of the six classes of issue 21,
#: so they form a seventh class rather than being forced into one.
BROAD = {
    "Pyramidal L2-3": "Excitatory neurons", "Pyramidal L2-3 L5": "Excitatory neurons",
    "Pyramidal L3-4": "Excitatory neurons", "pyramidal L4": "Excitatory neurons",
    "Pyramidal L5": "Excitatory neurons", "Pyramidal L6": "Excitatory neurons",
    "Pyramidal Cpne5": "Excitatory neurons", "Pyramidal Kcnip2": "Excitatory neurons",
    "Hippocampus": "Excitatory neurons",
    "Inhibitory CP": "Inhibitory neurons", "Inhibitory Cnr1": "Inhibitory neurons",
    "Inhibitory Crhbp": "Inhibitory neurons", "Inhibitory IC": "Inhibitory neurons",
    "Inhibitory Kcnip2": "Inhibitory neurons", "Inhibitory Pthlh": "Inhibitory neurons",
    "Inhibitory Vip": "Inhibitory neurons",
    "Astrocyte Gfap": "Astrocytes", "Astrocyte Mfge8": "Astrocytes",
    "Oligodendrocyte COP": "Oligodendrocyte lineage", "Oligodendrocyte MF": "Oligodendrocyte lineage",
    "Oligodendrocyte Mature": "Oligodendrocyte lineage", "Oligodendrocyte NF": "Oligodendrocyte lineage",
    "Oligodendrocyte Precursor cells": "Oligodendrocyte lineage",
    "Endothelial": "Vascular", "Endothelial 1": "Vascular", "Pericytes": "Vascular",
    "Vascular Smooth Muscle": "Vascular",
    "Microglia": "Immune (microglia, macrophages)", "Perivascular Macrophages": "Immune (microglia, macrophages)",
    "Ependymal": "Ventricle (ependymal, choroid plexus)", "C. Plexus": "Ventricle (ependymal, choroid plexus)",
}
MAJOR = {
    "Astrocyte": "Astrocyte", "Oligodendrocyte": "Oligodendrocyte", "Inhibitory": "Inhibitory",
    "Pyramidal": "Excitatory", "pyramidal": "Excitatory", "Hippocampus": "Excitatory",
    "Endothelial": "Vascular", "Pericytes": "Vascular", "Vascular": "Vascular",
    "Microglia": "Immune", "Perivascular": "Immune", "C.": "Ventricle", "Ependymal": "Ventricle",
}


def major_class(name: str) -> str:
    return MAJOR.get(name.split()[0], "Other")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------------------
# one method in one process: reads DIR/{reference,spots}.h5ad, writes DIR/<method>.npz
# ------------------------------------------------------------------------------------------
def run_method(method: str, data_dir: Path, epochs: dict, out_path: Path) -> None:
    import anndata as ad
    import torch

    torch.set_num_threads(1)
    ref = ad.read_h5ad(data_dir / "reference.h5ad")
    spots = ad.read_h5ad(data_dir / "spots.h5ad")
    types = sorted(ref.obs["cell_type"].astype(str).unique())
    ref.obs["cell_type"] = ref.obs["cell_type"].astype(str).astype("category")
    hint = float(spots.uns["bench_cells_per_spot"])
    lo = hi = None
    info = {}
    start, cpu_start = time.perf_counter(), time.process_time()
    if method == "prior_mean":
        freq = ref.obs["cell_type"].value_counts(normalize=True).reindex(types).to_numpy()
        prop = np.broadcast_to(freq, (spots.n_obs, len(types))).copy()
    elif method == "nnls":
        from pyrospatial.methods.deconvolution import nnls_abundance

        X = np.asarray(ref.X)
        S = np.stack([X[(ref.obs["cell_type"] == t).to_numpy()].mean(0) for t in types])
        w = nnls_abundance(np.asarray(spots[:, ref.var_names].X), S)
        prop = w / np.maximum(w.sum(1, keepdims=True), 1e-12)
    elif method in PYROSPATIAL_MODELS:
        import pyrospatial as ps

        # its defaults: the number of steps comes from the package, not from here
        steps = {} if epochs.get("pyrospatial") is None else {"max_steps": int(epochs["pyrospatial"])}
        model = PYROSPATIAL_MODELS[method]
        chosen = {} if model is None else {"model": model}
        out = ps.deconvolve(spots, ref, "cell_type", progress=False, seed=0, keep_draws=True, **chosen, **steps)
        prop = out.obsm["proportion_mean"][types].to_numpy()
        lo = out.obsm["cell_count_q05"][types].to_numpy()
        hi = out.obsm["cell_count_q95"][types].to_numpy()
        rec = out.uns["deconvolution"]
        order = [list(rec["cell_types"]).index(t) for t in types]
        info = {"model_interval_mass": float(rec["cell_count_interval_mass"]["overall"]),
                "steps": int(np.asarray(rec["settings"]["steps"]).ravel()[0]),
                "abundance_width_factor": float(rec.get("abundance_width_factor", 1.0)),
                "model": str(rec["settings"].get("model", model or "signatures")),
                "draws": np.asarray(rec["cell_count_draws"])[:, :, order]}
    elif method == "cell2location":
        from cell2location.models import Cell2location, RegressionModel

        RegressionModel.setup_anndata(adata=ref, labels_key="cell_type")
        reg = RegressionModel(ref)
        reg.train(max_epochs=epochs["cell2location_reference"], accelerator="cpu")
        ref = reg.export_posterior(ref, sample_kwargs={"num_samples": 1000, "batch_size": 2500})
        names = list(ref.uns["mod"]["factor_names"])
        signatures = ref.varm["means_per_cluster_mu_fg"][[f"means_per_cluster_mu_fg_{n}" for n in names]].copy()
        signatures.columns = names
        Cell2location.setup_anndata(adata=spots)
        model = Cell2location(spots, cell_state_df=signatures, N_cells_per_location=hint, detection_alpha=20)
        model.train(max_epochs=epochs["cell2location"], batch_size=None, train_size=1, accelerator="cpu")
        spots = model.export_posterior(spots, sample_kwargs={"num_samples": 1000, "batch_size": model.adata.n_obs})
        order = [names.index(t) for t in types]
        mean = np.asarray(spots.obsm["means_cell_abundance_w_sf"])[:, order]
        prop = mean / mean.sum(1, keepdims=True)
        lo = np.asarray(spots.obsm["q05_cell_abundance_w_sf"])[:, order]
        hi = np.asarray(spots.obsm["q95_cell_abundance_w_sf"])[:, order]
    elif method in ("stereoscope", "destvi"):
        import scvi

        scvi.settings.seed = 0
        if method == "stereoscope":
            from scvi.external import RNAStereoscope, SpatialStereoscope

            RNAStereoscope.setup_anndata(ref, labels_key="cell_type")
            sc_model = RNAStereoscope(ref)
            sc_model.train(max_epochs=epochs["stereoscope_reference"], accelerator="cpu")
            SpatialStereoscope.setup_anndata(spots)
            st = SpatialStereoscope.from_rna_model(spots, sc_model)
        else:
            from scvi.model import CondSCVI, DestVI

            CondSCVI.setup_anndata(ref, labels_key="cell_type")
            # the documented from_rna_model path fails in scvi-tools 1.4.2 unless prior="mog"
            sc_model = CondSCVI(ref, weight_obs=False, prior="mog")
            sc_model.train(max_epochs=epochs["destvi_reference"], accelerator="cpu")
            DestVI.setup_anndata(spots)
            st = DestVI.from_rna_model(spots, sc_model)
        st.train(max_epochs=epochs[method], accelerator="cpu")
        frame = st.get_proportions()
        prop = frame[types].to_numpy()
        prop = prop / prop.sum(1, keepdims=True)
    elif method == "tangram":
        import tangram as tg

        tg.pp_adatas(ref, spots, genes=None)
        mapping = tg.map_cells_to_space(ref, spots, mode="clusters", cluster_label="cell_type", device="cpu",
                                        num_epochs=epochs["tangram"], verbose=False)
        tg.project_cell_annotations(mapping, spots, annotation="cell_type")
        pred = spots.obsm["tangram_ct_pred"][types].to_numpy()
        prop = pred / np.maximum(pred.sum(1, keepdims=True), 1e-12)
    else:
        raise SystemExit(f"unknown method {method!r}")
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    extra = {} if lo is None else {"lo": np.asarray(lo, float), "hi": np.asarray(hi, float)}
    np.savez(out_path, prop=np.asarray(prop, float), seconds=seconds, cpu_seconds=cpu_seconds, peak_mem_mb=_peak_mb(),
             **extra, **info)


# ------------------------------------------------------------------------------------------
# metrics and the driver
# ------------------------------------------------------------------------------------------
def jsd(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum(1, keepdims=True)
    q = q / np.maximum(q.sum(1, keepdims=True), 1e-12)
    m = 0.5 * (p + q)

    def kl(a, b):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, a * np.log2(a / np.maximum(b, 1e-300)), 0.0).sum(1)
    return float(np.mean(0.5 * kl(p, m) + 0.5 * kl(q, m)))


def class_of(dataset: str):
    """The map from a data set's types to the coarser classes of ``rmse_major`` (None: no coarser level)."""
    if dataset.startswith("osmfish_broad"):
        return lambda name: name  # the types already are the broad classes
    if dataset.startswith("osmfish"):
        return major_class
    return None


def metrics(prop: np.ndarray, truth: np.ndarray, types: list[str], lo=None, hi=None, classes_of=major_class,
            draws=None) -> dict:
    """Accuracy of the proportions and, where the method gives them, the 90% intervals of the
    integer counts (``lo``, ``hi``) and the randomised PIT of the truth among count ``draws``
    ``(S, spots, types)``: nominal (0.9) for a calibrated posterior, integer or not."""
    from pyrospatial.criticism.calibration import pit_coverage_by_level

    tp = truth / truth.sum(1, keepdims=True)
    pit = pit_nonzero = None
    if draws is not None:
        draws = np.asarray(draws, float)
        pit = float(pit_coverage_by_level(draws, truth, [0.9])[0])
        pit_nonzero = float(pit_coverage_by_level(draws, np.where(truth > 0, truth, np.nan), [0.9])[0])
    if classes_of is None:
        pm = tm = None
    else:
        classes = sorted({classes_of(t) for t in types})
        agg = np.stack([[classes_of(t) == c for t in types] for c in classes], 1).astype(float)  # T x C
        pm, tm = prop @ agg, tp @ agg
    return {
        "rmse": float(np.sqrt(np.mean((prop - tp) ** 2))),
        "pearson": float(np.corrcoef(prop.ravel(), tp.ravel())[0, 1]),
        "jsd": jsd(tp, prop),
        "coverage_90": None if lo is None else float(np.mean((truth >= lo) & (truth <= hi))),
        "coverage_90_nonzero": None if lo is None else float(np.mean(((truth >= lo) & (truth <= hi))[truth > 0])),
        "pit_coverage_90": pit,
        "pit_coverage_90_nonzero": pit_nonzero,
        "rmse_major": None if pm is None else float(np.sqrt(np.mean((pm - tm) ** 2))),
        "pearson_major": None if pm is None else float(np.corrcoef(pm.ravel(), tm.ravel())[0, 1]),
    }


def make_datasets(quick: bool, seed: int = 0, only: list[str] | None = None) -> dict:
    from pyrospatial.data.datasets import load_osmfish
    from pyrospatial.data.sim import pseudo_spots

    names = only or (["osmfish_100um"] if quick else ["osmfish_100um", "osmfish_50um"])
    unknown = [n for n in names if n not in ALL_DATASETS]
    if unknown:
        raise SystemExit(f"unknown data sets {unknown}: choose from {ALL_DATASETS}")
    out = {}
    if any(n.startswith("osmfish") for n in names):
        cells = load_osmfish()
        missing = sorted(set(cells.obs["cell_type"].astype(str)) - set(BROAD))
        if missing:
            raise SystemExit(f"osmFISH types missing from BROAD: {missing}")
        perm = np.random.default_rng(seed).permutation(cells.n_obs)
        half = cells.n_obs // 2
        reference = cells[np.sort(perm[:half])].copy()
        spatial = cells[np.sort(perm[half:])].copy()
    for name in names:  # in the order asked for
        if name == "sim_gradient":
            from pyrospatial.data.sim_deconvolution import simulate_deconvolution

            spots, ref = simulate_deconvolution(**{**SIM_GRADIENT, "seed": SIM_GRADIENT["seed"] + seed})
            del ref.obsm["true_state"], ref.uns["sim_deconvolution"]  # the truth stays with the simulator
            out[name] = (ref, spots)
            continue
        size = float(name.rsplit("_", 1)[1][:-2])
        ref, spa = reference, spatial
        if name.startswith("osmfish_broad"):
            ref, spa = reference.copy(), spatial.copy()
            for frame in (ref.obs, spa.obs):
                frame["cell_type"] = frame["cell_type"].astype(str).map(BROAD).astype("category")
        _, spots = pseudo_spots(spa, size, grid="square", cell_type_key="cell_type")
        out[name] = (ref, spots)
    return out


#: settings of pyrospatial compared by held-out-gene prediction (``--select``); no truth is read
SELECTION_GRID = [
    {"concentration_mean": 1.0, "max_steps": 1000},
    {"concentration_mean": 0.3, "max_steps": 1000},
    {"concentration_mean": 0.3, "max_steps": 3000},
]


def select_settings(quick: bool, datasets: list[str] | None, out: Path, grid: list[dict] | None = None,
                    split_seed: int = 1) -> dict:
    """Score each setting of :data:`SELECTION_GRID` by held-out-gene Poisson deviance
    (:func:`pyrospatial.methods.deconvolution_report.heldout_gene_score`, 3 gene folds) on each dataset's spots
    and reference. The pseudo-spots' true cell counts are dropped before anything is fitted."""
    import torch

    from pyrospatial.methods.deconvolution_report import heldout_gene_score

    torch.set_num_threads(1)
    rows = []
    grid = SELECTION_GRID if grid is None else grid
    for name, (reference, spots) in make_datasets(quick, seed=split_seed, only=datasets).items():
        del spots.obsm["cell_type_counts"]  # the truth is never seen by the selection
        reference = reference.copy()
        reference.obs["cell_type"] = reference.obs["cell_type"].astype(str).astype("category")
        for setting in grid:
            started = time.process_time()
            score = heldout_gene_score(spots, reference, "cell_type", n_folds=3, num_samples=50,
                                       convergence_window=None, **setting)
            rows.append({"dataset": name, "split_seed": split_seed, **setting, **score,
                         "cpu_seconds": time.process_time() - started})
            print(json.dumps(rows[-1]), flush=True)
    payload = {"criterion": "mean Poisson deviance of held-out genes (3 random gene folds), lower is better",
               "results": rows}
    path = out / "deconvolution_selection.json"
    if path.exists():  # accumulate over invocations
        payload["results"] = json.loads(path.read_text())["results"] + rows
    path.write_text(json.dumps(payload, indent=2))
    return payload


#: The peers pyrospatial's default must match or beat on every data set (issue 21).
TARGET_PEERS = ("nnls", "tangram", "stereoscope", "destvi", "cell2location")


def target_checks(rows: list[dict]) -> list[tuple[str, bool | None, str]]:
    """Issue 21's targets for the ``pyrospatial`` row of one data set: proportion RMSE <= every
    finished peer's; 90% PIT coverage of the true counts in [0.85, 0.95]; CPU seconds <= 1/10 of
    cell2location's and <= DestVI's. ``(target, met, figures)``; ``met`` is None when a side is missing."""
    ours = next((r for r in rows if r["method"] == "pyrospatial" and r.get("finished")), None)
    if ours is None:
        return [("pyrospatial finished", False, "no finished pyrospatial row")]
    peers = [r for r in rows if r["method"].split("_500")[0] in TARGET_PEERS and r.get("finished")]
    checks: list[tuple[str, bool | None, str]] = []
    if peers:
        best = min(peers, key=lambda r: r["rmse"])
        checks.append(("rmse <= every peer", ours["rmse"] <= best["rmse"],
                       f"{ours['rmse']:.4f} vs best peer {best['method']} {best['rmse']:.4f}"))
    pit = ours.get("pit_coverage_90")
    checks.append(("PIT 90% coverage in [0.85, 0.95]", None if pit is None else 0.85 <= pit <= 0.95,
                   "—" if pit is None else f"{pit:.3f}"))
    cpu = ours.get("cpu_seconds")
    for peer, factor, label in (("cell2location", 0.1, "cpu <= 1/10 of cell2location"), ("destvi", 1.0, "cpu <= DestVI")):
        theirs = next((r for r in rows if r["method"] == peer and r.get("finished") and r.get("cpu_seconds")), None)
        if theirs is None or cpu is None:
            checks.append((label, None, f"{peer} not finished"))
        else:
            checks.append((label, cpu <= factor * theirs["cpu_seconds"],
                           f"{cpu:.1f} s vs {theirs['cpu_seconds']:.1f} s (ratio {cpu / theirs['cpu_seconds']:.3f})"))
    return checks


def target_lines(rows: list[dict]) -> list[str]:
    """The checks of :func:`target_checks` as markdown lines."""
    word = {True: "met", False: "MISSED", None: "not measured"}
    return [f"- target {name}: {word[met]} ({figures})" for name, met, figures in target_checks(rows)]


def markdown(payload: dict) -> str:
    rows = payload["results"]
    lines = ["# Cell-type deconvolution on pseudo-spots", "",
             f"Command: `{payload['settings']['command']}`", "",
             ("Proportion RMSE / Pearson / JSD over the data set's types (osmfish_*: 31 types; osmfish_broad_*: "
             "the broad classes of `BROAD`; sim_gradient: 6 simulated types whose expression shifts with x); "
             "`coverage_90`: true integer counts inside the method's 90% interval (— when it gives none); "
             "`rmse (classes)`: over the 7 major classes (osmfish_*) or the types themselves (osmfish_broad_*); "
             "ratios are to pyrospatial on the same dataset (rmse ratio > 1: worse than pyrospatial; "
             "seconds ratio: times pyrospatial's time)."), ""]
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        ref = next((r for r in rows if r["dataset"] == dataset and r["method"] == "pyrospatial" and r.get("finished")), None)
        lines += [f"## {dataset}", "",
                  "| method | rmse | pearson | jsd | coverage_90 | coverage_90 (true count > 0) | PIT 90% | PIT 90% (true count > 0) | rmse (classes) | seconds | cpu seconds | peak MB | rmse / pyrospatial | seconds / pyrospatial | cpu seconds / pyrospatial |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["dataset"] != dataset:
                continue
            name = r["method"] if "invocation" not in r else f"{r['method']} [{r['invocation'] + 1}]"
            if not r.get("finished"):
                lines.append(f"| {name} | not run: {r.get('reason', '')} | | | | | | | | | | | | | |")
                continue
            cov = "—" if r["coverage_90"] is None else f"{r['coverage_90']:.3f}"
            cov_nz = "—" if r.get("coverage_90_nonzero") is None else f"{r['coverage_90_nonzero']:.3f}"
            ratio = f"{r['rmse'] / ref['rmse']:.2f}" if ref else "—"
            sratio = f"{r['seconds'] / ref['seconds']:.2f}" if ref else "—"
            cpu = r.get("cpu_seconds")
            cratio = f"{cpu / ref['cpu_seconds']:.2f}" if ref and cpu and ref.get("cpu_seconds") else "—"
            cpu_s = "—" if cpu is None else f"{cpu:.1f}"
            major = "—" if r.get("rmse_major") is None else f"{r['rmse_major']:.4f}"
            pit = "—" if r.get("pit_coverage_90") is None else f"{r['pit_coverage_90']:.3f}"
            pit_nz = "—" if r.get("pit_coverage_90_nonzero") is None else f"{r['pit_coverage_90_nonzero']:.3f}"
            lines.append(f"| {name} | {r['rmse']:.4f} | {r['pearson']:.3f} | {r['jsd']:.3f} | {cov} | {cov_nz} | {pit} | {pit_nz} | "
                         f"{major} | {r['seconds']:.1f} | {cpu_s} | {r['peak_mem_mb']:.0f} | {ratio} | "
                         f"{sratio} | {cratio} |")
        extra = [r for r in rows if r["dataset"] == dataset and r.get("model_interval_mass") is not None]
        for r in extra:
            width = "" if r.get("abundance_width_factor") is None else f", q(w) width factor {r['abundance_width_factor']:g}"
            model = f" (model {r['model']})" if r.get("model") else ""
            lines.append(f"{r['method']}{model}: {r.get('steps')} steps{width}; posterior mass inside its integer 90% "
                         f"intervals (the interval coverage a perfectly calibrated posterior would reach): "
                         f"{r['model_interval_mass']:.3f}.")
        lines += [""] + target_lines([r for r in rows if r["dataset"] == dataset]) + [""]
    invocations = payload["settings"].get("invocations")
    if invocations:
        lines += ["Invocations (the number in brackets after a method):", ""]
        lines += [f"{i + 1}. `{c}`" for i, c in enumerate(invocations)]
        lines.append("")
    selection = payload.get("selection")
    if selection:
        lines += ["## How pyrospatial's defaults were chosen (no ground truth)", "",
                  (f"Criterion: {selection['criterion']}. Pseudo-spots of the reference/spatial split seed 1 "
                   "(the benchmark uses seed 0); the true cell counts are deleted before any fit."), "",
                  "| dataset | concentration_mean | max_steps | init_prior_weight | held-out deviance | cpu seconds | run by |",
                  "|---|---|---|---|---|---|---|"]
        for r in selection["results"]:
            # rows from before init_prior_weight existed started the guide at NNLS: weight 0
            lines.append(f"| {r['dataset']} | {r['concentration_mean']} | {r['max_steps']} | {r.get('init_prior_weight', 0.0)} | "
                         f"{r['deviance']:.3f} | {r['cpu_seconds']:.0f} | {r.get('source', '--select')} |")
        lines.append("")
    lines += ["Settings: `" + json.dumps({k: v for k, v in payload["settings"].items()
                                         if k not in ("command", "invocations")}) + "`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 µm only, short training (development)")
    parser.add_argument("--methods", nargs="+", default=ALL_METHODS, choices=ALL_METHODS)
    parser.add_argument("--out", required=True)
    parser.add_argument("--datasets", nargs="+", default=None, choices=ALL_DATASETS,
                        help="run these, in this order (default: osmfish_100um osmfish_50um; --quick: 100 µm)")
    parser.add_argument("--out-name", default="deconvolution",
                        help="write DIR/<out-name>.json and .md (e.g. deconvolution_broad)")
    parser.add_argument("--method-timeouts", default=None,
                        help="JSON dict of seconds per method, replacing --timeout for those methods")
    parser.add_argument("--merge", nargs="+", default=None,
                        help="instead of running: merge the deconvolution.json of these folders into --out")
    parser.add_argument("--peer-python", default=str(ROOT / ".bench-venv" / "bin" / "python"))
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per method and dataset")
    parser.add_argument("--epochs-override", default=None,
                        help="JSON dict replacing some training lengths (recorded in the settings)")
    parser.add_argument("--note", default=None, help="with --merge: a note recorded in the settings")
    parser.add_argument("--selection", default=None,
                        help="with --merge: a deconvolution_selection.json to include in the report")
    parser.add_argument("--select", action="store_true",
                        help="instead of the benchmark: score pyrospatial settings by held-out-gene prediction "
                             "(no truth) and write DIR/deconvolution_selection.json")
    parser.add_argument("--select-grid", default=None,
                        help="with --select: a JSON list of deconvolve settings (default: SELECTION_GRID)")
    parser.add_argument("--split-seed", type=int, default=1,
                        help="with --select: the random reference/spatial split (default 1, not the benchmark's 0)")
    parser.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_one:
        run_method(args.run_one, Path(args.data), json.loads(args.epochs), Path(args.result))
        return 0
    if args.select:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        select_settings(args.quick, args.datasets, out,
                        json.loads(args.select_grid) if args.select_grid else None, args.split_seed)
        return 0
    if args.merge:
        parts = [json.loads((Path(d) / f"{args.out_name}.json").read_text()) for d in args.merge]
        settings = {}
        for p in parts:  # a later invocation's settings win; keys of earlier ones are kept
            settings.update(p["settings"])
        named = [d for p in parts for d in p["settings"].get("datasets", [])] + [r["dataset"] for p in parts for r in p["results"]]
        settings["datasets"] = sorted(dict.fromkeys(named), key=lambda d: ALL_DATASETS.index(d) if d in ALL_DATASETS else 99)
        settings["command"] = " ; ".join(p["settings"]["command"] for p in parts)
        settings["spot_sizes_um"] = sorted({s for p in parts for s in p["settings"]["spot_sizes_um"]}, reverse=True)
        # a part that is itself a merge brings its invocations (and its rows' numbers) along
        invocations: list[str] = []
        notes = [p["settings"]["note"] for p in parts if p["settings"].get("note")]
        # a later invocation's row replaces an earlier one for the same dataset and method
        rows: dict = {}
        for p in parts:
            base = len(invocations)
            nested = p["settings"].get("invocations")
            invocations += list(nested) if nested else [p["settings"]["command"]]
            for r in p["results"]:
                row = dict(r, invocation=base + (int(r.get("invocation", 0)) if nested else 0))
                for key in ("rmse", "pearson", "jsd", "coverage_90", "seconds", "peak_mem_mb"):
                    row.setdefault(key, None)  # the schema, also for a method that did not finish
                rows[(r["dataset"], r["method"])] = row
        order = {m: k for k, m in enumerate(ALL_METHODS)}
        data_order = {d: k for k, d in enumerate(ALL_DATASETS)}
        results = sorted(rows.values(), key=lambda r: (data_order.get(r["dataset"], 99), order.get(r["method"], 99)))
        settings["invocations"] = invocations
        settings["note"] = " ".join(notes + ([args.note] if args.note else []))
        payload = {"settings": settings, "results": results}
        if args.selection:
            payload["selection"] = json.loads(Path(args.selection).read_text())
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.out_name}.json").write_text(json.dumps(payload, indent=2))
        (out / f"{args.out_name}.md").write_text(markdown(payload))
        print(markdown(payload))
        return 0

    epochs = ({"pyrospatial": 300, "cell2location_reference": 20, "cell2location": 200, "stereoscope_reference": 10,
               "stereoscope": 50, "destvi_reference": 10, "destvi": 50, "tangram": 50} if args.quick else
              {"pyrospatial": None, "cell2location_reference": 250, "cell2location": 6000,
               "stereoscope_reference": 100, "stereoscope": 2000, "destvi_reference": 300, "destvi": 2000,
               "tangram": 1000})
    if args.epochs_override:  # e.g. a peer shortened to fit a session (recorded in the settings)
        epochs.update(json.loads(args.epochs_override))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    peer_ok = Path(args.peer_python).exists()
    timeouts = {m: args.timeout for m in ALL_METHODS}
    if args.method_timeouts:
        timeouts.update(json.loads(args.method_timeouts))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (reference, spots) in make_datasets(args.quick, only=args.datasets).items():
            classes_of = class_of(name)
            data = Path(tmp) / name
            data.mkdir()
            truth_frame = spots.obsm["cell_type_counts"]
            types = sorted(reference.obs["cell_type"].astype(str).unique())
            truth = truth_frame.reindex(columns=types, fill_value=0).to_numpy(float)
            spots.uns["bench_cells_per_spot"] = float(truth.sum(1).mean())
            del spots.obsm["cell_type_counts"]
            spots.write_h5ad(data / "spots.h5ad")
            reference.write_h5ad(data / "reference.h5ad")
            print(f"{name}: {spots.n_obs} spots, {truth.sum(1).mean():.1f} cells/spot", flush=True)
            for method in args.methods:
                record = {"dataset": name, "method": method, "n_spots": int(spots.n_obs)}
                python = args.peer_python if method in PEERS else sys.executable
                if method in PEERS and not peer_ok:
                    record.update(finished=False, reason=f"peer environment {args.peer_python} missing: run make bench-env")
                    results.append(record)
                    continue
                result = data / f"{method}.npz"
                cmd = [python, str(Path(__file__).resolve()), "--run-one", method, "--data", str(data), "--out", tmp,
                       "--result", str(result), "--epochs", json.dumps(epochs)]
                started = time.perf_counter()
                load_start = os.getloadavg()[0]
                try:
                    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeouts[method])
                    failed = proc.returncode != 0
                    reason = (proc.stderr or proc.stdout)[-600:] if failed else ""
                except subprocess.TimeoutExpired:
                    failed, reason = True, f"timed out after {timeouts[method]:.0f} s"
                wall = time.perf_counter() - started
                record["load_average_1min"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
                if failed or not result.exists():
                    record.update(finished=False, reason=reason.strip().replace("\n", " ")[-400:], wall_seconds=wall)
                else:
                    got = np.load(result)
                    lo, hi = got.get("lo"), got.get("hi")
                    record.update(metrics(got["prop"], truth, types, lo, hi, classes_of, got.get("draws")),
                                  seconds=float(got["seconds"]),
                                  cpu_seconds=float(got["cpu_seconds"]) if "cpu_seconds" in got else None,
                                  peak_mem_mb=float(got["peak_mem_mb"]), wall_seconds=wall, finished=True)
                    for key in ("model_interval_mass", "steps", "abundance_width_factor", "model"):
                        if key in got:
                            record[key] = got[key].item()
                print(json.dumps(record), flush=True)
                results.append(record)
    datasets = args.datasets or (["osmfish_100um"] if args.quick else ["osmfish_100um", "osmfish_50um"])
    settings = {
        "command": "python benchmarks/deconvolution.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "quick": bool(args.quick), "split_seed": 0, "grid": "square",
        "datasets": datasets, "spot_sizes_um": sorted({int(n.rsplit("_", 1)[1][:-2]) for n in datasets
                                                       if n.startswith("osmfish")}, reverse=True),
        "epochs": epochs, "timeouts_s": {m: timeouts[m] for m in args.methods}, "threads_per_process": 1, "machine": platform.platform(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "pyrospatial": "pyrospatial.deconvolve defaults: model='states' (n_states=3, reference_steps=400), "
                       "max_steps=250, concentration_mean=0.3, init_prior_weight=0.75, the width of q(w) chosen after "
                       "training by the importance-weighted bound (states; the ELBO for signatures); the model chosen by "
                       "held-out genes (choose_settings) on split seed 1 / simulator seed 1 and the signatures settings "
                       "by `--select` there, never by the truth",
        "cells_per_spot_hint": "cell2location gets N_cells_per_location = the true mean cells per spot; "
                               "pyrospatial estimates it from library sizes (its default)",
        "peer_python": os.path.relpath(args.peer_python, ROOT) if peer_ok else "missing",
    }
    if any(n.startswith("osmfish_broad") for n in datasets):
        settings["broad_classes"] = BROAD
    if "sim_gradient" in datasets:
        settings["sim_gradient"] = dict(SIM_GRADIENT, simulator="pyrospatial.data.sim_deconvolution.simulate_deconvolution")
    payload = {"settings": settings, "results": results}
    (out / f"{args.out_name}.json").write_text(json.dumps(payload, indent=2))
    (out / f"{args.out_name}.md").write_text(markdown(payload))
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
