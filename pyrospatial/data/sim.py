"""Simulators with ground truth.

Two simulators live here:

* :func:`simulate_tissue` draws a whole tissue from the generative model family that
  CORAL fits (models/coral.py): cell types arranged in layers, a hierarchical latent
  ``v -> z`` per cell, a Gamma protein panel per cell, negative-binomial RNA per cell
  that is summed into spots, and a cell graph.  Everything the model would infer is
  returned as truth.
* :func:`pseudo_spots` aggregates real single-cell-resolution data (osmFISH, MERFISH,
  Xenium, ...) into pseudo-spots, like the CORAL paper's downsampling grids, keeping the
  per-cell counts and the cell-type composition of every spot as truth.

Both are vectorised numpy and deterministic for a seed.

Keys written
------------
cells AnnData (both simulators)
    ``obs["spot"]``                 categorical spot name, missing (NaN) for cells outside
                                    every spot.
    ``obsm["spatial"]``             (n_cells, 2) float64 coordinates in micrometres.
    ``obsm["true_spot_gene_counts"]`` per-cell counts of the genes that were summed into
                                    the spots (same columns/order as ``spots.var_names``).
spots AnnData (both simulators)
    ``.X``                          float32 dense array holding exact integer counts
                                    (sum of the member cells' counts).
    ``obs["n_cells"]``              number of member cells (>= 1; empty spots are dropped).
    ``obsm["spatial"]``             (n_spots, 2) spot centres in micrometres.
    ``obsm["cell_type_counts"]``    DataFrame spots x cell types: the deconvolution truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial import cKDTree

__all__ = ["VISIUM_SPACING_RATIO", "SimulatedTissue", "simulate_tissue", "pseudo_spots"]

#: Visium: 55 µm spots whose centres are 100 µm apart.
VISIUM_SPACING_RATIO = 100.0 / 55.0

_SPOT_LAYOUTS = ("hex", "square", "square_tiles")


@dataclass
class SimulatedTissue:
    """A simulated tissue with its ground truth.

    Attributes
    ----------
    cells
        Per-cell AnnData: ``.X`` proteins (float32), ``obs["cell_type"]``, ``obs["layer"]``,
        ``obs["spot"]``, ``obsm["spatial"]`` (µm), ``obsm["true_spot_gene_counts"]``.
    spots
        Per-spot AnnData: ``.X`` raw counts (float32 holding integers), ``obs["n_cells"]``,
        ``obsm["spatial"]`` (µm), ``obsm["cell_type_counts"]``.
    truth
        Per-cell / per-edge ground truth arrays (see :func:`simulate_tissue`).
    params
        Global parameters drawn for the simulation (decoder weights, dispersions, ...).
    settings
        The arguments of the call (also stored in ``uns["pyrospatial_sim"]``).
    """

    cells: ad.AnnData
    spots: ad.AnnData
    truth: dict[str, np.ndarray]
    params: dict[str, np.ndarray] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers


def _softmax(a: np.ndarray) -> np.ndarray:
    a = a - a.max(axis=-1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(axis=-1, keepdims=True)


def _softplus(a: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, a)


def _sigmoid(a: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * a))


def _lattice_centres(
    lo: np.ndarray, hi: np.ndarray, spacing: float, grid: str
) -> np.ndarray:
    """Centres of a hex or square lattice with ``spacing`` filling the box [lo, hi]."""
    if grid == "hex":
        dy = spacing * np.sqrt(3.0) / 2.0
    else:
        dy = spacing
    nx = int(np.floor((hi[0] - lo[0]) / spacing)) + 1
    ny = int(np.floor((hi[1] - lo[1]) / dy)) + 1
    ix, iy = np.meshgrid(np.arange(nx), np.arange(ny), indexing="xy")
    x = lo[0] + ix * spacing
    if grid == "hex":
        x = x + (iy % 2) * spacing / 2.0  # every other row shifted by half a spacing
    y = lo[1] + iy * dy
    centres = np.stack([x.ravel(), y.ravel()], axis=1).astype(np.float64)
    keep = (centres[:, 0] <= hi[0] + 1e-9) & (centres[:, 1] <= hi[1] + 1e-9)
    return centres[keep]


def _assign_circles(xy: np.ndarray, centres: np.ndarray, radius: float) -> np.ndarray:
    """Index of the circle (radius ``radius``) holding each point, -1 when none.

    Circles on the lattices used here never overlap (spacing >= diameter), so the
    nearest centre is the only candidate.
    """
    if len(centres) == 0:
        return np.full(len(xy), -1, dtype=np.int64)
    dist, idx = cKDTree(centres).query(xy, k=1)
    return np.where(dist <= radius, idx, -1).astype(np.int64)


def _assign_tiles(xy: np.ndarray, origin: np.ndarray, side: float) -> tuple[np.ndarray, np.ndarray]:
    """Touching square tiles of ``side`` from ``origin``: (tile index per point, centres)."""
    ij = np.floor((xy - origin) / side).astype(np.int64)
    ij = np.maximum(ij, 0)
    uniq, inv = np.unique(ij, axis=0, return_inverse=True)
    centres = origin + (uniq + 0.5) * side
    return inv.reshape(-1).astype(np.int64), centres


def _compact(spot_of_cell: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop spots without member cells and renumber the remaining ones 0..J-1."""
    used = np.unique(spot_of_cell[spot_of_cell >= 0])
    new_index = np.full(len(centres), -1, dtype=np.int64)
    new_index[used] = np.arange(len(used))
    out = np.where(spot_of_cell >= 0, new_index[np.maximum(spot_of_cell, 0)], -1)
    return out.astype(np.int64), centres[used]


def _membership(spot_of_cell: np.ndarray, n_spots: int) -> sp.csr_matrix:
    """Sparse (n_spots, n_cells) 0/1 matrix U with U[j, i] = 1 when cell i is in spot j."""
    members = np.flatnonzero(spot_of_cell >= 0)
    return sp.csr_matrix(
        (np.ones(len(members)), (spot_of_cell[members], members)),
        shape=(n_spots, len(spot_of_cell)),
    )


def _spot_categorical(spot_of_cell: np.ndarray, spot_names: Sequence[str]) -> pd.Categorical:
    return pd.Categorical.from_codes(spot_of_cell, categories=pd.Index(spot_names))


def _type_counts(
    U: sp.csr_matrix, type_codes: np.ndarray, type_names: Sequence[str], spot_names: Sequence[str]
) -> pd.DataFrame:
    onehot = sp.csr_matrix(
        (np.ones(len(type_codes)), (np.arange(len(type_codes)), type_codes)),
        shape=(len(type_codes), len(type_names)),
    )
    counts = np.asarray((U @ onehot).todense()).astype(np.int64)
    return pd.DataFrame(counts, index=pd.Index(spot_names), columns=pd.Index(type_names, dtype=str))


def _knn_edges(xy: np.ndarray, k: int) -> np.ndarray:
    """Symmetric kNN graph: (2, E) int64, both directions, no self loops, sorted, unique."""
    n = len(xy)
    k_eff = min(k, n - 1)
    if k_eff <= 0:
        return np.zeros((2, 0), dtype=np.int64)
    _, nbr = cKDTree(xy).query(xy, k=k_eff + 1)
    src = np.repeat(np.arange(n), k_eff)
    dst = nbr[:, 1:].reshape(-1)  # column 0 is the point itself
    pairs = np.concatenate([np.stack([src, dst]), np.stack([dst, src])], axis=1)
    pairs = pairs[:, pairs[0] != pairs[1]]
    pairs = np.unique(pairs, axis=1)
    return pairs.astype(np.int64)


# ----------------------------------------------------------------------------- simulate


def simulate_tissue(
    n_cells: int = 2000,
    n_types: int = 4,
    n_proteins: int = 20,
    n_genes: int = 100,
    spot_diameter: float = 55.0,
    *,
    seed: int = 0,
    v_dim: int = 1,
    z_dim: int = 8,
    cells_per_spot: float = 8.0,
    spot_layout: str = "hex",
    n_layers: int | None = None,
    layer_purity: float = 0.7,
    v_spatial_fraction: float = 0.7,
    v_lengthscale: float | None = None,
    type_separation: float = 1.5,
    z_noise: float = 0.3,
    protein_intensity: float = 1.0,
    protein_library_sd: float = 0.2,
    protein_concentration: float = 10.0,
    rna_library: float = 500.0,
    size_factor_sd: float = 0.3,
    rna_inverse_dispersion: float = 10.0,
    k_neighbors: int = 6,
    edge_z_scale: float = 0.0,
    edge_bias: float = 2.0,
    edge_candidates: str = "knn",
) -> SimulatedTissue:
    """Simulate a layered tissue from the CORAL generative model family, with truth.

    Generative story (symbols as in models/coral.py; ``i`` cells, ``p`` proteins, ``g`` genes,
    ``j`` spots, ``c`` cell types):

    1. A square tissue of side ``S`` µm; cells uniform at random, with a density such that
       on average ``cells_per_spot`` cells fall in one spot (spot area ``pi d^2 / 4`` for
       circular spots, ``d^2`` for ``"square_tiles"``).
    2. ``n_layers`` horizontal bands of equal height (the domains); each layer ``l`` has a
       cell-type mixture ``pi_l`` (weight ``layer_purity`` on type ``l mod n_types``, the
       rest Dirichlet-spread), ``c_i ~ Categorical(pi_{layer(i)})``.
    3. ``v_i ~ Normal(0, I)`` marginally, made spatially smooth:
       ``v_i = sqrt(a) f(s_i) + sqrt(1 - a) eps_i`` with ``f`` a random-Fourier-feature
       Gaussian field of unit variance and lengthscale ``v_lengthscale``, ``a =
       v_spatial_fraction``.
    4. ``z_i | v_i, c_i ~ Normal(mu_c(v_i), sigma_c(v_i))`` with
       ``mu_c(v) = a_c + B_c v`` and ``sigma_c(v) = z_noise * exp(0.2 tanh(G_c v))``.
    5. Proteins: ``h_y(z) = softmax(W_y z + b_y)``,
       ``l^y_i ~ LogNormal(log(n_proteins * protein_intensity), protein_library_sd)``,
       ``y_ip ~ Gamma(concentration k_p, rate k_p / (l^y_i h_y(z_i)_p))`` (mean
       ``l^y_i h_y(z_i)_p``, variance ``mean^2 / k_p``), ``k_p ~ LogNormal(log
       protein_concentration, 0.3)``.
    6. RNA: ``s_i ~ LogNormal(0, size_factor_sd)``, ``rho_i = s_i softmax(W_x z_i + b_x)``,
       ``x_ig ~ NB(mean L rho_ig, inverse dispersion theta_g)`` drawn as Gamma-Poisson,
       ``L = rna_library``, ``theta_g ~ LogNormal(log rna_inverse_dispersion, 0.3)``.
    7. Spots: centres on a hex (``"hex"``, Visium-like, centre spacing
       ``d * 100/55``) or square (``"square"``) lattice, spots lying wholly inside the
       tissue; cell ``i`` is in spot ``j`` when ``|s_i - c_j| <= d/2``.  With
       ``"square_tiles"`` touching square bins of side ``d`` cover the tissue and every
       cell is in exactly one spot.  ``X_jg = sum_{i in U(j)} x_ig`` exactly.  Spots
       without cells are dropped.
    8. Edges: symmetric kNN graph (``k_neighbors``) on positions.  With
       ``edge_z_scale > 0`` each undirected kNN edge is kept with probability
       ``sigmoid(edge_bias + edge_z_scale * z_i . z_j / z_dim)`` (inner-product decoder),
       so edge presence carries signal about ``z``; with ``0`` (default) all kNN edges are
       kept. With ``edge_candidates="all"`` every pair of cells is a candidate instead (no
       kNN): ``A_ij ~ Bernoulli(sigmoid(edge_bias + edge_z_scale * z_i . z_j / z_dim))``, the
       form of CORAL's own edge likelihood, so the true probability of every observed edge is
       known (``truth["edge_prob"]``, aligned with ``truth["edge_index"]``).

    Note that the spot counts are a sum of per-cell negative binomials: mean
    ``L sum_i rho_ig`` (the spot-sum model's mean with ``l_j = L``) and variance
    ``sum_i (mu_ig + mu_ig^2 / theta_g)``; CORAL models them as one NB with a per-gene
    dispersion, which matches the mean exactly and the variance approximately.

    Parameters
    ----------
    n_cells, n_types, n_proteins, n_genes
        Sizes.
    spot_diameter
        Spot diameter ``d`` in µm (side of the bins for ``"square_tiles"``).
    seed
        Seed of the numpy generator; the output is a deterministic function of all args.
    v_dim, z_dim
        Dimensions of the latents ``v`` and ``z``.
    cells_per_spot
        Target mean number of cells per spot (sets the cell density).
    spot_layout
        ``"hex"``, ``"square"`` (circles on a square lattice, same spacing) or
        ``"square_tiles"``.
    n_layers
        Number of horizontal layers (default ``n_types``).
    layer_purity
        Weight of a layer's dominant cell type in its mixture.
    v_spatial_fraction
        Fraction of the variance of ``v`` explained by position (0 = no spatial signal).
    v_lengthscale
        Lengthscale of the spatial field in µm (default a quarter of the tissue side).
    type_separation
        Standard deviation of the per-type offsets ``a_c`` (larger = types easier to tell).
    z_noise
        Typical ``sigma_c(v)``.
    protein_intensity, protein_library_sd, protein_concentration
        Protein panel: typical intensity per protein, log-sd of ``l^y``, typical ``k_p``.
    rna_library, size_factor_sd, rna_inverse_dispersion
        RNA: ``L``, log-sd of ``s_i``, typical ``theta_g``.
    k_neighbors
        ``k`` of the kNN cell graph.
    edge_z_scale, edge_bias
        Edge-keeping logits (see step 8).
    edge_candidates
        ``"knn"`` (default): the kNN pairs, thinned; ``"all"``: every pair (step 8; memory
        and time grow as ``n_cells^2``, meant for up to a few thousand cells).

    Returns
    -------
    SimulatedTissue
        ``cells`` (proteins in ``.X`` float32, var ``prot{p}``; obs ``cell_type``
        ``type{c}``, ``layer`` ``layer{l}``, ``spot``; obsm ``spatial``,
        ``true_spot_gene_counts``), ``spots`` (``.X`` float32 with integer counts, var
        ``gene{g}``; obs ``n_cells``; obsm ``spatial``, ``cell_type_counts``), ``truth``
        with keys ``z`` (n, z_dim), ``v`` (n, v_dim), ``cell_type`` (codes), ``layer``
        (codes), ``expected_rna`` (``L rho``, n x G), ``rho`` (n x G), ``counts`` (x, n x G
        int64), ``cell_spot`` (spot index or -1), ``size_factor`` (s, n), ``protein_library``
        (l^y, n), ``expected_protein`` (n x P), ``edge_index`` (2, E) kept edges in both
        directions, ``knn_edge_index`` (2, E0) all candidate kNN edges, ``knn_edge_prob``
        (E0,) their keep probabilities; ``params`` with the global parameters.

    Examples
    --------
    >>> sim = simulate_tissue(n_cells=500, seed=1)
    >>> bool(sim.spots.X.sum() == sim.truth["counts"][sim.truth["cell_spot"] >= 0].sum())
    True
    """
    if spot_layout not in _SPOT_LAYOUTS:
        raise ValueError(f"spot_layout must be one of {_SPOT_LAYOUTS}, got {spot_layout!r}")
    if edge_candidates not in ("knn", "all"):
        raise ValueError(f"edge_candidates must be 'knn' or 'all', got {edge_candidates!r}")
    if n_cells < 2 or n_types < 1 or n_proteins < 1 or n_genes < 1 or v_dim < 1 or z_dim < 1:
        raise ValueError("n_cells >= 2 and n_types, n_proteins, n_genes, v_dim, z_dim >= 1 required")
    if spot_diameter <= 0 or cells_per_spot <= 0:
        raise ValueError("spot_diameter and cells_per_spot must be positive")
    if not 0.0 <= v_spatial_fraction <= 1.0:
        raise ValueError("v_spatial_fraction must be in [0, 1]")
    if not 0.0 <= layer_purity <= 1.0:
        raise ValueError("layer_purity must be in [0, 1]")
    n_layers = n_types if n_layers is None else int(n_layers)
    if n_layers < 1:
        raise ValueError("n_layers must be >= 1")
    settings = dict(
        n_cells=n_cells, n_types=n_types, n_proteins=n_proteins, n_genes=n_genes,
        spot_diameter=float(spot_diameter), seed=seed, v_dim=v_dim, z_dim=z_dim,
        cells_per_spot=float(cells_per_spot), spot_layout=spot_layout, n_layers=n_layers,
        layer_purity=layer_purity, v_spatial_fraction=v_spatial_fraction,
        v_lengthscale=v_lengthscale, type_separation=type_separation, z_noise=z_noise,
        protein_intensity=protein_intensity, protein_library_sd=protein_library_sd,
        protein_concentration=protein_concentration, rna_library=rna_library,
        size_factor_sd=size_factor_sd, rna_inverse_dispersion=rna_inverse_dispersion,
        k_neighbors=k_neighbors, edge_z_scale=edge_z_scale, edge_bias=edge_bias,
        edge_candidates=edge_candidates,
    )
    rng = np.random.default_rng(seed)
    n, T, P, G, d = n_cells, n_types, n_proteins, n_genes, float(spot_diameter)
    r = d / 2.0

    # 1. tissue and cell positions s_i (µm) -------------------------------------------
    if spot_layout == "square_tiles":
        m = max(1, int(round(np.sqrt(n / cells_per_spot))))  # tiles per side
        side = m * d                                          # S, a whole number of tiles
    else:
        spot_area = np.pi * r**2
        side = float(np.sqrt(n * spot_area / cells_per_spot))  # S: n / S^2 = cps / area
    xy = rng.uniform(0.0, side, size=(n, 2))                   # s_i ~ Uniform([0, S]^2)
    settings["tissue_side"] = side

    # 2. layers and cell types --------------------------------------------------------
    layer = np.minimum((xy[:, 1] / side * n_layers).astype(np.int64), n_layers - 1)  # band
    dominant = np.arange(n_layers) % T
    rest = rng.dirichlet(np.ones(T), size=n_layers)                      # spread of the rest
    pi = (1.0 - layer_purity) * rest
    pi[np.arange(n_layers), dominant] += layer_purity                    # pi_l
    u = rng.uniform(size=n)
    cell_type = (u[:, None] > np.cumsum(pi[layer], axis=1)).sum(1)       # c_i ~ Cat(pi_l)
    cell_type = np.minimum(cell_type, T - 1).astype(np.int64)

    # 3. v_i: marginally Normal(0, I), smooth in space ---------------------------------
    ell = side / 4.0 if v_lengthscale is None else float(v_lengthscale)
    n_features = 128
    omega = rng.normal(0.0, 1.0 / ell, size=(v_dim, n_features, 2))      # RFF frequencies
    phase = rng.uniform(0.0, 2 * np.pi, size=(v_dim, n_features))
    field_ = np.sqrt(2.0 / n_features) * np.cos(
        np.einsum("nk,dfk->ndf", xy, omega) + phase[None]
    ).sum(-1)                                                            # f(s_i), var ~ 1
    field_ = (field_ - field_.mean(0)) / field_.std(0)                   # exactly unit scale
    eps_v = rng.normal(size=(n, v_dim))
    v = np.sqrt(v_spatial_fraction) * field_ + np.sqrt(1.0 - v_spatial_fraction) * eps_v

    # 4. z_i | v_i, c_i ~ Normal(mu_c(v_i), sigma_c(v_i)) --------------------------------
    a_c = rng.normal(0.0, type_separation, size=(T, z_dim))              # per-type offset
    B_c = rng.normal(0.0, 0.5 / np.sqrt(v_dim), size=(T, z_dim, v_dim))  # per-type slope
    G_c = rng.normal(0.0, 1.0 / np.sqrt(v_dim), size=(T, z_dim, v_dim))  # sigma map
    mu = a_c[cell_type] + np.einsum("nzv,nv->nz", B_c[cell_type], v)     # mu_c(v)
    sigma = z_noise * np.exp(0.2 * np.tanh(np.einsum("nzv,nv->nz", G_c[cell_type], v)))
    z = mu + sigma * rng.normal(size=(n, z_dim))                         # z_i

    # 5. proteins y_ip ~ Gamma(k_p, k_p / (l^y_i h_y(z_i)_p)) ----------------------------
    W_y = rng.normal(0.0, 1.0 / np.sqrt(z_dim), size=(P, z_dim))
    b_y = rng.normal(0.0, 0.5, size=P)
    h_y = _softmax(z @ W_y.T + b_y)                                      # h_y(z_i)
    l_y = rng.lognormal(np.log(P * protein_intensity), protein_library_sd, size=n)  # l^y_i
    k_p = rng.lognormal(np.log(protein_concentration), 0.3, size=P)      # concentration
    y_mean = l_y[:, None] * h_y                                          # E[y_ip]
    y = rng.gamma(shape=k_p[None, :], scale=y_mean / k_p[None, :])       # rate = k_p / mean
    y = np.maximum(y, np.finfo(np.float32).tiny).astype(np.float32)      # keep > 0 in float32

    # 6. RNA x_ig ~ NB(L rho_ig, theta_g) ---------------------------------------------
    W_x = rng.normal(0.0, 1.0 / np.sqrt(z_dim), size=(G, z_dim))
    b_x = rng.normal(0.0, 1.0, size=G)
    s = rng.lognormal(0.0, size_factor_sd, size=n)                       # s_i
    rho = s[:, None] * _softmax(z @ W_x.T + b_x)                         # rho_i
    theta = rng.lognormal(np.log(rna_inverse_dispersion), 0.3, size=G)   # theta_g
    expected_rna = rna_library * rho                                     # L rho_ig
    lam = rng.gamma(shape=theta[None, :], scale=expected_rna / theta[None, :])  # Gamma mix
    counts = rng.poisson(lam).astype(np.int64)                           # x_ig

    # 7. spots and the exact spot sums X_jg = sum_{i in U(j)} x_ig ----------------------
    if spot_layout == "square_tiles":
        cell_spot, centres = _assign_tiles(xy, np.zeros(2), d)
    else:
        spacing = d * VISIUM_SPACING_RATIO
        grid = "hex" if spot_layout == "hex" else "square"
        lattice = _lattice_centres(np.array([r, r]), np.array([side - r, side - r]), spacing, grid)
        cell_spot = _assign_circles(xy, lattice, r)                      # |s_i - c_j| <= d/2
        cell_spot, centres = _compact(cell_spot, lattice)                # drop empty spots
    J = len(centres)
    U = _membership(cell_spot, J)                                        # U[j, i]
    X_spot = np.asarray(U @ counts, dtype=np.float64)                    # X_jg (exact)

    # 8. edges -------------------------------------------------------------------------
    knn = _knn_edges(xy, k_neighbors)                                    # both directions
    lo, hi = np.minimum(knn[0], knn[1]), np.maximum(knn[0], knn[1])
    pair_id = lo * n + hi
    uniq_pairs, pair_inv = np.unique(pair_id, return_inverse=True)
    p_lo, p_hi = uniq_pairs // n, uniq_pairs % n
    if edge_z_scale != 0.0:
        logits = edge_bias + edge_z_scale * np.einsum("ez,ez->e", z[p_lo], z[p_hi]) / z_dim
        p_keep = _sigmoid(logits)                                        # sigmoid(f(z_i, z_j))
    else:
        p_keep = np.ones(len(uniq_pairs))
    keep_pair = rng.uniform(size=len(uniq_pairs)) < p_keep              # one draw per pair
    keep_pair_edge = keep_pair[pair_inv.reshape(-1)]
    edge_index = knn[:, keep_pair_edge]
    knn_edge_prob = p_keep[pair_inv.reshape(-1)]
    edge_prob = knn_edge_prob[keep_pair_edge]
    if edge_candidates == "all":                                         # every pair i < j
        lo, hi = np.triu_indices(n, 1)
        p_all = _sigmoid(edge_bias + edge_z_scale * np.einsum("ez,ez->e", z[lo], z[hi]) / z_dim)
        kept = rng.uniform(size=len(lo)) < p_all                         # A_ij ~ Bernoulli
        edge_index = np.concatenate([np.stack([lo[kept], hi[kept]]), np.stack([hi[kept], lo[kept]])], axis=1)
        edge_prob = np.concatenate([p_all[kept], p_all[kept]])

    # AnnData -------------------------------------------------------------------------
    cell_names = pd.Index([f"cell{i}" for i in range(n)])
    spot_names = pd.Index([f"spot{j}" for j in range(J)])
    type_names = [f"type{c}" for c in range(T)]
    layer_names = [f"layer{l}" for l in range(n_layers)]
    uns = {"pyrospatial_sim": {k: ("None" if val is None else val) for k, val in settings.items()}}

    cells = ad.AnnData(
        X=y,
        obs=pd.DataFrame(
            {
                "cell_type": pd.Categorical.from_codes(cell_type, categories=type_names),
                "layer": pd.Categorical.from_codes(layer, categories=layer_names),
                "spot": _spot_categorical(cell_spot, spot_names),
            },
            index=cell_names,
        ),
        var=pd.DataFrame(index=pd.Index([f"prot{p}" for p in range(P)])),
        obsm={"spatial": xy, "true_spot_gene_counts": counts},
        uns=dict(uns),
    )
    spots = ad.AnnData(
        X=X_spot.astype(np.float32),
        obs=pd.DataFrame({"n_cells": np.asarray(U.sum(1)).ravel().astype(np.int64)}, index=spot_names),
        var=pd.DataFrame(index=pd.Index([f"gene{g}" for g in range(G)])),
        obsm={
            "spatial": centres.astype(np.float64),
            "cell_type_counts": _type_counts(U, cell_type, type_names, spot_names),
        },
        uns={"pyrospatial_sim": dict(uns["pyrospatial_sim"])},
    )

    truth = {
        "z": z,
        "v": v,
        "cell_type": cell_type,
        "layer": layer,
        "expected_rna": expected_rna,
        "rho": rho,
        "counts": counts,
        "cell_spot": cell_spot,
        "size_factor": s,
        "protein_library": l_y,
        "expected_protein": y_mean,
        "edge_index": edge_index,
        "edge_prob": edge_prob,
        "knn_edge_index": knn,
        "knn_edge_prob": knn_edge_prob,
    }
    params = {
        "layer_type_probs": pi,
        "mu_offset": a_c,
        "mu_slope": B_c,
        "sigma_map": G_c,
        "W_y": W_y,
        "b_y": b_y,
        "protein_concentration": k_p,
        "W_x": W_x,
        "b_x": b_x,
        "rna_inverse_dispersion": theta,
        "rna_library": np.asarray(rna_library),
        "rff_omega": omega,
        "rff_phase": phase,
    }
    return SimulatedTissue(cells=cells, spots=spots, truth=truth, params=params, settings=settings)


# ----------------------------------------------------------------------------- pseudo-spots


def pseudo_spots(
    cells: ad.AnnData,
    spot_diameter: float,
    *,
    grid: str = "square",
    cell_type_key: str | None = "cell_type",
    feature_split: float | Sequence[str] | None = None,
    seed: int = 0,
) -> tuple[ad.AnnData, ad.AnnData]:
    """Aggregate single-cell-resolution data into pseudo-spots with ground truth.

    Parameters
    ----------
    cells
        AnnData with raw counts in ``.X`` (dense or sparse) and ``obsm["spatial"]`` in µm.
    spot_diameter
        Side of the square bins (``grid="square"``) or diameter of the circular spots
        (``grid="hex"``), in µm.
    grid
        ``"square"``: touching square bins starting at the minimum coordinates; every cell
        is in exactly one spot.  ``"hex"``: Visium-like circles of ``spot_diameter`` on a
        hex lattice with centre spacing ``spot_diameter * 100/55``, starting at the minimum
        coordinates; cells outside every circle are kept, without a spot.
    cell_type_key
        Column of ``cells.obs`` with cell-type labels, counted per spot into
        ``spots.obsm["cell_type_counts"]``; ``None`` skips it.
    feature_split
        Which genes stay per cell and which go to the spots.  ``None``: all genes go to the
        spots and the cells keep them too.  A float ``f`` in (0, 1): a random fraction ``f``
        of the genes (at least one, drawn with ``seed``) stays as the per-cell panel
        (``cells_out.X``) and the others are summed into the spots.  A list of var names:
        those genes are the per-cell panel, the rest go to the spots.
    seed
        Seed for the random gene split.

    Returns
    -------
    cells_out
        ``cells`` restricted to the panel genes (all genes when ``feature_split`` is None),
        with ``obs["spot"]`` (categorical spot name, NaN for no spot) and
        ``obsm["true_spot_gene_counts"]`` (cells x spot genes, same columns as
        ``spots_out.var_names``; sparse when ``cells.X`` is sparse).
    spots_out
        ``.X`` float32 dense sums of the member cells' counts (exact integers);
        ``obs["n_cells"]``; ``obsm["spatial"]`` spot centres (µm);
        ``obsm["cell_type_counts"]`` DataFrame spots x cell types whose rows sum to
        ``n_cells``.  Spots with no cell are dropped.  Both outputs carry
        ``uns["pyrospatial_pseudo_spots"]`` with the settings and the gene split.
    """
    if grid not in ("square", "hex"):
        raise ValueError(f"grid must be 'square' or 'hex', got {grid!r}")
    if not spot_diameter > 0:
        raise ValueError("spot_diameter must be positive")
    if "spatial" not in cells.obsm:
        raise KeyError("cells.obsm['spatial'] is missing: pseudo_spots needs cell coordinates in µm")
    xy = np.asarray(cells.obsm["spatial"], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or xy.shape[0] != cells.n_obs:
        raise ValueError(f"cells.obsm['spatial'] must have shape (n_cells, 2), got {xy.shape}")
    if not np.isfinite(xy).all():
        raise ValueError("cells.obsm['spatial'] contains NaN or inf")
    if cell_type_key is not None and cell_type_key not in cells.obs:
        raise KeyError(
            f"cells.obs[{cell_type_key!r}] is missing; pass cell_type_key=None to skip "
            "the cell-type counts"
        )

    # gene split -----------------------------------------------------------------------
    genes = pd.Index(cells.var_names)
    if feature_split is None:
        panel_mask = np.ones(len(genes), dtype=bool)
        spot_mask = np.ones(len(genes), dtype=bool)
    elif isinstance(feature_split, (float, np.floating)):
        if not 0.0 < feature_split < 1.0:
            raise ValueError("a float feature_split must lie in (0, 1)")
        if len(genes) < 2:
            raise ValueError("feature_split needs at least 2 genes")
        n_panel = int(np.clip(round(feature_split * len(genes)), 1, len(genes) - 1))
        chosen = np.random.default_rng(seed).choice(len(genes), size=n_panel, replace=False)
        panel_mask = np.zeros(len(genes), dtype=bool)
        panel_mask[chosen] = True
        spot_mask = ~panel_mask
    else:
        names = [str(g) for g in feature_split]
        missing = [g for g in names if g not in genes]
        if missing:
            raise KeyError(f"feature_split names genes not in cells.var_names: {missing[:5]}")
        panel_mask = genes.isin(names)
        spot_mask = ~panel_mask
        if not panel_mask.any() or not spot_mask.any():
            raise ValueError("feature_split must leave at least one gene per cell and one for the spots")

    # assignment -----------------------------------------------------------------------
    origin = xy.min(axis=0)
    if grid == "square":
        cell_spot, centres = _assign_tiles(xy, origin, float(spot_diameter))
    else:
        r = spot_diameter / 2.0
        spacing = spot_diameter * VISIUM_SPACING_RATIO
        lattice = _lattice_centres(origin, xy.max(axis=0) + spacing, spacing, "hex")
        cell_spot = _assign_circles(xy, lattice, r)
        cell_spot, centres = _compact(cell_spot, lattice)
    J = len(centres)
    if J == 0:
        raise ValueError("no cell falls inside any pseudo-spot; check the units of obsm['spatial']")
    U = _membership(cell_spot, J)
    spot_names = pd.Index([f"spot{j}" for j in range(J)])

    # sums -----------------------------------------------------------------------------
    X = cells.X
    X_spot_genes = X[:, np.flatnonzero(spot_mask)]
    summed = U @ X_spot_genes
    summed = summed.toarray() if sp.issparse(summed) else np.asarray(summed)

    settings = {
        "spot_diameter": float(spot_diameter),
        "grid": grid,
        "cell_type_key": "None" if cell_type_key is None else cell_type_key,
        "seed": seed,
        "feature_split": "None" if feature_split is None else (
            float(feature_split) if isinstance(feature_split, (float, np.floating)) else "list"
        ),
        "panel_genes": np.asarray(genes[panel_mask], dtype=str),
        "spot_genes": np.asarray(genes[spot_mask], dtype=str),
        "origin": origin,
    }

    obsm: dict[str, Any] = {"spatial": centres.astype(np.float64)}
    if cell_type_key is not None:
        labels = pd.Categorical(cells.obs[cell_type_key])
        if (labels.codes < 0).any():
            raise ValueError(f"cells.obs[{cell_type_key!r}] has missing labels")
        obsm["cell_type_counts"] = _type_counts(
            U, labels.codes.astype(np.int64), [str(c) for c in labels.categories], spot_names
        )
    spots_out = ad.AnnData(
        X=summed.astype(np.float32),
        obs=pd.DataFrame({"n_cells": np.asarray(U.sum(1)).ravel().astype(np.int64)}, index=spot_names),
        var=cells.var.loc[spot_mask].copy(),
        obsm=obsm,
        uns={"pyrospatial_pseudo_spots": dict(settings)},
    )

    cells_out = cells[:, panel_mask].copy()
    cells_out.obs["spot"] = _spot_categorical(cell_spot, spot_names)
    true_counts = X_spot_genes.copy() if sp.issparse(X_spot_genes) else np.array(X_spot_genes)
    cells_out.obsm["true_spot_gene_counts"] = true_counts
    cells_out.uns["pyrospatial_pseudo_spots"] = dict(settings)
    return cells_out, spots_out
