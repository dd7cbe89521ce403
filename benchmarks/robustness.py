"""Robustness benchmark and fuzz harness (issue 17, item 6).

Generates bad or odd inputs from small valid ones (one corruption per case) for the Python API
and the command line of ``coral``/``fit``, ``deconvolve``, ``align`` and ``check``, runs each
with the cheapest settings and classifies the outcome:

- ``correct``: it ran and returned finite outputs of the right shape (CLI: exit 0 and a
  complete ``run.json``);
- ``clear_error``: a :class:`pyrospatial.errors.PyrospatialError` with a message (CLI: exit
  status 2 with a one-line message on stderr and no traceback);
- ``crash``: any other exception, an exit status outside {0, 2}, a traceback printed without
  ``--debug``, or non-finite outputs returned as a success;
- ``input_modified``: the inputs (AnnData deep copies, file hashes) differ after the call.

``tests/test_fuzz.py`` imports this module by path and drives :func:`case_strategy` with
hypothesis. As a script::

    python benchmarks/robustness.py --cases 300 --out benchmarks/results

writes ``robustness.json`` (counts and one record per case) and ``robustness.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
FAST_CLI = ["--max-epochs", "1", "--num-samples", "2", "--no-progress", "--device", "cpu"]

# ------------------------------------------------------------------------------------------
# corruptions: each takes an AnnData (a copy) and a numpy generator and returns the new AnnData
# ------------------------------------------------------------------------------------------
ADATA_CORRUPTIONS = [
    "none", "nan_x", "inf_x", "negative_x", "noninteger_x", "huge_x", "all_zero_x", "empty_obs",
    "empty_var", "one_gene", "single_obs", "two_obs", "csr_x", "csc_x", "coo_as_unsorted_csr_x", "int_x", "float16_x",
    "bool_x", "nan_coords", "inf_coords", "missing_spatial", "spatial_1_column", "spatial_3_columns",
    "string_coords", "units_x0.1", "units_x4.7", "units_x1000", "duplicate_var_names", "duplicate_obs_names",
    "single_type", "missing_type_key", "nan_type", "numeric_type", "constant_coords",
]
API_ONLY_CORRUPTIONS = ["not_anndata_array", "not_anndata_none", "not_anndata_dataframe", "anndata_view"]
FILE_CORRUPTIONS = ["missing_file", "empty_file", "truncated_file", "random_bytes", "csv_as_h5ad",
                    "directory_as_file", "tenx_h5_as_h5ad"]
ARGUMENT_CORRUPTIONS = {
    "coral": ["spot_diameter_str", "spot_diameter_negative", "spot_diameter_nan", "spot_diameter_huge",
              "layer_missing", "type_key_missing_arg"],
    "deconvolve": ["cells_per_spot_negative", "cells_per_spot_nan", "min_cells_huge", "layer_missing",
                   "type_key_missing_arg", "cells_per_spot_str"],
    "align": ["n_components_zero", "k_zero", "radius_negative", "layer_missing", "spatial_key_missing",
              "label_key_missing"],
}
ROLES = {"coral": ["cells", "spots"], "deconvolve": ["spots", "reference"], "align": ["a", "b"]}
TYPED_ROLES = {"cells": "cell_type", "reference": "cell_type", "a": "cell_type", "b": "cell_type"}
CHECK_CORRUPTIONS = ["none", "missing_folder", "empty_folder", "nc_truncated", "nc_random_bytes",
                     "nc_missing", "results_is_file", "nc_other_groups", "nc_is_folder", "out_is_file"]


@dataclass(frozen=True)
class Case:
    """One generated case: the target (``<method>_api``, ``<method>_cli`` or ``check_cli``),
    the corruption, which input it hits (``role``) and a seed for its random positions."""

    target: str
    corruption: str
    role: str
    seed: int


@dataclass
class Record:
    """The outcome of one case."""

    target: str
    corruption: str
    role: str
    seed: int
    outcome: str
    message: str
    seconds: float
    names_field: bool | None = None  # for clear errors: does the message name an input, field or file?


def corruptions_for(target: str) -> list[str]:
    """Every corruption that applies to ``target``."""
    if target == "check_cli":
        return list(CHECK_CORRUPTIONS)
    method, kind = target.split("_")
    kinds = ADATA_CORRUPTIONS + ARGUMENT_CORRUPTIONS[method]
    return kinds + FILE_CORRUPTIONS if kind == "cli" else kinds + API_ONLY_CORRUPTIONS


TARGETS = ["coral_api", "deconvolve_api", "align_api", "coral_cli", "fit_cli", "deconvolve_cli", "align_cli",
           "check_cli"]


def _method(target: str) -> str:
    method = target.split("_")[0]
    return "coral" if method == "fit" else method


def all_cases(seed: int = 0) -> list[Case]:
    """Every target x corruption x input it can hit once: the deterministic part of the benchmark
    (argument corruptions hit no input: one case each)."""
    cases = []
    for target in TARGETS:
        roles = ["results"] if target == "check_cli" else ROLES[_method(target)]
        for corruption in corruptions_for(target if target != "fit_cli" else "coral_cli"):
            hits = roles if corruption not in ARGUMENT_CORRUPTIONS.get(_method(target), []) else roles[:1]
            cases.extend(Case(target, corruption, role, seed) for role in hits)
    return cases


def _dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if sp.issparse(x) else x)


def corrupt_adata(adata, kind: str, role: str, rng: np.random.Generator):
    """``adata`` (a copy) with one corruption ``kind`` applied (anndata's warnings silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _corrupt_adata(adata, kind, role, rng)


def _corrupt_adata(adata, kind: str, role: str, rng: np.random.Generator):
    import anndata as ad

    x = _dense(adata.X).astype(np.float64)
    n, g = x.shape
    idx = (rng.integers(0, n, size=max(1, n // 10)), rng.integers(0, g, size=max(1, n // 10)))
    if kind == "none":
        return adata
    if kind in ("nan_x", "inf_x", "negative_x", "noninteger_x", "huge_x"):
        value = {"nan_x": np.nan, "inf_x": np.inf, "negative_x": -3.0, "huge_x": 1e30}.get(kind)
        x[idx] = x[idx] + 0.37 if kind == "noninteger_x" else value
        adata.X = x.astype(np.float32) if kind != "huge_x" else x
    elif kind == "all_zero_x":
        adata.X = np.zeros_like(x, dtype=np.float32)
    elif kind == "empty_obs":
        adata = adata[:0].copy()
    elif kind == "empty_var":
        adata = adata[:, :0].copy()
    elif kind == "one_gene":
        adata = adata[:, :1].copy()
    elif kind == "single_obs":
        adata = adata[:1].copy()
    elif kind == "two_obs":
        adata = adata[:2].copy()
    elif kind in ("csr_x", "csc_x"):
        adata.X = {"csr_x": sp.csr_matrix, "csc_x": sp.csc_matrix}[kind](x.astype(np.float32))
    elif kind == "coo_as_unsorted_csr_x":  # AnnData refuses COO; its CSR conversion may be unsorted
        csr = sp.coo_matrix(x.astype(np.float32)).tocsr()
        for row in range(csr.shape[0]):
            lo, hi = csr.indptr[row], csr.indptr[row + 1]
            csr.indices[lo:hi], csr.data[lo:hi] = csr.indices[lo:hi][::-1].copy(), csr.data[lo:hi][::-1].copy()
        csr.has_sorted_indices = False
        adata.X = csr
    elif kind == "int_x":
        adata.X = np.rint(x).astype(np.int64)
    elif kind == "float16_x":
        adata.X = x.astype(np.float16)
    elif kind == "bool_x":
        adata.X = x > 0
    elif kind in ("nan_coords", "inf_coords", "spatial_1_column", "spatial_3_columns", "string_coords",
                  "constant_coords") or kind.startswith("units_"):
        xy = np.asarray(adata.obsm["spatial"], dtype=np.float64).copy() if "spatial" in adata.obsm else np.zeros((n, 2))
        if kind in ("nan_coords", "inf_coords"):
            xy[rng.integers(0, n), rng.integers(0, 2)] = np.nan if kind == "nan_coords" else np.inf
        elif kind == "spatial_1_column":
            xy = xy[:, :1]
        elif kind == "spatial_3_columns":
            xy = np.column_stack([xy, np.zeros(n)])
        elif kind == "string_coords":
            xy = xy.astype(str)
        elif kind == "constant_coords":
            xy = np.zeros_like(xy)
        else:
            xy = xy * float(kind.split("_x")[1])
        adata.obsm["spatial"] = xy
    elif kind == "missing_spatial":
        adata.obsm.pop("spatial", None)
    elif kind == "duplicate_var_names":
        names = adata.var_names.to_numpy().copy()
        if len(names) > 1:
            names[1] = names[0]
        adata.var_names = pd.Index(names)
    elif kind == "duplicate_obs_names":
        names = adata.obs_names.to_numpy().copy()
        if len(names) > 1:
            names[-1] = names[0]
        adata.obs_names = pd.Index(names)
    elif kind in ("single_type", "missing_type_key", "nan_type", "numeric_type"):
        key = TYPED_ROLES.get(role)
        if key is None or key not in adata.obs:
            return adata
        if kind == "single_type":
            adata.obs[key] = pd.Categorical([str(adata.obs[key].iloc[0])] * n)
        elif kind == "missing_type_key":
            del adata.obs[key]
        elif kind == "nan_type":
            labels = adata.obs[key].astype(object).to_numpy()
            labels[rng.integers(0, n)] = np.nan
            adata.obs[key] = labels
        else:
            adata.obs[key] = pd.Categorical(adata.obs[key]).codes.astype(np.int64)
    else:
        raise ValueError(f"unknown corruption {kind!r}")
    assert isinstance(adata, ad.AnnData)
    return adata


# ------------------------------------------------------------------------------------------
# small valid inputs
# ------------------------------------------------------------------------------------------
def _reference_and_spots(seed: int, n_types: int = 3, n_genes: int = 15, n_spots: int = 25):
    import anndata as ad

    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 1.0, size=(n_types, n_genes))
    for t in range(n_types):
        base[t, t * 5:(t + 1) * 5] *= 8.0
    types = [f"type{t}" for t in range(n_types)]
    genes = [f"g{i}" for i in range(n_genes)]
    per_type = 12
    ref_x = np.concatenate([rng.poisson(base[t], size=(per_type, n_genes)) for t in range(n_types)])
    reference = ad.AnnData(ref_x.astype(np.float32),
                           obs=pd.DataFrame({"cell_type": pd.Categorical(np.repeat(types, per_type))},
                                            index=[f"c{i}" for i in range(len(ref_x))]),
                           var=pd.DataFrame(index=genes))
    counts = rng.poisson(rng.gamma(1.0, 2.0, size=(n_spots, n_types)) + 0.5)
    x = counts @ base + rng.poisson(1.0, size=(n_spots, n_genes))
    side = int(np.ceil(np.sqrt(n_spots)))
    xy = np.stack(np.divmod(np.arange(n_spots), side), 1).astype(float) * 100.0
    spots = ad.AnnData(np.rint(x).astype(np.float32), obs=pd.DataFrame(index=[f"s{j}" for j in range(n_spots)]),
                       var=pd.DataFrame(index=genes), obsm={"spatial": xy})
    return spots, reference


_BASE: dict[int, dict[str, Any]] = {}


def base_inputs(seed: int = 0) -> dict[str, Any]:
    """Small valid inputs of every method (cached per seed; callers must copy)."""
    if seed not in _BASE:
        from pyrospatial.data.sim import simulate_tissue
        from pyrospatial.methods.alignment_features import simulate_pair

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tissue = simulate_tissue(n_cells=120, n_types=3, n_proteins=5, n_genes=10, seed=seed, cells_per_spot=4.0)
            a, b, _ = simulate_pair(70, seed=seed, n_types=3, n_proteins=6, n_genes=10)
        spots, reference = _reference_and_spots(seed)
        _BASE[seed] = {"cells": tissue.cells, "spots_coral": tissue.spots, "spots": spots, "reference": reference,
                       "a": a, "b": b}
    return _BASE[seed]


def _inputs_of(method: str, seed: int) -> dict[str, Any]:
    base = base_inputs(seed % 2)
    if method == "coral":
        return {"cells": base["cells"].copy(), "spots": base["spots_coral"].copy()}
    if method == "deconvolve":
        return {"spots": base["spots"].copy(), "reference": base["reference"].copy()}
    return {"a": base["a"].copy(), "b": base["b"].copy()}


def _arguments(method: str, corruption: str) -> dict[str, Any]:
    if method == "coral":
        kwargs: dict[str, Any] = {"cell_type_key": "cell_type", "spot_diameter": 55.0}
        changes = {"spot_diameter_str": {"spot_diameter": "55um"}, "spot_diameter_negative": {"spot_diameter": -5.0},
                   "spot_diameter_nan": {"spot_diameter": float("nan")}, "spot_diameter_huge": {"spot_diameter": 1e12},
                   "layer_missing": {"protein_layer": "no_such_layer"},
                   "type_key_missing_arg": {"cell_type_key": "no_such_column"}}
    elif method == "deconvolve":
        kwargs = {"cell_type_key": "cell_type", "cells_per_spot": 5.0, "min_cells_per_type": 2}
        changes = {"cells_per_spot_negative": {"cells_per_spot": -1.0},
                   "cells_per_spot_nan": {"cells_per_spot": float("nan")},
                   "cells_per_spot_str": {"cells_per_spot": "many"}, "min_cells_huge": {"min_cells_per_type": 10**6},
                   "layer_missing": {"layer": "no_such_layer"},
                   "type_key_missing_arg": {"cell_type_key": "no_such_column"}}
    else:
        kwargs = {"n_components": 3, "k": 6}
        changes = {"n_components_zero": {"n_components": 0}, "k_zero": {"k": 0}, "radius_negative": {"radius": -1.0},
                   "layer_missing": {"layer_a": "no_such_layer"}, "spatial_key_missing": {"spatial_key": "nope"},
                   "label_key_missing": {"label_keys": ["no_such_column"]}}
    kwargs.update(changes.get(corruption, {}))
    return kwargs


# ------------------------------------------------------------------------------------------
# comparing inputs before and after
# ------------------------------------------------------------------------------------------
def _same_array(a: Any, b: Any) -> bool:
    if sp.issparse(a) != sp.issparse(b) or (sp.issparse(a) and a.format != b.format):
        return False
    a, b = _dense(a), _dense(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind in "fc":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def _same_frame(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    try:  # plain frames: an AnnData view's obs is a DataFrameView
        pd.testing.assert_frame_equal(pd.DataFrame(a), pd.DataFrame(b), check_exact=True)
    except AssertionError:
        return False
    return True


def same_adata(a, b) -> bool:
    """True when two AnnData hold the same X, names, obs, var, obsm, layers and uns keys."""
    if not _same_array(a.X, b.X) or not a.obs_names.equals(b.obs_names) or not a.var_names.equals(b.var_names):
        return False
    if not _same_frame(a.obs, b.obs) or not _same_frame(a.var, b.var):
        return False
    for left, right in ((a.obsm, b.obsm), (a.layers, b.layers)):
        if set(left.keys()) != set(right.keys()):
            return False
        if not all(_same_array(np.asarray(left[k]) if not sp.issparse(left[k]) else left[k],
                               np.asarray(right[k]) if not sp.issparse(right[k]) else right[k]) for k in left):
            return False
    return set(a.uns.keys()) == set(b.uns.keys())


def _snapshot(value: Any) -> Any:
    """A deep copy to compare against after the call (``AnnData.copy``: deepcopy of a view
    returns its parent's data)."""
    import anndata as ad

    return value.copy() if isinstance(value, ad.AnnData) else copy.deepcopy(value)


def _same_input(a: Any, b: Any) -> bool:
    """:func:`same_adata` for AnnData, equality for arrays and frames, identity of ``None``."""
    import anndata as ad

    if isinstance(a, ad.AnnData) and isinstance(b, ad.AnnData):
        return same_adata(a, b)
    if isinstance(a, pd.DataFrame) and isinstance(b, pd.DataFrame):
        return a.equals(b)
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return _same_array(a, b)
    return a is None and b is None


def _digest(path: Path) -> str | None:
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if path.is_dir():
        return ";".join(f"{p.relative_to(path)}:{_digest(p)}" for p in sorted(path.rglob("*")) if p.is_file())
    return None


# ------------------------------------------------------------------------------------------
# running the API
# ------------------------------------------------------------------------------------------
def _finite(*arrays: Any) -> bool:
    for array in arrays:
        values = _dense(array)
        if values.dtype.kind in "fc" and not np.all(np.isfinite(values)):
            return False
    return True


def _run_api(method: str, inputs: dict[str, Any], kwargs: dict[str, Any]) -> tuple[bool, str]:
    """Run the method; returns (outputs finite and well shaped, a note)."""
    import pyrospatial as ps

    if method == "coral":
        model = ps.CORAL(inputs["cells"], inputs["spots"], **kwargs)
        model.train(max_epochs=1, progress=False, device="cpu", seed=0)
        model.sample(2, method="guide")
        cells_out, spots_out = model.export()
        n = len(model.dataset.cell_names)
        ok = cells_out.n_obs == n and _finite(cells_out.X) and (spots_out is None or _finite(spots_out.X))
        return ok, f"{n} cells"
    if method == "deconvolve":
        out = ps.deconvolve(inputs["spots"], inputs["reference"], max_steps=3, min_steps=1, num_samples=2,
                            progress=False, **kwargs)
        fractions = [out.obsm[k] for k in out.obsm]
        ok = out.n_obs == inputs["spots"].n_obs and _finite(*[np.asarray(f, dtype=float) for f in fractions])
        return ok, f"{out.n_obs} spots"
    res = ps.align(inputs["a"], inputs["b"], steps=2, num_samples=2, progress=False, **kwargs)
    ok = res.aligned.shape == (inputs["a"].n_obs, 2) and _finite(res.aligned, res.transform_draws, res.p_unmatched)
    return ok, f"angle {res.transform['angle']['mean']:.3f}"


def run_api_case(case: Case) -> Record:
    """Run one API case and classify it."""
    from pyrospatial.errors import PyrospatialError

    method = _method(case.target)
    start = time.perf_counter()
    inputs = _inputs_of(method, case.seed)
    rng = np.random.default_rng(case.seed)
    if case.corruption in ADATA_CORRUPTIONS:
        inputs[case.role] = corrupt_adata(inputs[case.role], case.corruption, case.role, rng)
    elif case.corruption == "not_anndata_array":
        inputs[case.role] = _dense(inputs[case.role].X).copy()
    elif case.corruption == "not_anndata_none":
        inputs[case.role] = None
    elif case.corruption == "not_anndata_dataframe":
        inputs[case.role] = inputs[case.role].to_df()
    elif case.corruption == "anndata_view":
        inputs[case.role] = inputs[case.role][: max(3, inputs[case.role].n_obs - 1)]
    kwargs = _arguments(method, case.corruption)
    before = {k: _snapshot(v) for k, v in inputs.items()}
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            ok, note = _run_api(method, inputs, kwargs)
        outcome, message = ("correct", note) if ok else ("crash", "non-finite or mis-shaped outputs returned")
    except PyrospatialError as error:
        message = " ".join(str(error).split())
        outcome = "clear_error" if message else "crash"
        message = f"{type(error).__name__}: {message}"
    except Exception as error:  # noqa: BLE001 - a crash is what we are looking for
        outcome = "crash"
        frames = traceback.extract_tb(error.__traceback__)
        where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
        message = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}{where}"
    if not all(_same_input(before[k], inputs[k]) for k in inputs):
        outcome = "input_modified"
    return Record(case.target, case.corruption, case.role, case.seed, outcome, message[:300],
                  round(time.perf_counter() - start, 3))


# ------------------------------------------------------------------------------------------
# running the CLI
# ------------------------------------------------------------------------------------------
def _write(adata, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.write_h5ad(path)


def _corrupt_file(path: Path, kind: str, rng: np.random.Generator) -> None:
    """Replace the valid file at ``path`` by the corrupted one of ``kind``."""
    data = path.read_bytes()
    path.unlink()
    if kind == "missing_file":
        return
    if kind == "empty_file":
        path.write_bytes(b"")
    elif kind == "truncated_file":
        path.write_bytes(data[: int(len(data) * rng.uniform(0.1, 0.9))])
    elif kind == "random_bytes":
        path.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "csv_as_h5ad":
        path.write_text("cell,x,y,CD3\nc1,1.0,2.0,5\nc2,3.0,4.0,0\n")
    elif kind == "directory_as_file":
        path.mkdir()
    elif kind == "tenx_h5_as_h5ad":
        import h5py

        with h5py.File(path, "w") as handle:
            matrix = handle.create_group("matrix")
            matrix.create_dataset("data", data=np.array([1, 2], dtype=np.int32))
            matrix.create_dataset("shape", data=np.array([3, 2], dtype=np.int64))


def _cli_argv(method: str, paths: dict[str, Path], kwargs: dict[str, Any], out: Path, command: str) -> list[str]:
    if method == "coral":
        argv = [command, "--cells", str(paths["cells"]), "--spots", str(paths["spots"]), "--cell-type-key",
                str(kwargs["cell_type_key"]), "--spot-diameter", str(kwargs["spot_diameter"]), "--posterior", "guide"]
        if "protein_layer" in kwargs:
            argv += ["--protein-layer", kwargs["protein_layer"]]
    elif method == "deconvolve":
        argv = ["deconvolve", "--spots", str(paths["spots"]), "--reference", str(paths["reference"]),
                "--cell-type-key", str(kwargs["cell_type_key"]), "--cells-per-spot", str(kwargs["cells_per_spot"]),
                "--min-cells-per-type", str(kwargs["min_cells_per_type"])]
        if "layer" in kwargs:
            argv += ["--spot-layer", kwargs["layer"]]
    else:
        argv = ["align", str(paths["a"]), str(paths["b"]), "--n-components", str(kwargs["n_components"]),
                "--k", str(kwargs["k"])]
        for name, flag in (("radius", "--radius"), ("layer_a", "--layer-a"), ("spatial_key", "--spatial-key")):
            if name in kwargs:
                argv += [flag, str(kwargs[name])]
        for key in kwargs.get("label_keys", []):
            argv += ["--label-key", key]
    return [*argv, "--out", str(out), *FAST_CLI]


def _classify_cli(code: int | None, stderr: str, out: Path | None, debug: bool = False) -> tuple[str, str]:
    from pyrospatial.outputs import read_run_marker

    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if "Traceback" in stderr and not debug:
        return "crash", f"traceback printed: {last[:200]}"
    if code == 0:
        if out is not None:
            marker = read_run_marker(out)
            if not marker or marker.get("status") != "complete":
                return "crash", "exit 0 without a complete run.json"
        return "correct", "exit 0"
    if code == 2:
        return ("clear_error", last) if last else ("crash", "exit 2 without a message")
    return "crash", f"exit status {code}: {last[:200]}"


def run_cli_in_process(argv: list[str]) -> tuple[int | None, str, str]:
    """``pyrospatial.cli.main(argv)`` with stdout/stderr captured; an uncaught exception is
    returned as exit status None with its traceback in stderr."""
    from pyrospatial import cli

    stdout, stderr = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        warnings.simplefilter("ignore")
        try:
            code = cli.main(argv)
        except SystemExit as stop:  # argparse: exit 2 with usage and a one-line error
            code = stop.code if isinstance(stop.code, int) else 1
        except Exception:  # noqa: BLE001
            code = None
            stderr.write(traceback.format_exc())
    return code, stdout.getvalue(), stderr.getvalue()


def run_cli_subprocess(argv: list[str], timeout: float = 600) -> tuple[int | None, str, str]:
    """``python -m pyrospatial.cli argv`` in a real process."""
    proc = subprocess.run([sys.executable, "-m", "pyrospatial.cli", *argv], capture_output=True, text=True, check=False,
                          timeout=timeout, cwd=ROOT, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                                                          "PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore"})
    return proc.returncode, proc.stdout, proc.stderr


_CORAL_RESULTS: dict[str, Path] = {}


def _coral_results(workdir: Path) -> Path:
    """A valid ``pyrospatial coral`` output folder (made once per process) for ``check``."""
    key = str(workdir)
    if key not in _CORAL_RESULTS:
        inputs = _inputs_of("coral", 0)
        folder = Path(tempfile.mkdtemp(prefix="check_inputs_", dir=workdir))
        paths = {name: folder / f"{name}.h5ad" for name in inputs}
        for name, adata in inputs.items():
            _write(adata, paths[name])
        out = folder / "coral_results"
        code, _, stderr = run_cli_in_process(_cli_argv("coral", paths, _arguments("coral", "none"), out, "coral"))
        if code != 0:
            raise RuntimeError(f"the valid coral run for `check` failed: {stderr[-2000:]}")
        _CORAL_RESULTS[key] = out
    return _CORAL_RESULTS[key]


def run_cli_case(case: Case, workdir: Path, subprocess_run: bool = False) -> Record:
    """Run one CLI case (in process unless ``subprocess_run``) and classify it."""
    start = time.perf_counter()
    run = run_cli_subprocess if subprocess_run else run_cli_in_process
    folder = Path(tempfile.mkdtemp(dir=workdir))
    rng = np.random.default_rng(case.seed)
    out = folder / "out"
    if case.target == "check_cli":
        results = folder / "results"
        shutil.copytree(_coral_results(workdir), results)
        nc = results / "inference_data.nc"
        if case.corruption == "missing_folder":
            shutil.rmtree(results)
        elif case.corruption == "empty_folder":
            shutil.rmtree(results)
            results.mkdir()
        elif case.corruption == "nc_truncated":
            nc.write_bytes(nc.read_bytes()[: nc.stat().st_size // 2])
        elif case.corruption == "nc_random_bytes":
            nc.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        elif case.corruption == "nc_missing":
            nc.unlink()
        elif case.corruption == "results_is_file":
            shutil.rmtree(results)
            results.write_text("not a folder\n")
        elif case.corruption == "nc_other_groups":  # a valid netcdf without the groups `check` reads
            import arviz as az

            nc.unlink()
            az.from_dict(posterior={"x": rng.normal(size=(1, 2))}).to_netcdf(str(nc))
        elif case.corruption == "nc_is_folder":
            nc.unlink()
            nc.mkdir()
        elif case.corruption == "out_is_file":
            out.write_text("a file where the output folder should go\n")
        argv = ["check", "--results", str(results), "--out", str(out), "--n-features", "1"]
        watched = [results]
    else:
        method = _method(case.target)
        inputs = _inputs_of(method, case.seed)
        if case.corruption in ADATA_CORRUPTIONS:
            inputs[case.role] = corrupt_adata(inputs[case.role], case.corruption, case.role, rng)
        paths = {name: folder / f"{name}.h5ad" for name in inputs}
        try:
            for name, adata in inputs.items():
                _write(adata, paths[name])
        except Exception as error:  # noqa: BLE001 - anndata refuses to write it: not our input
            shutil.rmtree(folder, ignore_errors=True)
            return Record(case.target, case.corruption, case.role, case.seed, "skipped",
                          f"anndata cannot write it: {type(error).__name__}", round(time.perf_counter() - start, 3))
        if case.corruption in FILE_CORRUPTIONS:
            _corrupt_file(paths[case.role], case.corruption, rng)
        command = "fit" if case.target == "fit_cli" else method
        argv = _cli_argv(method, paths, _arguments(method, case.corruption), out, command)
        watched = list(paths.values())
    before = {str(p): _digest(p) for p in watched}
    code, _, stderr = run(argv)
    outcome, message = _classify_cli(code, stderr, out if code == 0 else None)
    # the case's temporary folder is named, not its path on this machine (the results are committed)
    message = message.replace(str(folder), "CASE_DIR").replace(str(workdir), "WORK_DIR")
    if code != 0 and out.exists() and case.corruption != "out_is_file" and outcome != "crash":
        outcome, message = "crash", f"an output folder was created on an error: {message}"
    if {str(p): _digest(p) for p in watched} != before:
        outcome = "input_modified"
    shutil.rmtree(folder, ignore_errors=True)
    return Record(case.target, case.corruption, case.role, case.seed, outcome, message[:300],
                  round(time.perf_counter() - start, 3))


FIELD_WORDS = ("cells", "spots", "reference", "a.", "b.", "a has", "b has", "a is", "b is", "--", "/",
               "spot_diameter", "cells_per_spot", "min_cells_per_type", "cell_type_key", "k must", "radius",
               "label key", "n_components", "inference_data", "idata", "layer", "site '", "a must", "b must",
               "of a ", "of b ")


def names_a_field(message: str) -> bool:
    """Whether an error message names an input (``cells``, ``a.obsm[...]``), an argument, a file
    or a model site, after its ``pyrospatial <command>: <ErrorType>:`` prefix."""
    text = message.split(": ", 1)[1] if ": " in message else message
    if text.startswith("pyrospatial") or text.split(":")[0].endswith("Error"):
        text = text.split(": ", 1)[-1]
    return any(word in text for word in FIELD_WORDS)


def run_case(case: Case, workdir: Path, subprocess_run: bool = False) -> Record:
    """Run one case of any target."""
    record = run_api_case(case) if case.target.endswith("_api") else run_cli_case(case, workdir, subprocess_run)
    if record.outcome == "clear_error":
        record.names_field = names_a_field(record.message)
    return record


def case_strategy(targets: list[str] | None = None):
    """A hypothesis strategy of :class:`Case` (one target, one of its corruptions, a role, a seed)."""
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        target = draw(st.sampled_from(targets or TARGETS))
        corruption = draw(st.sampled_from(corruptions_for("coral_cli" if target == "fit_cli" else target)))
        roles = ["results"] if target == "check_cli" else ROLES[_method(target)]
        return Case(target, corruption, draw(st.sampled_from(roles)), draw(st.integers(0, 2**16)))

    return cases()


# ------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------
def generate_cases(n: int, seed: int = 0) -> list[Case]:
    """Every target x corruption once, then hypothesis-generated cases up to ``n``."""
    from hypothesis import HealthCheck, Phase, given, settings

    cases = all_cases(seed)
    extra: list[Case] = []
    if n > len(cases):
        @settings(max_examples=n - len(cases), derandomize=True, database=None, phases=[Phase.generate],
                  deadline=None, suppress_health_check=list(HealthCheck))
        @given(case_strategy())
        def collect(case: Case) -> None:
            extra.append(case)

        collect()
    return (cases + extra)[: max(n, len(cases))] if n > len(cases) else cases


def summarise(records: list[Record]) -> dict[str, Any]:
    """Counts of each outcome."""
    counted = [r for r in records if r.outcome != "skipped"]
    return {"cases_tried": len(counted),
            "clear_errors": sum(r.outcome == "clear_error" for r in counted),
            "correct_results": sum(r.outcome == "correct" for r in counted),
            "crashes": sum(r.outcome == "crash" for r in counted),
            "inputs_modified": sum(r.outcome == "input_modified" for r in counted),
            "clear_errors_not_naming_a_field": sum(r.names_field is False for r in counted),
            "skipped": len(records) - len(counted)}


def write_markdown(path: Path, summary: dict[str, Any], records: list[Record], meta: dict[str, Any]) -> None:
    """``robustness.md``: the counts, then one row per target x corruption kind."""
    table: dict[tuple[str, str], dict[str, int]] = {}
    for r in records:
        row = table.setdefault((r.target, r.corruption), {})
        row[r.outcome] = row.get(r.outcome, 0) + 1
    lines = ["# Robustness benchmark (issue 17, item 6)", "", f"Command: `{meta['command']}`", "",
             f"Versions: {json.dumps(meta['versions'])}", "", f"Wall time: {meta['seconds']:.0f} s", "",
             ("| cases tried | clear errors | correct results | crashes | inputs modified | skipped "
              "| clear errors whose message names no input, field or file |"),
             "|---|---|---|---|---|---|---|",
             ("| {cases_tried} | {clear_errors} | {correct_results} | {crashes} | {inputs_modified} | {skipped} "
              "| {clear_errors_not_naming_a_field} |").format(**summary), "",
             ("A correct result means: it ran and returned finite outputs of the right shape (CLI: exit 0 and a "
              "complete run.json); it does not judge the values. Targets marked (subprocess) ran "
              "`python -m pyrospatial.cli` in a real process."), "",
             "| target | corruption | cases | clear error | correct | crash | input modified | skipped |",
             "|---|---|---|---|---|---|---|---|"]
    for (target, corruption), row in sorted(table.items()):
        lines.append(f"| {target} | {corruption} | {sum(row.values())} | {row.get('clear_error', 0)} | "
                     f"{row.get('correct', 0)} | {row.get('crash', 0)} | {row.get('input_modified', 0)} | "
                     f"{row.get('skipped', 0)} |")
    path.write_text("\n".join(lines) + "\n")


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("pyrospatial", "torch", "pyro-ppl", "anndata", "numpy", "hypothesis"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write robustness.json and robustness.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=300, help="cases to run (at least every target x corruption)")
    parser.add_argument("--subprocess-cases", type=int, default=6, help="CLI cases also run in a real process")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    cases = generate_cases(args.cases)
    records: list[Record] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cli_cases = [c for c in cases if c.target.endswith("_cli")]
        chosen = set(np.random.default_rng(0).choice(len(cli_cases), size=min(args.subprocess_cases,
                                                                               len(cli_cases)), replace=False))
        sub = {id(cli_cases[i]) for i in chosen}
        for i, case in enumerate(cases):
            record = run_case(case, workdir, subprocess_run=id(case) in sub)
            if id(case) in sub:
                record.target += " (subprocess)"
            records.append(record)
            print(f"[{i + 1}/{len(cases)}] {record.target} {record.corruption} {record.role}: {record.outcome} "
                  f"{record.message[:120]}", flush=True)
    summary = summarise(records)
    meta = {"command": "python benchmarks/robustness.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "versions": _versions(), "seconds": time.perf_counter() - start}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "robustness.json").write_text(json.dumps({**summary, **meta, "records": [asdict(r) for r in records]},
                                                    indent=1) + "\n")
    write_markdown(out / "robustness.md", summary, records, meta)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
