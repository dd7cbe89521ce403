"""Fuzz suite (issue 17, item 6): generated bad or odd inputs to the Python API and the CLI of
``coral``/``fit``, ``deconvolve``, ``align`` and ``check`` end in a correct result or a clear
:class:`pyrospatial.errors.PyrospatialError` (CLI: exit 2, one line, no traceback), never in
another exception, and never modify their inputs. The harness is ``benchmarks/robustness.py``
(its full run is the robustness benchmark)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # anndata on the corrupted inputs
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _robustness():
    """benchmarks/robustness.py, imported by path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("robustness", BENCHMARKS / "robustness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("robustness", module)  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return sys.modules["robustness"]


rb = _robustness()


def fuzz(max_examples: int) -> settings:
    """Reproducible hypothesis settings: derandomised, no example database, no deadline."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _assert_no_crash(record) -> None:
    assert record.outcome in ("correct", "clear_error", "skipped"), (
        f"{record.target} / {record.corruption} on {record.role} (seed {record.seed}): {record.outcome}: "
        f"{record.message}"
    )


@fuzz(200)
@given(case=rb.case_strategy(["coral_api", "deconvolve_api", "align_api"]))
def test_api_never_crashes_nor_modifies_its_inputs(case):
    _assert_no_crash(rb.run_api_case(case))


@fuzz(60)
@given(case=rb.case_strategy(["coral_cli", "fit_cli", "deconvolve_cli", "align_cli", "check_cli"]))
def test_cli_never_crashes_nor_modifies_its_inputs(case, workdir):
    _assert_no_crash(rb.run_cli_case(case, workdir))


@pytest.mark.parametrize("corruption", ["truncated_file", "nan_x"])
def test_cli_in_a_real_process_gives_exit_2_and_one_line(corruption, workdir):
    record = rb.run_cli_case(rb.Case("deconvolve_cli", corruption, "spots", 1), workdir, subprocess_run=True)
    assert record.outcome == "clear_error", record.message
    assert record.message.startswith("pyrospatial deconvolve: ")


# ------------------------------------------------------------------------------------------
# the harness itself catches what it must (else a green fuzz run would mean nothing)
# ------------------------------------------------------------------------------------------
def test_the_harness_flags_a_modified_input_and_a_crash(monkeypatch):
    import pyrospatial as ps

    def modifies(spots, reference, *args, **kwargs):
        spots.X[0, 0] = 12345.0  # writes into the caller's AnnData
        raise ps.errors.InputError("spots: a clear message")

    monkeypatch.setattr(ps, "deconvolve", modifies)
    record = rb.run_api_case(rb.Case("deconvolve_api", "none", "spots", 0))
    assert record.outcome == "input_modified"

    def crashes(*args, **kwargs):
        raise KeyError("raw pandas error")

    monkeypatch.setattr(ps, "deconvolve", crashes)
    record = rb.run_api_case(rb.Case("deconvolve_api", "none", "spots", 0))
    assert record.outcome == "crash" and "KeyError" in record.message


def test_the_harness_flags_a_traceback_and_an_odd_exit_status():
    assert rb._classify_cli(2, "Traceback (most recent call last):\n  ...\nValueError: x\n", None)[0] == "crash"
    assert rb._classify_cli(1, "pyrospatial coral: something\n", None)[0] == "crash"
    assert rb._classify_cli(None, "", None)[0] == "crash"
    assert rb._classify_cli(2, "pyrospatial coral: InputError: cells.X has NaN\n", None)[0] == "clear_error"


def test_the_harness_sees_a_changed_file_and_an_in_place_edit(tmp_path):
    adata = rb._inputs_of("align", 0)["a"]
    before = rb._snapshot(adata)
    assert rb.same_adata(before, adata)
    adata.obsm["spatial"][0, 0] += 1.0
    assert not rb.same_adata(before, adata)
    path = tmp_path / "x.h5ad"
    path.write_bytes(b"abc")
    digest = rb._digest(path)
    path.write_bytes(b"abd")
    assert rb._digest(path) != digest


def test_every_corruption_applies(workdir):
    """Each AnnData corruption changes the input (except ``none``) and keeps an AnnData."""
    base = rb._inputs_of("coral", 0)["cells"]
    for kind in rb.ADATA_CORRUPTIONS:
        out = rb.corrupt_adata(base.copy(), kind, "cells", np.random.default_rng(0))
        assert (kind == "none") == rb.same_adata(out, base), kind


# ------------------------------------------------------------------------------------------
# the crashes the fuzz suite found, each now a clear error (regression cases)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [
    rb.Case("deconvolve_api", "nan_coords", "spots", 0),          # was ValueError in cKDTree
    rb.Case("deconvolve_api", "spatial_1_column", "spots", 0),
    rb.Case("deconvolve_api", "string_coords", "spots", 0),
    rb.Case("deconvolve_api", "empty_obs", "spots", 0),           # was ValueError in np.stack
    rb.Case("align_api", "empty_var", "a", 0),                    # was ValueError in PCA
    rb.Case("align_api", "duplicate_var_names", "b", 0),          # was pandas InvalidIndexError
    rb.Case("align_api", "duplicate_obs_names", "a", 0),          # passed silently
], ids=lambda c: f"{c.target}-{c.corruption}-{c.role}")
def test_found_crashes_are_clear_errors(case):
    record = rb.run_api_case(case)
    assert record.outcome == "clear_error", record.message
    assert case.role in record.message, record.message  # the message names the input


@pytest.mark.parametrize("corruption", ["nc_truncated", "nc_random_bytes", "nc_is_folder"])
def test_check_on_a_corrupt_inference_data_is_a_clear_error(corruption, workdir):
    record = rb.run_cli_case(rb.Case("check_cli", corruption, "results", 0), workdir)
    assert record.outcome == "clear_error", record.message  # was a traceback from h5py
    assert "inference_data.nc" in record.message
