"""Reference-based cell-type deconvolution of spots, with uncertainty.

The model explains each spot's raw counts as the sum of the expected expression of the cells
of every type it holds, with reference signatures, platform effects, a gene background and
over-dispersion all latent. It is built from the same pieces as every pyrospatial model (a
spot plate scaled for minibatches, a negative-binomial likelihood with per-gene dispersion,
optional spatial smoothness as a ``pyro.factor``) and trained by the same engine
(:func:`pyrospatial.fit`). :func:`pyrospatial.deconvolve` is the user-facing wrapper.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from pyrospatial.engine.batch import spot_plate
from pyrospatial.protocols import ModelContract, ObservedSite

__all__ = ["CellTypeDeconvolutionModel"]


class CellTypeDeconvolutionModel(PyroModule):
    r"""Spots as sums of reference cell types: the generative story.

    Indices: spot ``j``, cell type ``t`` (``T`` types of the labelled reference), gene ``g``.

    1. **Reference signatures.** The expected counts of gene ``g`` in one cell of type ``t``,
       as measured on the reference platform,

       ``s_tg ~ Gamma(shape_tg, rate_tg)``,

       a prior made from the labelled reference (see
       :func:`pyrospatial.methods.deconvolution.signature_prior`): its mean is the per-type mean of the
       reference counts and its variance that mean's squared standard error, so a type with few
       or heterogeneous reference cells has an uncertain signature, which the spots can refine.
    2. **Type frequencies** over the whole tissue, ``rho ~ Dirichlet(1, ..., 1)``, and a
       **concentration** ``a ~ Gamma(k, k / a0)`` saying how evenly a spot mixes types (small
       ``a``: few types per spot), ``k = concentration_shape`` (default 1000: a prior
       coefficient of variation of 3%). The prior is tight on purpose: under a mean-field guide
       the ELBO is biased towards a large ``a`` (the Gamma ``q`` of an absent type cannot follow
       the prior's spike at 0, and a larger ``a`` shrinks that gap), which spreads abundance over
       absent types; with a weak prior (``k = 2``) ``a`` ran to ~6 on osmFISH 50 µm pseudo-spots.
       Even the tight prior moves (``a0 = 0.3`` ends near 2 after the default fit), so read
       ``a0`` as a setting of the fit, chosen as described in :func:`pyrospatial.deconvolve`
       (held-out-gene prediction, no ground truth).
    3. **Cell abundances** (expected number of cells of type ``t`` in spot ``j``),

       ``w_jt ~ Gamma(shape = a * rho_t, rate = a / N_j)``,

       where ``N_j`` is the user's hint of the expected number of cells per spot (like
       cell2location's ``N_cells_per_location``). By the Gamma-Dirichlet construction the
       spot total ``sum_t w_jt`` has mean ``N_j`` and coefficient of variation ``1/sqrt(a)``,
       and the proportions ``w_jt / sum_t w_jt ~ Dirichlet(a * rho)``: a hierarchical prior
       whose shapes ``a * rho_t < 1`` make absent types cheap (sparse spots).

       3'. *Optional* (``total_cv`` given): total and composition apart, so that a sparse
       composition (small ``a``) need not make the spot total vague:
       ``c_j ~ Gamma(1 / cv_j^2, 1 / (cv_j^2 N_j))`` (mean ``N_j``, coefficient of variation
       ``cv_j = total_cv``), ``u_jt ~ Gamma(a * rho_t, 1)``, ``w_jt = c_j u_jt / sum_t u_jt``
       (sites ``total_cells`` and ``composition``; ``abundance`` becomes deterministic).
    4. **Integer cell counts**, the quantity a pseudo-spot truth or a segmentation reports:
       the likelihood below reads ``w_jt`` as the spot's number of cells of type ``t`` (its
       expression is the sum of ``w_jt`` cells'), so the integer count ``n_jt`` is ``w_jt``
       rounded, not a further ``Poisson(w_jt)`` draw, which would sample the cells twice. It is
       drawn after inference, each posterior draw of ``w_jt`` rounded at random (mean kept;
       :func:`pyrospatial.methods.deconvolution.round_at_random`, exported as
       ``cell_count_*``), so its 90% interval can contain 0 and is read against integer truth.
    5. **Gene-specific platform effects** between reference and spots,
       ``m_g ~ Gamma(1 / cv_m^2, 1 / cv_m^2)`` (mean 1, coefficient of variation
       ``platform_cv``).
    6. **Additive gene background** (ambient RNA, free molecules),
       ``b_g ~ Exponential(1 / beta_g)`` with ``beta_g`` = ``background_fraction`` of a cell's
       mean expression of ``g`` over types.
    7. **Per-spot detection efficiency** (capture relative to the other spots),
       ``l_j ~ Gamma(1 / cv_l^2, 1 / cv_l^2)`` (mean 1; ``detection_cv=0`` fixes ``l_j = 1``).
    8. **Optional spatial smoothness** over the spot graph ``E`` (edges between neighbouring
       spots), ``pyro.factor(-lambda / 2 * sum_{(j,k) in E} sum_t (log1p w_jt - log1p w_kt)^2)``
       with ``lambda = smoothness`` (0, the default, turns it off).
    9. **Observed counts.** A spot's count is a sum over its cells, and cells of one type
       differ (size, state): a cell of type ``t`` has, on the reference, an excess variance
       ``v_tg = max(Var_i x_ig - E x_ig, 0)`` over Poisson (``signature_excess_variance``,
       measured on the reference). The sum over ``w_jt`` such cells has mean
       ``sum_t w_jt s_tg`` and excess variance ``sum_t w_jt v_tg``; the spot adds its own
       over-dispersion ``1 / sqrt(phi_g) ~ Exponential(10)`` (platform, segmentation, ...):

       ``mu_jg = l_j * (m_g * sum_t w_jt * s_tg + b_g)``,
       ``e_jg = l_j^2 * m_g^2 * sum_t w_jt * v_tg + mu_jg^2 / phi_g``,
       ``X_jg ~ NegativeBinomial(mean = mu_jg, variance = mu_jg + e_jg)``
       (``GammaPoisson(mu^2 / e, mu / e)``). So a spot of few, homogeneous cells is nearly
       Poisson and one of many heterogeneous cells is wide, as the sum of cells is.

    Deterministic sites: ``proportion`` (``w_jt / sum_t w_jt``) and, when
    ``record_expression`` is set, ``expected_expression`` (``l_j * m_g * w_jt * s_tg``, spots x
    types x genes: the counts of each gene the model attributes to each type in each spot).

    Parameters
    ----------
    signature_shape, signature_rate
        ``(T, G)`` Gamma prior of the signatures (from the reference).
    signature_excess_variance
        ``(T, G)`` per-cell variance over Poisson, ``v_tg`` (from the reference).
    cells_per_spot
        ``N_j``: a scalar or ``(n_spots,)`` tensor, the expected number of cells per spot.
    concentration_mean
        ``a0``, the prior mean of the mixing concentration ``a``.
    platform_cv, detection_cv, background_fraction
        Prior widths of ``m_g`` and ``l_j`` and the background's prior mean (see above).
    smoothness
        ``lambda`` of the spatial smoothness factor (needs ``batch.spot_edge_index``).
    total_cv
        ``None`` (default): story 3; a scalar or ``(n_spots,)`` tensor: story 3'.
    concentration_shape
        Shape of the Gamma prior of ``a`` (its coefficient of variation is
        ``1 / sqrt(concentration_shape)``).
    record_expression
        Record the ``expected_expression`` deterministic site (memory: spots x T x G).
    """

    #: The sites the engine and criticism read (pyrospatial.protocols).
    contract = ModelContract(
        observed=(ObservedSite("counts", "spots", ("spot", "gene")),),
        local={"spots": ("abundance", "total_cells", "composition", "detection")},
        global_sites=("signature", "type_frequency", "concentration", "platform_effect", "background",
                      "inv_sqrt_dispersion"),
        deterministic=("proportion", "expected_expression"),
        dims={"signature": ("type", "gene"), "platform_effect": ("gene",), "background": ("gene",),
              "inv_sqrt_dispersion": ("gene",)},
    )

    def __init__(
        self,
        signature_shape: torch.Tensor,
        signature_rate: torch.Tensor,
        signature_excess_variance: torch.Tensor,
        cells_per_spot: float | torch.Tensor,
        *,
        concentration_mean: float = 1.0,
        concentration_shape: float = 1000.0,
        platform_cv: float = 0.3,
        detection_cv: float = 0.1,
        background_fraction: float = 0.05,
        smoothness: float = 0.0,
        total_cv: float | None = None,
        record_expression: bool = False,
    ) -> None:
        super().__init__()
        shape = torch.as_tensor(signature_shape, dtype=torch.float32)
        rate = torch.as_tensor(signature_rate, dtype=torch.float32)
        self.n_types, self.n_genes = int(shape.shape[0]), int(shape.shape[1])
        self.register_buffer("signature_shape", shape)
        self.register_buffer("signature_rate", rate)
        self.register_buffer(
            "signature_excess_variance", torch.as_tensor(signature_excess_variance, dtype=torch.float32).clamp_min(0)
        )
        self.register_buffer("cells_per_spot", torch.as_tensor(cells_per_spot, dtype=torch.float32).reshape(-1))
        self.register_buffer("background_mean", background_fraction * (shape / rate).mean(0).clamp_min(1e-3))
        self.concentration_mean = float(concentration_mean)
        self.concentration_shape = float(concentration_shape)
        self.platform_cv = float(platform_cv)
        self.detection_cv = float(detection_cv)
        self.smoothness = float(smoothness)
        self.split_total = total_cv is not None
        self.register_buffer(
            "total_cv", torch.as_tensor(1.0 if total_cv is None else total_cv, dtype=torch.float32).reshape(-1)
        )
        self.record_expression = bool(record_expression)

    @staticmethod
    def _per_spot(values: torch.Tensor, batch) -> torch.Tensor:
        return values.expand(batch.n_spots) if values.numel() == 1 else values[batch.spot_index]

    def _spot_hint(self, batch) -> torch.Tensor:
        return self._per_spot(self.cells_per_spot, batch)

    def forward(self, batch) -> None:
        """The generative story above, on one :class:`~pyrospatial.engine.batch.Batch` of spots."""
        T = self.n_types
        one = self.signature_shape.new_ones(())
        # 1. reference signatures, with the reference's own uncertainty
        s = pyro.sample("signature", dist.Gamma(self.signature_shape, self.signature_rate).to_event(2))
        # 2. tissue-wide type frequencies and mixing concentration
        rho = pyro.sample("type_frequency", dist.Dirichlet(one.expand(T)))
        a = pyro.sample("concentration", dist.Gamma(self.concentration_shape * one, self.concentration_shape / self.concentration_mean * one))
        # 5.-6. platform effects and additive background
        cv = self.platform_cv
        m = pyro.sample("platform_effect", dist.Gamma(one / cv**2, one / cv**2).expand([self.n_genes]).to_event(1))
        b = pyro.sample("background", dist.Exponential(1.0 / self.background_mean).to_event(1))
        # 9. (part) per-gene over-dispersion
        r = pyro.sample("inv_sqrt_dispersion", dist.Exponential(10.0 * one).expand([self.n_genes]).to_event(1))

        hint = self._spot_hint(batch)
        with spot_plate(batch):
            # 3. abundances: expected cells of each type in each spot
            if not self.split_total:
                w = pyro.sample(
                    "abundance", dist.Gamma(a * rho, (a / hint).unsqueeze(-1).expand(-1, T)).to_event(1)
                )
                pyro.deterministic("proportion", w / w.sum(-1, keepdim=True).clamp_min(1e-12), event_dim=1)
            else:
                # 3'. total and composition apart: the total's width is the hint's own
                k = 1.0 / self._per_spot(self.total_cv, batch) ** 2
                c = pyro.sample("total_cells", dist.Gamma(k, k / hint))
                u = pyro.sample("composition", dist.Gamma(a * rho, one).expand([batch.n_spots, T]).to_event(1))
                p = u / u.sum(-1, keepdim=True).clamp_min(1e-30)
                pyro.deterministic("proportion", p, event_dim=1)
                w = pyro.deterministic("abundance", c.unsqueeze(-1) * p, event_dim=1)
            # 7. detection efficiency of each spot
            if self.detection_cv > 0:
                k = 1.0 / self.detection_cv**2
                l = pyro.sample("detection", dist.Gamma(k * one, k * one))
            else:
                l = torch.ones(batch.n_spots, device=w.device)
            # 9. the spots' counts
            mu = l.unsqueeze(-1) * (m * (w @ s) + b)
            excess = (l.unsqueeze(-1) * m) ** 2 * (w @ self.signature_excess_variance) + (mu * r) ** 2
            excess = excess.clamp_min(1e-6)
            if self.record_expression:
                pyro.deterministic(
                    "expected_expression",
                    l[:, None, None] * w.unsqueeze(-1) * s * m,
                    event_dim=2,
                )
            pyro.sample(
                "counts",
                dist.GammaPoisson(mu**2 / excess, mu / excess).to_event(1),
                obs=batch.spot_counts,
            )
        # 8. optional spatial smoothness over neighbouring spots inside the batch
        edges = getattr(batch, "spot_edge_index", None)
        if self.smoothness > 0 and edges is not None and edges.numel():
            z = torch.log1p(w)
            diff = z[edges[0]] - z[edges[1]]
            pyro.factor("smoothness", -0.5 * self.smoothness * float(batch.spot_scale) * diff.pow(2).sum())
