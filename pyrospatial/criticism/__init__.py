"""Criticism: reads posterior draws and never makes them.

- :mod:`~pyrospatial.criticism.convergence`: split-R-hat and bulk ESS (ArviZ);
- :mod:`~pyrospatial.criticism.ppc`: posterior predictive replicates and Bayesian p-values;
- :mod:`~pyrospatial.criticism.calibration`: coverage, PIT, reliability against known truth;
- :mod:`~pyrospatial.criticism.arviz`: draws -> ``arviz.InferenceData``;
- :mod:`~pyrospatial.criticism.plots` and :mod:`~pyrospatial.criticism.report`: figures and
  the ``pyrospatial check`` report;
- :mod:`~pyrospatial.criticism.recalibration`: post-hoc interval recalibrations fitted on
  held-apart simulations; :mod:`~pyrospatial.criticism.metrics`: scores against truth.
"""

from pyrospatial.criticism.arviz import load_inference_data, to_inference_data
from pyrospatial.criticism.calibration import (
    align_sign,
    expected_calibration_error,
    interval_coverage_by_level,
    pit_coverage_by_level,
    reliability_curve,
    sbc_ks_pvalue,
    sbc_ranks,
    standardize_within_groups,
)
from pyrospatial.criticism.convergence import chain_convergence
from pyrospatial.criticism.plots import edge_reliability_inputs, plot_coverage, plot_ppc, plot_pvalues, plot_reliability
from pyrospatial.criticism.ppc import STATISTICS, PPCSummary, bayesian_pvalue, observed_data, posterior_predictive, ppc_summary
from pyrospatial.criticism.report import check_results

__all__ = [
    "STATISTICS", "PPCSummary", "align_sign", "bayesian_pvalue", "chain_convergence",
    "check_results", "edge_reliability_inputs", "expected_calibration_error", "interval_coverage_by_level",
    "load_inference_data", "observed_data", "pit_coverage_by_level", "plot_coverage", "plot_ppc", "plot_pvalues",
    "plot_reliability", "posterior_predictive", "ppc_summary", "reliability_curve", "sbc_ks_pvalue",
    "sbc_ranks", "standardize_within_groups", "to_inference_data",
]
