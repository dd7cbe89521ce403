"""Convergence of MCMC draws: split-R-hat and bulk ESS through ArviZ.
"""

from __future__ import annotations

import warnings

import numpy as np


__all__ = ["chain_convergence", "convergence_detail", "em_drift", "unconverged_sites", "warn_unconverged", "RHAT_MAX",
           "ESS_BULK_MIN", "EM_DRIFT_MAX", "MAX_COORDS"]


#: coordinates of one quantity checked at most (evenly spaced): ArviZ ranks and transforms each
#: coordinate in a Python loop, about 1.5 ms per coordinate for R-hat and ESS together, so 2,000 took
#: 13-17 s of every posterior run with 5 sites; 500 still find a stuck fraction of 1% of the
#: coordinates with probability 0.99 (1 - 0.99^500)
MAX_COORDS = 500


def chain_convergence(draws: np.ndarray, num_chains: int, *, max_coords: int = MAX_COORDS) -> tuple[float, float]:
    """Largest split-R-hat and smallest bulk ESS (see :func:`convergence_detail`)."""
    detail = convergence_detail(draws, num_chains, max_coords=max_coords)
    return detail["rhat_max"], detail["ess_bulk_min"]


def convergence_detail(draws: np.ndarray, num_chains: int, *, max_coords: int = MAX_COORDS,
                       rhat_threshold: float = 1.1) -> dict[str, float]:
    """Largest split-R-hat and smallest bulk ESS over the coordinates of ``draws``, by ArviZ
    (rank-normalised, Vehtari et al. 2021).

    ``draws`` ``(S, ...)`` interleave the chains as :func:`pyrospatial.engine.refine.refine_posterior`
    returns them: row ``k * num_chains + c`` is the ``k``-th kept state of chain ``c``. NaN with
    fewer than 4 kept per chain (too few to split). A quantity with more than ``max_coords``
    coordinates is checked on ``max_coords`` evenly spaced ones (ArviZ loops over coordinates);
    constant or non-finite coordinates are skipped. R-hat above about 1.05 means the chains
    disagree: the draws are not yet from the posterior.

    Returns ``rhat_max``, ``ess_bulk_min`` and ``rhat_above`` (the fraction of the checked
    coordinates whose R-hat exceeds ``rhat_threshold``: one stuck coordinate and a stuck
    quantity read alike in the maximum, not in this fraction).
    """
    import arviz as az

    C = int(num_chains)
    draws = np.asarray(draws)
    per_chain = draws.shape[0] // max(C, 1)
    nan = {"rhat_max": float("nan"), "ess_bulk_min": float("nan"), "rhat_above": float("nan")}
    if C < 2 or per_chain < 4:
        return nan
    x = draws[: per_chain * C].reshape(per_chain, C, -1)  # (draw, chain, coordinate)
    if x.shape[2] > max_coords:  # pick the coordinates before any copy (the draws may be GBs)
        x = x[:, :, np.linspace(0, x.shape[2] - 1, int(max_coords)).round().astype(int)]
    x = x.astype(float).transpose(1, 0, 2)  # (chain, draw, coordinate)
    x = x[:, :, np.isfinite(x).all(axis=(0, 1)) & (np.ptp(x, axis=(0, 1)) > 0)]
    if x.shape[2] == 0:
        return nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "more chains than draws" is the intended layout here
        data = az.convert_to_dataset({"x": x})
        rhat = az.rhat(data)["x"].values
        ess = az.ess(data, method="bulk")["x"].values
        # all-NaN (e.g. 4 draws per chain, too few for ArviZ's ESS) gives NaN: "too few to tell"
        return {"rhat_max": float(np.nanmax(rhat)), "ess_bulk_min": float(np.nanmin(ess)),
                "rhat_above": float(np.mean(rhat > rhat_threshold))}


#: split-R-hat above this (the largest over a site's coordinates) fails the check. The largest
#: of thousands of R-hats from converged chains with ~10 kept draws each sits near 1.1 by
#: chance alone, so the check for the maximum is looser than the 1.01-1.05 for one quantity.
RHAT_MAX = 1.2
#: bulk ESS below this (the smallest over a site's coordinates) fails the check.
ESS_BULK_MIN = 20.0


#: relative change of a Monte Carlo EM estimate between the last two windows of its warm-up
#: trace above which it is still moving (see :func:`em_drift`). Adam's steps (learning rate
#: 0.02 on the log scale) move a parameter with a consistent gradient by about 2% a step, so
#: a steady drift passes 5% within a few steps, while noise around a settled value averages out.
EM_DRIFT_MAX = 0.05


def em_drift(trace, window: int | None = None) -> float:
    """Relative change of a Monte Carlo EM estimate at the end of warm-up: the mean of the last
    ``window`` values of ``trace`` (one per EM step) against the mean of the ``window`` before,
    ``(last - before) / |before|``. ``window`` defaults to a quarter of the trace (at least 2);
    NaN with fewer than ``2 * window`` values (too few to tell)."""
    values = np.asarray(trace, dtype=float)
    w = max(2, values.size // 4) if window is None else int(window)
    if values.size < 2 * w or not np.isfinite(values[-2 * w:]).all():
        return float("nan")
    before, last = values[-2 * w:-w].mean(), values[-w:].mean()
    return float((last - before) / max(abs(before), 1e-12))


def unconverged_sites(diagnostics: dict, *, rhat_max: float = RHAT_MAX, ess_min: float = ESS_BULK_MIN,
                      em_drift_max: float = EM_DRIFT_MAX) -> dict[str, str]:
    """Sites whose draws fail the convergence check: site -> reason (from the ``rhat_max`` and
    ``ess_bulk_min`` entries of an MCMC run's ``diagnostics``; NaN, i.e. too few draws to
    tell, is not a failure), and model parameters re-estimated by Monte Carlo EM whose
    estimate was still moving at the end of warm-up (``diagnostics["em"]`` traces, by
    :func:`em_drift`; key ``"<parameter> (EM)"``)."""
    failing: dict[str, str] = {}
    for name, trace in sorted((diagnostics.get("em") or {}).items()):
        drift = em_drift(trace)
        if np.isfinite(drift) and abs(drift) > em_drift_max:
            w = max(2, len(trace) // 4)
            failing[f"{name} (EM)"] = (f"Monte Carlo EM estimate still moving at the end of warm-up ({drift:+.0%} "
                                       f"between the last two windows of {w} steps, from {trace[0]:.3g} to "
                                       f"{trace[-1]:.3g}): the draws rest on a value that more warm-up would change")
    rhats = diagnostics.get("rhat_max", {}) or {}
    esses = diagnostics.get("ess_bulk_min", {}) or {}
    for name in sorted(set(rhats) | set(esses)):
        reasons = []
        r, e = rhats.get(name, float("nan")), esses.get(name, float("nan"))
        if np.isfinite(r) and r > rhat_max:
            above = (diagnostics.get("rhat_above", {}) or {}).get(name, float("nan"))
            share = f", {above:.0%} of coordinates above 1.1" if np.isfinite(above) else ""
            reasons.append(f"split-R-hat up to {r:.2f} (> {rhat_max}{share})")
        if np.isfinite(e) and e < ess_min:
            reasons.append(f"bulk ESS down to {e:.0f} (< {ess_min:.0f})")
        if reasons:
            failing[name] = ", ".join(reasons)
    return failing


def warn_unconverged(diagnostics: dict, *, context: str = "MCMC") -> dict[str, str]:
    """Warn (``UserWarning``) naming every site that fails :func:`unconverged_sites`, with what
    to do; returns the failures (also stored as ``diagnostics["unconverged"]``)."""
    failing = unconverged_sites(diagnostics)
    diagnostics["unconverged"] = failing
    if failing:
        listed = "; ".join(f"{name}: {why}" for name, why in failing.items())
        warnings.warn(
            f"{context}: the chains have not converged for {listed}. Intervals of these sites are not "
            "reliable: draw more (larger num_warmup and num_samples) or train longer.",
            UserWarning, stacklevel=3,
        )
    return failing
