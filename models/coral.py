"""CORAL: cells with proteins, spots with RNA, and the cell graph in one generative model.

Read :class:`CoralModel`'s docstring for the generative story; ``CoralModel.forward`` is that
story, line by line, built from :mod:`pyrospatial.models.blocks`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam
from torch import nn
from torch.nn import functional as F

from pyrospatial.engine.batch import Batch, cell_plate, spot_plate
from pyrospatial.errors import InputError
from pyrospatial.protocols import ModelContract, ObservedSite

from .blocks import (
    EdgeDecoder,
    HierarchicalPrior,
    bernoulli_edges,
    contrastive_factor,
    gamma_likelihood,
    laplacian_factor,
    negative_binomial,
    spot_sum,
    spot_sum_negative_binomial,
    symmetric_from_upper,
)
from .scales import data_scales

__all__ = ["CoralConfig", "CoralModel", "data_scales"]

#: prior sd of the bias ``b_e`` of a Bayesian edge decoder (its mean is ``edge_bias_init``)
EDGE_BIAS_PRIOR_SCALE = 2.0


def _decoder(z_dim: int, hidden: int, out: int, bias_init: torch.Tensor | None) -> nn.Sequential:
    """``z -> hidden -> out`` logits; the output bias starts at ``bias_init`` (log-proportions)."""
    net = nn.Sequential(nn.Linear(z_dim, hidden), nn.ELU(), nn.Linear(hidden, out))
    if bias_init is not None:
        with torch.no_grad():
            net[-1].bias.copy_(torch.as_tensor(bias_init, dtype=net[-1].bias.dtype))
    return net


def _same(a: Any, b: Any) -> bool:
    """Equality that also compares tensors and arrays (element-wise, all equal)."""
    if isinstance(a, (torch.Tensor, np.ndarray)) or isinstance(b, (torch.Tensor, np.ndarray)):
        if a is None or b is None:
            return a is b
        a, b = torch.as_tensor(a), torch.as_tensor(b)
        return a.shape == b.shape and bool(torch.equal(a.to(b.dtype), b))
    return bool(a == b)


@dataclass
class CoralConfig:
    r"""Every setting of CORAL's model/guide pair, written once and read by both.

    :class:`CoralModel` builds its sites from it and :class:`~pyrospatial.guides.CoralGuide`
    reads from the same object the latent structure it must match (``z_dim``, ``v_dim``,
    :attr:`capture`, ``bayesian_decoder`` with the read-out width :attr:`rna_width`,
    ``bayesian_edge_decoder`` with its prior mean ``edge_bias_init``) and the data scales
    (``cell_library_mean``, ``size_loc_init``). Build it with :meth:`from_dataset` (scales read
    from the data) or directly; ``model.config`` is the model's.

    Fields
    ------
    n_types, n_features, n_genes
        Cell types ``C``, per-cell features ``P`` (proteins), spot genes ``G``.
    z_dim, v_dim, hidden
        Latent sizes and the width of the model's decoder / prior networks.
    bayesian_decoder
        True (default): the RNA read-out ``W`` is a latent (site ``"rna_weight"``, plate
        ``"genes"``, non-centred); False: a point estimate.
    rna_weight_scale_init
        Initial ``tau`` and ``tau_c``.
    rna_readout
        ``"linear"`` (default): state features ``e = z``; ``"mlp"``: standardised hidden
        features of width ``hidden``.
    rna_type_effects
        Append ``onehot(c)`` to the read-out features (a per-type offset per gene).
    rna_type_slopes
        Also append ``onehot(c) (x) e``: a per-type read-out of the state, partially pooled
        towards the shared one (prior scale ``tau_s``, site scale ``rna_slope_scale``). Off by
        default.
    spot_dispersion
        ``"sum"`` (default): moment-matched NB of a sum of per-cell NB counts; ``"spot"``:
        ``theta_g`` is the spot-level inverse dispersion.
    laplacian_weight
        Weight of the graph-Laplacian factor, per observed edge (0: off).
    contrastive_weight, contrastive_margin
        Weight (per cell) and margin of the contrastive cell-type factor (0: off). Pairs are
        the batch's observed edges and sampled non-edges, weighted to estimate the mean over
        all pairs of cells; the factor is ``-weight * n_cells_total * mean pair loss``.
    size_loc_init
        Initial ``a`` (log expected RNA total per cell); the guide's ``a0``.
    size_scale_init
        Initial ``sigma_s``.
    cell_library_mean
        ``lbar``; None uses each batch's mean protein library (model and guide alike).
    protein_concentration_init, rna_inverse_dispersion_init
        Initial ``k_p`` and ``theta_g``.
    gene_logits_init, protein_logits_init
        Optional ``(G,)`` / ``(P,)`` initial baselines ``beta`` of ``h_x`` / output biases of
        ``h_y`` (log proportions); :meth:`from_dataset` fills them from the data.
    edge_bias_init
        Initial ``b`` of the edge decoder (e.g. the logit of the graph's edge density); with
        ``bayesian_edge_decoder``, the prior mean of ``b_e`` and the start of its ``q``.
    bayesian_edge_decoder
        True: ``W_e, b_e`` are latents (sites ``"edge_weight"``, ``"edge_bias"``); False
        (default): point estimates.
    capture_sd
        None: ``l_j = 1``. A float: ``log l_j ~ Normal(0, capture_sd)`` per spot (the guide
        then has ``q(l_j)``).
    """

    n_types: int
    n_features: int
    n_genes: int
    z_dim: int = 8
    v_dim: int = 1
    hidden: int = 64
    bayesian_decoder: bool = True
    rna_weight_scale_init: float = 1.0
    rna_readout: str = "linear"
    rna_type_effects: bool = True
    rna_type_slopes: bool = False
    spot_dispersion: str = "sum"
    laplacian_weight: float = 0.0
    contrastive_weight: float = 0.0
    contrastive_margin: float = 1.0
    size_loc_init: float = 0.0
    size_scale_init: float = 0.3
    cell_library_mean: float | None = None
    protein_concentration_init: float = 5.0
    rna_inverse_dispersion_init: float = 5.0
    gene_logits_init: torch.Tensor | None = field(default=None, repr=False, compare=False)
    protein_logits_init: torch.Tensor | None = field(default=None, repr=False, compare=False)
    edge_bias_init: float = 0.0
    bayesian_edge_decoder: bool = False
    capture_sd: float | None = None

    def __post_init__(self) -> None:
        for name in ("n_types", "n_features", "n_genes", "z_dim", "v_dim", "hidden"):
            value = int(getattr(self, name))
            if value < 1:
                raise InputError(f"CoralConfig.{name} must be a positive integer, got {getattr(self, name)!r}.")
            setattr(self, name, value)
        for name in ("bayesian_decoder", "rna_type_effects", "rna_type_slopes", "bayesian_edge_decoder"):
            setattr(self, name, bool(getattr(self, name)))
        for name in ("rna_weight_scale_init", "laplacian_weight", "contrastive_weight", "contrastive_margin",
                     "size_loc_init", "size_scale_init", "protein_concentration_init",
                     "rna_inverse_dispersion_init", "edge_bias_init"):
            setattr(self, name, float(getattr(self, name)))
        if self.rna_readout not in ("linear", "mlp"):
            raise InputError(f"CoralConfig.rna_readout must be 'linear' or 'mlp', got {self.rna_readout!r}.")
        if self.spot_dispersion not in ("sum", "spot"):
            raise InputError(f"CoralConfig.spot_dispersion must be 'sum' or 'spot', got {self.spot_dispersion!r}.")
        if self.capture_sd is not None:
            self.capture_sd = float(self.capture_sd)
            if not self.capture_sd > 0:
                raise InputError(f"CoralConfig.capture_sd must be None or > 0 (e.g. 0.2), got {self.capture_sd!r}.")
        if self.cell_library_mean is not None:
            self.cell_library_mean = float(self.cell_library_mean)

    # -- values derived from the fields (never stored twice) --------------------------------
    @property
    def capture(self) -> bool:
        """Whether spots have a capture-efficiency latent ``l_j`` (``capture_sd`` set)."""
        return self.capture_sd is not None

    @property
    def rna_state_width(self) -> int:
        """Width of the read-out's state features: ``hidden`` (``"mlp"``) or ``z_dim``."""
        return self.hidden if self.rna_readout == "mlp" else self.z_dim

    @property
    def rna_width(self) -> int:
        """``K``, the columns of the RNA read-out ``W`` (state, per-type slopes, type offsets)."""
        state = self.rna_state_width
        return (state + (self.n_types * state if self.rna_type_slopes else 0)
                + (self.n_types if self.rna_type_effects else 0))

    def edge_weight_prior_loc(self, dtype: torch.dtype = torch.float32, device: Any = None) -> torch.Tensor:
        """Prior mean of the free entries ``upper(W_e)`` of a Bayesian edge decoder
        (row-major upper triangle, diagonal included): ``upper(I / sqrt(z_dim))``."""
        rows, cols = torch.triu_indices(self.z_dim, self.z_dim, device=device)
        return (rows == cols).to(dtype) / math.sqrt(self.z_dim)

    @property
    def edge_weight_prior_scale(self) -> float:
        """Prior sd of each free entry of a Bayesian ``W_e``: ``1 / sqrt(z_dim)``."""
        return 1.0 / math.sqrt(self.z_dim)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The names of the fields, in order."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def check_names(cls, names: Any, where: str) -> None:
        """Raise :class:`~pyrospatial.errors.InputError` naming any of ``names`` that is no field."""
        unknown = sorted(set(names) - set(cls.field_names()))
        if unknown:
            raise InputError(f"{where}: unknown CoralConfig field(s) {unknown}; the fields are {list(cls.field_names())}.")

    @classmethod
    def from_dataset(cls, dataset: Any, **overrides: Any) -> CoralConfig:
        """A config sized for ``dataset`` (``n_types``, ``n_features``, ``n_genes``), its scales
        initialised from the data (:func:`data_scales`); ``overrides`` set any field."""
        cls.check_names(overrides, "CoralConfig.from_dataset")
        values: dict[str, Any] = {"n_types": int(dataset.n_types), "n_features": int(dataset.n_features),
                                  "n_genes": int(dataset.n_genes)}
        values.update(data_scales(dataset))
        values.update(overrides)
        return cls(**values)

    @classmethod
    def build(cls, config: CoralConfig | int, n_features: int | None = None, n_genes: int | None = None,
              **settings: Any) -> CoralConfig:
        """``config`` itself (``settings`` override its fields), or a new config from
        ``n_types = config``, ``n_features``, ``n_genes`` and ``settings``."""
        cls.check_names(settings, "CoralModel")
        if isinstance(config, CoralConfig):
            if n_features is not None or n_genes is not None:
                raise InputError("CoralModel(config, ...): the sizes come from the config; pass either a CoralConfig "
                                 "or n_types, n_features, n_genes.")
            return config.replace(**settings) if settings else config
        if n_features is None or n_genes is None:
            raise InputError("CoralModel(n_types, n_features, n_genes, ...): all three sizes are needed "
                             "(or pass a CoralConfig).")
        return cls(int(config), int(n_features), int(n_genes), **settings)

    def replace(self, **changes: Any) -> CoralConfig:
        """A copy with ``changes`` (field names checked)."""
        self.check_names(changes, "CoralConfig.replace")
        return replace(self, **changes)

    def mismatches(self, **values: Any) -> dict[str, tuple[Any, Any]]:
        """``{name: (given, this config's)}`` for each of ``values`` that differs from the field."""
        self.check_names(values, "CoralConfig.mismatches")
        return {k: (v, getattr(self, k)) for k, v in values.items() if not _same(v, getattr(self, k))}


class CoralModel(PyroModule):
    r"""CORAL's generative model of cells (proteins), spots (RNA) and the cell graph.

    Symbols: cells ``i`` with type ``c_i`` and protein library ``l^y_i = sum_p y_ip``;
    spots ``j`` with member cells ``U(j)``; proteins ``p``, genes ``g``.

    Generative story (one line per line of :meth:`forward`)::

        for each gene g (plate "genes"; with bayesian_decoder, the default):
            omega_g ~ Normal(0, I_K);  w_g = d * omega_g                       "rna_weight"
        for each cell i (plate "cells", scaled by batch.cell_scale):
            v_i ~ Normal(0, I_{v_dim})                                         "v"
            z_i ~ Normal(mu_{c_i}(v_i), sigma_{c_i}(v_i))                      "z"
            y_i ~ Gamma(mean = l^y_i h_y(z_i), concentration k_p)             "proteins"
            log s_i ~ Normal(a + b log(l^y_i / lbar), sigma_s)                 "cell_size"
            rho_i = s_i softmax(beta + W e(z_i, c_i))                          "expected_rna"
        for each spot j (plate "spots", scaled by batch.spot_scale):
            [log l_j ~ Normal(0, capture_sd)    only with capture_sd; else l_j = 1]  "spot_capture"
            mu_j = l_j sum_{i in U(j)} rho_i
            X_jg ~ NB(mean mu_jg, inverse dispersion                           "spot_counts"
                      theta_g (sum_i rho_ig)^2 / sum_i rho_ig^2)
        [with bayesian_edge_decoder: the edge decoder f's parameters
            upper(W_e) ~ Normal(upper(I / sqrt(K)), 1 / sqrt(K))               "edge_weight"
            b_e ~ Normal(b0, 2)                                                "edge_bias"]
        for each observed edge (i, i'), i < i' (scaled by batch.edge_scale):
            A_ii' = 1 ~ Bernoulli(sigmoid(f(z_i, z_i')))                       "edges"
        for each sampled non-edge (scaled by batch.nonedge_scale):
            A_ii' = 0 ~ Bernoulli(sigmoid(f(z_i, z_i')))                       "nonedges"
        optional factors (weight 0 = absent):
            -laplacian_weight * tr(Z^T L Z)                                     "laplacian"
            -contrastive_weight * N * mean_pairs contrastive(z, c; margin)     "contrastive"

    * ``mu_c, sigma_c`` (:class:`~pyrospatial.models.blocks.HierarchicalPrior`): one small
      network head per cell type.
    * ``h_y(z) = softmax(decoder_y(z))`` over proteins, so ``sum_p E[y_ip] = l^y_i``: the
      decoder explains composition, the observed library explains total intensity. The Gamma
      is in mean/concentration form (``rate = k_p / mean``, ``Var = mean^2 / k_p``); features
      must be strictly positive.
    * RNA read-out ``h_x(z, c) = softmax(beta + W e(z, c))``: the features ``e(z, c)`` are the
      cell state ``z`` (``rna_readout="linear"``, default; or standardised hidden features
      ``LayerNorm(ELU(A z + a)) / sqrt(H)`` with ``"mlp"``) followed by ``onehot(c)``
      (``rna_type_effects``, default), so ``W`` (genes x K) holds per gene a linear read-out
      of the state and one offset per cell type; ``beta`` (genes) is the baseline, initialised
      at the spots' log gene proportions. With ``bayesian_decoder`` (default) ``W`` is a
      latent, non-centred: ``w_gk = d_k omega_gk``, ``omega_gk ~ Normal(0, 1)``, with prior
      scales ``d_k = tau`` for the state features and ``tau_c`` for the type offsets (point
      estimates, i.e. empirical Bayes; ``tau_s`` for optional per-type slopes). Why: a few hundred spot sums leave each gene's
      read-out uncertain; a point estimate of ``W`` over-fits with training and makes the
      per-cell RNA intervals far too narrow. With ``bayesian_decoder=False`` ``W`` is a point
      estimate. The linear read-out is the default because the spots cannot identify a
      non-linear read-out per gene (``z`` itself is a non-linear function of the proteins).
    * Spot counts: if each member cell's counts were ``NB(l_j rho_ig, theta_g)``, the spot's
      sum has mean ``mu_jg`` and variance ``mu_jg + l_j^2 sum_i rho_ig^2 / theta_g``; the NB
      above matches both (:func:`~pyrospatial.models.blocks.spot_sum_negative_binomial`), so
      ``theta_g`` is a per-cell inverse dispersion, as used to split spot counts among cells
      (Dirichlet-multinomial). ``spot_dispersion="spot"`` uses ``theta_g`` for the spot NB
      directly (the earlier form).
    * ``s_i`` is the cell's expected total RNA (a per-cell size factor in count units). Its
      prior links it to the protein total (cell size drives both): ``a`` starts at
      ``log(median spot library / median cells per spot)``, ``b`` at 0. ``lbar`` is the data
      set's mean protein library (``cell_library_mean``; the batch mean when not given).
      Thus ``rho_ig = E[x_ig | z_i, s_i]`` is directly comparable to a simulated per-cell truth
      ``E[x_ig]`` and a spot's mean is the plain sum over its member cells.
    * ``l_j`` is a per-spot capture efficiency. By default ``l_j = 1`` (a spot's counts are the
      sum of its cells' counts, as in a simulation or pseudo-spots). On real data pass
      ``capture_sd`` (e.g. 0.2) to make ``log l_j`` a local latent; the guide, built from the
      same :class:`CoralConfig`, then has ``q(l_j)``.
    * ``f(z, z') = z^T W_e z' + b_e`` with symmetric ``W_e`` (:class:`~pyrospatial.models.blocks.EdgeDecoder`).
      ``pyro.deterministic("edge_prob")`` holds ``sigmoid(f)`` for the batch's observed edges;
      :meth:`edge_probability` evaluates it for any pairs and posterior draws.
      By default ``W_e, b_e`` are point estimates. With ``bayesian_edge_decoder`` they are
      latents: the ``K (K + 1) / 2`` free entries of ``W_e`` (site ``"edge_weight"``; prior
      centred on the scaled inner product ``I / sqrt(K)``, scale ``1 / sqrt(K)``) and ``b_e``
      (``"edge_bias"``, centred on ``edge_bias_init``, scale 2), so an interaction score
      averaged over thousands of edges carries the decoder's own uncertainty, which dominates
      there (``benchmarks/results/interaction_calibration.md``). ``b0`` is ``edge_bias_init``.

    Latent vs point estimate: ``v``, ``z``, ``cell_size`` (and ``spot_capture``) are local
    latents, and ``rna_weight`` (``omega``, with ``bayesian_decoder``) a global latent, each
    with a posterior (fitted by the guide; :func:`pyrospatial.engine.refine.refine_posterior`
    refines it by MCMC). Everything else -- the prior networks ``mu_c, sigma_c``, the
    decoder ``h_y``, the baseline ``beta`` (and hidden layer ``A, a``) of ``h_x``, the prior
    scales ``tau, tau_c``, the edge decoder ``W_e, b_e`` (unless ``bayesian_edge_decoder``),
    concentrations ``k_p``, inverse
    dispersions ``theta_g``, the size prior ``a, b, sigma_s`` -- is a global point estimate
    (``nn.Parameter`` / ``PyroParam``, positive ones constrained positive) learned by
    maximising the ELBO (and, for the variance-type ones, re-estimated by Monte Carlo EM in
    :func:`~pyrospatial.engine.refine.refine_posterior`).

    Vectorised evaluation: every site broadcasts over leading batch dimensions, so the model
    can be run under an outer ``pyro.plate`` at ``dim=-2`` (e.g. one entry per MCMC chain;
    ``rna_weight`` then has shape ``(chains, G, K)``).

    Posterior predictive checks: ``model(batch, predictive=True)`` drops every ``obs`` so
    ``"proteins"``, ``"spot_counts"``, ``"edges"``, ``"nonedges"`` are *drawn*; e.g.
    ``Predictive(model, guide=guide, num_samples=S)(batch, predictive=True)`` (the guide
    accepts and ignores the flag).

    Batches without spots or without edges are fine: the corresponding sites are simply
    absent from the trace (a plate of size 0 is not a valid Pyro plate).
    ``"edge_prob"`` is then an empty tensor.

    Parameters
    ----------
    config
        A :class:`CoralConfig` (every setting, shared with the guide), or ``n_types`` with
        ``n_features``, ``n_genes`` and the other fields as keywords (``settings``), e.g.
        ``CoralModel(3, 10, 50, z_dim=4)``; with a config, ``settings`` override its fields.
        The fields are documented on :class:`CoralConfig`; ``model.config`` holds them.
    name
        Prefix of the parameters' names in Pyro's param store.
    """

    #: The sites and parameters the engine and criticism read (pyrospatial.protocols).
    contract = ModelContract(
        observed=(
            ObservedSite("proteins", "cells", ("cell", "protein")),
            ObservedSite("spot_counts", "spots", ("spot", "gene")),
            ObservedSite("edges", "edge", ("edge",), moments=("mean",), mean_name="edge_prob", pairs="edge_pairs"),
            ObservedSite("nonedges", "edge", ("nonedge",), moments=("mean",), mean_name="nonedge_prob",
                         pairs="nonedge_index"),
        ),
        local={"cells": ("v", "z", "cell_size"), "spots": ("spot_capture",)},
        global_sites=("rna_weight", "edge_weight", "edge_bias"),
        deterministic=("expected_rna", "edge_prob"),
        # variance-type globals a mean-field guide biases (docs/refine.md, "Monte Carlo EM")
        em_parameters=("size_scale", "rna_inverse_dispersion"),
        # the point-estimated edge decoder, fitted under the guide, with graph=True
        graph_em_parameters=("edge_decoder.weight", "edge_decoder.bias"),
        graph_sites=("edge_weight", "edge_bias"),
        noncentred=("cell_size",),
        dims={"expected_rna": ("cell", "gene"), "rna_weight": ("gene",)},
    )

    def __init__(
        self,
        config: CoralConfig | int,
        n_features: int | None = None,
        n_genes: int | None = None,
        *,
        name: str = "coral_model",
        **settings: Any,
    ) -> None:
        super().__init__(name=name)
        cfg = CoralConfig.build(config, n_features, n_genes, **settings)
        self.config = cfg
        # plain attributes read from the config (the values are written once, in ``cfg``)
        self.n_types, self.n_features, self.n_genes = cfg.n_types, cfg.n_features, cfg.n_genes
        self.z_dim, self.v_dim, self.hidden = cfg.z_dim, cfg.v_dim, cfg.hidden
        self.laplacian_weight = cfg.laplacian_weight
        self.contrastive_weight = cfg.contrastive_weight
        self.contrastive_margin = cfg.contrastive_margin
        self.capture_sd = cfg.capture_sd
        self.spot_dispersion = cfg.spot_dispersion
        self.cell_library_mean = cfg.cell_library_mean

        # z | v, c : one head per cell type
        self.prior = HierarchicalPrior(self.n_types, self.v_dim, self.z_dim, hidden=max(self.hidden // 2, 8))
        # proteins: decoder h_y and concentrations k_p
        self.protein_decoder = _decoder(self.z_dim, self.hidden, self.n_features, cfg.protein_logits_init)
        self.protein_concentration = PyroParam(
            torch.full((self.n_features,), cfg.protein_concentration_init), constraint=constraints.positive
        )
        # RNA: h_x(z, c) = softmax(beta + W e(z, c)); W latent (scales tau, tau_c) or a point
        # estimate; size prior (a, b, sigma_s); per-cell inverse dispersions theta_g
        self.bayesian_decoder = cfg.bayesian_decoder
        self.rna_readout = cfg.rna_readout
        self.rna_type_effects = cfg.rna_type_effects
        self.rna_state_width = cfg.rna_state_width
        self.rna_type_slopes = cfg.rna_type_slopes
        self.rna_width = cfg.rna_width
        if self.rna_readout == "mlp":
            self.rna_hidden = nn.Sequential(nn.Linear(self.z_dim, self.hidden), nn.ELU())
        gene_logits = cfg.gene_logits_init
        bias = torch.zeros(self.n_genes) if gene_logits is None else torch.as_tensor(gene_logits, dtype=torch.float32)
        self.rna_bias = nn.Parameter(bias.clone().reshape(self.n_genes))
        if self.bayesian_decoder:
            tau = cfg.rna_weight_scale_init
            self.rna_weight_scale = PyroParam(torch.tensor(tau), constraint=constraints.positive)
            if self.rna_type_slopes:
                self.rna_slope_scale = PyroParam(torch.tensor(0.5 * tau), constraint=constraints.positive)
            if self.rna_type_effects:
                self.rna_type_scale = PyroParam(torch.tensor(tau), constraint=constraints.positive)
        else:
            self.rna_weight = nn.Parameter(0.1 * torch.randn(self.n_genes, self.rna_width))
        self.size_intercept = nn.Parameter(torch.tensor(cfg.size_loc_init))
        self.size_slope = nn.Parameter(torch.tensor(0.0))
        self.size_scale = PyroParam(torch.tensor(cfg.size_scale_init), constraint=constraints.interval(0.01, 3.0))
        self.rna_inverse_dispersion = PyroParam(
            torch.full((self.n_genes,), cfg.rna_inverse_dispersion_init), constraint=constraints.positive
        )
        # edges: f(z, z') = z^T W_e z' + b_e, point estimates or latents
        self.bayesian_edge_decoder = cfg.bayesian_edge_decoder
        self.edge_bias_init = cfg.edge_bias_init
        self.edge_decoder = EdgeDecoder(self.z_dim, bias_init=self.edge_bias_init, point_estimates=not self.bayesian_edge_decoder)

    # ------------------------------------------------------------------------------------
    @classmethod
    def from_dataset(cls, dataset: Any, **kwargs: Any) -> CoralModel:
        """A model sized for ``dataset``, its config from :meth:`CoralConfig.from_dataset`
        (scales initialised from the data): ``kwargs`` naming a :class:`CoralConfig` field
        override it; any other keyword goes to the constructor (``name``, or a variant's own
        option such as ``cofactor``)."""
        names = CoralConfig.field_names()
        config = CoralConfig.from_dataset(dataset, **{k: v for k, v in kwargs.items() if k in names})
        return cls(config, **{k: v for k, v in kwargs.items() if k not in names})

    # ------------------------------------------------------------------------------------
    def forward(self, batch: Batch, predictive: bool = False) -> None:
        """The generative story on one minibatch (see the class docstring).

        Parameters
        ----------
        batch
            A :class:`~pyrospatial.engine.batch.Batch`.
        predictive
            True: observed sites are sampled instead of conditioned (posterior predictive).
        """
        observe = not predictive
        n = batch.n_cells
        lib_y = batch.cell_library
        lbar = self.cell_library_mean if self.cell_library_mean is not None else lib_y.mean().detach()

        W = self.rna_read_out()  # (G, K), or (..., G, K) under outer plates
        with cell_plate(batch):
            v = pyro.sample("v", dist.Normal(lib_y.new_zeros(n, self.v_dim), 1.0).to_event(1))
            z = pyro.sample("z", self.prior.distribution(v, batch.cell_type))
            pyro.sample(
                "proteins",
                self.feature_likelihood(z, batch),
                obs=self.observed_features(batch) if observe else None,
            )
            size_loc = self.size_intercept + self.size_slope * torch.log(lib_y / lbar)
            s = pyro.sample("cell_size", dist.LogNormal(size_loc, self.size_scale))
            if batch.density_only:
                # only the density is wanted (training, MCMC): a cell's RNA enters the likelihood
                # through its spot's sum alone, so it is computed for the cells inside a spot
                # (in a tissue most cells lie between spots) and not recorded
                inside, membership = batch.spot_members
                rho = s[..., inside, None] * self.rna_rates(z[..., inside, :], batch.cell_type[inside], W)
            else:
                rho = pyro.deterministic("expected_rna", s.unsqueeze(-1) * self.rna_rates(z, batch.cell_type, W),
                                         event_dim=1)
                membership = batch.membership

        if batch.n_spots > 0:
            with spot_plate(batch):
                capture = None
                if self.capture_sd is not None:
                    zeros = batch.spot_library.new_zeros(batch.n_spots)
                    capture = pyro.sample("spot_capture", dist.LogNormal(zeros, self.capture_sd))
                if self.spot_dispersion == "sum":
                    counts_dist = spot_sum_negative_binomial(membership, rho, self.rna_inverse_dispersion, capture)
                else:
                    mean_x = spot_sum(membership, rho)
                    mean_x = mean_x if capture is None else capture.unsqueeze(-1) * mean_x
                    counts_dist = negative_binomial(mean_x, self.rna_inverse_dispersion)
                pyro.sample("spot_counts", counts_dist, obs=batch.spot_counts if observe else None)

        edge_pairs, nonedge_pairs = batch.edge_pairs, batch.nonedge_index
        W_e, b_e = self.edge_decoder_draw(z)
        edge_logits = self.edge_decoder(z, edge_pairs, W_e, b_e)
        pyro.deterministic("edge_prob", torch.sigmoid(edge_logits), event_dim=1)
        bernoulli_edges("edges", edge_logits, True if observe else None, scale=batch.edge_scale)
        nonedge_logits = self.edge_decoder(z, nonedge_pairs, W_e, b_e)
        bernoulli_edges("nonedges", nonedge_logits, False if observe else None, scale=batch.nonedge_scale)

        laplacian_factor("laplacian", z, edge_pairs, self.laplacian_weight, scale=batch.edge_scale)
        if self.contrastive_weight != 0:
            pairs, weights = self._contrastive_pairs(batch, edge_pairs, nonedge_pairs, z)
            contrastive_factor(
                "contrastive", z, batch.cell_type, pairs, self.contrastive_weight,
                self.contrastive_margin, pair_weights=weights,
            )

    # -- the single-cell feature block (override in a variant, e.g. models/coral_variants.py) --
    def feature_likelihood(self, z: torch.Tensor, batch: Batch) -> dist.Distribution:
        """``p(y_i | z_i)``: Gamma with mean ``l^y_i softmax(h_y(z_i))`` and concentration ``k_p``
        (event dim 1 over features)."""
        mean_y = batch.cell_library.unsqueeze(-1) * F.softmax(self.protein_decoder(z), dim=-1)
        return gamma_likelihood(mean_y, self.protein_concentration)

    def observed_features(self, batch: Batch) -> torch.Tensor:
        """The observations of the ``"proteins"`` site (raw intensities by default)."""
        return batch.cell_features

    def rna_read_out(self) -> torch.Tensor:
        """``W`` (genes x ``rna_width``). With ``bayesian_decoder``: ``W = omega * d``,
        ``omega_g ~ Normal(0, I)`` drawn at the site ``"rna_weight"`` (plate ``"genes"``),
        ``d = (tau, ..., tau, tau_c, ..., tau_c)``; else the point estimate."""
        if not self.bayesian_decoder:
            return self.rna_weight
        zeros = self.rna_bias.new_zeros(self.n_genes, self.rna_width)
        with pyro.plate("genes", self.n_genes, dim=-1):
            omega = pyro.sample("rna_weight", dist.Normal(zeros, 1.0).to_event(1))
        scale = self.rna_weight_scale.expand(self.rna_state_width)
        if self.rna_type_slopes:
            scale = torch.cat([scale, self.rna_slope_scale.expand(self.n_types * self.rna_state_width)])
        if self.rna_type_effects:
            scale = torch.cat([scale, self.rna_type_scale.expand(self.n_types)])
        return scale * omega

    @property
    def graph_sites(self) -> tuple[str, ...]:
        """Latent sites that only the graph terms inform (held at the guide's draws by
        :func:`pyrospatial.engine.refine.refine_posterior` unless it conditions on the graph)."""
        return ("edge_weight", "edge_bias") if self.bayesian_edge_decoder else ()

    def edge_decoder_draw(self, z: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """With ``bayesian_edge_decoder``: draw ``W_e`` (sym., ``(..., K, K)``) and ``b_e``
        (``(..., 1)``) with the leading dims of ``z (..., n, K)`` (one decoder per chain under
        an outer plate); else ``(None, None)`` (the point estimates are used)."""
        if not self.bayesian_edge_decoder:
            return None, None
        loc = self.config.edge_weight_prior_loc(z.dtype, z.device)
        upper = pyro.sample("edge_weight", dist.Normal(loc, self.config.edge_weight_prior_scale).to_event(1))
        bias = pyro.sample("edge_bias", dist.Normal(z.new_tensor(self.edge_bias_init), EDGE_BIAS_PRIOR_SCALE))
        return self._edge_decoder_values(upper, bias, z.shape[:-2])

    def _edge_decoder_values(
        self, upper: torch.Tensor, bias: torch.Tensor, lead: torch.Size
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_e, b_e)`` as ``(*lead, K, K)`` and ``(*lead, 1)`` from the free entries
        ``upper`` and the bias of a Bayesian edge decoder (any shapes holding ``lead``)."""
        K = self.z_dim
        return symmetric_from_upper(upper, K).reshape(lead + (K, K)), bias.reshape(lead + (1,))

    def edge_logits(
        self,
        z: torch.Tensor,
        pairs: torch.Tensor,
        edge_weight: torch.Tensor | None = None,
        edge_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``f(z_i, z_i')`` for the ``(2, K)`` index ``pairs`` into the cells of ``z (..., n,
        z_dim)``: ``(..., K)`` logits of the model's edge decoder.

        With ``bayesian_edge_decoder`` pass the decoder's draws matching ``z``'s leading dims
        (one decoder per draw): ``edge_weight (..., z_dim (z_dim + 1) / 2)`` (site
        ``"edge_weight"``) and ``edge_bias (...)`` (site ``"edge_bias"``); without it they
        must be None (the point estimates are used).
        """
        if not self.bayesian_edge_decoder:
            if edge_weight is not None or edge_bias is not None:
                raise InputError("edge_weight/edge_bias draws were given, but this model's edge decoder is a point "
                                 "estimate (bayesian_edge_decoder=False): call edge_logits(z, pairs) without them.")
            return self.edge_decoder(z, pairs)
        if edge_weight is None or edge_bias is None:
            raise InputError("this model's edge decoder is Bayesian (bayesian_edge_decoder=True): pass the draws of "
                             "the sites 'edge_weight' and 'edge_bias' that go with z.")
        W, b = self._edge_decoder_values(edge_weight, edge_bias, z.shape[:-2])
        return self.edge_decoder(z, pairs, W, b)

    def edge_probability(
        self,
        z: torch.Tensor,
        pairs: torch.Tensor,
        edge_weight: torch.Tensor | None = None,
        edge_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``sigmoid(f(z_i, z_i'))``: the probability of an edge between each pair of cells
        (see :meth:`edge_logits` for the arguments); ``(..., K)``."""
        return torch.sigmoid(self.edge_logits(z, pairs, edge_weight, edge_bias))

    def rna_features(self, z: torch.Tensor, cell_type: torch.Tensor) -> torch.Tensor:
        """``e(z, c)``: the state features (``z`` itself, or ``standardise(ELU(A z + a)) /
        sqrt(H)`` with ``rna_readout="mlp"``), then ``onehot(c)`` with ``rna_type_effects``;
        ``(..., n, rna_width)``."""
        if self.rna_readout == "linear":
            e = z
        else:
            h = self.rna_hidden(z)
            e = F.layer_norm(h, h.shape[-1:]) / math.sqrt(self.hidden)
        onehot = F.one_hot(cell_type, self.n_types).to(e.dtype).expand(e.shape[:-1] + (self.n_types,))
        parts = [e]
        if self.rna_type_slopes:  # the state features again, in the block of the cell's own type
            parts.append((onehot.unsqueeze(-1) * e.unsqueeze(-2)).flatten(-2))
        if self.rna_type_effects:
            parts.append(onehot)
        return torch.cat(parts, dim=-1) if len(parts) > 1 else e

    def rna_rates(self, z: torch.Tensor, cell_type: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """``h_x(z, c) = softmax(beta + W e(z, c))``: ``z (..., n, z_dim)``, ``W (..., G, K)``
        -> ``(..., n, G)``. A ``W`` with leading dims (one per chain/particle) applies batch-wise."""
        logits = torch.matmul(self.rna_features(z, cell_type), W.transpose(-1, -2)) + self.rna_bias
        return F.softmax(logits, dim=-1)

    @staticmethod
    def _contrastive_pairs(
        batch: Batch, edge_pairs: torch.Tensor, nonedge_pairs: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs (edges + sampled non-edges) and weights estimating ``N * mean over all pairs``."""
        N = batch.n_cells_total
        n_pairs_total = max(N * (N - 1) / 2.0, 1.0)
        pairs = torch.cat([edge_pairs, nonedge_pairs], dim=1)
        weights = torch.cat(
            [
                z.new_full((edge_pairs.shape[1],), float(batch.edge_scale)),
                z.new_full((nonedge_pairs.shape[1],), float(batch.nonedge_scale)),
            ]
        ) * (N / n_pairs_total)
        return pairs, weights
