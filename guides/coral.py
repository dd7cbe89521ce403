"""CORAL's amortised guide: a graph-attention encoder over the cell graph.

Read :class:`CoralGuide`'s docstring for the variational family.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam
from torch import nn
from torch.nn import functional as F
from torch_geometric.nn import GATConv

from pyrospatial.engine.batch import Batch, cell_plate, spot_plate
from pyrospatial.errors import InputError
from pyrospatial.models.blocks import MIN_SCALE
from pyrospatial.models.coral import CoralConfig

__all__ = ["GUIDE_OPTIONS", "CoralGuide"]

#: the guide's own options (everything else it reads from the shared :class:`CoralConfig`)
GUIDE_OPTIONS = ("hidden", "heads", "weight_init_scale", "init_scale", "spot_norm", "name")


def _mlp(n_in: int, hidden: int, n_out: int, out_bias: torch.Tensor | None = None, out_gain: float = 0.1) -> nn.Sequential:
    """``n_in -> hidden -> n_out``; the output layer starts small (near its bias)."""
    net = nn.Sequential(nn.Linear(n_in, hidden), nn.ELU(), nn.Linear(hidden, n_out))
    with torch.no_grad():
        net[-1].weight.mul_(out_gain)
        if out_bias is not None:
            net[-1].bias.copy_(out_bias)
    return net


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """Per row: zero mean, unit variance over the last dim (a LayerNorm without weights)."""
    return F.layer_norm(x, x.shape[-1:]) if x.shape[-1] > 1 else x - x


def _raw(scale: float) -> float:
    """Inverse of ``softplus(.) + MIN_SCALE``."""
    return math.log(math.expm1(max(scale - MIN_SCALE, 1e-4)))


class CoralGuide(PyroModule):
    r"""Amortised variational family for :class:`~pyrospatial.models.coral.CoralModel`.

    Per-cell input ``e_i = [std(log1p(y_i / l^y_i * lbar)), std(log1p(X_{j(i)} / l_{j(i)} *
    1e4)), onehot(c_i), 1{cell in a spot}]``: the cell's normalised proteins, its spot's
    normalised expression (zeros for cells outside every spot, ``batch.cell_spot == -1``) and
    its type; ``std`` standardises each row over its features (a LayerNorm without weights,
    so inputs are O(1) whatever the panel size). Then::

        h_i  = ELU(GATConv_1(e, A))                 multi-head, heads concatenated
        (m_i, r_i) = GATConv_2(h, A)                multi-head, heads averaged
        q(z_i)        = Normal(m_i, softplus(r_i))                                  "z"
        q(v_i | z_i)  = Normal(MLP_v([z_i, onehot(c_i)]))                          "v"
        q(s_i | z_i)  = LogNormal(o_i + MLP_s([z_i, onehot(c_i), log(l^y_i/lbar),
                                               1{spot}, u_i - a0]))             "cell_size"
        [q(l_j)       = LogNormal(MLP_l([std(log1p(X_j / l_j * 1e4)), log(l_j / n_j) - a0]))
                                                                          "spot_capture"]
        [q(omega_g)   = Normal(m_g, diag(s_g^2))   per gene, plate "genes"   "rna_weight"]
        [q(upper(W_e)) = Normal(m_W, diag(s_W^2)),  q(b_e) = Normal(m_b, s_b^2)
                                                        "edge_weight", "edge_bias"]

    ``A`` is ``batch.edge_index`` with self loops added by GATConv. Both GATConv layers have
    a residual (linear skip) connection, so a cell's own input is not averaged away by its
    neighbours' (without it, q(z) mixes the types of neighbouring cells and the
    deconvolution is barely better than spot means). The output layer starts small, so q(z)
    starts near 0 with spread ``init_scale``. ``u_i = log(l_{j(i)} /
    n_{j(i)})`` (the spot's library split evenly over its ``n_j`` cells) and ``o_i = u_i`` for
    cells in a spot, ``o_i = a0`` (``size_loc_init``) otherwise, so ``q(s_i)`` starts at a
    spot-consistent scale. ``z`` is sampled first; ``v`` and ``s`` are conditioned on it.
    All networks are amortisation parameters (point estimates). With ``bayesian_decoder``
    (the model's RNA read-out ``W = omega * d`` is a latent) the guide holds a mean-field
    Normal ``q(omega)``, free parameters ``m_g, s_g`` (``m`` starts small and random, ``s`` at
    ``weight_init_scale``): the one global latent. Mean-field ``q`` is over-confident where latents are coupled (the cells
    of one spot share its counts): :func:`pyrospatial.engine.refine.refine_posterior` corrects the
    posterior by MCMC started from this guide.

    ``forward(batch, predictive=False)``: the flag is accepted (so one argument list serves
    model and guide under ``Predictive``) and ignored. :meth:`attention` returns GATConv's
    per-edge, per-head attention weights. Within :meth:`repeated_draws` (the engine's posterior
    draws) the encoder runs once per batch instead of once per draw.

    Parameters
    ----------
    config
        The :class:`~pyrospatial.models.coral.CoralConfig` shared with the model
        (``model.config``): sizes, ``z_dim``, ``v_dim``, ``capture`` (``capture_sd`` set),
        ``bayesian_decoder`` and the read-out width ``rna_width`` (the shape of ``q(omega)``),
        ``bayesian_edge_decoder`` (then ``q`` of the decoder's free entries and bias starts at
        the model's prior means, with standard deviation 0.01), ``cell_library_mean``
        (``lbar``; None uses the batch mean) and ``size_loc_init`` (``a0``, the log expected
        RNA total of a cell). Nothing is copied: the guide keeps the config.
    hidden
        The encoder width (the guide's own; ``config.hidden`` is the model's networks').
    heads
        Attention heads of both GATConv layers.
    weight_init_scale
        Initial standard deviation of ``q(omega)``.
    init_scale
        Initial standard deviation of every ``q`` (log scale for ``s`` and ``l``).
    spot_norm
        Target total of the normalised spot expression (1e4: counts per 10k).
    name
        Prefix of the parameters' names in Pyro's param store.
    """

    def __init__(
        self,
        config: CoralConfig,
        *,
        hidden: int = 64,
        heads: int = 4,
        weight_init_scale: float = 0.1,
        init_scale: float = 0.1,
        spot_norm: float = 1e4,
        name: str = "coral_guide",
    ) -> None:
        super().__init__(name=name)
        if not isinstance(config, CoralConfig):
            raise InputError(
                f"CoralGuide(config, ...) takes the CoralConfig shared with the model (model.config), got "
                f"{type(config).__name__}; build it with CoralGuide.from_dataset(data, model=model)."
            )
        self.config = config
        self.n_types, self.n_features, self.n_genes = config.n_types, config.n_features, config.n_genes
        self.z_dim, self.v_dim, self.hidden, self.heads = config.z_dim, config.v_dim, int(hidden), int(heads)
        self.spot_norm = float(spot_norm)
        self.init_raw = _raw(init_scale)
        self._encoding_memo: dict[str, Any] | None = None  # set by repeated_draws()

        n_in = self.n_features + self.n_genes + self.n_types + 1
        per_head = max(math.ceil(self.hidden / self.heads), 1)
        self.gat1 = GATConv(n_in, per_head, heads=self.heads, concat=True, add_self_loops=True, residual=True)
        self.gat2 = GATConv(per_head * self.heads, 2 * self.z_dim, heads=self.heads, concat=False, add_self_loops=True, residual=True)
        with torch.no_grad():  # q(z) starts near 0 with a small spread, on the prior's scale
            self.gat2.lin.weight.mul_(0.1)
            self.gat2.res.weight.mul_(0.1)
        raw = torch.tensor([0.0, self.init_raw])
        self.v_net = _mlp(self.z_dim + self.n_types, self.hidden, 2 * self.v_dim, raw.repeat_interleave(self.v_dim))
        self.size_net = _mlp(self.z_dim + self.n_types + 3, self.hidden, 2, raw)
        if config.capture:
            self.capture_net = _mlp(self.n_genes + 1, self.hidden, 2, raw)
        if config.bayesian_decoder:  # q(omega): small random loc (breaks the symmetry of hidden units)
            self.rna_weight_loc = nn.Parameter(0.1 * torch.randn(self.n_genes, config.rna_width))
            self.rna_weight_scale = PyroParam(
                torch.full((self.n_genes, config.rna_width), float(weight_init_scale)), constraint=constraints.positive
            )
        if config.bayesian_edge_decoder:  # q(W_e, b_e): mean-field Normal, starting at the prior means
            loc = config.edge_weight_prior_loc()
            self.edge_weight_loc = nn.Parameter(loc)
            self.edge_weight_scale = PyroParam(torch.full(loc.shape, 0.01), constraint=constraints.positive)
            self.edge_bias_loc = nn.Parameter(torch.tensor(config.edge_bias_init))
            self.edge_bias_scale = PyroParam(torch.tensor(0.01), constraint=constraints.positive)

    # -- the settings the guide reads from the shared config ---------------------------------
    @property
    def capture(self) -> bool:
        """Whether the model has a per-spot capture latent (``config.capture_sd`` set)."""
        return self.config.capture

    @property
    def bayesian_decoder(self) -> bool:
        """Whether the model's RNA read-out is a latent (``q(omega)`` is then part of the guide)."""
        return self.config.bayesian_decoder

    @property
    def bayesian_edge_decoder(self) -> bool:
        """Whether the model's edge decoder is a latent."""
        return self.config.bayesian_edge_decoder

    @property
    def cell_library_mean(self) -> float | None:
        """``lbar`` of the config."""
        return self.config.cell_library_mean

    @property
    def size_loc_init(self) -> float:
        """``a0`` of the config."""
        return self.config.size_loc_init

    # ------------------------------------------------------------------------------------
    @classmethod
    def from_dataset(cls, dataset: Any, model: Any = None, **kwargs: Any) -> CoralGuide:
        """A guide for ``dataset`` on the model's config (``model.config``), or without a
        model on :meth:`CoralConfig.from_dataset(dataset, ...) <pyrospatial.models.coral.CoralConfig.from_dataset>`.

        ``kwargs``: the guide's own options (:data:`GUIDE_OPTIONS`: ``hidden``, ``heads``,
        ``weight_init_scale``, ``init_scale``, ``spot_norm``, ``name``); config fields (e.g.
        ``z_dim``), which build the config without a model and must equal the model's with
        one; and, as before the shared config, ``capture`` and ``decoder_hidden``, checked
        against ``config.capture`` and ``config.rna_width``. A disagreement is an
        :class:`~pyrospatial.errors.InputError` naming the field.
        """
        options = {k: kwargs.pop(k) for k in GUIDE_OPTIONS if k in kwargs}
        derived = {k: kwargs.pop(k) for k in ("capture", "decoder_hidden") if k in kwargs}
        CoralConfig.check_names(kwargs, "CoralGuide.from_dataset")
        if model is None:
            config = CoralConfig.from_dataset(dataset, **kwargs)
        else:
            config = model.config
            differ = config.mismatches(**kwargs)
            if differ:
                detail = ", ".join(f"{k}={given!r} (model: {own!r})" for k, (given, own) in differ.items())
                raise InputError(f"CoralGuide.from_dataset: {detail}; the guide reads these from model.config: "
                                 "drop the keyword, or build the model with it.")
        if "capture" in derived and bool(derived["capture"]) != config.capture:
            raise InputError(f"CoralGuide.from_dataset: capture={derived['capture']!r} but the config's capture_sd is "
                             f"{config.capture_sd!r}; the guide has q(l_j) exactly when capture_sd is set: drop "
                             "capture= and set capture_sd on the model (or here, without a model).")
        if "decoder_hidden" in derived and int(derived["decoder_hidden"]) != config.rna_width:
            raise InputError(f"CoralGuide.from_dataset: decoder_hidden={derived['decoder_hidden']!r} but the model's "
                             f"read-out width (config.rna_width) is {config.rna_width}: drop decoder_hidden=.")
        return cls(config, **options)

    # ------------------------------------------------------------------------------------
    def _lbar(self, batch: Batch) -> torch.Tensor | float:
        return self.cell_library_mean if self.cell_library_mean is not None else batch.cell_library.mean()

    def _spot_inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised spot expression ``(m, G)`` and ``u_j = log(l_j / n_j)`` ``(m,)``."""
        lib = batch.spot_library.clamp(min=1.0)
        expr = torch.log1p(batch.spot_counts / lib.unsqueeze(-1) * self.spot_norm)
        members = batch.cell_spot[batch.cell_spot >= 0]
        n_per_spot = torch.bincount(members, minlength=batch.n_spots).clamp(min=1).to(lib.dtype)
        return expr, torch.log(lib / n_per_spot)

    def cell_inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoder input ``e`` ``(n, P + G + C + 1)``, one-hot types, ``1{spot}`` and ``u_i``."""
        n = batch.n_cells
        lib_y = batch.cell_library
        proteins = _standardise(torch.log1p(batch.cell_features / lib_y.unsqueeze(-1) * self._lbar(batch)))
        has_spot = (batch.cell_spot >= 0).to(proteins.dtype)
        if batch.n_spots > 0:
            expr, u_spot = self._spot_inputs(batch)
            j = batch.cell_spot.clamp(min=0)
            spot_expr = _standardise(expr)[j] * has_spot.unsqueeze(-1)
            u = u_spot[j] * has_spot
        else:
            spot_expr = proteins.new_zeros(n, self.n_genes)
            u = proteins.new_zeros(n)
        onehot = F.one_hot(batch.cell_type, self.n_types).to(proteins.dtype)
        e = torch.cat([proteins, spot_expr, onehot, has_spot.unsqueeze(-1)], dim=-1)
        return e, onehot, has_spot, u

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of ``q(z_i)``, each ``(n, z_dim)``."""
        return self._encode(self.cell_inputs(batch)[0], batch.edge_index)

    @contextmanager
    def repeated_draws(self) -> Iterator[None]:
        """Reuse the encoding while the guide is drawn from again and again on one batch.

        Inside the context, a call on the very batch object of the call before, without
        gradients and in eval mode, takes that call's encoder inputs and ``(loc, scale)`` of
        ``q(z)`` instead of recomputing them: they depend on the batch and the parameters only,
        never on a draw, so the draws are the same bit for bit.
        :func:`~pyrospatial.engine.posterior.sample_posterior` draws ``S`` times per chunk,
        and on 10,000 simulated cells the graph-attention encoder was half of the cost of
        100 draws. Outside the context (training included) every call encodes afresh."""
        previous, self._encoding_memo = self._encoding_memo, {}
        try:
            yield
        finally:
            self._encoding_memo = previous

    def _encoded(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        """``(e, onehot, has_spot, u, z_loc, z_scale)`` of ``batch``, reused within
        :meth:`repeated_draws` (see there)."""
        memo = self._encoding_memo
        reusable = memo is not None and not torch.is_grad_enabled() and not self.training
        if reusable and memo.get("batch") is batch:
            return memo["encoding"]
        e, onehot, has_spot, u = self.cell_inputs(batch)
        encoding = (e, onehot, has_spot, u, *self._encode(e, batch.edge_index))
        if reusable:
            memo.clear()
            memo.update(batch=batch, encoding=encoding)
        return encoding

    def _encode(self, e: torch.Tensor, edge_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.elu(self.gat1(e, edge_index))
        out = self.gat2(h, edge_index)
        loc, raw = out[..., : self.z_dim], out[..., self.z_dim :]
        return loc, F.softplus(raw + self.init_raw) + MIN_SCALE

    # ------------------------------------------------------------------------------------
    def forward(self, batch: Batch, predictive: bool = False) -> None:
        """Sample ``rna_weight`` (with ``bayesian_decoder``), ``edge_weight`` and ``edge_bias``
        (with ``bayesian_edge_decoder``) and the local latents ``z``,
        ``v``, ``cell_size`` (and ``spot_capture``)."""
        if self.bayesian_decoder:
            with pyro.plate("genes", self.n_genes, dim=-1):
                pyro.sample("rna_weight", dist.Normal(self.rna_weight_loc, self.rna_weight_scale).to_event(1))
        if self.bayesian_edge_decoder:
            pyro.sample("edge_weight", dist.Normal(self.edge_weight_loc, self.edge_weight_scale).to_event(1))
            pyro.sample("edge_bias", dist.Normal(self.edge_bias_loc, self.edge_bias_scale))
        e, onehot, has_spot, u, z_loc, z_scale = self._encoded(batch)
        lib_y = batch.cell_library
        with cell_plate(batch):
            z = pyro.sample("z", dist.Normal(z_loc, z_scale).to_event(1))
            zc = torch.cat([z, onehot.expand(z.shape[:-1] + onehot.shape[-1:])], dim=-1)
            v_out = self.v_net(zc)
            v_loc, v_raw = v_out[..., : self.v_dim], v_out[..., self.v_dim :]
            pyro.sample("v", dist.Normal(v_loc, F.softplus(v_raw) + MIN_SCALE).to_event(1))
            extra = torch.stack([torch.log(lib_y / self._lbar(batch)), has_spot, (u - self.size_loc_init) * has_spot], -1)
            s_out = self.size_net(torch.cat([zc, extra.expand(zc.shape[:-1] + extra.shape[-1:])], dim=-1))
            offset = has_spot * u + (1.0 - has_spot) * self.size_loc_init
            s_loc = offset + s_out[..., 0]
            pyro.sample("cell_size", dist.LogNormal(s_loc, F.softplus(s_out[..., 1]) + MIN_SCALE))
        if self.capture and batch.n_spots > 0:
            expr, u_spot = self._spot_inputs(batch)
            out = self.capture_net(torch.cat([_standardise(expr), (u_spot - self.size_loc_init).unsqueeze(-1)], dim=-1))
            with spot_plate(batch):
                pyro.sample("spot_capture", dist.LogNormal(out[..., 0], F.softplus(out[..., 1]) + MIN_SCALE))

    # ------------------------------------------------------------------------------------
    @torch.no_grad()
    def attention(
        self, batch: Batch, layer: int = 2, remove_self_loops: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-edge attention weights of a GATConv layer.

        Parameters
        ----------
        batch
            The batch whose graph to attend over.
        layer
            1 or 2 (the layer giving ``q(z)``; default).
        remove_self_loops
            Drop the self loops GATConv adds (they carry no cell--cell information).

        Returns
        -------
        edge_index, alpha
            ``(2, E')`` local edges (source, target) and ``(E', heads)`` weights; for each
            target cell the weights over its incoming edges (incl. the self loop) sum to 1
            per head.
        """
        if layer not in (1, 2):
            raise ValueError(f"layer must be 1 or 2, got {layer!r}")
        e, _, _, _ = self.cell_inputs(batch)
        h, (ei, alpha) = self.gat1(e, batch.edge_index, return_attention_weights=True)
        if layer == 2:
            _, (ei, alpha) = self.gat2(F.elu(h), batch.edge_index, return_attention_weights=True)
        if remove_self_loops:
            keep = ei[0] != ei[1]
            ei, alpha = ei[:, keep], alpha[keep]
        return ei, alpha
