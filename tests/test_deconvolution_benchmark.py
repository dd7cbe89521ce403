"""The scoring of the deconvolution benchmark (benchmarks/deconvolution.py): the randomised-PIT
coverage of count draws and the issue-21 target checks, on hand-built cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark_modules import load_benchmark


@pytest.fixture(scope="module")
def bench():
    """benchmarks/deconvolution.py, imported by path (benchmarks/ is not a package)."""
    return load_benchmark("deconvolution", "deconvolution_bench")


def _case(seed: int = 0, n_spots: int = 400, n_types: int = 4, n_draws: int = 200):
    """Poisson counts whose rates differ per entry; the truth is one more draw of the same law."""
    rng = np.random.default_rng(seed)
    rate = rng.gamma(0.6, 2.0, size=(n_spots, n_types))
    truth = rng.poisson(rate).astype(float)
    truth[truth.sum(1) == 0, 0] = 1.0  # every spot holds a cell
    draws = rng.poisson(rate, size=(n_draws, n_spots, n_types)).astype(float)
    prop = rate / rate.sum(1, keepdims=True)
    return prop, truth, draws


def test_pit_coverage_is_nominal_for_a_calibrated_posterior_and_low_for_an_overconfident_one(bench):
    prop, truth, draws = _case()
    types = [f"t{k}" for k in range(truth.shape[1])]
    lo, hi = np.quantile(draws, 0.05, axis=0), np.quantile(draws, 0.95, axis=0)
    calibrated = bench.metrics(prop, truth, types, lo, hi, classes_of=None, draws=draws)
    # 1,600 entries: the PIT coverage of a calibrated posterior is 0.9 within ~3 binomial sd
    assert abs(calibrated["pit_coverage_90"] - 0.9) < 0.03
    # the closed integer interval over-covers: its endpoints hold whole probability masses
    assert calibrated["coverage_90"] > calibrated["pit_coverage_90"] + 0.03
    # all draws at the posterior mean: far too sharp, so the PIT coverage collapses
    sharp = np.broadcast_to(np.round(draws.mean(0)), draws.shape)
    over = bench.metrics(prop, truth, types, lo, hi, classes_of=None, draws=sharp)
    assert over["pit_coverage_90"] < 0.6
    assert bench.metrics(prop, truth, types, classes_of=None)["pit_coverage_90"] is None


def _row(method: str, rmse: float, cpu: float | None, pit: float | None = None, finished: bool = True) -> dict:
    return {"method": method, "rmse": rmse, "cpu_seconds": cpu, "pit_coverage_90": pit, "finished": finished}


def test_target_checks_compare_with_every_finished_peer(bench):
    rows = [_row("pyrospatial", 0.10, 10.0, 0.90), _row("nnls", 0.12, 1.0), _row("destvi", 0.11, 200.0),
            _row("cell2location", 0.20, 150.0), _row("tangram", 0.05, 1.0, finished=False)]
    checks = {name: met for name, met, _ in bench.target_checks(rows)}
    # tangram did not finish, so the best peer is DestVI (0.11): met
    assert checks["rmse <= every peer"] is True
    assert checks["PIT 90% coverage in [0.85, 0.95]"] is True
    assert checks["cpu <= 1/10 of cell2location"] is True  # 10 <= 15
    assert checks["cpu <= DestVI"] is True
    rows[0] = _row("pyrospatial", 0.115, 16.0, 0.97)
    checks = {name: met for name, met, _ in bench.target_checks(rows)}
    assert checks["rmse <= every peer"] is False
    assert checks["PIT 90% coverage in [0.85, 0.95]"] is False
    assert checks["cpu <= 1/10 of cell2location"] is False  # 16 > 15
    lines = bench.target_lines(rows)
    assert any("MISSED" in line and "destvi 0.1100" in line for line in lines)
    # a peer that never finished is reported as not measured, not as met
    only = [rows[0], _row("cell2location", 0.2, None, finished=False)]
    checks = {name: met for name, met, _ in bench.target_checks(only)}
    assert checks["cpu <= 1/10 of cell2location"] is None and checks["cpu <= DestVI"] is None
