"""Variational family of :class:`~pyrospatial.models.domains.DomainModel`."""

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

__all__ = ["DomainGuide"]

MIN_SCALE = 1e-3

#: The per-spot logits are stored divided by this factor, so that Adam (whose steps are about
#: ``lr`` in the stored parameter) moves them this many times faster than the shared parameters:
#: each spot's logits are updated only by its own (and its neighbours') evidence.
LOGIT_SPEED = 10.0


class DomainGuide(PyroModule):
    r"""Amortised encoder for the embedding, mean-field for everything else.

    Sites and their families (``q``):

    - ``embedding`` ``z_i``: ``Normal(e(x_i), s(x_i))`` with an encoder of the spot's input
      ``x_i`` (its own features and their average over its graph neighbours, built by
      :func:`pyrospatial.domains`): ``e(x) = (x - c) P + h(x)``, a linear map started at the
      principal axes of the neighbour-averaged input (``init_projection``) plus a one-hidden-layer
      network ``h`` started at zero, so the fit starts from a smoothed PCA embedding;
    - ``domain_logits`` ``u_i``: ``Normal(loc_i + (x_i - c) R, scale_i)``, a pair per spot
      (indexed by ``batch.spot_index``: minibatches work; ``loc_i`` started at ``init_logits``
      and stored divided by :data:`LOGIT_SPEED`) plus a linear map ``R`` of the input, started at 0;
    - ``domain_frequency``: ``Dirichlet(exp(log_conc))``;
    - ``domain_mean`` ``(K, Z)``: ``Normal``, started at ``init_domain_mean`` (e.g. k-means
      centres of the starting embedding);
    - ``count_offset``, ``protein_offset``, ``morphology_offset`` ``(S, .)``: ``Normal``.

    Parameters
    ----------
    n_spots, n_inputs, n_domains, latent_dim
        Spots, encoder inputs ``D``, ``K``, ``Z``.
    n_genes, n_proteins, n_morphology, n_sections
        Sizes of the offsets (0 = modality absent).
    init_projection, init_centre
        ``(D, Z)`` and ``(D,)``: the linear part of the encoder.
    init_domain_mean
        ``(K, Z)`` starting centres.
    hidden
        Width of ``h``.
    init_scale
        Starting posterior scale of ``z`` and of the global sites.
    """

    def __init__(
        self,
        n_spots: int,
        n_inputs: int,
        n_domains: int,
        latent_dim: int,
        n_genes: int,
        n_proteins: int,
        n_morphology: int,
        n_sections: int,
        *,
        init_projection: torch.Tensor,
        init_centre: torch.Tensor,
        init_domain_mean: torch.Tensor,
        init_logits: torch.Tensor | None = None,
        hidden: int = 64,
        init_scale: float = 0.1,
    ) -> None:
        super().__init__()
        K, Z = int(n_domains), int(latent_dim)
        pos = constraints.positive
        self.sizes = {"count_offset": int(n_genes), "protein_offset": int(n_proteins),
                      "morphology_offset": int(n_morphology)}
        self.frequency_log_conc = PyroParam(torch.full((K,), math.log(10.0 * K)))
        self.domain_mean_loc = PyroParam(torch.as_tensor(init_domain_mean, dtype=torch.float32).clone())
        self.domain_mean_scale = PyroParam(torch.full((K, Z), init_scale), pos)
        for name, size in self.sizes.items():
            setattr(self, f"{name}_loc", PyroParam(torch.zeros(int(n_sections), size)))
            setattr(self, f"{name}_scale", PyroParam(torch.full((int(n_sections), size), 0.05), pos))
        start = torch.zeros(int(n_spots), K) if init_logits is None else torch.as_tensor(init_logits, dtype=torch.float32)
        self.logits_loc_stored = PyroParam(start.clone() / LOGIT_SPEED)
        self.logits_weight = nn.Parameter(torch.zeros(int(n_inputs), K))
        self.logits_scale = PyroParam(torch.full((int(n_spots), K), 0.5), pos)
        # encoder
        self.projection = nn.Parameter(torch.as_tensor(init_projection, dtype=torch.float32).clone())
        self.register_buffer("centre", torch.as_tensor(init_centre, dtype=torch.float32).clone())
        D = self.projection.shape[0]
        if D != int(n_inputs):
            raise ValueError(f"init_projection has {D} rows for {n_inputs} encoder inputs.")
        self.hidden_weight = nn.Parameter(torch.randn(D, int(hidden)) / math.sqrt(max(D, 1)))
        self.hidden_bias = nn.Parameter(torch.zeros(int(hidden)))
        self.out_weight = nn.Parameter(torch.zeros(int(hidden), 2 * Z))
        self.out_bias = nn.Parameter(torch.cat([torch.zeros(Z), torch.full((Z,), math.log(math.expm1(init_scale)))]))

    def encode(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(e(x), s(x))``: the posterior mean and scale of ``z`` for inputs ``(m, D)``."""
        x = features - self.centre
        out = F.elu(x @ self.hidden_weight + self.hidden_bias) @ self.out_weight + self.out_bias
        Z = self.projection.shape[1]
        return x @ self.projection + out[..., :Z], F.softplus(out[..., Z:]) + MIN_SCALE

    def forward(self, batch) -> None:
        """Draw every latent of the model for one batch of spots."""
        pyro.sample("domain_frequency", dist.Dirichlet(self.frequency_log_conc.exp()))
        pyro.sample("domain_mean", dist.Normal(self.domain_mean_loc, self.domain_mean_scale).to_event(2))
        with pyro.plate("sections", batch.n_sections, dim=-1):
            for name, size in self.sizes.items():
                if size:
                    loc, scale = getattr(self, f"{name}_loc"), getattr(self, f"{name}_scale")
                    pyro.sample(name, dist.Normal(loc, scale).to_event(1))
        idx = batch.spot_index
        with spot_plate(batch):
            u_loc = LOGIT_SPEED * self.logits_loc_stored[idx] + (batch.features - self.centre) @ self.logits_weight
            pyro.sample("domain_logits", dist.Normal(u_loc, self.logits_scale[idx]).to_event(1))
            loc, scale = self.encode(batch.features)
            pyro.sample("embedding", dist.Normal(loc, scale).to_event(1))
