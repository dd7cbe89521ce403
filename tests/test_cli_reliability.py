"""The CLI under bad files and interruptions (issue 17, items 4 and 5): every file problem is a
one-line `pyrospatial.errors` message with exit status 2 and no traceback (--debug shows it),
nothing is created on input errors, a non-empty --out is refused without --overwrite, and a run
killed with SIGKILL leaves nothing at --out that looks complete."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from pyrospatial import cli
from pyrospatial.errors import OutputFolderError
from pyrospatial.outputs import RUN_MARKER, output_folder, read_run_marker

FAST = ["--max-epochs", "2", "--num-samples", "2", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from pyrospatial.data.sim import simulate_tissue
    from pyrospatial.methods.alignment_features import simulate_pair

    folder = tmp_path_factory.mktemp("inputs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tissue = simulate_tissue(n_cells=300, seed=0)
        a, b, _ = simulate_pair(120, seed=0)
    paths = {name: folder / f"{name}.h5ad" for name in ("cells", "spots", "a", "b")}
    tissue.cells.write_h5ad(paths["cells"])
    tissue.spots.write_h5ad(paths["spots"])
    a.write_h5ad(paths["a"])
    b.write_h5ad(paths["b"])
    return paths


def coral_argv(cells: Path, spots: Path, out: Path, *extra: str) -> list[str]:
    return ["coral", "--cells", str(cells), "--spots", str(spots), "--cell-type-key", "cell_type",
            "--spot-diameter", "55", "--posterior", "guide", "--out", str(out), *FAST, *extra]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(parent: Path, name: str) -> list[Path]:
    """Anything the run created beside --out (temporary folders included)."""
    return [p for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


# ------------------------------------------------------------------------------------------
# bad files
# ------------------------------------------------------------------------------------------
def _make_bad(kind: str, good: Path, folder: Path) -> Path:
    path = folder / f"bad_{kind}.h5ad"
    if kind == "missing":
        return path
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "csv":
        path.write_text("cell,x,y,CD3\nc1,1.0,2.0,5\nc2,3.0,4.0,0\n")
    elif kind == "tenx_h5":
        with h5py.File(path, "w") as handle:
            matrix = handle.create_group("matrix")
            matrix.create_dataset("data", data=np.array([1, 2], dtype=np.int32))
            matrix.create_dataset("indices", data=np.array([0, 1], dtype=np.int64))
            matrix.create_dataset("indptr", data=np.array([0, 1, 2], dtype=np.int64))
            matrix.create_dataset("shape", data=np.array([2, 2], dtype=np.int64))
            matrix.create_dataset("barcodes", data=np.array([b"AAAC-1", b"AAAG-1"]))
            features = matrix.create_group("features")
            features.create_dataset("id", data=np.array([b"g1", b"g2"]))
            features.create_dataset("name", data=np.array([b"G1", b"G2"]))
            features.create_dataset("feature_type", data=np.array([b"Gene Expression"] * 2))
    elif kind == "directory":
        path.mkdir()
    return path


BAD_KINDS = ["missing", "empty", "truncated", "random_bytes", "csv", "tenx_h5", "directory"]
EXPECTED_WORDS = {"missing": "does not exist", "empty": "empty", "truncated": "corrupt",
                  "random_bytes": "not an HDF5", "csv": "text file", "tenx_h5": "read_10x_h5",
                  "directory": "folder"}


def _argv_for(command: str, bad: Path, inputs: dict[str, Path], out: Path) -> list[str]:
    if command == "coral":
        return coral_argv(bad, inputs["spots"], out)
    if command == "deconvolve":
        return ["deconvolve", "--spots", str(inputs["spots"]), "--reference", str(bad), "--cell-type-key",
                "cell_type", "--out", str(out), *FAST]
    return ["align", str(inputs["a"]), str(bad), "--out", str(out), *FAST]


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("command", ["coral", "deconvolve", "align"])
def test_a_bad_file_is_one_clear_line_exit_2_and_creates_nothing(tmp_path, capsys, inputs, kind, command):
    bad = _make_bad(kind, inputs["cells"], tmp_path)
    out = tmp_path / "results"
    before = {name: digest(path) for name, path in inputs.items()}
    assert cli.main(_argv_for(command, bad, inputs, out)) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in captured.err
    assert bad.name in err  # names the file
    assert EXPECTED_WORDS[kind].lower() in err.lower(), err
    assert leftovers(tmp_path, "results") == []  # nothing created
    assert {name: digest(path) for name, path in inputs.items()} == before  # inputs never modified


def test_debug_shows_the_traceback(tmp_path, capsys, inputs):
    bad = _make_bad("random_bytes", inputs["cells"], tmp_path)
    assert cli.main([*coral_argv(bad, inputs["spots"], tmp_path / "o"), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_out_pointing_to_a_file_is_refused(tmp_path, capsys, inputs):
    target = tmp_path / "results"
    target.write_text("keep me")
    assert cli.main(coral_argv(inputs["cells"], inputs["spots"], target)) == 2
    assert "is an existing file" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_duplicated_gene_names_stop_coral_and_create_nothing(tmp_path, capsys, inputs):
    import anndata as ad

    spots = ad.read_h5ad(inputs["spots"])
    names = list(spots.var_names)
    names[1] = names[0]
    spots.var_names = names
    path = tmp_path / "dup.h5ad"
    spots.write_h5ad(path)
    assert cli.main(coral_argv(inputs["cells"], path, tmp_path / "results")) == 2
    err = capsys.readouterr().err
    assert "DuplicateNamesError" in err and "var_names_make_unique" in err
    assert leftovers(tmp_path, "results") == []


def test_a_units_mismatch_stops_coral_with_the_override_named(tmp_path, capsys, inputs):
    import anndata as ad

    cells = ad.read_h5ad(inputs["cells"])
    cells.obsm["spatial"] = np.asarray(cells.obsm["spatial"]) * 4.7
    path = tmp_path / "cells_px.h5ad"
    cells.write_h5ad(path)
    assert cli.main(coral_argv(path, inputs["spots"], tmp_path / "results")) == 2
    err = capsys.readouterr().err
    assert "GeometryError" in err and "--skip-geometry-checks" in err
    assert leftovers(tmp_path, "results") == []
    # the override, for the rare real case: the run goes through
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli.main([*coral_argv(path, inputs["spots"], tmp_path / "results"), "--skip-geometry-checks",
                         "--assignment", "nearest"])
    assert code == 0 and read_run_marker(tmp_path / "results")["settings"]["skip_geometry_checks"] is True


# ------------------------------------------------------------------------------------------
# output folders
# ------------------------------------------------------------------------------------------
def test_non_empty_out_is_refused_without_overwrite_and_replaced_with_it(tmp_path, capsys, inputs):
    out = tmp_path / "results"
    out.mkdir()
    (out / "old.txt").write_text("previous results")
    argv = ["align", str(inputs["a"]), str(inputs["b"]), "--out", str(out), *FAST]
    assert cli.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "old.txt").read_text() == "previous results"
    before = {name: digest(path) for name, path in inputs.items()}
    assert cli.main([*argv, "--overwrite"]) == 0
    assert not (out / "old.txt").exists()
    marker = read_run_marker(out)
    assert marker["status"] == "complete" and marker["command"] == "align"
    assert marker["settings"]["max_epochs"] == 2 and "torch" in marker["versions"]
    assert marker["duration_s"] >= 0 and marker["started"] <= marker["finished"]
    assert (out / "aligned_a.h5ad").is_file() and (out / "alignment.json").is_file()
    assert leftovers(tmp_path, "results") == [out]  # no temporary folder left
    assert {name: digest(path) for name, path in inputs.items()} == before


def test_coral_writes_run_json_last_and_an_empty_out_is_fine(tmp_path, inputs):
    out = tmp_path / "results"
    out.mkdir()  # an existing empty folder is not refused
    assert cli.main(coral_argv(inputs["cells"], inputs["spots"], out)) == 0
    marker = json.loads((out / RUN_MARKER).read_text())
    assert marker["status"] == "complete" and marker["argv"][:2] == ["pyrospatial", "coral"]
    written = max((p for p in out.rglob("*") if p.is_file() and p.name != RUN_MARKER), key=os.path.getmtime)
    assert os.path.getmtime(out / RUN_MARKER) >= os.path.getmtime(written)
    assert (out / "cells.h5ad").is_file() and (out / "figures").is_dir()
    # check --out goes through the same output folder machinery
    checked = tmp_path / "checked"
    assert cli.main(["check", "--results", str(out), "--out", str(checked)]) == 0
    assert read_run_marker(checked)["command"] == "check" and (checked / "ppc_summary.csv").is_file()
    assert cli.main(["check", "--results", str(out), "--out", str(checked)]) == 2  # not empty now
    assert cli.main(["check", "--results", str(out), "--out", str(checked), "--overwrite"]) == 0


def test_output_folder_keeps_the_old_results_when_the_run_fails(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "old.txt").write_text("previous")
    with pytest.raises(RuntimeError), output_folder(out, command="test", overwrite=True) as staging:
        (staging / "half.txt").write_text("half")
        raise RuntimeError("killed mid-way")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert leftovers(tmp_path, "results") == [out]


def test_a_run_killed_with_sigkill_leaves_nothing_that_looks_complete(tmp_path, inputs):
    out = tmp_path / "results"
    argv = coral_argv(inputs["cells"], inputs["spots"], out)
    argv[argv.index("--max-epochs") + 1] = "100000"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pyrospatial.cli", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.startswith(".results.partial-") for p in tmp_path.iterdir()):
            assert proc.poll() is None, "the run ended before it started writing"
            assert time.monotonic() < deadline, "no temporary folder appeared"
            time.sleep(0.05)
        time.sleep(random.uniform(0.5, 3.0))  # a random point of the run
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() or not (out / RUN_MARKER).exists()


def test_missing_parents_are_created_and_removed_again_on_an_input_error(tmp_path, capsys, inputs):
    bad = _make_bad("empty", inputs["cells"], tmp_path)
    nested = tmp_path / "runs" / "today" / "results"
    with pytest.raises(ValueError), output_folder(nested, command="test"):
        raise ValueError("input error")
    assert not (tmp_path / "runs").exists()
    assert cli.main(coral_argv(bad, inputs["spots"], nested)) == 2
    assert not (tmp_path / "runs").exists()
    with output_folder(nested, command="test") as staging:
        (staging / "x.txt").write_text("x")
    assert (nested / "x.txt").is_file() and read_run_marker(nested)["status"] == "complete"


def test_results_are_kept_when_out_fills_up_during_the_run(tmp_path):
    out = tmp_path / "results"
    with pytest.raises(OutputFolderError, match="kept in") as info, output_folder(out, command="test") as staging:
        (staging / "result.txt").write_text("done")
        out.mkdir()
        (out / "other.txt").write_text("written meanwhile by someone else")
    assert "--overwrite" in str(info.value)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("results.complete-")]
    assert len(kept) == 1 and (kept[0] / "result.txt").read_text() == "done"
    assert read_run_marker(kept[0])["status"] == "complete"
    assert (out / "other.txt").is_file()
