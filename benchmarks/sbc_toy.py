"""Simulation-based calibration of SVI on toy conjugate models (used by benchmarks/calibration.py and a test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pyrospatial.errors import InputError
from pyrospatial.criticism.calibration import sbc_ks_pvalue, sbc_ranks


#: toy models for :func:`sbc_toy`: prior (loc, scale) of the parameter and the likelihood
SBC_TOYS = {
    # y_i ~ Normal(mu, 1), mu ~ Normal(0, 1): conjugate, the posterior is a Normal, so the
    # mean-field Normal guide contains it exactly
    "normal_mean": (0.0, 1.0),
    # y_i ~ Poisson(exp(eta)), eta ~ Normal(1, 0.5): not conjugate, posterior close to Normal
    "poisson_log_rate": (1.0, 0.5),
}


@dataclass
class SBCResult:
    """Ranks (``R``,) of the true parameter among ``num_draws`` guide draws per replicate,
    and the KS p-value of their uniformity (:func:`sbc_ks_pvalue`)."""

    ranks: np.ndarray
    num_draws: int
    ks_pvalue: float


def sbc_toy(
    toy: str = "normal_mean",
    *,
    num_replicates: int = 200,
    num_draws: int = 99,
    n_obs: int = 10,
    fixed_scale: float | None = None,
    steps: int = 1500,
    lr: float = 0.05,
    seed: int = 0,
) -> SBCResult:
    """Simulation-based calibration of SVI with a Normal guide on a one-parameter toy model.

    ``num_replicates`` data sets are simulated from the prior predictive (parameter from its
    prior, ``n_obs`` observations); one vectorised SVI run (Pyro ``Trace_ELBO``, Adam, the
    learning rate divided by 10 for the last third) fits a Normal guide per replicate; the
    rank of the true parameter among ``num_draws`` guide draws is uniform on
    ``{0..num_draws}`` if and only if the fitted posteriors are calibrated (Talts et al. 2018).

    Parameters
    ----------
    toy
        A key of :data:`SBC_TOYS`.
    fixed_scale
        None: the guide's scale is learned. A float: the scale is fixed there -- a
        deliberately broken, over-confident guide (e.g. 0.01) that the check must reject.
    """
    import pyro
    import pyro.distributions as dist
    from pyro.infer import Trace_ELBO

    if toy not in SBC_TOYS:
        raise InputError(f"toy must be one of {sorted(SBC_TOYS)}, got {toy!r}.")
    if num_replicates < 10 or num_draws < 9:
        raise InputError("num_replicates must be >= 10 and num_draws >= 9 for a meaningful rank test.")
    prior_loc, prior_scale = SBC_TOYS[toy]
    gen = torch.Generator().manual_seed(int(seed))
    R = int(num_replicates)
    theta = prior_loc + prior_scale * torch.randn(R, generator=gen)
    if toy == "normal_mean":
        y = theta[:, None] + torch.randn(R, n_obs, generator=gen)
    else:
        y = torch.poisson(torch.exp(theta)[:, None].expand(R, n_obs), generator=gen)

    def model(y):
        t = pyro.sample("theta", dist.Normal(torch.full((R,), prior_loc), prior_scale).to_event(1))
        t = t.unsqueeze(-1)  # (..., R, 1): leading dims are vectorised ELBO particles
        like = dist.Normal(t, 1.0) if toy == "normal_mean" else dist.Poisson(torch.exp(t))
        pyro.sample("y", like.expand(t.shape[:-1] + (n_obs,)).to_event(2), obs=y)

    loc = torch.full((R,), float(prior_loc), requires_grad=True)
    log_scale = torch.full((R,), math.log(prior_scale) - 1.0, requires_grad=True)

    def scale():
        return torch.full((R,), float(fixed_scale)) if fixed_scale is not None else log_scale.exp()

    def guide(y):
        pyro.sample("theta", dist.Normal(loc, scale()).to_event(1))

    params = [loc] if fixed_scale is not None else [loc, log_scale]
    optim = torch.optim.Adam(params, lr=lr)
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    torch.manual_seed(int(seed))
    for step in range(int(steps)):
        if step == (2 * steps) // 3:
            for group in optim.param_groups:
                group["lr"] = lr / 10
        optim.zero_grad()
        elbo.differentiable_loss(model, guide, y).backward()
        optim.step()
    with torch.no_grad():
        draws = loc[None] + scale()[None] * torch.randn(num_draws, R, generator=gen)
    ranks = sbc_ranks(draws.T.numpy(), theta.numpy())
    return SBCResult(ranks=ranks, num_draws=int(num_draws), ks_pvalue=sbc_ks_pvalue(ranks, num_draws, seed=seed))
