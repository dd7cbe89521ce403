"""Convergence of MCMC draws: split-R-hat and bulk ESS through ArviZ.
"""

from __future__ import annotations

import warnings

import numpy as np


__all__ = ["chain_convergence"]


def chain_convergence(draws: np.ndarray, num_chains: int, *, max_coords: int = 2000) -> tuple[float, float]:
    """Largest split-R-hat and smallest bulk ESS over the coordinates of ``draws``, by ArviZ
    (rank-normalised, Vehtari et al. 2021).

    ``draws`` ``(S, ...)`` interleave the chains as :func:`pyrospatial.engine.refine.refine_posterior`
    returns them: row ``k * num_chains + c`` is the ``k``-th kept state of chain ``c``. NaN with
    fewer than 4 kept per chain (too few to split). A quantity with more than ``max_coords``
    coordinates is checked on ``max_coords`` evenly spaced ones (ArviZ loops over coordinates);
    constant or non-finite coordinates are skipped. R-hat above about 1.05 means the chains
    disagree: the draws are not yet from the posterior.
    """
    import arviz as az

    C = int(num_chains)
    draws = np.asarray(draws, dtype=float)
    per_chain = draws.shape[0] // max(C, 1)
    if C < 2 or per_chain < 4:
        return float("nan"), float("nan")
    x = draws[: per_chain * C].reshape(per_chain, C, -1).transpose(1, 0, 2)  # (chain, draw, coordinate)
    if x.shape[2] > max_coords:
        x = x[:, :, np.linspace(0, x.shape[2] - 1, int(max_coords)).round().astype(int)]
    x = x[:, :, np.isfinite(x).all(axis=(0, 1)) & (np.ptp(x, axis=(0, 1)) > 0)]
    if x.shape[2] == 0:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "more chains than draws" is the intended layout here
        data = az.convert_to_dataset({"x": x})
        rhat = az.rhat(data)["x"].values
        ess = az.ess(data, method="bulk")["x"].values
    return float(np.nanmax(rhat)), float(np.nanmin(ess))
