"""Model criticism in ArviZ: posterior draws, replicated and observed data as ``InferenceData``.

:func:`to_inference_data` takes posterior draws (it never makes them: pass the output of
:func:`~pyrospatial.engine.posterior.sample_posterior` or
:func:`~pyrospatial.engine.refine.refine_posterior`) and works for any model/guide pair that
follows the batch protocol, accepts ``model(batch, predictive=True)`` (every observation
dropped, so the observed sites are *drawn*) and declares its sites in a ``contract``
(:class:`~pyrospatial.protocols.ModelContract`), e.g. :class:`~pyrospatial.models.CoralModel`.

InferenceData layout (:func:`to_inference_data`)
------------------------------------------------
Dimensions: ``chain`` (1), ``draw`` (S), ``cell`` / ``spot`` for the local plates, the
observed sites' declared ``dims`` (CORAL: ``protein``, ``gene``, ``edge`` for the graph's
observed edges ``i < j``, ``nonedge`` for a fixed, seeded sample of non-adjacent pairs), the
contract's ``dims`` of latent sites, ``svi_step``; other trailing axes are named
``{site}_dim_{k}``. A dimension ``d`` is labelled by the data source's ``{d}_names`` when it
has them.

- ``posterior``: every site of the draws (latent, global and local, and deterministic), and
  for each observed site its likelihood moments under each draw, ``{site}_lik_mean`` /
  ``{site}_lik_variance`` (or the declared ``mean_name``, e.g. CORAL's ``edge_prob`` /
  ``nonedge_prob``: the Bernoulli means of the edges and sampled non-edges).
- ``posterior_predictive``: each observed site, drawn by running the model with
  ``predictive=True`` under each posterior draw; with ``mixed_sites`` (the demo and
  ``pyrospatial coral`` use ``("z",)`` for CORAL) the sites whose likelihood depends on those
  sites are replicated with them redrawn from their prior (attribute ``mixed_replicates``).
- ``observed_data``: each observed site as the model conditions on it (read off its trace);
  attribute ``likelihood_means`` maps a site to its posterior mean variable.
- ``sample_stats``: ``loss`` ``(svi_step,)`` -- the training loss (negative ELBO, full-data
  scale) per optimiser step -- and ``elbo = -loss``. (SVI has no per-draw statistics; the
  history has its own dimension.)
- ``constant_data``: ``cell_type`` / ``cell_spot`` ``(cell,)`` when the data source has them;
  for each pair-level observed site with row dimension ``d``: ``{d}_pairs`` ``(d, pair_end)``
  in dataset cell indices (when the batch holds them, see ``ObservedSite.pairs``) and, when
  one sampled pair stands for several, ``{d}_weight`` (the site's likelihood scale, e.g.
  ``nonedge_weight``).
- ``attrs``: ``method`` ("refine", "guide", ...), ``seed``, ``num_samples``, and
  ``n_nonedges_total`` for a data source with a graph.

The netcdf file (``path``, :func:`write_inference_data`)
-------------------------------------------------------
Written with zlib compression (level 4, byte shuffle) for every numeric variable. By default
it holds what ``pyrospatial check`` reads (:func:`checks_only`): ``posterior_predictive``,
``observed_data``, ``constant_data``, ``sample_stats``, and of ``posterior`` only the global
latents and the likelihood moments the checks use (those of the observed sites replicated
under the posterior draws, for the dispersion statistic, and the means of pair-level sites,
for the reliability diagram). The per-cell draws (e.g. CORAL's ``z``, ``v``,
``expected_rna``: most of the bytes) are left out: their summaries are in the exported
AnnData. ``full_netcdf=True`` (CLI ``--full-netcdf``) writes every variable; the file's
attribute ``netcdf_content`` says which (``"checks"`` or ``"full"``). The returned
``InferenceData`` always holds everything.

Bayesian p-values (:func:`~pyrospatial.criticism.ppc.ppc_summary`)
-----------------------------------------------------------------
For a feature (a gene over spots, a protein over cells) and a statistic ``T`` (mean,
variance, zero fraction across rows, and the *dispersion* ``mean_rows (y - E[y|theta])^2 /
Var[y|theta]``, a discrepancy that depends on the draw ``theta`` and is about 1 under the
model), ``p = P(T(y_rep) > T(y)) + 0.5 P(T(y_rep) = T(y))``
over the posterior draws (a mid p-value, so ties -- e.g. zero fractions of a continuous
feature -- give 0.5). ``p`` near 0 or 1 means the observed statistic is in a tail of what the
model replicates. Posterior predictive p-values of a well-specified model concentrate around
0.5 (they re-use the data), so their histogram is not uniform; a pile-up at 0 or 1 flags a
misfit (e.g. ``p(variance) ~ 1`` for a Poisson model of over-dispersed counts).
"""


from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pyrospatial.criticism.ppc import _pairs, observed_data, posterior_predictive
from pyrospatial.engine.device import module_device
from pyrospatial.errors import FileInputError, InputError
from pyrospatial.protocols import PLATE_DIMS, ModelContract, require_contract

__all__ = ["to_inference_data", "load_inference_data", "write_inference_data", "checks_only"]


def _dims(name: str, value: np.ndarray, plate: str, contract: ModelContract) -> list[str]:
    """ArviZ dims (after chain, draw) of a posterior site: the contract's ``dims`` for it
    (else the plate's dimension for a local site), then ``{name}_dim_{k}``."""
    trailing = value.ndim - 2  # minus (chain, draw)
    declared = list(contract.dims.get(name, ()))
    if not declared and plate in PLATE_DIMS:
        declared = [PLATE_DIMS[plate]]
    return declared[:trailing] + [f"{name}_dim_{k}" for k in range(len(declared), trailing)]


def _labels(dataset: Any, dim: str, n: int) -> list[str] | None:
    """The data source's labels of dimension ``dim`` (``{dim}_names``), ``{dim}{i}`` when they
    do not match its size, None when it has none."""
    index = getattr(dataset, f"{dim}_names", None)
    if index is None:
        return None
    if len(index) != n:
        return [f"{dim}{i}" for i in range(n)]
    return [str(x) for x in index]


def _coords(dataset: Any, *groups: Mapping[str, tuple]) -> dict[str, list[str]]:
    """Coordinates of every dimension used by ``groups`` that the data source labels."""
    sizes: dict[str, int] = {}
    for variables in groups:
        for dims, value in variables.values():
            for d, size in zip(dims, np.shape(value)):
                sizes.setdefault(d, int(size))
    coords = {}
    for d, n in sizes.items():
        labels = _labels(dataset, d, n)
        if labels is not None:
            coords[d] = labels
    return coords


def _coords_for(coords: dict[str, Any], variables: Mapping[str, tuple]) -> dict[str, Any]:
    used = {d for dims, _ in variables.values() for d in dims}
    return {k: v for k, v in coords.items() if k in used}


def to_inference_data(
    fit_result: Any,
    dataset: Any,
    samples: Mapping[str, np.ndarray],
    *,
    method: str | None = None,
    seed: int = 0,
    prior_sites: Iterable[str] = (),
    mixed_sites: Iterable[str] = (),
    path: str | Path | None = None,
    full_netcdf: bool = False,
    progress: bool = False,
):
    """Posterior draws, posterior predictive, observed data and ELBO history as ``arviz.InferenceData``.

    Parameters
    ----------
    fit_result
        What :func:`pyrospatial.fit` returned (``model``, ``guide``, ``elbo_history``), or a
        trained method object with ``model`` and ``fit_result`` (e.g. :class:`~pyrospatial.CORAL`).
        The model must declare a ``contract`` with its observed sites.
    dataset
        The data source the model was trained on; its ``full_batch()`` is replicated (with its
        own settings, e.g. :attr:`~pyrospatial.data.dataset.SpatialDataset.nonedge_ratio` for
        the ``nonedge`` dimension).
    samples
        Posterior draws of every latent site (a
        :class:`~pyrospatial.engine.posterior.PosteriorSamples` or any dict with ``.plates``),
        at least 2, e.g. ``sample_posterior(model, guide, dataset, 100)`` or
        ``refine_posterior(...)``. Deterministic sites among them are conditioned on as well.
    method
        Label of how the draws were made (``"guide"``, ``"refine"``), recorded in ``attrs``;
        default: ``samples.method`` when set, else ``"unknown"``.
    seed
        Seeds the replicates.
    prior_sites
        Latent sites that may be absent from ``samples`` because the model uses them only
        through a deterministic site that ``samples`` holds (CORAL: ``("rna_weight",)`` with
        ``expected_rna``); they are then drawn from the prior and do not enter the replicates.
    mixed_sites
        Local latent sites redrawn from their prior (given the other draws) for the replicates
        of the observed sites that depend on them ("mixed" replication; CORAL: ``("z",)``).
        Posterior replication conditions on each cell's own state, which was fitted to that
        cell's observations, so replicates scatter around a mean already pulled towards the
        observation and the checks flag a well-specified model; mixed replicates ask instead
        whether the population could come from the model. Which observed sites are replicated
        this way is found by comparing their likelihood means with and without the redraw,
        and listed in the ``posterior_predictive`` attribute ``mixed_replicates``
        (comma-separated). The ``posterior`` group (likelihood moments) always comes from
        posterior replication.
    path
        If given, the InferenceData is also written there as compressed netcdf
        (:func:`write_inference_data`).
    full_netcdf
        Write every variable to ``path``; default: only what the checks read (module
        docstring, :func:`checks_only`). The returned InferenceData holds everything either way.
    progress
        Progress bars.

    Returns
    -------
    arviz.InferenceData
        Groups and dims as in the module docstring.
    """
    import arviz as az
    import xarray as xr

    model, _, history = _unpack(fit_result)
    contract = require_contract(model, "to_inference_data")
    if not isinstance(samples, Mapping) or not samples:
        raise InputError(
            "samples must be posterior draws ({site: (S, ...)} with .plates), e.g. from "
            "pyrospatial.sample_posterior(...) or pyrospatial.refine_posterior(...)."
        )
    S = int(np.shape(next(iter(samples.values())))[0])
    if S < 2:
        raise InputError(f"posterior predictive checks need at least 2 draws, got {S}.")
    plates = dict(getattr(samples, "plates", {}) or {})
    batch = dataset.full_batch().to(module_device(model))
    reps = posterior_predictive(model, batch, samples, plates, seed=seed, prior_sites=prior_sites, progress=progress)
    mixed_replicates: list[str] = []
    if tuple(mixed_sites):
        mixed = posterior_predictive(model, batch, samples, plates, seed=seed + 1, prior_sites=prior_sites,
                                     mixed_sites=mixed_sites, progress=progress)
        for name in contract.observed_names:
            key = f"{name}_mean"
            if name in reps and key in reps and key in mixed and not np.allclose(reps[key], mixed[key]):
                reps[name] = mixed[name]
                mixed_replicates.append(name)
    observed_values, scales = observed_data(model, batch, samples, plates, prior_sites=prior_sites)

    posterior: dict[str, Any] = {}
    for name, value in samples.items():
        value = np.asarray(value)[None]
        posterior[name] = (("chain", "draw", *_dims(name, value, plates.get(name, "global"), contract)), value)
    means: dict[str, str] = {}
    for site in contract.observed:  # the likelihood's moments under each draw
        for moment in site.moments:
            key = f"{site.name}_{moment}"
            if key in reps:
                posterior[site.moment_name(moment)] = (("chain", "draw", *site.dims), reps.pop(key)[None])
                if moment == "mean":
                    means[site.name] = site.moment_name(moment)
    predictive = {k: (("chain", "draw", *contract.observed_site(k).dims), v[None]) for k, v in reps.items()}
    observed = {k: (contract.observed_site(k).dims, v) for k, v in observed_values.items() if k in reps}
    constants = _constants(dataset, batch, contract, scales, observed)
    coords = _coords(dataset, posterior, predictive, observed, constants)

    history = np.asarray(history if history is not None else [], dtype=np.float64)
    attrs: dict[str, Any] = {"method": str(method or getattr(samples, "method", None) or "unknown"), "seed": int(seed),
                             "num_samples": S}
    if getattr(dataset, "n_nonedges", None) is not None:
        attrs["n_nonedges_total"] = int(dataset.n_nonedges)
    predictive_attrs = dict(attrs, mixed_sites=",".join(mixed_sites), mixed_replicates=",".join(mixed_replicates))
    observed_attrs = dict(attrs, likelihood_means=",".join(f"{k}:{v}" for k, v in means.items()))
    groups = {
        "posterior": xr.Dataset(posterior, coords=_coords_for(coords, posterior), attrs=attrs),
        "posterior_predictive": xr.Dataset(predictive, coords=_coords_for(coords, predictive), attrs=predictive_attrs),
        "observed_data": xr.Dataset(observed, coords=_coords_for(coords, observed), attrs=observed_attrs),
        "sample_stats": xr.Dataset({"loss": (("svi_step",), history), "elbo": (("svi_step",), -history)}, attrs=attrs),
        "constant_data": xr.Dataset(constants, coords=_coords_for(coords, constants), attrs=attrs),
    }
    idata = az.InferenceData(**groups)
    if path is not None:
        write_inference_data(idata, path, full=full_netcdf)
    return idata


#: zlib level of the netcdf variables (4: most of level 9's saving at a fraction of its time)
NETCDF_COMPLEVEL = 4


def _needed_posterior(idata) -> list[str]:
    """Variables of ``idata.posterior`` that ``pyrospatial check`` reads or that are small:
    the global latents (no local dimension), the likelihood moments of the observed sites
    replicated under the posterior draws (the dispersion statistic) and the likelihood means
    of one-dimensional (pair-level) observed sites (the reliability diagram)."""
    post = idata.posterior
    observed = idata.observed_data if "observed_data" in idata.groups() else {}
    mixed = {m for m in str(idata.posterior_predictive.attrs.get("mixed_replicates", "")).split(",") if m} \
        if "posterior_predictive" in idata.groups() else set()
    means = dict(item.split(":", 1) for item in str(getattr(observed, "attrs", {}).get("likelihood_means", "")).split(",")
                 if ":" in item)
    rows = set(PLATE_DIMS.values()) | {var.dims[0] for var in getattr(observed, "data_vars", {}).values() if var.ndim}
    keep = []
    for name, var in post.data_vars.items():
        site = next((s for s, mean in means.items() if mean == name), None)
        if site is None:
            site = next((s for s in observed if name.startswith(f"{s}_lik_")), None) if observed else None
        if site is not None:
            pair_level = observed[site].ndim == 1
            if site not in mixed or (pair_level and means.get(site) == name):
                keep.append(name)
        elif not rows.intersection(var.dims):
            keep.append(name)  # a global latent: no row dimension
    return keep


def checks_only(idata):
    """``idata`` with only what ``pyrospatial check`` reads (module docstring): every group but
    ``posterior``, of which the global latents and the likelihood moments the checks use."""
    import arviz as az

    groups = {name: getattr(idata, name) for name in idata.groups()}
    if "posterior" in groups:
        groups["posterior"] = idata.posterior[_needed_posterior(idata)]
    return az.InferenceData(**groups)


def write_inference_data(idata, path: str | Path, *, full: bool = False) -> Path:
    """Write ``idata`` to ``path`` as netcdf, zlib-compressed with byte shuffle (the parent folder
    is created). ``full=False``: only what the checks read (:func:`checks_only`); attribute
    ``netcdf_content`` of every group: ``"checks"`` or ``"full"``. Read it back with
    :func:`load_inference_data` (or ``arviz.from_netcdf``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = idata if full else checks_only(idata)
    mode = "w"
    for group in written.groups():
        data = getattr(written, group).copy()
        data.attrs = dict(data.attrs, netcdf_content="full" if full else "checks")
        encoding = {name: {"zlib": True, "complevel": NETCDF_COMPLEVEL, "shuffle": True}
                    for name, var in data.variables.items() if var.dtype.kind in "biuf" and var.ndim > 0}
        data.to_netcdf(str(path), mode=mode, group=group, engine="h5netcdf", encoding=encoding)
        mode = "a"
    return path


def _constants(dataset: Any, batch: Any, contract: ModelContract, scales: Mapping[str, float],
               observed: Mapping[str, tuple]) -> dict[str, tuple]:
    """``constant_data``: per-cell labels of the data source, and the pairs and weights of
    the pair-level observed sites (see the module docstring)."""
    out: dict[str, tuple] = {}
    for attr in ("cell_type", "cell_spot"):
        value = getattr(dataset, attr, None)
        if value is not None and len(value) == batch.n_cells:
            out[attr] = (("cell",), np.asarray(value))
    for site in contract.observed:
        if site.plate != "edge" or site.name not in observed:
            continue
        row = site.dims[0]
        pairs = getattr(batch, site.pairs, None) if site.pairs else None
        if pairs is not None:
            out[f"{row}_pairs"] = ((row, "pair_end"), _pairs(pairs, batch))
        if scales.get(site.name, 1.0) != 1.0:
            out[f"{row}_weight"] = ((), float(scales[site.name]))
    return out


def load_inference_data(path: str | Path):
    """Read an InferenceData written by :func:`to_inference_data` (netcdf)."""
    import arviz as az

    path = Path(path)
    if not path.exists():
        raise InputError(f"no InferenceData at {path}; write it with to_inference_data(..., path=...).")
    if not path.is_file():
        raise FileInputError(f"{path} is not a file: expected a netcdf InferenceData written by to_inference_data.")
    try:
        return az.from_netcdf(str(path))
    except (OSError, ValueError, KeyError, TypeError) as error:  # truncated, corrupt or another format
        raise FileInputError(
            f"{path} is not a readable netcdf InferenceData ({type(error).__name__}: {' '.join(str(error).split())[:160]}); "
            "it may be truncated or corrupt: rerun the fit that wrote it."
        ) from error


def _unpack(fit_result: Any) -> tuple[Any, Any, np.ndarray | None]:
    """(model, guide, elbo_history) of a FitResult or a trained CORAL."""
    if hasattr(fit_result, "fit_result") and hasattr(fit_result, "model"):  # CORAL
        history = None if fit_result.fit_result is None else fit_result.fit_result.elbo_history
        return fit_result.model, fit_result.guide, history
    for attr in ("model", "guide"):
        if not hasattr(fit_result, attr):
            raise InputError(
                f"fit_result has no '{attr}'; pass what pyrospatial.fit(...) returned (a FitResult) or a trained CORAL."
            )
    return fit_result.model, fit_result.guide, getattr(fit_result, "elbo_history", None)
