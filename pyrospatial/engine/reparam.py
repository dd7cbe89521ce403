"""Non-centred coordinates of Normal / LogNormal latent sites, for the MCMC refinement.

A site ``x ~ Normal(loc, scale)`` is sampled as ``u ~ Normal(0, 1)``, ``x = loc + scale u``
(for a LogNormal, ``log x``): in these coordinates a scale parameter's EM gradient comes
through the likelihood, and a weakly identified latent has unit prior scale for the sampler.
Used by :func:`pyrospatial.engine.refine.refine_posterior` for the sites the model's contract
lists as ``noncentred``.
"""

from __future__ import annotations

from typing import Callable, Iterable

import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer.reparam import LocScaleReparam, TransformReparam

from pyrospatial.errors import InputError

__all__ = ["noncentre", "decentred_value"]


def _base_normal(fn) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """``(loc, scale, log)`` of a Normal / LogNormal site distribution (None otherwise)."""
    base = fn.base_dist if isinstance(fn, dist.Independent) else fn
    if isinstance(base, dist.LogNormal):
        return base.loc, base.scale, True
    if isinstance(base, dist.Normal):
        return base.loc, base.scale, False
    return None


def noncentre(model: Callable, trace, names: Iterable[str]) -> tuple[Callable, dict[str, str]]:
    """``model`` with the sites ``names`` (Normal or LogNormal) sampled in non-centred
    coordinates ``u = (x - loc) / scale`` (of ``log x`` for a LogNormal), ``u ~ Normal(0, 1)``;
    returns the wrapped model and ``{site: its non-centred site}``. In these coordinates a
    scale parameter's EM gradient comes through the likelihood, and weakly identified
    latents (a cell's size within its spot) have unit prior scale for the sampler."""
    log_config, loc_config, renamed = {}, {}, {}
    for name in names:
        node = trace.nodes.get(name)
        if node is None or node["type"] != "sample" or node["is_observed"]:
            continue
        found = _base_normal(node["fn"])
        if found is None:
            raise InputError(f"noncentred: site '{name}' is not Normal or LogNormal.")
        if found[2]:
            log_config[name] = TransformReparam()
            loc_config[f"{name}_base"] = LocScaleReparam(0.0)
            renamed[name] = f"{name}_base_decentered"
        else:
            loc_config[name] = LocScaleReparam(0.0)
            renamed[name] = f"{name}_decentered"
    if not renamed:
        return model, {}
    wrapped = poutine.reparam(poutine.reparam(model, config=log_config), config=loc_config) if log_config else poutine.reparam(model, config=loc_config)
    return wrapped, renamed


def decentred_value(fn, value: torch.Tensor) -> torch.Tensor:
    """The non-centred coordinate ``(x - loc) / scale`` (of ``log x`` for a LogNormal) of a
    value ``x`` of the site distribution ``fn``."""
    loc, scale, log = _base_normal(fn)
    x = value.log() if log else value
    return (x - loc) / scale
