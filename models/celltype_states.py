"""Cell-type deconvolution with a continuous state inside each type (the package's v -> z prior
applied to spots).

Two models share one decoder per cell type:

- :class:`CellTypeStateReferenceModel` learns, from the labelled single cells, a low-dimensional
  state space per type: each reference cell has a state ``v_i`` (``K`` numbers, standard
  normal prior) that shifts its type's log-expression through the type's decoder;
- :class:`CellTypeStatesModel` explains each spot's counts as a sum over types of
  ``abundance_jt`` cells whose expression is the decoder's at the spot's own state ``v_jt``
  of that type: a type whose expression drifts across the tissue is still recognised.

:func:`pyrospatial.deconvolve` with ``model="states"`` trains the first on the reference, freezes
its decoder and trains the second on the spots (``pyrospatial.methods.deconvolution_states``).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import nn

from pyrospatial.engine.batch import spot_plate
from pyrospatial.protocols import ModelContract, ObservedSite

__all__ = ["CellTypeStateReferenceModel", "CellTypeStatesModel", "TypeStateDecoder"]


class TypeStateDecoder(PyroModule):
    r"""One small network per cell type from a state ``v`` (``K`` numbers) to that type's
    expression of one cell: ``s_t(v)_g = exp(beta_tg + f_t(v)_g)``, in counts per cell.

    ``beta_t`` is the type's baseline log-expression (started at the log of the reference mean)
    and ``f_t(v) = W2_t elu(W1_t v + b1_t)`` its log-expression shift (one hidden layer of
    ``hidden`` units; the weights of all types are stored batched, ``(T, ...)``). The shift is
    not normalised: a state can change a cell's size (its total count) as well as its
    composition, as cells that grow a program do (with a size-free decoder, bigger cells at one
    end of a gradient would read as more cells). The per-type, per-gene inverse dispersion
    ``theta_tg`` of single cells around ``s_t(v)`` is learnt with it (the spatial model reads it
    as each cell's excess variance). The weights are point estimates, learnt on the reference
    and then frozen.
    """

    def __init__(self, mean_expression: torch.Tensor, n_states: int, hidden: int = 16) -> None:
        super().__init__()
        mean = torch.as_tensor(mean_expression, dtype=torch.float32).clamp_min(1e-4)
        T, G = mean.shape
        self.n_types, self.n_genes, self.n_states, self.hidden = int(T), int(G), int(n_states), int(hidden)
        self.beta = nn.Parameter(mean.log())
        self.w1 = nn.Parameter(torch.randn(T, self.n_states, hidden) / math.sqrt(self.n_states))
        self.b1 = nn.Parameter(0.1 * torch.randn(T, hidden))
        self.w2 = nn.Parameter(0.1 * torch.randn(T, hidden, G) / math.sqrt(hidden))
        self.log_theta = nn.Parameter(torch.full((T, G), math.log(10.0)))

    def shift(self, v: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        """``f_t(v)``: ``v`` ``(..., T, K)`` gives ``(..., T, G)`` (type ``t`` at ``v[..., t, :]``);
        with ``types`` ``(n,)`` codes, ``v`` ``(..., n, K)`` gives ``(..., n, G)``."""
        if types is None:
            h = F.elu(torch.einsum("...tk,tkh->...th", v, self.w1) + self.b1)
            return torch.einsum("...th,thg->...tg", h, self.w2)
        h = F.elu(torch.einsum("...nk,nkh->...nh", v, self.w1[types]) + self.b1[types])
        # Second layer as one matrix product: cell n's hidden units placed in its type's block of
        # T * hidden columns (zeros elsewhere) times all types' W2 stacked. Same numbers as
        # gathering W2 per cell, without copying a (hidden, G) matrix for every cell (about 8x
        # faster per reference step on 3,000 cells).
        one_hot = F.one_hot(types, self.n_types).to(h.dtype)  # (n, T)
        blocks = (one_hot[:, :, None] * h[..., :, None, :]).flatten(-2)  # (..., n, T * hidden)
        return blocks @ self.w2.reshape(self.n_types * self.hidden, self.n_genes)

    def forward(self, v: torch.Tensor, types: torch.Tensor | None = None) -> torch.Tensor:
        """``s_t(v)``: expected counts of one cell of each type at its state (shapes of :meth:`shift`)."""
        beta = self.beta if types is None else self.beta[types]
        return torch.exp(beta + self.shift(v, types))

    @property
    def theta(self) -> torch.Tensor:
        """``theta_tg``: inverse dispersion of single cells (``(T, G)``)."""
        return self.log_theta.exp()


class CellTypeStateReferenceModel(PyroModule):
    r"""The reference cells' story: each cell a point of its type's state space.

    Indices: reference cell ``i`` of (known) type ``t_i``, gene ``g``. The cells are the units
    of the ``spots`` plate (a :class:`~pyrospatial.data.spot_counts.SpotCounts` of cells).

    1. **State** of each cell, ``v_i ~ Normal(0, I_K)`` (site ``state``, ``K = n_states``).
    2. **Expression** (decoder :class:`TypeStateDecoder`, point estimates),
       ``mu_ig = s_{t_i}(v_i)_g = exp(beta_{t_i g} + f_{t_i}(v_i)_g)``: the state sets the cell's
       size as well as its composition, so the spots can use both.
    3. **Counts**, ``x_ig ~ NegativeBinomial(mean = mu_ig, inverse dispersion = theta_{t_i g})``
       (``GammaPoisson(theta, theta / mu)``).
    """

    contract = ModelContract(
        observed=(ObservedSite("counts", "spots", ("spot", "gene")),),
        local={"spots": ("state",)},
        global_sites=(),
    )

    def __init__(self, decoder: TypeStateDecoder, cell_type: torch.Tensor) -> None:
        super().__init__()
        self.decoder = decoder
        self.register_buffer("cell_type", torch.as_tensor(cell_type, dtype=torch.long))

    def forward(self, batch) -> None:
        """The story above on one batch of reference cells."""
        K = self.decoder.n_states
        types = self.cell_type[batch.spot_index]
        x = batch.spot_counts
        with spot_plate(batch):
            # 1. state of each cell
            v = pyro.sample("state", dist.Normal(x.new_zeros(K), 1.0).to_event(1).expand([batch.n_spots]))
            # 2. its expected counts
            mu = self.decoder(v, types)
            theta = self.decoder.theta[types]
            # 3. observed counts
            pyro.sample("counts", dist.GammaPoisson(theta, theta / mu.clamp_min(1e-8)).to_event(1), obs=x)


class CellTypeStatesModel(PyroModule):
    r"""Spots as sums of cells of reference types, each type in a continuous state per spot.

    Indices: spot ``j``, cell type ``t`` (``T``), state dimension ``k`` (``K``), gene ``g``.
    Decoder ``s_t(v)`` and ``theta_tg`` come from :class:`CellTypeStateReferenceModel`, frozen.

    1. **Type frequencies** ``rho ~ Dirichlet(1)`` and **concentration**
       ``a ~ Gamma(k_a, k_a / a0)`` (as in
       :class:`~pyrospatial.models.celltype_deconvolution.CellTypeDeconvolutionModel`).
    2. **Gene platform effects** ``m_g ~ Gamma(1 / cv_m^2, 1 / cv_m^2)``, **background**
       ``b_g ~ Exponential(1 / beta_g)`` (``beta_g`` = ``background_fraction`` of a cell's mean
       expression), **over-dispersion** ``r_g = 1 / sqrt(phi_g) ~ Exponential(10)``.
    3. **Abundances** (expected cells of each type), ``w_jt ~ Gamma(a rho_t, a / N_j)``, with
       ``N_j`` the expected cells per spot (a hint, e.g. nucleus counts); ``proportion`` is
       ``w_jt / sum_t w_jt``.
    4. **State of each type in each spot**, ``v_jt ~ Normal(0, I_K)`` (site ``state``,
       ``(T, K)`` per spot): the same prior as a reference cell's, so ``v_jt`` reads on the
       reference's state axes.
    5. **Detection efficiency** ``l_j ~ Gamma(1 / cv_l^2, 1 / cv_l^2)`` (``detection_cv = 0``:
       ``l_j = 1``).
    6. **Counts.** A cell of type ``t`` in spot ``j`` has mean expression ``s_t(v_jt)`` and, over
       Poisson, the single-cell excess variance ``s_t(v_jt)^2 / theta_t``; the sum over
       ``w_jt`` such cells:

       ``mu_jg = l_j (m_g sum_t w_jt s_t(v_jt)_g + b_g)``,
       ``e_jg = (l_j m_g)^2 sum_t w_jt s_t(v_jt)_g^2 / theta_tg + (mu_jg r_g)^2``,
       ``X_jg ~ NegativeBinomial(mean = mu_jg, variance = mu_jg + e_jg)``,

       over the genes ``fit_genes`` only (default: all; a held-out-gene score leaves some out).

    Deterministic sites: ``proportion`` and, with ``record_expression``, ``type_expression``
    ``(T, G)`` per spot, ``m_g s_t(v_jt)_g``: the expected counts of one cell of type ``t`` in
    spot ``j`` on the spots' platform (before the spot's detection).

    Parameters
    ----------
    decoder
        The :class:`TypeStateDecoder` trained on the reference (the method sets
        ``requires_grad_(False)`` on it before fitting the spots).
    cells_per_spot
        ``N_j``: scalar or ``(n_spots,)``.
    concentration_mean, concentration_shape, platform_cv, detection_cv, background_fraction
        Priors as above.
    fit_genes
        Indices of the genes in the likelihood (``None``: all).
    """

    contract = ModelContract(
        observed=(ObservedSite("counts", "spots", ("spot", "gene")),),
        local={"spots": ("abundance", "state", "detection")},
        global_sites=("type_frequency", "concentration", "platform_effect", "background", "inv_sqrt_dispersion"),
        deterministic=("proportion", "type_expression"),
        dims={"platform_effect": ("gene",), "background": ("gene",), "inv_sqrt_dispersion": ("gene",)},
    )

    def __init__(
        self,
        decoder: TypeStateDecoder,
        cells_per_spot: float | torch.Tensor,
        *,
        concentration_mean: float = 0.3,
        concentration_shape: float = 1000.0,
        platform_cv: float = 0.3,
        detection_cv: float = 0.1,
        background_fraction: float = 0.05,
        fit_genes: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.decoder = decoder  # trained on the reference; the method freezes it for the spot fit
        self.n_types, self.n_genes, self.n_states = decoder.n_types, decoder.n_genes, decoder.n_states
        self.register_buffer("cells_per_spot", torch.as_tensor(cells_per_spot, dtype=torch.float32).reshape(-1))
        mean_cell = decoder.beta.detach().exp()
        self.register_buffer("background_mean", background_fraction * mean_cell.mean(0).clamp_min(1e-3))
        genes = torch.arange(self.n_genes) if fit_genes is None else torch.as_tensor(fit_genes, dtype=torch.long)
        self.register_buffer("fit_genes", genes)
        self.concentration_mean, self.concentration_shape = float(concentration_mean), float(concentration_shape)
        self.platform_cv, self.detection_cv = float(platform_cv), float(detection_cv)
        self.record_expression = False

    def forward(self, batch) -> None:
        """The generative story above, on one :class:`~pyrospatial.data.spot_counts.SpotBatch`."""
        T, K, G = self.n_types, self.n_states, self.n_genes
        one = self.background_mean.new_ones(())
        # 1. tissue-wide type frequencies rho and mixing concentration a
        rho = pyro.sample("type_frequency", dist.Dirichlet(one.expand(T)))
        k_a = self.concentration_shape
        a = pyro.sample("concentration", dist.Gamma(k_a * one, k_a / self.concentration_mean * one))
        # 2. platform effects m, background b, over-dispersion r
        k_m = 1.0 / self.platform_cv**2
        m = pyro.sample("platform_effect", dist.Gamma(k_m * one, k_m * one).expand([G]).to_event(1))
        b = pyro.sample("background", dist.Exponential(1.0 / self.background_mean).to_event(1))
        r = pyro.sample("inv_sqrt_dispersion", dist.Exponential(10.0 * one).expand([G]).to_event(1))
        hint = self.cells_per_spot.expand(batch.n_spots) if self.cells_per_spot.numel() == 1 \
            else self.cells_per_spot[batch.spot_index]
        with spot_plate(batch):
            # 3. abundances w_jt
            w = pyro.sample("abundance", dist.Gamma(a * rho, (a / hint).unsqueeze(-1).expand(-1, T)).to_event(1))
            pyro.deterministic("proportion", w / w.sum(-1, keepdim=True).clamp_min(1e-12), event_dim=1)
            # 4. state v_jt of each type in each spot, and its cells' expression s_t(v_jt)
            v = pyro.sample("state", dist.Normal(one.new_zeros(T, K), 1.0).to_event(2))
            s = self.decoder(v)  # (..., m, T, G)
            if self.record_expression:
                pyro.deterministic("type_expression", m.unsqueeze(-2) * s, event_dim=2)
            # 5. detection efficiency l_j
            if self.detection_cv > 0:
                k_l = 1.0 / self.detection_cv**2
                l = pyro.sample("detection", dist.Gamma(k_l * one, k_l * one))
            else:
                l = torch.ones(batch.n_spots, device=w.device)
            # 6. the spots' counts over the fitted genes
            cells = torch.einsum("...mt,...mtg->...mg", w, s)
            excess_cells = torch.einsum("...mt,...mtg->...mg", w, s.pow(2) / self.decoder.theta)
            lm = l.unsqueeze(-1) * m
            mu = l.unsqueeze(-1) * (m * cells + b)
            excess = (lm.pow(2) * excess_cells + (mu * r).pow(2)).clamp_min(1e-6)
            idx = self.fit_genes
            mu, excess = mu[..., idx], excess[..., idx]
            pyro.sample("counts", dist.GammaPoisson(mu**2 / excess, mu / excess).to_event(1),
                        obs=batch.spot_counts[..., idx])
