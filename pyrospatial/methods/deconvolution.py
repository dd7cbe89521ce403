"""Uncertainty-aware cell-type deconvolution of spots from a labelled single-cell reference.

::

    import pyrospatial as ps
    out = ps.deconvolve(spots, reference, cell_type_key="cell_type", cells_per_spot=8)
    out.obsm["proportion_mean"]          # spots x cell types (DataFrame)
    out.obsm["cell_count_q05"], out.obsm["cell_count_q95"]   # 90% interval of integer counts

The model is :class:`pyrospatial.models.celltype_deconvolution.CellTypeDeconvolutionModel`
(its docstring is the generative story), the guide
:class:`pyrospatial.guides.celltype_deconvolution.CellTypeDeconvolutionGuide`; both are trained
by :func:`pyrospatial.fit` and summarised by :func:`pyrospatial.sample_posterior`.

:func:`deconvolve` is one call of the method class :class:`Deconvolution` (the shape of
:class:`~pyrospatial.methods.coral.CORAL`): build it on the inputs (validated, with data,
model and guide), then ``train``, ``sample``, ``export``; also ``to_inference_data``,
``save`` and ``load``::

    dec = ps.methods.Deconvolution(spots, reference, "cell_type", cells_per_spot=8)
    dec.train(max_steps=250)
    dec.sample(num_samples=300)
    out = dec.export()                    # the same AnnData as ps.deconvolve
    dec.save("deconvolution.pt")          # tensors and settings only (no pickle)

Documented keys of the returned spots AnnData
---------------------------------------------
For ``stat`` in ``mean, sd, q05, q50, q95`` (posterior mean, standard deviation and the 5%,
50%, 95% quantiles over ``num_samples`` joint posterior draws):

- ``obsm[f"abundance_{stat}"]``: DataFrame spots x cell types, ``w_jt``, the expected
  number of cells of each type in each spot (continuous, never exactly 0);
- ``obsm[f"cell_count_{stat}"]``: DataFrame spots x cell types, the integer number of cells
  ``n_jt``: each posterior draw of ``w_jt`` rounded at random (:func:`round_at_random`): read
  its ``[q05, q95]`` as the 90% interval of a spot's cell count (it contains 0 when absence is
  plausible);
- ``obsm[f"proportion_{stat}"]``: DataFrame spots x cell types, ``w_jt / sum_t w_jt``;
- ``obs[f"{quantity}_{stat}_{cell_type}"]`` for ``quantity`` in abundance, cell_count,
  proportion: every column of those DataFrames, for scanpy's ``color=`` (e.g.
  ``sc.pl.spatial(out, color="proportion_mean_T0")``);
- ``uns["spatial"]``: kept from the spots (e.g. :func:`pyrospatial.io.read_visium`'s, with its
  image) or created without image when the spots have ``obsm["spatial"]``;
- ``obsm[f"expected_expression_{stat}"]`` (only with ``return_expression=True``): array
  spots x cell types x genes, the counts of each gene attributed to each type in each spot
  (``l_j m_g w_jt s_tg``), genes in ``uns["deconvolution"]["genes"]`` order;
- ``obs[f"detection_{stat}"]``: per-spot detection efficiency ``l_j`` (when
  ``detection_cv > 0``);
- ``uns["deconvolution"]``: ``cell_types``, ``genes`` (the shared genes used),
  ``n_reference_cells`` (per type), ``settings``, ``versions``, ``elbo`` (loss per step),
  ``fit_seconds`` and ``globals``: ``{site: {stat: array}}`` for ``signature`` (T x G),
  ``platform_effect``, ``background``, ``inv_sqrt_dispersion`` (G), ``type_frequency`` (T)
  and ``concentration``; ``cell_count_interval_mass``: ``{"overall": float, "per_type": (T,)}``,
  the posterior mass inside the integer intervals ``[cell_count_q05, cell_count_q95]``, i.e.
  the coverage a perfectly calibrated posterior would reach (>= 0.9; near 1 where most types
  are absent from most spots, since ``[0, 0]`` then holds nearly all the mass).
  ``settings`` records every setting, ``steps`` (steps run) and ``stopped_by``. The record
  goes through :func:`pyrospatial.engine.export.h5ad_safe` (``None`` is written ``"None"``).
  ``abundance_width_factor`` and ``abundance_width_criterion``: the scaling of the
  abundances' guide width chosen after training, and by what
  (:mod:`pyrospatial.methods.deconvolution_width`).

Errors (all :class:`~pyrospatial.errors.InputError` subclasses, naming the field and the fix)
------------------------------------------------------------------------------------------
- :class:`NoSharedGenesError`: spots and reference have no gene (``var_names``) in common;
- :class:`ReferenceTypeError`: ``reference.obs[cell_type_key]`` is missing, or a type has
  fewer than ``min_cells_per_type`` cells;
- :class:`~pyrospatial.errors.CountsError`: NaN/inf, negative or non-integer counts in the
  spots or in the reference;
- :class:`EmptySpotError`: spots with zero counts over the shared genes.
"""


from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import pandas as pd
import pyro
import torch
from anndata import AnnData

from pyrospatial.data.spot_counts import SpotCounts
from pyrospatial.engine.export import add_spatial_uns, frames_to_obs, h5ad_safe
from pyrospatial.engine.infer import FitResult, fit
from pyrospatial.engine.posterior import sample_posterior
from pyrospatial.engine.summary import summarise
from pyrospatial.methods.deconvolution_width import WIDTH_FACTORS, fit_abundance_width
from pyrospatial.errors import InputError
from pyrospatial.methods.deconvolution_inputs import (
    EmptySpotError,
    NoSharedGenesError,
    ReferenceTypeError,
    _matrix,
    _raw_counts,
    _reference_labels,
    _shared_genes,
    convergence_callback,
    elbo_converged,
    guide_start,
    nnls_abundance,
    signature_prior,
    spot_coordinates,
)
from pyrospatial.methods.method_io import (
    SAVE_FORMAT,
    check_saved,
    draws_to_inference_data,
)

__all__ = ["STATS", "UNS_KEY", "WIDTH_FACTORS", "Deconvolution", "EmptySpotError", "NoSharedGenesError",
           "ReferenceTypeError", "deconvolve", "round_at_random", "elbo_converged", "guide_start", "nnls_abundance", "signature_prior"]


#: Statistics exported for every inferred quantity.
STATS = ("mean", "sd", "q05", "q50", "q95")

#: Key of the run record in ``spots.uns``.
UNS_KEY = "deconvolution"


#: Global sites summarised into ``uns["deconvolution"]["globals"]``.
GLOBAL_SITES = ("signature", "platform_effect", "background", "inv_sqrt_dispersion", "type_frequency",
                "concentration")

#: ArviZ dims of every site (after ``chain``, ``draw``).
DIMS = {
    "abundance": ("spot", "cell_type"), "proportion": ("spot", "cell_type"), "cell_count": ("spot", "cell_type"),
    "expected_expression": ("spot", "cell_type", "gene"), "detection": ("spot",),
    "signature": ("cell_type", "gene"), "platform_effect": ("gene",), "background": ("gene",),
    "inv_sqrt_dispersion": ("gene",), "type_frequency": ("cell_type",), "concentration": (),
    "spot_counts": ("spot", "gene"),
}

class Deconvolution:
    """Reference-based cell-type deconvolution of spots (the method behind :func:`deconvolve`).

    Building it validates the inputs and builds the data (:class:`~pyrospatial.data.spot_counts.SpotCounts`),
    the model and the guide; nothing is trained yet. Then :meth:`train`, :meth:`sample`,
    :meth:`export` (and :meth:`to_inference_data`, :meth:`save`, :meth:`load`).

    Parameters
    ----------
    spots, reference, cell_type_key, cells_per_spot, layer, reference_layer, spatial_key, min_cells_per_type
        The inputs and how to read them, as for :func:`deconvolve`.
    concentration_mean, concentration_shape, init_shape, init_prior_weight, platform_cv, detection_cv
        Model priors and the guide's start, as for :func:`deconvolve`.
    background_fraction, smoothness, total_cv, n_neighbours
        As for :func:`deconvolve`.

    Raises
    ------
    NoSharedGenesError, ReferenceTypeError, CountsError, EmptySpotError, InputError
    """

    #: global sites summarised into ``uns["deconvolution"]["globals"]`` (a variant may differ)
    global_sites: tuple[str, ...] = GLOBAL_SITES
    #: ArviZ dims of every site
    dims: dict[str, tuple[str, ...]] = DIMS
    #: how the width of q(w) is chosen after training (:mod:`~pyrospatial.methods.deconvolution_width`)
    WIDTH_CRITERION: str = "elbo"

    def __init__(
        self,
        spots: AnnData,
        reference: AnnData,
        cell_type_key: str = "cell_type",
        *,
        cells_per_spot: float | np.ndarray | str | None = None,
        layer: str | None = None,
        reference_layer: str | None = None,
        spatial_key: str = "spatial",
        min_cells_per_type: int = 5,
        concentration_mean: float = 0.3,
        concentration_shape: float = 1000.0,
        init_shape: float = 2.0,
        init_prior_weight: float = 0.75,
        platform_cv: float = 0.3,
        detection_cv: float = 0.1,
        background_fraction: float = 0.05,
        smoothness: float = 0.0,
        total_cv: float | str | None = None,
        n_neighbours: int = 6,
    ) -> None:
        from pyrospatial.guides.celltype_deconvolution import CellTypeDeconvolutionGuide
        from pyrospatial.models.celltype_deconvolution import CellTypeDeconvolutionModel

        if not isinstance(spots, AnnData) or not isinstance(reference, AnnData):
            raise InputError("spots and reference must be AnnData objects (spots x genes, cells x genes).")
        for name, adata in (("spots", spots), ("reference", reference)):
            if adata.n_obs == 0:
                raise InputError(f"{name} has no observations (n_obs == 0): pass a non-empty {name} AnnData.")
        if int(min_cells_per_type) < 1:
            raise InputError(f"min_cells_per_type must be >= 1, got {min_cells_per_type}.")
        genes = _shared_genes(spots, reference)
        labels = _reference_labels(reference, cell_type_key, int(min_cells_per_type))
        types = [str(t) for t in labels.categories]
        ref_matrix, ref_field = _matrix(reference, reference_layer, "reference")
        spot_matrix, spot_field = _matrix(spots, layer, "spots")
        ref_counts = _raw_counts(ref_matrix, ref_field)
        spot_counts = _raw_counts(spot_matrix, spot_field)
        ref_counts = ref_counts[:, pd.Index(map(str, reference.var_names)).get_indexer(genes)]
        spot_counts = spot_counts[:, pd.Index(map(str, spots.var_names)).get_indexer(genes)]
        empty = np.flatnonzero(spot_counts.sum(1) <= 0)
        if empty.size:
            names = list(map(str, spots.obs_names[empty[:5]]))
            raise EmptySpotError(
                f"{empty.size} spot(s) have zero counts over the {len(genes)} genes shared with the reference "
                f"(e.g. {names}); nothing can be said about their cell types: drop them first, e.g. "
                "spots = spots[spots.X.sum(1) > 0] (after restricting to the shared genes)."
            )
        if len(genes) < 10:
            warnings.warn(
                f"only {len(genes)} genes are shared between spots and reference; abundances of similar types "
                "will be uncertain (wide intervals).",
                stacklevel=2,
            )
        shape, rate, excess, n_ref = signature_prior(ref_counts, labels)
        hint = _cells_per_spot(cells_per_spot, spots, spot_counts, ref_counts)
        coords = spot_coordinates(spots, spatial_key)
        if coords is None and smoothness > 0:
            raise InputError(f"smoothness > 0 needs spot coordinates in spots.obsm['{spatial_key}'].")

        self.spots, self.reference = spots, reference
        self.cell_types, self.genes, self.n_reference_cells = types, genes, n_ref
        self.hint = hint
        # kept for variants built on these inputs (deconvolution_states)
        self._ref_counts, self._spot_counts, self._labels = ref_counts, spot_counts, labels
        self.data = SpotCounts(spot_counts, coords, len(types), n_neighbours=n_neighbours if smoothness > 0 else 0,
                               gene_names=genes)
        init = guide_start(nnls_abundance(spot_counts, shape / rate), hint, n_ref / n_ref.sum(), init_prior_weight)
        self._init_abundance = init
        total_cv_value = _total_cv(total_cv, ref_counts, hint)
        self.model = CellTypeDeconvolutionModel(
            torch.as_tensor(shape), torch.as_tensor(rate), torch.as_tensor(excess),
            torch.as_tensor(hint if hint.size > 1 else hint[0]),
            concentration_mean=concentration_mean, concentration_shape=concentration_shape,
            platform_cv=platform_cv, detection_cv=detection_cv,
            background_fraction=background_fraction, smoothness=smoothness, record_expression=False,
            total_cv=total_cv_value,
        )
        self.guide = CellTypeDeconvolutionGuide(
            torch.as_tensor(shape), torch.as_tensor(rate), torch.as_tensor(init), detection=detection_cv > 0,
            init_shape=init_shape, init_concentration=concentration_mean, split_total=total_cv_value is not None,
        )
        #: the constructor's settings, as recorded in ``uns["deconvolution"]["settings"]``
        self.settings: dict[str, Any] = {
            "cell_type_key": cell_type_key, "layer": layer, "reference_layer": reference_layer,
            "cells_per_spot": "estimated" if cells_per_spot is None else (
                cells_per_spot if isinstance(cells_per_spot, str) else float(np.mean(hint))),
            "min_cells_per_type": int(min_cells_per_type), "concentration_mean": float(concentration_mean),
            "platform_cv": float(platform_cv), "detection_cv": float(detection_cv),
            "background_fraction": float(background_fraction), "smoothness": float(smoothness),
            "concentration_shape": float(concentration_shape), "init_shape": float(init_shape),
            "init_prior_weight": float(init_prior_weight), "n_neighbours": int(n_neighbours),
        }
        self.fit_result: FitResult | None = None
        #: what :meth:`train` did (steps, ELBO, settings); restored by :meth:`load`
        self.train_record: dict[str, Any] | None = None
        #: posterior draws of the last :meth:`sample` (site -> ``(S, ...)``), ``cell_count`` included
        self.draws: dict[str, np.ndarray] | None = None
        self.sample_record: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------
    def train(
        self,
        max_steps: int = 250,
        *,
        min_steps: int = 200,
        convergence_window: int | None = None,
        lr: float = 0.02,
        batch_size: int | None = None,
        seed: int = 0,
        device: str = "cpu",
        progress: bool = True,
        **fit_kwargs: Any,
    ) -> FitResult:
        """Fit by SVI with :func:`pyrospatial.fit` (Adam at ``lr``, decayed 10x over ``max_steps``).

        ``convergence_window``/``min_steps``: the optional ELBO stopping rule
        (:func:`elbo_converged`); other ``fit`` options pass through ``fit_kwargs``.
        """
        started = time.perf_counter()
        callbacks = list(fit_kwargs.pop("callbacks", []) or [])
        stopper = None
        if convergence_window:
            stopper = convergence_callback(int(convergence_window), int(min_steps))
            callbacks.append(stopper)
        # argument validation off while training: it costs a tenth of every step and the engine
        # still stops with the offending site named on a non-finite loss
        with pyro.validation_enabled(False):
            result = fit(self.model, self.guide, self.data, max_steps=int(max_steps), batch_size=batch_size, lr=lr,
                         lr_decay=0.1 ** (1.0 / max(int(max_steps), 1)), seed=seed, device=device,
                         progress=progress, callbacks=callbacks, **fit_kwargs)
        self.fit_result = result
        self.train_record = {
            "max_steps": int(max_steps), "min_steps": int(min_steps),
            "convergence_window": 0 if not convergence_window else int(convergence_window),
            "steps": len(result.elbo_history),
            "stopped_by": "elbo_converged" if (stopper is not None and stopper.stopped_at) else "max_steps",
            "lr": float(lr), "batch_size": None if batch_size is None else int(batch_size), "seed": int(seed),
            "device": str(result.settings.get("device", device)),
            "elbo": np.asarray(result.elbo_history, dtype=np.float64),
            "versions": dict(result.settings.get("versions", {})),
            "seconds": time.perf_counter() - started,
        }
        width_started = time.perf_counter()
        self.train_record["abundance_width_factor"] = self._fit_abundance_width(seed)
        self.train_record["seconds"] += time.perf_counter() - width_started
        self.draws = None
        return result

    def _fit_abundance_width(self, seed: int) -> float:
        """Scale the abundances' Gamma guide by the factor :data:`WIDTH_CRITERION` prefers
        (:func:`~pyrospatial.methods.deconvolution_width.fit_abundance_width`); returns it."""
        factor, scores = fit_abundance_width(self, seed, self.WIDTH_CRITERION)
        self.train_record["abundance_width_scores"] = scores
        self.train_record["abundance_width_criterion"] = self.WIDTH_CRITERION
        return factor

    def sample(self, num_samples: int = 300, *, return_expression: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
        """Joint posterior draws (site -> ``(num_samples, ...)``) of the abundances, proportions,
        globals, detection (when ``detection_cv > 0``), per-spot per-type expected expression
        (``return_expression``), and the integer cell counts: each abundance draw rounded at
        random (:func:`round_at_random`, numpy generator seeded with ``seed``)."""
        self._require_trained()
        started = time.perf_counter()
        sites = ["abundance", "proportion", *self.global_sites]
        if self.settings["detection_cv"] > 0:
            sites.append("detection")
        if return_expression:
            sites.append("expected_expression")
        self.model.record_expression = bool(return_expression)
        try:
            with pyro.validation_enabled(False):
                draws = dict(sample_posterior(self.model, self.guide, self.data, num_samples=int(num_samples),
                                              sites=sites, seed=seed))
        finally:
            self.model.record_expression = False
        draws["cell_count"] = round_at_random(draws["abundance"], seed)
        self.draws = draws
        self.sample_record = {"num_samples": int(num_samples), "seed": int(seed),
                              "seconds": time.perf_counter() - started}
        return draws

    def export(self, *, keep_draws: bool = False) -> AnnData:
        """A copy of ``spots`` with every result under the keys of the module docstring;
        ``keep_draws`` also keeps the integer cell-count draws in ``uns["deconvolution"]["cell_count_draws"]``."""
        draws, record = self._require_draws(), self.train_record
        types = self.cell_types
        out = self.spots.copy()
        index = pd.Index(out.obs_names)
        local = ["abundance", "cell_count", "proportion"]
        local += [site for site in ("expected_expression", "detection") if site in draws]
        summary = summarise({site: np.asarray(draws[site], dtype=np.float64) for site in local + list(self.global_sites)},
                            integer_sites=["cell_count"])
        for name in ("abundance", "cell_count", "proportion"):
            for stat, v in summary[name].items():
                out.obsm[f"{name}_{stat}"] = pd.DataFrame(v, index=index, columns=types)
        frames_to_obs(out, [f"{name}_{stat}" for name in ("abundance", "cell_count", "proportion")
                            for stat in summary[name]])
        if "expected_expression" in draws:
            for stat, v in summary["expected_expression"].items():
                out.obsm[f"expected_expression_{stat}"] = v.astype(np.float32)
        if "detection" in draws:
            for stat, v in summary["detection"].items():
                out.obs[f"detection_{stat}"] = v
        # posterior mass inside each integer interval [q05, q95]: the coverage a perfectly calibrated
        # posterior would reach. Integer intervals hold at least 90% of the mass, far more where a
        # type is probably absent (P(n = 0) near 1 makes [0, 0] hold ~100%).
        n_draws = draws["cell_count"]
        lo_q, hi_q = summary["cell_count"]["q05"], summary["cell_count"]["q95"]
        inside = ((n_draws >= lo_q) & (n_draws <= hi_q)).mean(0)
        settings = dict(self.settings)
        settings.update({key: record[key] for key in ("max_steps", "min_steps", "convergence_window", "steps",
                                                       "stopped_by", "lr", "batch_size", "seed", "device")})
        settings["num_samples"] = self.sample_record["num_samples"]
        rec = {
            "cell_types": np.asarray(types, dtype=str),
            "genes": np.asarray(self.genes, dtype=str),
            "n_reference_cells": np.asarray(self.n_reference_cells).astype(np.int64),
            "settings": settings,
            "versions": record["versions"],
            "elbo": np.asarray(record["elbo"], dtype=np.float64),
            "fit_seconds": float(record["seconds"] + self.sample_record["seconds"]),
            "globals": {site: dict(summary[site]) for site in self.global_sites},
            "cell_count_interval_mass": {"overall": float(inside.mean()), "per_type": inside.mean(0).astype(np.float64)},
            "abundance_width_factor": float(record.get("abundance_width_factor", 1.0)),
            "abundance_width_criterion": str(record.get("abundance_width_criterion", self.WIDTH_CRITERION)),
        }
        if keep_draws:
            rec["cell_count_draws"] = n_draws.astype(np.int32)
        out.uns[UNS_KEY] = h5ad_safe(rec)
        add_spatial_uns(out, spatial_key=self.settings.get("spatial_key") or "spatial")
        return out

    def to_inference_data(self):
        """``arviz.InferenceData`` of the last :meth:`sample`'s draws (one chain): posterior sites
        with dims ``spot``, ``cell_type``, ``gene`` (named after the plates), the observed
        ``spot_counts`` (``spot``, ``gene``), and the training loss per step in ``sample_stats``."""
        draws = self._require_draws()
        coords = {"spot": list(map(str, self.spots.obs_names)), "cell_type": self.cell_types, "gene": self.genes}
        return draws_to_inference_data(
            draws, self.dims, coords, observed={"spot_counts": self.data.counts},
            elbo=self.train_record["elbo"] if self.train_record else None,
            attrs={"method": "Deconvolution", "seed": self.sample_record["seed"]},
        )

    # ------------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Save the trained model and guide (state dicts), the settings and the training record
        (tensors, numbers and strings only; read back by :meth:`load` with ``weights_only=True``)."""
        record = self._require_trained()
        state = {
            "method": "Deconvolution", "format": SAVE_FORMAT, "identity": self._identity(),
            "model": self.model.state_dict(), "guide": self.guide.state_dict(),
            "train": {**{k: v for k, v in record.items() if k != "elbo"}, "elbo": torch.as_tensor(record["elbo"])},
        }
        torch.save(state, path)

    def load(self, path: str) -> Deconvolution:
        """Load what :meth:`save` wrote, into a :class:`Deconvolution` built on the same inputs and
        settings (checked: a mismatch raises :class:`~pyrospatial.errors.InputError` naming the field).
        Draws are not saved: call :meth:`sample` again (same seed, same draws)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        check_saved(state, "Deconvolution", self._identity(), path)
        self.model.load_state_dict(state["model"])
        self.guide.load_state_dict(state["guide"])
        train = dict(state["train"])
        train["elbo"] = train["elbo"].numpy().astype(np.float64)
        self.train_record, self.fit_result, self.draws = train, None, None
        return self

    # ------------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {**self.settings, "cell_types": list(self.cell_types), "genes": list(self.genes),
                "n_spots": int(self.data.n_spots)}

    def _require_trained(self) -> dict[str, Any]:
        if self.train_record is None:
            raise InputError("this Deconvolution is not trained: call train() (or load() a saved one) first.")
        return self.train_record

    def _require_draws(self) -> dict[str, np.ndarray]:
        if self.draws is None:
            raise InputError("no posterior draws: call sample(num_samples) after train() first.")
        return self.draws


def deconvolve(
    spots: AnnData,
    reference: AnnData,
    cell_type_key: str = "cell_type",
    *,
    cells_per_spot: float | np.ndarray | str | None = None,
    layer: str | None = None,
    reference_layer: str | None = None,
    spatial_key: str = "spatial",
    min_cells_per_type: int = 5,
    concentration_mean: float = 0.3,
    concentration_shape: float = 1000.0,
    init_shape: float | None = None,
    init_prior_weight: float = 0.75,
    platform_cv: float = 0.3,
    detection_cv: float = 0.1,
    background_fraction: float = 0.05,
    smoothness: float = 0.0,
    total_cv: float | str | None = None,
    n_neighbours: int = 6,
    model: str = "states",
    n_states: int = 3,
    expression_genes: list[str] | None = None,
    reference_steps: int = 400,
    max_steps: int = 250,
    min_steps: int = 200,
    convergence_window: int | None = None,
    lr: float = 0.02,
    batch_size: int | None = None,
    num_samples: int = 300,
    return_expression: bool = False,
    keep_draws: bool = False,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    checkpoint_dir: str | None = None,
    resume: str | None = None,
) -> AnnData:
    """Cell-type abundances and proportions of every spot, with their uncertainty.

    One call of :class:`Deconvolution`: build it (validation, data, model, guide), ``train``,
    ``sample`` and ``export``.

    Parameters
    ----------
    spots
        Spots x genes, raw integer counts in ``.X`` (or ``layers[layer]``); optional
        ``obsm[spatial_key]`` coordinates (minibatches, smoothness, maps).
    reference
        Labelled single cells x genes, raw integer counts in ``.X`` (or
        ``layers[reference_layer]``), labels in ``obs[cell_type_key]``.
    cell_type_key
        Column of ``reference.obs`` with the cell-type labels.
    cells_per_spot
        Expected number of cells per spot ``N_j`` (a scalar, an array over spots, or the name
        of a column of ``spots.obs``). ``None``: estimated per spot as the spot's total counts
        over the mean total of a reference cell (right when both platforms capture alike).
    min_cells_per_type
        Reference types with fewer cells raise :class:`ReferenceTypeError`.
    concentration_mean, concentration_shape, platform_cv, detection_cv, background_fraction, smoothness
        Priors of the model (see its docstring); ``smoothness > 0`` adds the spatial term over
        a ``n_neighbours``-nearest-spot graph.
    model
        ``"states"`` (default): a continuous state per spot and type shifting the type's
        expression through a decoder learnt on the reference cells
        (:class:`~pyrospatial.methods.deconvolution_states.StateDeconvolution`; adds the keys
        ``type_state_*`` and, with ``expression_genes``, ``type_expression_*``, documented in
        that module; ``smoothness`` and ``total_cv`` are not part of it).
        ``"signatures"``: fixed per-type signatures
        (:class:`~pyrospatial.models.celltype_deconvolution.CellTypeDeconvolutionModel`), about
        a third of the cost. The default was chosen by held-out genes, never by the truth:
        :func:`~pyrospatial.methods.deconvolution_states.choose_settings` preferred
        ``"states"`` on all five benchmark data sets built from another split (see that
        module's docstring); run it on your own data to choose there.
    n_states, expression_genes, reference_steps
        ``model="states"`` only: dimension ``K >= 1`` of each type's state; genes whose expected
        per-type expression is exported per spot; Adam steps of the reference model.
    total_cv
        ``None`` (default): the model's story 3 (one Gamma per abundance). A number, or
        ``"reference"`` (``cv_cell / sqrt(N_j)``, with ``cv_cell`` the coefficient of variation
        of the reference cells' total counts): story 3', total and composition apart.
    max_steps, lr, batch_size
        SVI budget (Adam steps, learning rate, decayed 10x over the run) and spots per
        minibatch (``None``: full batch). The guide starts at the non-negative least-squares
        abundances, so the number of steps also sets how far the fit moves from that start.
    init_shape, init_prior_weight
        Start of the abundances' Gamma guide (:func:`guide_start`): shape ``init_shape``
        (``None``: 2 for ``model="signatures"``, 10 for ``model="states"``) at the
        mean ``(1 - init_prior_weight) * NNLS + init_prior_weight * N_j f_t`` (``f_t`` the
        reference's type frequencies, ``N_j`` the cells-per-spot hint).
    min_steps, convergence_window
        Optional ELBO stopping rule (:func:`elbo_converged`): with ``convergence_window=W`` the
        fit also stops, after ``min_steps``, once the mean loss of the last ``W`` steps is not
        lower than that of the ``W`` before by more than 2 standard errors. Off by default.

        How the defaults were chosen (``concentration_mean=0.3``, ``max_steps=250``, no stopping
        rule), without any ground truth: by held-out-gene prediction
        (:func:`heldout_gene_score`: 3 random gene folds, fit on the other genes, Poisson
        deviance of the held-out genes predicted from the abundances and the reference), on the
        osmFISH pseudo-spots of a reference/spatial split (seed 1) other than the benchmark's,
        at 100 and 50 µm (``python benchmarks/deconvolution.py --select ...``; scores in
        ``benchmarks/results/deconvolution.md``). ``a0 = 0.3`` beat ``a0 = 1`` at both densities;
        250 steps was best at 50 µm and within 0.1% of the best (500) at 100 µm, and had the
        lowest deviance summed (relative to each density's best) over both. Longer fits (the
        ELBO rule ran 1500 to over 3000 steps) predicted held-out genes worse and grew the
        spot totals well above the cells-per-spot hint.
    num_samples
        Joint posterior draws behind every summary.
    return_expression
        Also export per-spot per-type expected expression (spots x types x genes).
    keep_draws
        Also keep the integer cell-count draws behind the summaries in
        ``uns["deconvolution"]["cell_count_draws"]`` (draws x spots x types, int32), e.g. to
        score calibration with :func:`pyrospatial.criticism.calibration.pit_coverage_by_level`.
    seed, device, progress
        Seed of the fit and the draws; torch device; progress bar.
    checkpoint_dir, resume
        As for :func:`pyrospatial.fit`: ``last.ckpt`` written there during training;
        ``resume="last"`` continues a killed fit from it.

    Returns
    -------
    AnnData
        A copy of ``spots`` with the documented keys (module docstring).

    Raises
    ------
    NoSharedGenesError, ReferenceTypeError, CountsError, EmptySpotError, InputError
    """
    from pyrospatial.methods.deconvolution_states import (
        StateDeconvolution,
        check_model_name,
        check_n_states,
    )

    common: dict[str, Any] = {
        "cells_per_spot": cells_per_spot, "layer": layer, "reference_layer": reference_layer,
        "spatial_key": spatial_key, "min_cells_per_type": min_cells_per_type,
        "concentration_mean": concentration_mean, "concentration_shape": concentration_shape,
        "init_prior_weight": init_prior_weight, "platform_cv": platform_cv,
        "detection_cv": detection_cv, "background_fraction": background_fraction, "smoothness": smoothness,
        "total_cv": total_cv, "n_neighbours": n_neighbours,
    }
    if init_shape is not None:
        common["init_shape"] = init_shape
    extra: dict[str, Any] = {}
    n_states = check_n_states(n_states)
    if check_model_name(model) == "states":
        method = StateDeconvolution(spots, reference, cell_type_key, n_states=n_states, seed=seed,
                                    expression_genes=expression_genes, **common)
        extra["reference_steps"] = reference_steps
    else:
        method = Deconvolution(spots, reference, cell_type_key, **common)
    method.train(max_steps, min_steps=min_steps, convergence_window=convergence_window, lr=lr, batch_size=batch_size,
                 seed=seed, device=device, progress=progress, checkpoint_dir=checkpoint_dir, resume=resume, **extra)
    method.sample(num_samples, return_expression=return_expression, seed=seed)
    return method.export(keep_draws=keep_draws)


def round_at_random(abundance: np.ndarray, seed: int) -> np.ndarray:
    """Integer cell counts from abundance draws: ``floor(w) + 1`` with probability
    ``w - floor(w)``, else ``floor(w)`` (mean ``w``; int64).

    Why not ``Poisson(w)``: the likelihood reads ``w`` as the spot's number of cells (its
    expression is the sum of ``w`` cells' expression), so the data already pin the count; a
    Poisson draw on top samples the cells a second time. Measured with the randomised PIT of
    the true counts (nominal 0.5 / 0.9 when calibrated), signatures model after the ELBO's
    width choice: on the ``sim_gradient`` simulator, seeds 1 and 2 (the benchmark scores seed 0),
    Poisson 0.71 / 0.97 and 0.67 / 0.96, rounded 0.50 / 0.89 and 0.48 / 0.87; on the simulation
    of ``tests/test_deconvolution.py`` Poisson 0.75 / 0.97, rounded 0.50 / 0.94."""
    w = np.asarray(abundance, dtype=np.float64)
    base = np.floor(w)
    return (base + (np.random.default_rng(seed).random(w.shape) < w - base)).astype(np.int64)


def _cells_per_spot(cells_per_spot, spots: AnnData, spot_counts: np.ndarray, ref_counts: np.ndarray) -> np.ndarray:
    """``N_j`` per spot: given (scalar, array, ``spots.obs`` column) or estimated from the totals."""
    if cells_per_spot is None:
        per_cell = ref_counts.sum(1).mean()
        hint = np.maximum(spot_counts.sum(1) / max(per_cell, 1e-8), 0.5)
    elif isinstance(cells_per_spot, str):
        if cells_per_spot not in spots.obs:
            raise InputError(f"cells_per_spot='{cells_per_spot}' is not a column of spots.obs.")
        hint = np.asarray(spots.obs[cells_per_spot], dtype=np.float64)
    else:
        hint = np.broadcast_to(np.asarray(cells_per_spot, dtype=np.float64), (spots.n_obs,)).copy()
    if not (np.isfinite(hint).all() and (hint > 0).all()):
        raise InputError("cells_per_spot must be positive and finite for every spot.")
    return hint


def _total_cv(total_cv, ref_counts: np.ndarray, hint: np.ndarray):
    """The model's ``total_cv``: ``None``, a number, or ``"reference"`` (``cv_cell / sqrt(N_j)``)."""
    if total_cv is None:
        return None
    if total_cv == "reference":
        # the hint N_j = spot total / mean cell total errs by the spread of cell totals:
        # coefficient of variation cv_cell / sqrt(N_j), measured on the reference
        lib = ref_counts.sum(1)
        cv_cell = float(lib.std() / max(lib.mean(), 1e-8))
        return torch.as_tensor(cv_cell / np.sqrt(hint), dtype=torch.float32)
    return float(total_cv)

