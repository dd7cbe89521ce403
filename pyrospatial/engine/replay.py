"""Deterministic sites recomputed from stored posterior draws, one chunk of the data at a time.

A posterior of a large tissue keeps the draws of its latent sites (small per cell: a few
numbers) but not those of a large deterministic site such as a per-cell, per-gene expected
expression (``S x N x G`` floats: 8 GB for 100 draws of 100k cells and 200 genes). Such a
site is a function of the latents, so it is recomputed on demand: the model is run on one
batch (a spot-complete chunk of the data), conditioned on every latent site's draws for the
batch's rows, a group of draws at a time as an outer plate, and the site's value is read off
the trace. Memory is then ``S x chunk x G``, never ``S x N x G``; the values are exactly those
the sampler would have recorded (same model, same latents).

Example
-------
>>> for batch in dataset.chunks(64):                                              # doctest: +SKIP
...     rna = replay_site(model, batch, draws, "expected_rna")   # (S, batch.n_cells, G)
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from pyrospatial.engine.batch import Batch
from pyrospatial.engine.device import module_device
from pyrospatial.engine.posterior import site_plate
from pyrospatial.errors import InputError

__all__ = ["latent_site_plates", "replay_site"]

_DRAW_DIM = -2  # the draws' outer plate, left of the model's plates (all at dim -1)


def _prior_trace(model, batch: Batch):
    with torch.no_grad(), pyro.validation_enabled(False):
        return poutine.trace(model).get_trace(batch)


def latent_site_plates(model, batch: Batch) -> dict[str, str]:
    """The model's latent sample sites (not observed, not deterministic) and their plates
    (``"cells"``, ``"spots"``, ``"global"``), from one prior run on ``batch``."""
    out: dict[str, str] = {}
    for name, node in _prior_trace(model, batch).nodes.items():
        if node["type"] != "sample" or site_is_subsample(node) or node["is_observed"]:
            continue
        if node["infer"].get("_deterministic"):
            continue
        out[name] = site_plate(node)
    return out


def replay_site(
    model,
    batch: Batch,
    draws: Mapping[str, np.ndarray],
    name: str,
    *,
    draws_per_pass: int = 8,
) -> np.ndarray:
    """``(S, batch.n_cells, ...)`` draws of the cells-plate deterministic site ``name``.

    Parameters
    ----------
    model
        The model the draws are of (a callable of a :class:`Batch`, plates at ``dim=-1``).
    batch
        A batch of whole spots with their member cells (e.g. one of ``dataset.chunks``);
        its ``cell_index`` / ``spot_index`` are the rows of the draws it uses.
    draws
        Site -> ``(S, N, ...)`` (cells), ``(S, M, ...)`` (spots) or ``(S, ...)`` (global)
        posterior draws, laid out as :func:`~pyrospatial.engine.posterior.sample_posterior`
        returns them. Every latent site of the model must be there: one left out would be
        drawn from its prior, which is not the posterior (an :class:`InputError` names it).
    name
        A ``pyro.deterministic`` site of the cells plate.
    draws_per_pass
        Draws evaluated at once (memory: this x the batch's per-cell tensors).
    """
    device = module_device(model)
    batch = batch.to(device)
    trace = _prior_trace(model, batch)
    node = trace.nodes.get(name)
    if node is None or not node["infer"].get("_deterministic") or site_plate(node) != "cells":
        raise InputError(f"'{name}' is not a deterministic site of the model's cells plate.")
    latents = {k: v for k, v in trace.nodes.items() if v["type"] == "sample" and not site_is_subsample(v)
               and not v["is_observed"] and not v["infer"].get("_deterministic")}
    missing = sorted(set(latents) - set(draws))
    if missing:
        raise InputError(f"draws of the latent site(s) {missing} are needed to recompute '{name}': "
                         "sample them too (sites=...).")
    S = int(next(iter(draws.values())).shape[0])
    cells = batch.cell_index.cpu().numpy()
    spots = batch.spot_index.cpu().numpy()
    out: np.ndarray | None = None
    with torch.no_grad(), pyro.validation_enabled(False):
        for lo in range(0, S, int(draws_per_pass)):
            hi = min(S, lo + int(draws_per_pass))
            C = hi - lo
            values = {}
            for site, latent in latents.items():
                plate = site_plate(latent)
                value = np.asarray(draws[site][lo:hi])
                if plate == "cells":
                    value = value[:, cells]
                elif plate == "spots":
                    value = value[:, spots]
                else:  # one value per draw, broadcast against the model's plates
                    shape = tuple(latent["value"].shape)
                    pad = max(0, 1 - (len(shape) - int(latent["fn"].event_dim)))
                    value = value.reshape((C,) + (1,) * pad + shape)
                values[site] = torch.as_tensor(value, dtype=latent["value"].dtype, device=device)
            with poutine.trace() as tracer, pyro.plate("replay_draws", C, dim=_DRAW_DIM):
                poutine.condition(model, data=values)(batch)
            value = tracer.trace.nodes[name]["value"]
            value = value.expand((C,) + tuple(value.shape[1:])) if value.shape[0] == 1 else value
            if out is None:
                out = np.empty((S,) + tuple(value.shape[1:]), dtype=np.float32)
            out[lo:hi] = value.cpu().numpy()
    return out
