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

Documented keys of the returned spots AnnData
---------------------------------------------
For ``stat`` in ``mean, sd, q05, q50, q95`` (posterior mean, standard deviation and the 5%,
50%, 95% quantiles over ``num_samples`` joint posterior draws):

- ``obsm[f"abundance_{stat}"]``: DataFrame spots x cell types, ``w_jt``, the expected
  number of cells of each type in each spot (continuous, never exactly 0);
- ``obsm[f"cell_count_{stat}"]``: DataFrame spots x cell types, the integer number of cells
  ``n_jt ~ Poisson(w_jt)`` under the posterior of ``w``: read its ``[q05, q95]`` as the 90%
  interval of a spot's cell count (it contains 0 when absence is plausible);
- ``obsm[f"proportion_{stat}"]``: DataFrame spots x cell types, ``w_jt / sum_t w_jt``;
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
  ``settings`` records every setting, ``steps`` (steps run) and ``stopped_by``.

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

import math
import time
import warnings

import numpy as np
import pandas as pd
import pyro
import scipy.sparse as sp
import torch
from anndata import AnnData
from scipy.optimize import nnls

from pyrospatial.errors import CountsError, InputError
from pyrospatial.data.spot_counts import SpotCounts


__all__ = ["STATS", "UNS_KEY", "NoSharedGenesError", "ReferenceTypeError", "EmptySpotError", "signature_prior", "nnls_abundance", "guide_start", "elbo_converged", "deconvolve"]


#: Statistics exported for every inferred quantity.
STATS = ("mean", "sd", "q05", "q50", "q95")


#: Key of the run record in ``spots.uns``.
UNS_KEY = "deconvolution"


class NoSharedGenesError(InputError):
    """The spots and the reference share no gene."""


class ReferenceTypeError(InputError):
    """The reference's cell-type labels are missing or a type has too few cells."""


class EmptySpotError(InputError):
    """Some spots have zero counts over the genes used."""


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------
def _matrix(adata: AnnData, layer: str | None, what: str):
    if layer is None:
        return adata.X, f"{what}.X"
    if layer not in adata.layers:
        raise InputError(
            f"{what}.layers['{layer}'] is missing (available layers: {sorted(adata.layers.keys())}); "
            f"pass the layer that holds raw counts, or layer=None to use {what}.X."
        )
    return adata.layers[layer], f"{what}.layers['{layer}']"


def _raw_counts(matrix, field: str) -> np.ndarray:
    """Dense float64 raw counts, rejecting NaN/inf, negative and non-integer values."""
    array = matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)
    if array.dtype.kind not in "biuf":
        raise CountsError(f"{field} must be numeric counts, got dtype {array.dtype}.")
    array = np.asarray(array, dtype=np.float64)
    bad = ~np.isfinite(array)
    if bad.any():
        raise CountsError(
            f"{field} contains {int(bad.sum())} NaN/inf value(s); pass raw integer counts "
            "(e.g. adata.layers['counts'] or adata.raw.X)."
        )
    if (array < 0).any():
        raise CountsError(
            f"{field} has {int((array < 0).sum())} negative value(s); pass raw counts, not scaled data."
        )
    fractional = np.abs(array - np.round(array)) > 1e-6
    if fractional.any():
        raise CountsError(
            f"{field} has {int(fractional.sum())} non-integer value(s) (e.g. {array[fractional][0]:.4g}); "
            "the negative-binomial likelihood needs raw integer counts: pass the raw counts (layer=... / "
            "reference_layer=...), not normalised or log-transformed data."
        )
    return np.round(array)


def _shared_genes(spots: AnnData, reference: AnnData) -> list[str]:
    ref = set(map(str, reference.var_names))
    genes = [str(g) for g in spots.var_names if str(g) in ref]
    if not genes:
        raise NoSharedGenesError(
            f"spots.var_names ({spots.n_vars} genes, e.g. {list(map(str, spots.var_names[:3]))}) and "
            f"reference.var_names ({reference.n_vars} genes, e.g. {list(map(str, reference.var_names[:3]))}) "
            "share no gene: use the same gene identifiers in both (symbols or Ensembl IDs)."
        )
    return genes


def _reference_labels(reference: AnnData, cell_type_key: str, min_cells_per_type: int) -> pd.Categorical:
    if cell_type_key not in reference.obs:
        raise ReferenceTypeError(
            f"reference.obs['{cell_type_key}'] is missing: pass cell_type_key= the column with the "
            f"cell-type labels (available: {list(reference.obs.columns)})."
        )
    labels = reference.obs[cell_type_key]
    if labels.isna().any():
        raise ReferenceTypeError(
            f"reference.obs['{cell_type_key}'] has {int(labels.isna().sum())} missing label(s); "
            "drop those cells or label them."
        )
    labels = pd.Categorical(labels.astype(str))
    labels = labels.remove_unused_categories()
    counts = pd.Series(labels).value_counts()
    small = counts[counts < min_cells_per_type]
    if len(small):
        raise ReferenceTypeError(
            f"reference.obs['{cell_type_key}'] has type(s) with fewer than min_cells_per_type="
            f"{min_cells_per_type} cells: {dict(small.astype(int))}. A signature from so few cells is "
            "not estimable: merge those types into a related one, drop their cells, or lower "
            "min_cells_per_type."
        )
    if len(counts) < 2:
        raise ReferenceTypeError(
            f"reference.obs['{cell_type_key}'] has a single type; deconvolution needs at least 2."
        )
    return labels


# ------------------------------------------------------------------------------------------
# reference signatures and a point-estimate baseline
# ------------------------------------------------------------------------------------------
def signature_prior(
    counts: np.ndarray, labels: pd.Categorical, *, pseudocount: float = 0.1
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Gamma prior ``(shape, rate)`` of the per-type mean expression ``s_tg`` (``T x G``).

    Moment matching of the type mean's sampling distribution: mean ``s_hat = (sum_i x_ig +
    pseudocount) / n_t`` and variance ``max(var_i x_ig, s_hat) / n_t`` (the squared standard
    error, floored at its Poisson value), so ``shape = n_t s_hat^2 / max(var, s_hat)`` and
    ``rate = shape / s_hat``. For a Poisson gene this is the conjugate posterior of its rate.

    Returns
    -------
    shape, rate
        ``(T, G)`` float64 arrays.
    excess_variance
        ``(T, G)`` per-cell variance over Poisson, ``max(var_i x_ig - s_hat, 0)``.
    n_cells
        ``(T,)`` number of reference cells per type.
    """
    codes = np.asarray(labels.codes)
    T = len(labels.categories)
    n_t = np.bincount(codes, minlength=T).astype(np.float64)
    sums = np.zeros((T, counts.shape[1]))
    np.add.at(sums, codes, counts)
    squares = np.zeros_like(sums)
    np.add.at(squares, codes, counts**2)
    mean_raw = sums / n_t[:, None]
    var = np.maximum(squares / n_t[:, None] - mean_raw**2, 0.0) * n_t[:, None] / np.maximum(n_t[:, None] - 1, 1)
    mean = (sums + pseudocount) / n_t[:, None]
    shape = n_t[:, None] * mean**2 / np.maximum(var, mean)
    rate = shape / mean
    return shape, rate, np.maximum(var - mean_raw, 0.0), n_t


def nnls_abundance(spot_counts: np.ndarray, signatures: np.ndarray) -> np.ndarray:
    """``(n_spots, T)`` non-negative least squares: ``X_j ~ sum_t w_jt s_t`` with ``w >= 0``.

    The point-estimate baseline (``nnls`` in the benchmark) and the guide's starting point.
    """
    S = np.asarray(signatures, dtype=np.float64).T  # G x T
    X = np.asarray(spot_counts, dtype=np.float64)
    return np.stack([nnls(S, x)[0] for x in X])


def guide_start(
    nnls: np.ndarray, cells_per_spot: np.ndarray, type_frequency: np.ndarray, prior_weight: float
) -> np.ndarray:
    """``(n_spots, T)`` starting mean of the abundances' guide: a blend of the NNLS fit and the
    prior mean, ``(1 - prior_weight) * nnls + prior_weight * N_j f_t``.

    Why blend: NNLS is sparse (a type it sets to 0 starts at the guide's floor, a Gamma with
    ``P(n = 0) ~ 0.95``), and the fit runs a fixed, short budget from its start, so a type NNLS
    dropped in a spot mostly stays "surely absent" whatever the data say. The prior mean
    (``N_j`` cells spread over the types in the reference's frequencies ``f_t``) is dense and uses
    no spot data; a blend starts every type with some abundance and still starts near the
    least-squares composition. ``prior_weight = 0`` is the NNLS start.

    Parameters
    ----------
    nnls
        ``(n_spots, T)`` non-negative least-squares abundances (:func:`nnls_abundance`).
    cells_per_spot
        ``N_j``, a scalar or ``(n_spots,)``.
    type_frequency
        ``(T,)`` type frequencies (e.g. of the reference cells), summing to 1.
    prior_weight
        Weight of the prior mean, in ``[0, 1]``.
    """
    if not 0.0 <= float(prior_weight) <= 1.0:
        raise InputError(f"init_prior_weight must be in [0, 1], got {prior_weight}.")
    nnls = np.asarray(nnls, dtype=np.float64)
    hint = np.broadcast_to(np.asarray(cells_per_spot, dtype=np.float64).reshape(-1, 1), (nnls.shape[0], 1))
    prior_mean = hint * np.asarray(type_frequency, dtype=np.float64)[None, :]
    return (1.0 - float(prior_weight)) * nnls + float(prior_weight) * prior_mean


# ------------------------------------------------------------------------------------------
# when to stop: a rule on the ELBO alone
# ------------------------------------------------------------------------------------------
def elbo_converged(history, window: int, z: float = 2.0) -> bool:
    """True when the mean loss of the last ``window`` steps is no longer lower than the mean
    of the ``window`` steps before it by more than ``z`` standard errors of that difference.

    A rule on the (noisy, single-draw) ELBO estimates only: it stops when further steps no
    longer improve the ELBO by more than its Monte-Carlo noise can explain. It never looks at
    any ground truth.
    """
    h = np.asarray(history, dtype=np.float64)
    if h.size < 2 * window:
        return False
    prev, last = h[-2 * window:-window], h[-window:]
    se = math.sqrt((prev.var(ddof=1) + last.var(ddof=1)) / window)
    return bool(prev.mean() - last.mean() <= z * se)


def _convergence_callback(window: int, min_steps: int, z: float = 2.0):
    """A Lightning callback applying :func:`elbo_converged` every ``window`` steps (after
    ``min_steps``)."""
    from lightning.pytorch.callbacks import Callback

    class ELBOConvergence(Callback):
        def __init__(self):
            self.stopped_at = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            history = pl_module.elbo_history
            n = len(history)
            if n >= max(min_steps, 2 * window) and n % window == 0 and elbo_converged(history, window, z):
                self.stopped_at = n
                trainer.should_stop = True

    return ELBOConvergence()


# ------------------------------------------------------------------------------------------
# the API
# ------------------------------------------------------------------------------------------
def _quantiles(draws: np.ndarray, probs, integer: bool) -> list[np.ndarray]:
    """``np.quantile(draws, probs, axis=0)`` with ``method="inverted_cdf"`` (integer) or
    ``"linear"``, from one sort of the draws (several times faster for many probabilities)."""
    ordered = np.sort(draws, axis=0)
    n = ordered.shape[0]
    out = []
    for p in probs:
        if integer:
            out.append(ordered[max(int(math.ceil(n * p)) - 1, 0)])
        else:
            pos = (n - 1) * p
            lo = int(math.floor(pos))
            hi = min(lo + 1, n - 1)
            out.append(ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo]))
    return out


def _summary(draws: np.ndarray, integer: bool = False) -> dict[str, np.ndarray]:
    """mean, sd (ddof=1) and the 5/50/95% quantiles over axis 0; integer draws get quantiles
    that are draws themselves (``inverted_cdf``), so count intervals have integer ends."""
    q = _quantiles(draws, (0.05, 0.5, 0.95), integer)
    return {
        "mean": draws.mean(0),
        "sd": draws.std(0, ddof=1) if draws.shape[0] > 1 else np.zeros(draws.shape[1:]),
        "q05": q[0],
        "q50": q[1],
        "q95": q[2],
    }


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
    init_shape: float = 2.0,
    init_prior_weight: float = 0.75,
    platform_cv: float = 0.3,
    detection_cv: float = 0.1,
    background_fraction: float = 0.05,
    smoothness: float = 0.0,
    total_cv: float | str | None = None,
    n_neighbours: int = 6,
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
) -> AnnData:
    """Cell-type abundances and proportions of every spot, with their uncertainty.

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
    total_cv
        ``None`` (default): the model's story 3 (one Gamma per abundance). A number, or
        ``"reference"`` (``cv_cell / sqrt(N_j)``, with ``cv_cell`` the coefficient of variation
        of the reference cells' total counts): story 3', total and composition apart.
    max_steps, lr, batch_size
        SVI budget (Adam steps, learning rate, decayed 10x over the run) and spots per
        minibatch (``None``: full batch). The guide starts at the non-negative least-squares
        abundances, so the number of steps also sets how far the fit moves from that start.
    init_shape, init_prior_weight
        Start of the abundances' Gamma guide (:func:`guide_start`): shape ``init_shape`` at the
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

    Returns
    -------
    AnnData
        A copy of ``spots`` with the documented keys (module docstring).

    Raises
    ------
    NoSharedGenesError, ReferenceTypeError, CountsError, EmptySpotError, InputError
    """
    from pyrospatial.guides.celltype_deconvolution import CellTypeDeconvolutionGuide
    from pyrospatial.engine.infer import fit
    from pyrospatial.models.celltype_deconvolution import CellTypeDeconvolutionModel
    from pyrospatial.engine.posterior import sample_posterior

    if not isinstance(spots, AnnData) or not isinstance(reference, AnnData):
        raise InputError("spots and reference must be AnnData objects (spots x genes, cells x genes).")
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
    signature_mean = shape / rate
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

    coords = None
    if spatial_key in spots.obsm:
        coords = np.asarray(spots.obsm[spatial_key], dtype=np.float64)[:, :2]
    elif smoothness > 0:
        raise InputError(f"smoothness > 0 needs spot coordinates in spots.obsm['{spatial_key}'].")
    data = SpotCounts(spot_counts, coords, len(types), n_neighbours=n_neighbours if smoothness > 0 else 0)

    init = guide_start(nnls_abundance(spot_counts, signature_mean), hint, n_ref / n_ref.sum(), init_prior_weight)
    if total_cv == "reference":
        # the hint N_j = spot total / mean cell total errs by the spread of cell totals:
        # coefficient of variation cv_cell / sqrt(N_j), measured on the reference
        lib = ref_counts.sum(1)
        cv_cell = float(lib.std() / max(lib.mean(), 1e-8))
        total_cv_value = torch.as_tensor(cv_cell / np.sqrt(hint), dtype=torch.float32)
    elif total_cv is None:
        total_cv_value = None
    else:
        total_cv_value = float(total_cv)
    model = CellTypeDeconvolutionModel(
        torch.as_tensor(shape), torch.as_tensor(rate), torch.as_tensor(excess),
        torch.as_tensor(hint if hint.size > 1 else hint[0]),
        concentration_mean=concentration_mean, concentration_shape=concentration_shape,
        platform_cv=platform_cv, detection_cv=detection_cv,
        background_fraction=background_fraction, smoothness=smoothness, record_expression=False,
        total_cv=total_cv_value,
    )
    guide = CellTypeDeconvolutionGuide(torch.as_tensor(shape), torch.as_tensor(rate), torch.as_tensor(init),
                                       detection=detection_cv > 0, init_shape=init_shape,
                                       init_concentration=concentration_mean,
                                       split_total=total_cv_value is not None)
    started = time.perf_counter()
    callbacks = []
    if convergence_window:
        stopper = _convergence_callback(int(convergence_window), int(min_steps))
        callbacks.append(stopper)
    # argument validation off while training and sampling: it costs a tenth of every step and
    # the engine still stops with the offending site named on a non-finite loss
    with pyro.validation_enabled(False):
        result = fit(model, guide, data, max_steps=int(max_steps), batch_size=batch_size, lr=lr,
                     lr_decay=0.1 ** (1.0 / max(int(max_steps), 1)), seed=seed, device=device, progress=progress,
                     callbacks=callbacks)
    model.record_expression = bool(return_expression)
    sites = ["abundance", "proportion", "signature", "platform_effect", "background", "inv_sqrt_dispersion",
             "type_frequency", "concentration"]
    if detection_cv > 0:
        sites.append("detection")
    if return_expression:
        sites.append("expected_expression")
    with pyro.validation_enabled(False):
        draws = sample_posterior(model, guide, data, num_samples=int(num_samples), sites=sites, seed=seed)
    model.record_expression = False
    seconds = time.perf_counter() - started

    rng = np.random.default_rng(seed)
    w = draws["abundance"].astype(np.float64)
    out = spots.copy()
    index = pd.Index(out.obs_names)
    n_draws = rng.poisson(w)
    for name, values in (("abundance", w), ("cell_count", n_draws), ("proportion", draws["proportion"])):
        for stat, v in _summary(np.asarray(values, dtype=np.float64), integer=name == "cell_count").items():
            out.obsm[f"{name}_{stat}"] = pd.DataFrame(v, index=index, columns=types)
    # posterior mass inside each integer interval [q05, q95]: the coverage a perfectly calibrated
    # posterior would reach. Integer intervals hold at least 90% of the mass, far more where a
    # type is probably absent (P(n = 0) near 1 makes [0, 0] hold ~100%).
    lo_q, hi_q = out.obsm["cell_count_q05"].to_numpy(), out.obsm["cell_count_q95"].to_numpy()
    inside = ((n_draws >= lo_q) & (n_draws <= hi_q)).mean(0)
    interval_mass = {"overall": float(inside.mean()),
                     "per_type": inside.mean(0).astype(np.float64)}
    if return_expression:
        for stat, v in _summary(draws["expected_expression"].astype(np.float64)).items():
            out.obsm[f"expected_expression_{stat}"] = v.astype(np.float32)
    if detection_cv > 0:
        for stat, v in _summary(draws["detection"].astype(np.float64)).items():
            out.obs[f"detection_{stat}"] = v
    globals_ = {
        site: {stat: np.asarray(v) for stat, v in _summary(draws[site].astype(np.float64)).items()}
        for site in ("signature", "platform_effect", "background", "inv_sqrt_dispersion", "type_frequency",
                     "concentration")
    }
    settings = {
        "cell_type_key": cell_type_key, "layer": str(layer), "reference_layer": str(reference_layer),
        "cells_per_spot": "estimated" if cells_per_spot is None else (
            cells_per_spot if isinstance(cells_per_spot, str) else float(np.mean(hint))),
        "min_cells_per_type": int(min_cells_per_type), "concentration_mean": float(concentration_mean),
        "platform_cv": float(platform_cv), "detection_cv": float(detection_cv),
        "background_fraction": float(background_fraction), "smoothness": float(smoothness),
        "concentration_shape": float(concentration_shape), "init_shape": float(init_shape),
        "init_prior_weight": float(init_prior_weight),
        "n_neighbours": int(n_neighbours), "max_steps": int(max_steps), "min_steps": int(min_steps),
        "convergence_window": 0 if not convergence_window else int(convergence_window),
        "steps": int(len(result.elbo_history)),
        "stopped_by": "elbo_converged" if (convergence_window and stopper.stopped_at) else "max_steps",
        "lr": float(lr),
        "batch_size": "None" if batch_size is None else int(batch_size), "num_samples": int(num_samples),
        "seed": int(seed), "device": str(result.settings.get("device", device)),
    }
    out.uns[UNS_KEY] = {
        "cell_types": np.asarray(types, dtype=str),
        "genes": np.asarray(genes, dtype=str),
        "n_reference_cells": n_ref.astype(np.int64),
        "settings": settings,
        "versions": result.settings.get("versions", {}),
        "elbo": np.asarray(result.elbo_history, dtype=np.float64),
        "fit_seconds": float(seconds),
        "globals": globals_,
        "cell_count_interval_mass": interval_mass,
    }
    if keep_draws:
        out.uns["deconvolution"]["cell_count_draws"] = n_draws.astype(np.int32)
    return out
