"""What the method classes share around their results: draws as ``arviz.InferenceData`` and the
checks of a saved file.

Used by :class:`~pyrospatial.methods.deconvolution.Deconvolution` and
:class:`~pyrospatial.methods.alignment.Alignment`: they hold their draws already, so
:func:`draws_to_inference_data` only names axes (it never draws); :func:`check_saved` reads
the header of what their ``save`` wrote.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pyrospatial.errors import InputError

__all__ = ["SAVE_FORMAT", "check_saved", "draws_to_inference_data"]

#: Version of the files the method classes' ``save`` writes.
SAVE_FORMAT = 1


def draws_to_inference_data(
    draws: Mapping[str, np.ndarray],
    dims: Mapping[str, Sequence[str]],
    coords: Mapping[str, Sequence[Any]],
    *,
    observed: Mapping[str, np.ndarray] | None = None,
    elbo: np.ndarray | None = None,
    attrs: Mapping[str, Any] | None = None,
    chains: int = 1,
):
    """``arviz.InferenceData`` of joint draws, one chain or several laid end to end.

    Parameters
    ----------
    draws
        Site -> ``(S, ...)`` array (leading axis = draw); every site needs an entry in ``dims``
        naming its other axes (``[]`` for a scalar).
    dims, coords
        ArviZ dims (after ``chain``, ``draw``) per site, and the labels of each named dim.
    observed
        ``observed_data`` group (site -> array, dims from ``dims``).
    elbo
        The training loss per SVI step: ``sample_stats["loss"]`` over an ``svi_step`` dim (and
        ``elbo = -loss``), as :func:`pyrospatial.criticism.arviz.to_inference_data` writes it.
    attrs
        Attributes of the posterior group (e.g. ``method``, ``seed``).
    chains
        The draws are ``chains`` consecutive blocks of equal length, one per chain (e.g. the
        pooled restarts of :func:`pyrospatial.domains`), so ArviZ's R-hat compares them.
    """
    import arviz as az
    import xarray as xr

    missing = sorted(set(draws) - set(dims))
    if missing:
        raise InputError(f"draws_to_inference_data: no dims given for site(s) {missing}.")
    for name, value in draws.items():
        if np.ndim(value) != 1 + len(dims[name]):
            raise InputError(
                f"site '{name}' has shape {np.shape(value)} but dims {list(dims[name])} (plus the draw axis)."
            )
    chains = int(chains)
    sizes = {np.shape(value)[0] for value in draws.values()}
    if chains < 1 or any(size % chains for size in sizes):
        raise InputError(f"draws_to_inference_data: {sorted(sizes)} draws cannot be split into {chains} chains of "
                         "equal length; pass chains=1 or a divisor of the number of draws.")
    posterior = {name: np.asarray(value).reshape((chains, -1) + np.shape(value)[1:]) for name, value in draws.items()}
    used = {d for name in list(draws) + list(observed or {}) for d in dims.get(name, ())}
    idata = az.from_dict(
        posterior=posterior,
        observed_data={k: np.asarray(v) for k, v in (observed or {}).items()} or None,
        coords={d: list(c) for d, c in coords.items() if d in used},
        dims={k: list(v) for k, v in dims.items()},
    )
    if elbo is not None:
        loss = np.asarray(elbo, dtype=np.float64)
        stats = xr.Dataset({"loss": ("svi_step", loss), "elbo": ("svi_step", -loss)},
                           coords={"svi_step": np.arange(loss.size)})
        idata.add_groups({"sample_stats": stats})
    for key, value in (attrs or {}).items():
        idata.posterior.attrs[str(key)] = value
    return idata


def check_saved(state: Any, method: str, identity: dict[str, Any], path: str) -> None:
    """Reject a saved ``state`` of another method, format, inputs or settings with an
    :class:`~pyrospatial.errors.InputError` naming the first difference (``identity``: the
    inputs and settings of the object loading it)."""
    if not isinstance(state, dict) or state.get("method") != method:
        raise InputError(f"{path} is not a saved {method} (write one with {method}.save).")
    if state.get("format") != SAVE_FORMAT:
        raise InputError(f"{path} has save format {state.get('format')}; this version reads format {SAVE_FORMAT}.")
    saved = state.get("identity", {})
    for key in sorted(set(saved) | set(identity)):
        if saved.get(key) != identity.get(key):
            raise InputError(
                f"{path} was saved with {key}={saved.get(key)!r} but this {method} has {key}={identity.get(key)!r}: "
                f"build the {method} on the same inputs and settings before load()."
            )
