"""Variational families of :mod:`pyrospatial.models.celltype_states`: amortised states (an
encoder of each unit's counts, as in :class:`~pyrospatial.guides.CoralGuide`), mean-field for the
rest."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam
from torch import nn

from pyrospatial.engine.batch import spot_plate

__all__ = ["CellTypeStateReferenceGuide", "CellTypeStatesGuide"]


def _encoder(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    """``n_in -> hidden -> n_out``; the output starts near 0 (states at the prior mean)."""
    net = nn.Sequential(nn.Linear(n_in, hidden), nn.ELU(), nn.Linear(hidden, n_out))
    with torch.no_grad():
        net[-1].weight.mul_(0.1)
        net[-1].bias.zero_()
    return net


def _features(x: torch.Tensor, log_library_mean: float) -> torch.Tensor:
    """Encoder input: log of the counts per 10^4, standardised per unit (row), and the unit's
    log total count centred at ``log_library_mean`` (a cell's size is part of its state)."""
    total = x.sum(-1, keepdim=True).clamp_min(1.0)
    y = torch.log1p(1e4 * x / total)
    return torch.cat([F.layer_norm(y, y.shape[-1:]), total.log() - log_library_mean], -1)


def _normal(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split an encoder output into a location and a positive scale (``softplus``, started ~0.5)."""
    loc, raw = out.chunk(2, dim=-1)
    return loc, F.softplus(raw - 0.5) + 1e-3


class CellTypeStateReferenceGuide(PyroModule):
    r"""``q(v_i | x_i, t_i) = Normal(loc, scale)`` from an encoder of the cell's normalised
    counts, its log total count and its type (one-hot), ``n_genes + 1 + T -> hidden -> 2K``.
    ``log_library_mean``: the mean log total count of the cells (centres that input)."""

    def __init__(self, n_genes: int, n_types: int, n_states: int, cell_type: torch.Tensor, hidden: int = 64,
                 log_library_mean: float = 0.0) -> None:
        super().__init__()
        self.n_types, self.n_states = int(n_types), int(n_states)
        self.log_library_mean = float(log_library_mean)
        self.register_buffer("cell_type", torch.as_tensor(cell_type, dtype=torch.long))
        self.encoder = _encoder(int(n_genes) + 1 + self.n_types, int(hidden), 2 * self.n_states)

    def encode(self, counts: torch.Tensor, types: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of the states of cells with ``counts`` ``(n, G)`` and ``types`` ``(n,)``."""
        onehot = F.one_hot(types, self.n_types).to(counts.dtype)
        return _normal(self.encoder(torch.cat([_features(counts, self.log_library_mean), onehot], -1)))

    def forward(self, batch) -> None:
        """Draw each cell's state."""
        loc, scale = self.encode(batch.spot_counts, self.cell_type[batch.spot_index])
        with spot_plate(batch):
            pyro.sample("state", dist.Normal(loc, scale).to_event(1))


class CellTypeStatesGuide(PyroModule):
    r"""Guide of :class:`~pyrospatial.models.celltype_states.CellTypeStatesModel`.

    - per spot ``state`` ``(T, K)``: ``Normal(loc, scale)`` from an encoder of the spot's
      normalised counts (over the fitted genes) and its log total count (centred at
      ``log_library_mean``), ``G + 1 -> hidden -> 2 T K`` (amortised: a spot's
      states are a function of its counts, so spots with similar counts get similar states);
    - per spot ``abundance`` ``(T,)``: ``Gamma(shape, rate)`` with free parameters, started
      at ``init_abundance`` (see :class:`~pyrospatial.guides.CellTypeDeconvolutionGuide` for why
      a Gamma and why free parameters); ``detection``: ``LogNormal``;
    - ``type_frequency``: ``Dirichlet``; ``concentration``, ``platform_effect``, ``background``,
      ``inv_sqrt_dispersion``: ``LogNormal``. The over-dispersion ``r_g`` starts at 0.02 (the
      signatures guide: 0.1): early in the fit the abundances and states are still far off, a
      large ``r`` then explains the misfit as noise and flattens the likelihood the states need
      (on the gradient simulation of ``tests/test_deconvolution_states.py`` the start at 0.1 gave
      clearly worse proportions after 400 steps).
    """

    def __init__(
        self,
        n_genes: int,
        n_states: int,
        init_abundance: torch.Tensor,
        background_mean: torch.Tensor,
        *,
        fit_genes: torch.Tensor | None = None,
        detection: bool = True,
        init_shape: float = 2.0,
        init_concentration: float = 0.3,
        hidden: int = 64,
        log_library_mean: float = 0.0,
    ) -> None:
        super().__init__()
        init = torch.as_tensor(init_abundance, dtype=torch.float32).clamp_min(0.05)
        n_spots, T = init.shape
        G = int(n_genes)
        self.n_types, self.n_states, self.detection = int(T), int(n_states), bool(detection)
        genes = torch.arange(G) if fit_genes is None else torch.as_tensor(fit_genes, dtype=torch.long)
        self.register_buffer("fit_genes", genes)
        pos = constraints.positive
        freq = init.sum(0) / init.sum()
        self.type_frequency_log_conc = PyroParam(torch.log(10.0 * T * freq.clamp_min(0.1 / T)))
        self.concentration_loc = PyroParam(torch.tensor(math.log(init_concentration)))
        self.concentration_scale = PyroParam(torch.tensor(0.1), pos)
        self.platform_loc = PyroParam(torch.zeros(G))
        self.platform_scale = PyroParam(torch.full((G,), 0.05), pos)
        self.background_loc = PyroParam(torch.as_tensor(background_mean, dtype=torch.float32).log())
        self.background_scale = PyroParam(torch.full((G,), 0.1), pos)
        self.dispersion_loc = PyroParam(torch.full((G,), math.log(0.02)))
        self.dispersion_scale = PyroParam(torch.full((G,), 0.1), pos)
        self.abundance_shape = PyroParam(torch.full((n_spots, T), float(init_shape)), pos)
        self.abundance_rate = PyroParam(float(init_shape) / init, pos)
        if self.detection:
            self.detection_loc = PyroParam(torch.zeros(n_spots))
            self.detection_scale = PyroParam(torch.full((n_spots,), 0.05), pos)
        self.log_library_mean = float(log_library_mean)
        self.encoder = _encoder(int(genes.numel()) + 1, int(hidden), 2 * T * self.n_states)

    def encode(self, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)``, each ``(n, T, K)``, of the states of spots with ``counts`` ``(n, G)``."""
        out = self.encoder(_features(counts[..., self.fit_genes], self.log_library_mean))
        loc, scale = _normal(out.reshape(*out.shape[:-1], self.n_types, 2 * self.n_states))
        return loc, scale

    def forward(self, batch) -> None:
        """Draw every latent of the model for one batch of spots."""
        pyro.sample("type_frequency", dist.Dirichlet(self.type_frequency_log_conc.exp()))
        pyro.sample("concentration", dist.LogNormal(self.concentration_loc, self.concentration_scale))
        pyro.sample("platform_effect", dist.LogNormal(self.platform_loc, self.platform_scale).to_event(1))
        pyro.sample("background", dist.LogNormal(self.background_loc, self.background_scale).to_event(1))
        pyro.sample("inv_sqrt_dispersion", dist.LogNormal(self.dispersion_loc, self.dispersion_scale).to_event(1))
        idx = batch.spot_index
        loc, scale = self.encode(batch.spot_counts)
        with spot_plate(batch):
            pyro.sample("abundance", dist.Gamma(self.abundance_shape[idx], self.abundance_rate[idx]).to_event(1))
            pyro.sample("state", dist.Normal(loc, scale).to_event(2))
            if self.detection:
                pyro.sample("detection", dist.LogNormal(self.detection_loc[idx], self.detection_scale[idx]))
