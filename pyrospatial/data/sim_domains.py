"""Simulated layered tissue with known domains: counts, proteins-free, and a morphology feature.

:func:`simulate_domains` draws sections of a layered tissue (cortex-like bands with wavy
boundaries) whose spots carry counts and image features that each hold a tunable amount of
domain signal, with per-section batch effects, for tests and tutorials of
:func:`pyrospatial.domains`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from anndata import AnnData

from pyrospatial.errors import InputError

__all__ = ["simulate_domains"]


def simulate_domains(
    n_sections: int = 1,
    n_domains: int = 4,
    *,
    grid: int = 24,
    n_genes: int = 60,
    markers_per_domain: int = 6,
    expression_signal: float = 1.5,
    n_morphology: int = 3,
    morphology_signal: float = 1.5,
    section_shift: float = 0.3,
    library_mean: float = 300.0,
    inverse_dispersion: float = 5.0,
    seed: int = 0,
) -> list[AnnData]:
    """Sections of a layered tissue: one AnnData per section with its true domains.

    Spots lie on a jittered ``grid x grid`` lattice (unit spacing). Domain ``k`` of spot
    ``(x, y)`` is the band ``floor(K (y + a sin(2 pi x / grid + phi_s)) / grid)`` (clipped to
    ``0..K-1``): horizontal layers with wavy boundaries, the phase ``phi_s`` differing per
    section. Then, per spot ``i`` of domain ``k``:

    - counts ``x_ig ~ NB(l_i softmax_g(b_g + expression_signal * M_kg + o_sg), inverse_dispersion)``
      with ``l_i ~ LogNormal(log library_mean, 0.3)``, baseline ``b_g ~ Normal(0, 1)``,
      ``M_kg = 1`` on ``markers_per_domain`` marker genes of domain ``k`` (else 0) and a
      section offset ``o_sg ~ Normal(0, section_shift)``;
    - morphology ``m_if = morphology_signal * c_kf + e_sf + Normal(0, 1)``, with domain
      centres ``c_kf ~ Normal(0, 1)`` and a section offset ``e_sf ~ Normal(0, section_shift)``.

    ``expression_signal=0`` gives expression with no domain signal (only morphology);
    ``morphology_signal=0`` the reverse.

    Returns
    -------
    list of AnnData
        Per section: ``X`` raw counts (float32), ``obs['domain_true']`` (categorical
        ``"0".."K-1"``), ``obs['section']``, ``obsm['spatial']`` (x, y), ``obsm['morphology']``
        ``(n, n_morphology)``; ``uns['sim_domains']`` with the settings.
    """
    if n_domains < 2 or n_sections < 1 or grid < 4:
        raise InputError("simulate_domains needs n_domains >= 2, n_sections >= 1 and grid >= 4.")
    if n_genes < n_domains * markers_per_domain:
        raise InputError(f"n_genes must be >= n_domains * markers_per_domain = {n_domains * markers_per_domain}.")
    rng = np.random.default_rng(seed)
    K = int(n_domains)
    base = rng.normal(0.0, 1.0, n_genes)
    markers = np.zeros((K, n_genes))
    for k in range(K):
        markers[k, k * markers_per_domain:(k + 1) * markers_per_domain] = 1.0
    centres = rng.normal(0.0, 1.0, (K, n_morphology))
    out = []
    for s in range(int(n_sections)):
        gx, gy = np.meshgrid(np.arange(grid, dtype=float), np.arange(grid, dtype=float))
        xy = np.stack([gx.ravel(), gy.ravel()], 1) + rng.uniform(-0.2, 0.2, (grid * grid, 2))
        phase = rng.uniform(0, 2 * np.pi)
        wave = 0.06 * grid * np.sin(2 * np.pi * xy[:, 0] / grid + phase)
        domain = np.clip(np.floor(K * (xy[:, 1] + wave) / grid), 0, K - 1).astype(int)
        n = domain.size
        library = np.exp(rng.normal(np.log(library_mean), 0.3, n))
        offset = rng.normal(0.0, section_shift, n_genes)
        logits = base + expression_signal * markers[domain] + offset
        prop = np.exp(logits - logits.max(1, keepdims=True))
        prop /= prop.sum(1, keepdims=True)
        mean = library[:, None] * prop
        rate = rng.gamma(inverse_dispersion, mean / inverse_dispersion)
        counts = rng.poisson(rate).astype(np.float32)
        morph = (morphology_signal * centres[domain] + rng.normal(0.0, section_shift, n_morphology)
                 + rng.normal(0.0, 1.0, (n, n_morphology)))
        name = f"section{s}"
        obs = pd.DataFrame({"domain_true": pd.Categorical([str(d) for d in domain], categories=[str(k) for k in range(K)]),
                            "section": name}, index=[f"{name}_spot{i}" for i in range(n)])
        adata = AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"gene{g}" for g in range(n_genes)]))
        adata.obsm["spatial"] = xy
        adata.obsm["morphology"] = morph.astype(np.float32)
        adata.uns["sim_domains"] = {"n_domains": K, "expression_signal": float(expression_signal),
                                    "morphology_signal": float(morphology_signal), "seed": int(seed), "section": s}
        out.append(adata)
    return out
