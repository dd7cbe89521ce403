"""The interval recalibration: what it does to draws, and when CORAL applies it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pyrospatial.criticism.recalibration import INTERACTION_RECALIBRATION, widen

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_widen_moves_every_quantile_away_from_the_mean_by_the_factor():
    rng = np.random.default_rng(0)
    draws = rng.gamma(2.0, 0.01, size=(400, 3, 3))
    draws[:, 0, 2] = np.nan  # a type pair without an edge
    wide = widen(draws, 1.7, bounds=None)
    mean = draws.mean(0)
    for q in (0.05, 0.25, 0.75, 0.95):
        np.testing.assert_allclose(np.quantile(wide, q, axis=0), mean + 1.7 * (np.quantile(draws, q, axis=0) - mean),
                                   rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(wide.mean(0), mean)
    np.testing.assert_allclose(wide.std(0), 1.7 * draws.std(0))
    assert np.isnan(wide[:, 0, 2]).all()


def test_widen_keeps_probabilities_in_their_support_and_refuses_a_bad_factor():
    draws = np.array([[0.001], [0.02], [0.5], [0.999]])
    wide = widen(draws, 5.0)
    assert wide.min() == 0.0 and wide.max() == 1.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="factor"):
            widen(draws, bad)


def test_the_shipped_factor_is_the_one_the_committed_fit_produced():
    """The constant is copied from benchmarks/results/interaction_recalibration.json by hand: the two must agree,
    and the fit must have used held-apart seeds only (never the evaluation seeds 0-4)."""
    fitted = json.loads((RESULTS / "interaction_recalibration.json").read_text())
    assert INTERACTION_RECALIBRATION.factor == pytest.approx(round(fitted["fit"]["factor"], 3), abs=1e-9)
    assert min(fitted["seeds"]) >= 100
    for path in RESULTS.glob("interaction_calibration*.json"):  # every evaluation of the factor
        evaluated = json.loads(path.read_text())
        assert not set(fitted["seeds"]) & {r["seed"] for r in evaluated["records"]}, path.name
    # widening by the factor covers 90% of the fitting entries, the raw intervals fewer
    cover = fitted["fit"]["fit_coverage"]["0.9"]
    assert cover["widened"] >= 0.9 > cover["unwidened"]
