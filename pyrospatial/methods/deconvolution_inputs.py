"""Inputs of :mod:`pyrospatial.methods.deconvolution`: validation of the spots and the
reference, the reference signatures' prior, the point-estimate baseline and guide start, and
the ELBO stopping rule. Everything here is re-exported by that module (its public names).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData
from scipy.optimize import nnls

from pyrospatial.errors import CountsError, DuplicateNamesError, InputError

__all__ = [
    "EmptySpotError",
    "NoSharedGenesError",
    "ReferenceTypeError",
    "convergence_callback",
    "elbo_converged",
    "guide_start",
    "nnls_abundance",
    "signature_prior",
]


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


def check_unique_names(adata: AnnData, what: str) -> None:
    """Cell (obs) and gene (var) names of ``what`` are unique, else a
    :class:`~pyrospatial.errors.DuplicateNamesError` naming examples and the fix."""
    if not isinstance(adata, AnnData):
        raise InputError(f"{what} must be an AnnData, got {type(adata).__name__}.")
    for axis, names, fix, kind in (("var", adata.var_names, "var_names_make_unique", "gene"),
                                   ("obs", adata.obs_names, "obs_names_make_unique", "cell/spot")):
        if not names.is_unique:
            dup = names[names.duplicated()].unique()
            raise DuplicateNamesError(
                f"{what}.{axis}_names has {dup.size} duplicated {kind} name(s) (e.g. {list(map(str, dup[:5]))}); "
                f"call {what}.{fix}() first (or sum/drop the duplicated {kind}s)."
            )


def spot_coordinates(spots: AnnData, spatial_key: str) -> np.ndarray | None:
    """``spots.obsm[spatial_key]`` as finite ``(n_spots, 2)`` floats (the first two columns), or
    ``None`` when absent; an :class:`~pyrospatial.errors.InputError` naming the field otherwise."""
    if spatial_key not in spots.obsm:
        return None
    field = f"spots.obsm['{spatial_key}']"
    raw = np.asarray(spots.obsm[spatial_key])
    if raw.ndim != 2 or raw.shape[1] < 2:
        raise InputError(f"{field} must have shape (n_spots, 2) (x, y per spot), got {raw.shape}; store the "
                         "x/y coordinates there or delete the key.")
    if raw.dtype.kind not in "biuf":
        raise InputError(f"{field} must be numeric, got dtype {raw.dtype}; convert it with .astype(float).")
    coords = raw[:, :2].astype(np.float64)
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        raise InputError(f"{field} has {int(bad.sum())} spot(s) with NaN/inf coordinates (e.g. "
                         f"{list(spots.obs_names[bad][:3])}); drop those spots or fix their coordinates.")
    return coords


def _shared_genes(spots: AnnData, reference: AnnData) -> list[str]:
    check_unique_names(spots, "spots")
    check_unique_names(reference, "reference")
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


def convergence_callback(window: int, min_steps: int, z: float = 2.0):
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
