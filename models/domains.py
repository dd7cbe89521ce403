"""Spatial domains from several modalities and several sections at once.

:class:`DomainModel` is the generative story (class docstring); its guide is
:class:`pyrospatial.guides.domains.DomainGuide`; the data source
:class:`pyrospatial.data.domain_data.DomainData`; the user API :func:`pyrospatial.domains`.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from pyro.nn import PyroModule
from torch import nn

from pyrospatial.engine.batch import spot_plate
from pyrospatial.protocols import ModelContract, ObservedSite

from .blocks import gamma_likelihood

__all__ = ["CountLikelihood", "DomainModel"]


class DomainModel(PyroModule):
    r"""Domains shared across sections, seen through counts, proteins and morphology.

    Indices: spot (or cell) ``i`` of section ``s(i)``, domain ``k = 1..K``, gene ``g``,
    protein ``p``, morphology feature ``f``; ``z`` has ``Z`` dimensions, ``v`` has ``V``.

    Global latents (one set for all sections, so domain ``k`` means the same in every section
    and labels agree across sections by construction):

    1. domain frequencies ``rho ~ Dirichlet(1, ..., 1)``;
    2. domain centres in the latent space ``mu_k ~ Normal(0, mean_scale^2 I_Z)``;
    3. per-section offsets (plate ``sections``): ``delta^x_s ~ Normal(0, offset_scale^2 I_G)``
       on the count log-rates, ``delta^y_s`` on the protein log-means and ``delta^m_s`` on the
       morphology means (same prior): batch effects of a section, not of a domain.

    Local latents of spot ``i`` (plate ``spots``, scaled for minibatches):

    4. domain logits with a spatial prior: ``u_i ~ Normal(0, logit_scale^2 I_K)`` times the
       graph factor ``exp(-lambda / 2 sum_{(i,j) in E} ||u_i - u_j||^2)`` over the k-nearest
       spot graph ``E`` of each section (``lambda = smoothness``): neighbours have similar
       prior domain probabilities ``pi_i = softmax(log rho + u_i)``; on a spatially compact
       minibatch the batch's edges are scaled by ``spot_scale * edge_scale`` (``edge_scale``:
       half the batch's spots' degrees over its edges), so that the batches of one partition
       add up to every edge once;
    5. domain ``d_i ~ Categorical(pi_i)``;
    6. the hierarchical continuous state (the v -> z prior): ``v_i ~ Normal(0, I_V)``,
       ``z_i | d_i, v_i ~ Normal(mu_{d_i} + W v_i, diag(sigma^2))``.

       ``d_i`` and ``v_i`` are marginalised exactly:
       ``p(z_i | u_i) = sum_k pi_ik Normal(z_i; mu_k, W W^T + diag(sigma^2))`` (a mixture of
       low-rank Gaussians, site ``embedding``), so the ELBO needs no enumeration and
       minibatches like any spot model, and the domain posterior given ``z_i`` and ``u_i`` is
       exact: ``P(d_i = k | z_i, u_i) = pi_ik N_k(z_i) / sum_k' pi_ik' N_k'(z_i)``
       (deterministic site ``domain_prob``).

    Observations, each through a decoder of ``z_i``:

    7. counts (with library size ``l_i = sum_g x_ig``; :class:`CountLikelihood`, whose
       ``lgamma`` terms touch only the non-zero counts):
       ``x_ig ~ NB(mean = l_i softmax_g(b^x + A^T z_i + delta^x_{s(i)}), inverse dispersion theta_g)``;
    8. proteins: ``y_ip ~ Gamma(mean = exp(b^y_p + (B^T z_i)_p + delta^y_{s(i)p}), concentration kappa_p)``;
    9. morphology features (any precomputed, standardised image features or embedding):
       ``m_if ~ StudentT(nu, b^m_f + (C^T z_i)_f + delta^m_{s(i)f}, omega_f)``.

    ``W``, ``sigma``, the decoders ``A, B, C``, their biases and ``theta, kappa, omega`` are
    point estimates (parameters of this module). A modality with zero features is absent.

    Parameters
    ----------
    n_domains, latent_dim, state_dim
        ``K``, ``Z`` and ``V``.
    n_genes, n_proteins, n_morphology, n_sections
        ``G``, ``P``, ``F`` (0 = modality absent) and ``S``.
    smoothness, logit_scale, mean_scale, offset_scale, student_df
        ``lambda``, the prior scales above and ``nu``.
    init_gene_logits, init_morphology_mean, init_protein_log_mean
        Starting biases ``b^x`` (log mean proportions), ``b^m``, ``b^y`` (optional).
    init_state_scale
        Starting ``sigma``.
    """

    contract = ModelContract(
        observed=(ObservedSite("counts", "spots", ("spot", "gene")),
                  ObservedSite("proteins", "spots", ("spot", "protein")),
                  ObservedSite("morphology", "spots", ("spot", "morphology_feature"))),
        local={"spots": ("domain_logits", "embedding")},
        global_sites=("domain_frequency", "domain_mean", "count_offset", "protein_offset", "morphology_offset"),
        deterministic=("domain_prob",),
        graph_sites=("domain_logits",),
        dims={"domain_frequency": ("domain",), "domain_mean": ("domain", "latent"),
              "count_offset": ("section", "gene"), "protein_offset": ("section", "protein"),
              "morphology_offset": ("section", "morphology_feature"),
              "domain_logits": ("domain",), "embedding": ("latent",), "domain_prob": ("domain",)},
    )

    def __init__(
        self,
        n_domains: int,
        latent_dim: int,
        state_dim: int,
        n_genes: int,
        n_proteins: int,
        n_morphology: int,
        n_sections: int,
        *,
        smoothness: float = 1.0,
        logit_scale: float = 5.0,
        mean_scale: float = 3.0,
        offset_scale: float = 0.3,
        student_df: float = 5.0,
        init_gene_logits: torch.Tensor | None = None,
        init_morphology_mean: torch.Tensor | None = None,
        init_protein_log_mean: torch.Tensor | None = None,
        init_state_scale: float = 0.5,
    ) -> None:
        super().__init__()
        self.n_domains, self.latent_dim, self.state_dim = int(n_domains), int(latent_dim), int(state_dim)
        self.n_genes, self.n_proteins, self.n_morphology = int(n_genes), int(n_proteins), int(n_morphology)
        self.n_sections = int(n_sections)
        self.smoothness, self.logit_scale = float(smoothness), float(logit_scale)
        self.mean_scale, self.offset_scale, self.student_df = float(mean_scale), float(offset_scale), float(student_df)
        Z, G, P, Fm = self.latent_dim, self.n_genes, self.n_proteins, self.n_morphology
        self.state_loading = nn.Parameter(0.1 * torch.randn(Z, self.state_dim))  # W
        self.state_scale_raw = nn.Parameter(torch.full((Z,), _inverse_softplus(init_state_scale)))  # sigma
        self.count_decoder = nn.Parameter(torch.zeros(Z, G))  # A
        self.count_bias = nn.Parameter(_start(init_gene_logits, G, -math.log(max(G, 1))))  # b^x
        self.count_log_theta = nn.Parameter(torch.full((G,), math.log(5.0)))  # log theta
        self.protein_decoder = nn.Parameter(torch.zeros(Z, P))  # B
        self.protein_bias = nn.Parameter(_start(init_protein_log_mean, P, 0.0))  # b^y
        self.protein_log_concentration = nn.Parameter(torch.full((P,), math.log(5.0)))  # log kappa
        self.morphology_decoder = nn.Parameter(torch.zeros(Z, Fm))  # C
        self.morphology_bias = nn.Parameter(_start(init_morphology_mean, Fm, 0.0))  # b^m
        self.morphology_log_scale = nn.Parameter(torch.zeros(Fm))  # log omega

    # ------------------------------------------------------------------ pieces of the story
    def state_scale(self) -> torch.Tensor:
        """``sigma`` (positive)."""
        return F.softplus(self.state_scale_raw) + 1e-3

    def components(self, mu: torch.Tensor) -> dist.LowRankMultivariateNormal:
        """``Normal(mu_k, W W^T + diag(sigma^2))`` for every domain: batch ``(..., K)``, event ``(Z,)``."""
        return dist.LowRankMultivariateNormal(mu, self.state_loading, self.state_scale() ** 2)

    def forward(self, batch) -> None:
        """The generative story above on one :class:`~pyrospatial.data.domain_data.DomainBatch`."""
        K, Z, S = self.n_domains, self.latent_dim, batch.n_sections
        one = self.state_loading.new_ones(())
        # 1.-2. domain frequencies and centres, shared by every section
        rho = pyro.sample("domain_frequency", dist.Dirichlet(one.expand(K)))
        mu = pyro.sample("domain_mean", dist.Normal(0.0 * one, self.mean_scale * one).expand([K, Z]).to_event(2))
        # 3. per-section offsets of each modality
        offsets = {}
        with pyro.plate("sections", S, dim=-1):
            for name, size in (("count_offset", self.n_genes), ("protein_offset", self.n_proteins),
                               ("morphology_offset", self.n_morphology)):
                if size:
                    prior = dist.Normal(0.0 * one, self.offset_scale * one).expand([size]).to_event(1)
                    offsets[name] = pyro.sample(name, prior)
        section = batch.section
        with spot_plate(batch):
            # 4. domain logits, smoothed over the spot graph below
            u = pyro.sample("domain_logits", dist.Normal(0.0 * one, self.logit_scale * one).expand([K]).to_event(1))
            log_pi = torch.log_softmax(rho.clamp_min(1e-12).log() + u, dim=-1)
            # 5.-6. domain and within-domain state, both marginalised: a mixture over domains
            m = batch.n_spots
            comps = self.components(mu.expand((m, K, Z)))
            z = pyro.sample("embedding", dist.MixtureSameFamily(dist.Categorical(logits=log_pi), comps))
            # exact domain posterior given z and u
            joint = log_pi + comps.log_prob(z.unsqueeze(-2))
            pyro.deterministic("domain_prob", torch.softmax(joint, dim=-1), event_dim=1)
            # 7. counts
            if self.n_genes:
                logits = self.count_bias + z @ self.count_decoder + offsets["count_offset"][section]
                log_mean = batch.library.clamp_min(1e-8).log().unsqueeze(-1) + torch.log_softmax(logits, dim=-1)
                pyro.sample("counts", CountLikelihood(log_mean, self.count_log_theta.exp(), nonzero=_nonzero(batch)),
                            obs=batch.counts)
            # 8. proteins
            if self.n_proteins:
                log_mean = self.protein_bias + z @ self.protein_decoder + offsets["protein_offset"][section]
                pyro.sample("proteins", gamma_likelihood(log_mean.clamp(max=30.0).exp(),
                                                         self.protein_log_concentration.exp()), obs=batch.proteins)
            # 9. morphology
            if self.n_morphology:
                loc = self.morphology_bias + z @ self.morphology_decoder + offsets["morphology_offset"][section]
                scale = self.morphology_log_scale.exp().expand_as(loc)
                pyro.sample("morphology", dist.StudentT(self.student_df * one, loc, scale).to_event(1),
                            obs=batch.morphology)
        # 4. (graph factor) neighbours' logits pulled together, scaled like the spots plate; in a
        # minibatch the batch's edges also stand for the edges cut off at its border
        # (``batch.edge_scale``, 1 for the full batch)
        edges = batch.edge_index
        if self.smoothness > 0 and edges.numel():
            diff = u[..., edges[0], :] - u[..., edges[1], :]
            scale = float(batch.spot_scale) * float(getattr(batch, "edge_scale", 1.0))
            pyro.factor("domain_smoothness", -0.5 * self.smoothness * scale * diff.pow(2).sum((-1, -2)))


class CountLikelihood(dist.TorchDistribution):
    r"""``NB(mean = exp(log_mean), inverse dispersion theta)`` over the genes of each spot (event
    dim 1), the same law as :func:`pyrospatial.models.blocks.negative_binomial`, with a log
    density that touches the dense ``(spots, genes)`` array only through ``x log mu`` and
    ``(x + theta) log(theta + mu)``; the ``lgamma`` terms are evaluated on the non-zero counts
    only (DLPFC: 19% of entries), which is most of the fit's time otherwise:

    ``log p(x) = sum_g [lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)]_{x > 0}
    + theta log theta + x log mu - (x + theta) log(theta + mu)``.
    """

    arg_constraints = {}
    support = constraints.independent(constraints.nonnegative_integer, 1)

    def __init__(self, log_mean: torch.Tensor, theta: torch.Tensor, validate_args=None, *, nonzero=None) -> None:
        self.log_mean, self.theta, self.nonzero = log_mean, theta, nonzero
        super().__init__(log_mean.shape[:-1], log_mean.shape[-1:], validate_args=False)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape) + self.event_shape
        return CountLikelihood(self.log_mean.expand(shape), self.theta, nonzero=self.nonzero)

    @property
    def mean(self) -> torch.Tensor:
        return self.log_mean.exp()

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        mu = self.log_mean.exp().clamp_min(1e-8)
        theta = self.theta.expand_as(mu)
        return dist.GammaPoisson(theta, theta / mu).sample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """``nonzero = (rows, cols, values, log_factorial)`` of ``value`` when it is the batch's
        ``(m, G)`` count matrix (see :class:`~pyrospatial.data.domain_data.DomainBatch`); else
        the non-zero entries are found here."""
        theta = self.theta.expand(value.shape[-1])
        log_mean = self.log_mean
        if self.nonzero is not None and value.dim() == 2:
            rows, cols, x, log_factorial = self.nonzero
        else:
            shape = torch.broadcast_shapes(value.shape, log_mean.shape)
            log_mean = log_mean.expand(shape).reshape(-1, shape[-1])
            flat = value.expand(shape).reshape(-1, shape[-1])
            rows, cols = flat.nonzero(as_tuple=True)
            x = flat[rows, cols]
            log_factorial = torch.zeros(flat.shape[0], dtype=x.dtype, device=x.device).index_add_(
                0, rows, torch.lgamma(x + 1.0))
            out = self._log_prob(log_mean, theta, rows, cols, x, log_factorial)
            return out.reshape(shape[:-1])
        return self._log_prob(log_mean, theta, rows, cols, x, log_factorial)

    @staticmethod
    def _log_prob(log_mean, theta, rows, cols, x, log_factorial):
        log_c = torch.log(theta + log_mean.exp() + 1e-8)  # log(theta + mu): the only dense terms
        out = (theta * theta.log()).sum() - (theta * log_c).sum(-1) - log_factorial
        th = theta[cols]
        terms = torch.lgamma(x + th) - torch.lgamma(th) + x * (log_mean[..., rows, cols] - log_c[..., rows, cols])
        return out.index_add(-1, rows, terms)


def _nonzero(batch):
    rows = getattr(batch, "count_rows", None)
    if rows is None:
        return None
    return rows, batch.count_cols, batch.count_values, batch.count_log_factorial


def _inverse_softplus(value: float) -> float:
    return math.log(math.expm1(max(float(value) - 1e-3, 1e-4)))


def _start(value: torch.Tensor | None, size: int, default: float) -> torch.Tensor:
    if value is None:
        return torch.full((size,), float(default))
    out = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
    if out.numel() != size:
        raise ValueError(f"starting value has {out.numel()} entries, expected {size}.")
    return out.clone()
