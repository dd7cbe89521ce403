"""Variational family of :class:`~pyrospatial.models.CellTypeDeconvolutionModel`."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam

from pyrospatial.engine.batch import spot_plate

__all__ = ["CellTypeDeconvolutionGuide"]


class CellTypeDeconvolutionGuide(PyroModule):
    r"""Mean-field guide: a Gamma for the abundances, a log-normal for every other positive
    latent, a Dirichlet for ``rho``.

    Why not amortised, why not ``AutoNormal``: a spot's abundances are ``T`` numbers for which
    a per-spot free parameter is cheap (``n_spots x T``), exact to optimise and needs no
    encoder to be trained; an encoder would pay off only for millions of spots or for
    predicting new spots without refitting. The guide is written out rather than an
    ``AutoNormal`` for two reasons. (1) The family of the abundances: their prior is a sparse
    Gamma (shape ``a * rho_t`` well below 1); a log-normal ``q`` (what ``AutoNormal`` gives)
    widens without bound in log space for absent types, and its mean, dominated by the tail,
    blew the spot totals up (measured on osmFISH pseudo-spots: ~230 cells per spot for 8 true);
    a Gamma ``q`` can match the prior's spike at 0. (2) The starting point: the abundances' mean
    ``init_abundance``, which :func:`pyrospatial.deconvolve` sets to a blend of a non-negative
    least-squares fit of the spots on the reference signatures and the prior mean
    (:func:`pyrospatial.methods.deconvolution.guide_start`), the signatures from the reference prior. The fit then moves from
    that start for a set number of steps (:func:`pyrospatial.deconvolve` documents how its
    default was chosen: held-out-gene prediction, no ground truth). Local parameters are
    indexed by ``batch.spot_index``, so minibatches work.

    Sites and their families (``q``):

    - ``signature`` ``(T, G)``: ``LogNormal(loc, scale)``, started at the prior's mean and a
      log-scale width of ``sqrt(log(1 + 1/shape))`` (the prior's own);
    - ``type_frequency``: ``Dirichlet(exp(log_conc))``;
    - ``concentration``, ``platform_effect``, ``background``, ``inv_sqrt_dispersion``:
      ``LogNormal``;
    - per spot ``abundance`` ``(T,)``: ``Gamma(shape, rate)`` (reparameterised), started with
      shape ``init_shape`` (2) at the mean ``init_abundance``; ``detection``: ``LogNormal``;
    - with ``split_total`` (the model's ``total_cv`` story): ``total_cells``: ``LogNormal``
      started at the initial spot total, and ``composition`` ``(T,)``: ``Gamma``, started at
      the initial proportions.

    Parameters
    ----------
    signature_shape, signature_rate
        The model's signature prior (``(T, G)``).
    init_abundance
        ``(n_spots, T)`` starting abundances (e.g. non-negative least squares, or its blend with
        the prior mean), floored at
        ``0.05`` cells.
    detection
        Whether the model has the ``detection`` site (``detection_cv > 0``).
    init_scale, init_shape, init_concentration
        Starting log-scale widths of the global sites, shape of the abundances' ``q``, and the
        starting value of the concentration ``a`` (the model's ``a0``).
    split_total
        Guide the ``total_cells`` / ``composition`` sites instead of ``abundance``.
    """

    def __init__(
        self,
        signature_shape: torch.Tensor,
        signature_rate: torch.Tensor,
        init_abundance: torch.Tensor,
        *,
        detection: bool = True,
        init_scale: float = 0.1,
        init_shape: float = 2.0,
        init_concentration: float = 1.0,
        split_total: bool = False,
    ) -> None:
        super().__init__()
        shape = torch.as_tensor(signature_shape, dtype=torch.float32)
        rate = torch.as_tensor(signature_rate, dtype=torch.float32)
        init = torch.as_tensor(init_abundance, dtype=torch.float32)
        n_spots, T = init.shape
        G = shape.shape[1]
        prior_mean = shape / rate
        self.detection = bool(detection)
        pos = constraints.positive
        self.signature_loc = PyroParam(prior_mean.log())
        self.signature_scale = PyroParam(torch.sqrt(torch.log1p(1.0 / shape)).clamp(1e-3, 1.0), pos)
        freq = init.sum(0) / init.sum().clamp_min(1e-8)
        self.type_frequency_log_conc = PyroParam(torch.log(10.0 * T * freq.clamp_min(0.1 / T)))
        self.concentration_loc = PyroParam(torch.tensor(math.log(init_concentration)))
        self.concentration_scale = PyroParam(torch.tensor(init_scale), pos)
        self.platform_loc = PyroParam(torch.zeros(G))
        self.platform_scale = PyroParam(torch.full((G,), 0.05), pos)
        background = 0.05 * prior_mean.mean(0).clamp_min(1e-3)
        self.background_loc = PyroParam(background.log())
        self.background_scale = PyroParam(torch.full((G,), init_scale), pos)
        self.dispersion_loc = PyroParam(torch.full((G,), math.log(0.1)))
        self.dispersion_scale = PyroParam(torch.full((G,), init_scale), pos)
        mean = init.clamp_min(0.05)
        self.split_total = bool(split_total)
        if self.split_total:
            total = init.sum(-1).clamp_min(0.5)
            self.total_loc = PyroParam(total.log())
            self.total_scale = PyroParam(torch.full((n_spots,), 0.1), pos)
            mean = mean / mean.sum(-1, keepdim=True)
        self.abundance_shape = PyroParam(torch.full((n_spots, T), float(init_shape)), pos)
        self.abundance_rate = PyroParam(float(init_shape) / mean, pos)
        if self.detection:
            self.detection_loc = PyroParam(torch.zeros(n_spots))
            self.detection_scale = PyroParam(torch.full((n_spots,), 0.05), pos)

    def forward(self, batch) -> None:
        """Draw every latent of the model for one batch of spots."""
        pyro.sample("signature", dist.LogNormal(self.signature_loc, self.signature_scale).to_event(2))
        pyro.sample("type_frequency", dist.Dirichlet(self.type_frequency_log_conc.exp()))
        pyro.sample("concentration", dist.LogNormal(self.concentration_loc, self.concentration_scale))
        pyro.sample("platform_effect", dist.LogNormal(self.platform_loc, self.platform_scale).to_event(1))
        pyro.sample("background", dist.LogNormal(self.background_loc, self.background_scale).to_event(1))
        pyro.sample("inv_sqrt_dispersion", dist.LogNormal(self.dispersion_loc, self.dispersion_scale).to_event(1))
        idx = batch.spot_index
        with spot_plate(batch):
            q = dist.Gamma(self.abundance_shape[idx], self.abundance_rate[idx]).to_event(1)
            if self.split_total:
                pyro.sample("total_cells", dist.LogNormal(self.total_loc[idx], self.total_scale[idx]))
                pyro.sample("composition", q)
            else:
                pyro.sample("abundance", q)
            if self.detection:
                pyro.sample("detection", dist.LogNormal(self.detection_loc[idx], self.detection_scale[idx]))
