"""A deconvolution simulator whose cell types change their expression across the tissue.

:func:`simulate_deconvolution` draws a square tissue of single cells, half of which are
labelled reference cells and half are summed into square pseudo-spots, where every cell
type's expression shifts smoothly with the x coordinate. A method that describes each type
by one fixed signature (the reference's mean) meets, in every spot, a type that looks a bit
different from that mean; a method with a continuous state per spot and type can follow it.

Generative story (all draws from one ``numpy`` generator seeded with ``seed``)
--------------------------------------------------------------------------------
Tissue and composition. ``n_cells`` cells are uniform on ``[0, width] x [0, width]`` µm.
Type ``t`` of a cell at ``(x, y)`` is categorical with probabilities
``softmax_t(composition_strength * a_t(x, y))``, where ``a_t`` is a low-frequency cosine
field, ``a_t(x, y) = cos(2 pi (f_t1 x + f_t2 y) / width + phi_t)``, with integer
frequencies ``f_t. in {-1, 0, 1}`` (not both 0) and phase ``phi_t ~ Uniform(0, 2 pi)``.
Composition thus varies over the tissue in both directions, not only with x.

Cell states. Every cell has a state ``v_c in R^state_dim``,
``v_c ~ Normal(m(x_c), state_noise^2 I)``, whose mean is a smooth function of x only:
``m_k(x) = cos(k pi x / width)``, ``k = 1..state_dim`` (so the first component goes
monotonically from +1 at the left edge to -1 at the right edge).

Expression. Type ``t`` has baseline log-expression ``b_tg = base_g + marker_strength *
M_tg`` (``base_g ~ Normal(0, 1)``; ``M_tg = 1`` on ``markers_per_type`` marker genes of
``t``, else 0) and a per-type loading matrix ``L_t`` (genes x state_dim) of independent
``Normal(0, 1)`` entries. The expected counts of cell ``c`` of type ``t`` are
``mu_cg = l_c softmax_g(b_tg + gradient_strength * (L_t v_c)_g)``, with library size
``l_c ~ LogNormal(log library_mean, library_sd)``, and its counts are negative binomial
(Gamma-Poisson) with mean ``mu_cg`` and inverse dispersion ``inverse_dispersion``.
``gradient_strength = 0`` removes the within-type gradient (every type then has one
signature up to the cell-level noise of ``v_c``, which also vanishes).

Split and spots. A random ``reference_fraction`` of the cells (seeded) forms the reference
(``obs["cell_type"]``, all over the tissue, so it sees every state); the other cells are
summed into touching square spots of side ``spot_size`` µm
(:func:`pyrospatial.data.sim.pseudo_spots`), whose per-type cell counts are the truth.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from pyrospatial.data.sim import pseudo_spots
from pyrospatial.errors import InputError

__all__ = ["simulate_deconvolution", "state_mean"]


def state_mean(x: np.ndarray, width: float, state_dim: int) -> np.ndarray:
    """The mean cell state at x coordinates ``x``: ``m_k(x) = cos(k pi x / width)``, k = 1..state_dim.

    Returns an array of shape ``(len(x), state_dim)``.
    """
    k = np.arange(1, state_dim + 1, dtype=np.float64)
    return np.cos(np.pi * np.asarray(x, np.float64)[:, None] * k[None, :] / float(width))


def _softmax_rows(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _check(n_cells: int, n_types: int, n_genes: int, markers_per_type: int, width: float, spot_size: float,
           reference_fraction: float, state_dim: int) -> None:
    if n_types < 2:
        raise InputError(f"n_types must be >= 2, got {n_types}.")
    if n_genes < n_types * markers_per_type:
        raise InputError(f"n_genes must be >= n_types * markers_per_type = {n_types * markers_per_type}, "
                         f"got {n_genes}: lower markers_per_type or raise n_genes.")
    if state_dim < 1:
        raise InputError(f"state_dim must be >= 1, got {state_dim}.")
    if not 0.0 < reference_fraction < 1.0:
        raise InputError(f"reference_fraction must lie in (0, 1), got {reference_fraction}.")
    if not (width > 0 and 0 < spot_size <= width):
        raise InputError(f"need width > 0 and 0 < spot_size <= width, got width={width}, spot_size={spot_size}.")
    if n_cells < 4 * n_types:
        raise InputError(f"n_cells must be >= 4 * n_types = {4 * n_types}, got {n_cells}.")


def simulate_deconvolution(
    n_cells: int = 6000,
    n_types: int = 6,
    n_genes: int = 60,
    *,
    width: float = 1500.0,
    spot_size: float = 100.0,
    reference_fraction: float = 0.5,
    state_dim: int = 2,
    gradient_strength: float = 1.0,
    state_noise: float = 0.3,
    marker_strength: float = 2.0,
    markers_per_type: int = 5,
    composition_strength: float = 1.5,
    library_mean: float = 200.0,
    library_sd: float = 0.3,
    inverse_dispersion: float = 10.0,
    seed: int = 0,
    return_cells: bool = False,
) -> tuple[ad.AnnData, ad.AnnData] | tuple[ad.AnnData, ad.AnnData, ad.AnnData]:
    """Spots and a labelled reference from a tissue whose types shift their expression with x.

    See the module docstring for the generative story and the meaning of every argument.

    Returns
    -------
    spots
        Spots x genes: ``.X`` float32 integer counts (sums of the member cells);
        ``obs["n_cells"]``; ``obsm["spatial"]`` spot centres (µm);
        ``obsm["cell_type_counts"]`` DataFrame spots x types (the truth; rows sum to
        ``n_cells``); ``uns["sim_deconvolution"]`` the settings.
    reference
        Reference cells x genes: ``.X`` float32 counts, ``obs["cell_type"]`` (categorical
        ``type0..``), ``obsm["spatial"]``, ``obsm["true_state"]`` (cells x state_dim);
        ``uns["sim_deconvolution"]`` the settings plus the truth of the expression model:
        ``baseline`` (types x genes log-expression ``b``) and ``loadings``
        (types x genes x state_dim, already multiplied by ``gradient_strength``).
    cells
        Only with ``return_cells=True``: the spatial (non-reference) cells with the same
        fields as ``reference`` and ``obs["spot"]``, the spot each was summed into.
    """
    _check(n_cells, n_types, n_genes, markers_per_type, width, spot_size, reference_fraction, state_dim)
    rng = np.random.default_rng(seed)
    T, G, R = int(n_types), int(n_genes), int(state_dim)

    # tissue and composition
    xy = rng.uniform(0.0, width, size=(n_cells, 2))
    freq = rng.integers(-1, 2, size=(T, 2)).astype(np.float64)
    freq[(freq == 0).all(axis=1), 0] = 1.0  # every field varies
    phase = rng.uniform(0.0, 2 * np.pi, size=T)
    field = np.cos(2 * np.pi * (xy @ freq.T) / width + phase[None, :])
    type_prob = _softmax_rows(composition_strength * field)
    cell_type = (rng.random(n_cells)[:, None] > np.cumsum(type_prob, axis=1)).sum(axis=1)
    cell_type = np.minimum(cell_type, T - 1)

    # states and expression
    state = state_mean(xy[:, 0], width, R) + state_noise * rng.normal(size=(n_cells, R))
    base = rng.normal(0.0, 1.0, size=G)
    markers = np.zeros((T, G))
    for t in range(T):
        markers[t, t * markers_per_type:(t + 1) * markers_per_type] = 1.0
    baseline = base[None, :] + marker_strength * markers  # T x G
    loadings = gradient_strength * rng.normal(0.0, 1.0, size=(T, G, R))
    logits = baseline[cell_type] + np.einsum("cgr,cr->cg", loadings[cell_type], state)
    library = np.exp(rng.normal(np.log(library_mean), library_sd, size=n_cells))
    mean = library[:, None] * _softmax_rows(logits)
    counts = rng.poisson(rng.gamma(inverse_dispersion, mean / inverse_dispersion)).astype(np.float32)

    types = [f"type{t}" for t in range(T)]
    settings = {
        "n_cells": int(n_cells), "n_types": T, "n_genes": G, "width": float(width), "spot_size": float(spot_size),
        "reference_fraction": float(reference_fraction), "state_dim": R,
        "gradient_strength": float(gradient_strength), "state_noise": float(state_noise),
        "marker_strength": float(marker_strength), "markers_per_type": int(markers_per_type),
        "composition_strength": float(composition_strength), "library_mean": float(library_mean),
        "library_sd": float(library_sd), "inverse_dispersion": float(inverse_dispersion), "seed": int(seed),
    }
    cells = ad.AnnData(
        X=counts,
        obs=pd.DataFrame({"cell_type": pd.Categorical([types[t] for t in cell_type], categories=types)},
                         index=[f"cell{c}" for c in range(n_cells)]),
        var=pd.DataFrame(index=[f"gene{g}" for g in range(G)]),
    )
    cells.obsm["spatial"] = xy
    cells.obsm["true_state"] = state

    # split: a random reference_fraction of the cells is the reference, the rest become spots
    n_ref = round(reference_fraction * n_cells)
    perm = rng.permutation(n_cells)
    reference = cells[np.sort(perm[:n_ref])].copy()
    spatial = cells[np.sort(perm[n_ref:])].copy()
    reference.uns["sim_deconvolution"] = dict(settings, baseline=baseline, loadings=loadings)
    spatial_cells, spots = pseudo_spots(spatial, float(spot_size), grid="square", cell_type_key="cell_type")
    spots.obsm["cell_type_counts"] = spots.obsm["cell_type_counts"].reindex(columns=types, fill_value=0)
    spots.uns["sim_deconvolution"] = dict(settings)
    if return_cells:
        return spots, reference, spatial_cells
    return spots, reference
