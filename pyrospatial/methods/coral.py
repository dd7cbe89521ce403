"""CORAL on AnnData: deconvolve spots into single cells, with uncertainty on every quantity.

The maths lives in :class:`pyrospatial.models.CoralModel` and
:class:`pyrospatial.guides.CoralGuide`; this module is the user API around them (in the
spirit of scvi-tools' model classes): build the dataset, train with the shared engine, draw
coherent posterior samples, and export every result with its spread into AnnData.

Result keys (written by :meth:`CORAL.export`)
---------------------------------------------
``cells`` AnnData returned (obs = cells, var = the spots' genes; the input cells AnnData,
whose variables are proteins, is left untouched):

- ``X``: posterior mean of the per-cell expected RNA ``E[x_ig | z_i, s_i] = rho_ig``;
- ``layers["expected_rna_{mean,sd,q05,q50,q95}"]``: its posterior summaries;
- ``layers["counts_{mean,sd,q05,q50,q95}"]``: spot-consistent per-cell counts
  (:meth:`CORAL.split_spot_counts`: each draw's cell counts add up exactly to the observed
  spot counts); NaN for cells outside every spot (no counts to split; their number is
  ``uns["pyrospatial"]["n_cells_outside_spots"]``; their ``expected_rna`` is still estimated);
- ``obsm["z_{stat}"]``, ``obsm["v_{stat}"]`` / ``obs["v_{stat}"]`` (1-D v), ``obs["cell_size_{stat}"]``;
- ``obs["domain"]`` (categorical), ``obs["domain_confidence"]`` (co-clustering across posterior
  draws), only with ``n_domains``; input columns of these names become ``obs["input_domain"]``
  / ``obs["input_domain_confidence"]`` (with a warning), never passed off as this fit's;
- scverse keys: ``uns["spatial"]`` (scanpy's layout: the spots' library and image when they
  have one, else one without image, ``spot_diameter_fullres`` in the units of
  ``obsm["spatial"]``), the cell graph as ``obsp["spatial_connectivities"]`` /
  ``obsp["spatial_distances"]`` with squidpy's ``uns["spatial_neighbors"]``; the spots output
  keeps or gets ``uns["spatial"]`` too;
- ``obsp["edge_prob_mean"]``, ``obsp["edge_prob_sd"]``: per-edge probabilities of the cell
  graph (sparse, symmetric); ``obsp["attention"]``: the guide's GAT attention per edge (mean
  over heads; an encoder quantity, not a posterior one);
- ``obsm["spatial"]``, ``obsm["proteins"]`` (the input features), ``obs`` columns of the input;
- ``uns["pyrospatial"]``: ``settings``, ``versions``, ``globals`` (for every global latent in
  the posterior draws, e.g. the RNA read-out ``rna_weight``: ``mean``, ``sd``, ``q05``,
  ``q50``, ``q95`` arrays), ``n_cells_outside_spots``, and
  ``"interactions"``: cell-type x cell-type interaction matrix ``mean``, ``sd``, ``q05``,
  ``q50``, ``q95``, ``n_edges`` and ``cell_types``.

``spots`` AnnData returned (the spots kept by the dataset): the input plus
``layers["expected_counts_{mean,sd,q05,q50,q95}"]`` (the model's spot means ``sum_i rho_i``)
and ``obs["n_cells"]``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyro
import scipy.sparse as sp
import torch
from anndata import AnnData

from pyrospatial.methods.analysis import CountSplit, interaction_matrix, spatial_domains, split_spot_counts, summarise_draws
from pyrospatial.data.dataset import SpatialDataset
from pyrospatial.criticism.convergence import chain_convergence, warn_unconverged
from pyrospatial.errors import InputError
from pyrospatial.engine.batch import Batch
from pyrospatial.engine.device import module_device
from pyrospatial.engine.replay import latent_site_plates, replay_site
from pyrospatial.engine.infer import FitResult, SVIModule, fit, load_checkpoint
from pyrospatial.engine.export import add_spatial_graph, add_spatial_uns
from pyrospatial.engine.export import export as export_summaries
from pyrospatial.engine.memory import release_free_memory
from pyrospatial.engine.posterior import sample_posterior
from pyrospatial.engine.summary import summarise
from pyrospatial.criticism.recalibration import INTERACTION_RECALIBRATION, widen
from pyrospatial.methods.edge_decoder_posterior import EdgeDecoderDraws, coral_edge_decoder_posterior, edge_probabilities

__all__ = ["LOCAL_SITES", "EDGE_DECODER_SITES", "CoralPosterior", "CORAL"]

LOCAL_SITES = ("z", "v", "cell_size", "expected_rna")
#: posteriors drawn by MCMC chains (``CoralPosterior.method``): R-hat and ESS apply
MCMC_METHODS = ("local", "hmc", "refine")
#: default ``max_draws_mb`` of :meth:`CORAL.sample`: larger ``expected_rna`` draws are recomputed, not kept
DRAWS_MB = 1024.0
#: the edge decoder's latents, drawn too when the model has ``bayesian_edge_decoder``
EDGE_DECODER_SITES = ("edge_weight", "edge_bias")


@dataclass
class CoralPosterior:
    """Posterior draws of CORAL's per-cell quantities (leading axis = draw).

    ``samples``: site -> (S, N, ...) arrays for ``z``, ``v``, ``cell_size``, ``expected_rna``
    (and (S, ...) ``edge_weight``, ``edge_bias`` with a Bayesian edge decoder);
    ``edge_prob``: (S, E) per-edge probabilities for the dataset's graph edges
    (``dataset.edges``), computed from the same draws of z (and of the decoder).
    """

    samples: dict[str, np.ndarray]
    edge_prob: np.ndarray
    plates: dict[str, str]
    method: str = "guide"
    diagnostics: dict[str, Any] = field(default_factory=dict)
    #: deterministic sites not held in ``samples`` (too large: ``max_draws_mb``) but recomputed
    #: from the latents' draws chunk by chunk (:meth:`CORAL.draw_chunks`, :meth:`CORAL.site_draws`)
    replayed: tuple[str, ...] = ()
    #: the seed ``CORAL.sample`` was given (it also seeds the edge decoder's posterior)
    seed: int = 0
    #: draws of the edge decoder given the graph, for a posterior that leaves the graph out
    #: (made by :meth:`CORAL.interactions` on first use)
    edge_decoder: EdgeDecoderDraws | None = None

    @property
    def num_samples(self) -> int:
        return int(self.samples["z"].shape[0])


class CORAL:
    """CORAL: spots (RNA counts) + single cells (proteins) + the cell graph, one Pyro model.

    Parameters
    ----------
    cells, spots
        AnnData inputs (see :meth:`pyrospatial.SpatialDataset.from_anndata`).
    cell_type_key, spot_diameter, assignment, k, protein_layer, spot_layer
        Passed to :meth:`~pyrospatial.SpatialDataset.from_anndata`.
    dataset
        A prebuilt :class:`~pyrospatial.SpatialDataset` (then the AnnData keys are not read
        again), e.g. with held-out edges.
    model_kwargs, guide_kwargs
        Passed to :meth:`CoralModel.from_dataset` (fields of the shared
        :class:`~pyrospatial.models.CoralConfig`, or a variant's own options) /
        :meth:`CoralGuide.from_dataset` (the guide's own options, e.g. ``hidden``, ``heads``;
        the guide reads everything it shares with the model from ``model.config``).
    model_cls, guide_cls
        A custom variant (e.g. a subclass of :class:`~pyrospatial.models.CoralModel` that
        swaps one block); it must keep the sites ``z``, ``v``, ``cell_size``,
        ``expected_rna`` and :meth:`~pyrospatial.models.CoralModel.edge_probability`.
    check_geometry
        Check that cells and spots share units and that the assignment suits the spot layout
        (:mod:`pyrospatial.data.geometry_checks`); ``False`` only for the rare real case the
        checks misjudge.
    seed
        Seeds the networks' initial weights (``train`` and ``sample`` take their own seeds):
        the same inputs, settings and seeds give the same result in any process on CPU.

    Examples
    --------
    >>> coral = CORAL(cells, spots, cell_type_key="cell_type", spot_diameter=55.0)  # doctest: +SKIP
    >>> coral.train(max_epochs=200, batch_size=32)                                  # doctest: +SKIP
    >>> cells_rna, spots_out = coral.export(num_samples=100)                        # doctest: +SKIP
    """

    def __init__(
        self,
        cells: AnnData,
        spots: AnnData | None,
        *,
        cell_type_key: str = "cell_type",
        spot_diameter: float | None = None,
        assignment: Literal["radius", "nearest"] = "radius",
        k: int = 6,
        protein_layer: str | None = None,
        spot_layer: str | None = None,
        dataset: SpatialDataset | None = None,
        model_kwargs: dict[str, Any] | None = None,
        guide_kwargs: dict[str, Any] | None = None,
        model_cls: type | None = None,
        guide_cls: type | None = None,
        seed: int = 0,
        check_geometry: bool = True,
    ) -> None:
        from pyrospatial.guides import CoralGuide
        from pyrospatial.models import CoralModel

        model_cls = model_cls or CoralModel
        guide_cls = guide_cls or CoralGuide

        self.cells, self.spots = cells, spots
        self.dataset = dataset or SpatialDataset.from_anndata(
            cells, spots, cell_type_key=cell_type_key, spot_diameter=spot_diameter,
            assignment=assignment, k=k, protein_layer=protein_layer, spot_layer=spot_layer,
            check_geometry=check_geometry,
        )
        self.model_kwargs = dict(model_kwargs or {})
        self.guide_kwargs = dict(guide_kwargs or {})
        # the networks' initial weights come from torch's global generator: seed it, so that
        # one seed gives one result in any process
        pyro.set_rng_seed(seed)
        self.model = model_cls.from_dataset(self.dataset, **self.model_kwargs)
        self.guide = guide_cls.from_dataset(self.dataset, model=self.model, **self.guide_kwargs)
        self.fit_result: FitResult | None = None
        self.posterior: CoralPosterior | None = None
        #: True once :meth:`sample` has re-estimated the variance-type globals by Monte Carlo EM
        self.refined = False
        #: megabytes of draws per chunk when per-cell draws are summarised, split or recomputed
        #: chunk by chunk (:meth:`draw_chunks`): bounds the memory of exports on large tissues
        self.chunk_mb = 256.0

    # ------------------------------------------------------------------------------------
    def train(
        self,
        *,
        max_epochs: int | None = 200,
        max_steps: int | None = None,
        batch_size: int | None = None,
        lr: float = 1e-2,
        device: str = "auto",
        seed: int = 0,
        progress: bool = True,
        **fit_kwargs: Any,
    ) -> FitResult:
        """Fit by SVI with :func:`pyrospatial.fit` (any of its options pass through)."""
        self.fit_result = fit(
            self.model, self.guide, self.dataset, max_epochs=max_epochs, max_steps=max_steps,
            batch_size=batch_size, lr=lr, device=device, seed=seed, progress=progress, **fit_kwargs,
        )
        self.posterior = None
        self.refined = False
        return self.fit_result

    def save(self, path: str) -> None:
        """Save model and guide parameters (tensors only; load with :meth:`load`)."""
        state = {"state_dict": SVIModule(self.model, self.guide).state_dict(), "refined": bool(self.refined)}
        torch.save(state, path)

    def load(self, path: str) -> "CORAL":
        """Load parameters saved by :meth:`save` or a :func:`~pyrospatial.fit` checkpoint
        (read with ``weights_only=True``)."""
        load_checkpoint(self.model, self.guide, self.dataset, path)
        self.refined = bool(torch.load(path, map_location="cpu", weights_only=True).get("refined", False))
        self.posterior = None
        return self

    def to_inference_data(self, *, path: str | None = None, seed: int = 0, mixed: bool = True,
                          full_netcdf: bool = False):
        """``arviz.InferenceData`` of the posterior drawn by :meth:`sample`, with posterior
        predictive replicates, observed data and the ELBO history
        (:func:`pyrospatial.criticism.arviz.to_inference_data`; written to ``path`` as compressed
        netCDF holding what ``pyrospatial check`` reads, or everything with ``full_netcdf=True``).

        ``mixed=True`` replicates the observations whose likelihood depends on ``z`` with ``z``
        redrawn from its prior given the other draws ("mixed" replication): a cell's own
        posterior state was fitted to its observations, so plain posterior replicates are pulled
        towards the data and hide misfit. The read-out ``rna_weight`` may be absent from the
        draws (they hold ``expected_rna``, through which alone the model uses it); it is then
        drawn from its prior and does not enter the replicates.
        """
        from pyrospatial.criticism.arviz import to_inference_data
        from pyrospatial.engine.posterior import PosteriorSamples

        post = self._require_posterior()
        samples = PosteriorSamples(post.samples, plates=post.plates)
        return to_inference_data(self, self.dataset, samples, method=post.method, seed=seed,
                                 prior_sites=("rna_weight",), mixed_sites=("z",) if mixed else (), path=path,
                                 full_netcdf=full_netcdf)

    # ------------------------------------------------------------------------------------
    def sample(
        self,
        num_samples: int = 100,
        *,
        seed: int = 0,
        method: Literal["local", "hmc", "refine", "guide"] = "local",
        chunk_size: int | None = None,
        max_draws_mb: float | None = DRAWS_MB,
        progress: bool = False,
        **refine_kwargs: Any,
    ) -> CoralPosterior:
        """Coherent joint posterior draws of z, v, s and rho, and per-edge probabilities.

        ``method="local"`` (default, calibrated, cost linear in cells): HMC per spot from the
        trained guide, every spot at once with its own step size, the global latents sampled in
        turn, with Monte Carlo EM of the variance-type global parameters in the first
        ``sample()`` after a fit (later calls keep its estimates and run no EM)
        (:func:`pyrospatial.engine.local.local_posterior`; ``refine_kwargs`` pass through, e.g.
        ``num_chains``, ``num_warmup``, ``max_cells_per_chunk``, and ``checkpoint``/``resume``: a
        file the sampler's state is written to, from which a killed run continues). ``"hmc"`` (``"refine"`` is
        its former name): one HMC over every latent of the tissue, globals included, for
        audits (:func:`pyrospatial.engine.refine.refine_posterior`; e.g. ``graph=True``).
        ``"guide"``: draws of the amortised mean-field guide (fast; its per-cell RNA intervals
        are too narrow).

        ``graph=True`` (implies ``method="hmc"``) also conditions the posterior on the cell graph (and
        re-estimates a point edge decoder by EM; samples a Bayesian one): it costs
        ``num_chains x n_cells^2`` per leapfrog step while all non-adjacent pairs are
        evaluated (``max_nonedges``). Convergence (split-R-hat, bulk ESS) is checked after
        every MCMC run; a warning names the sites that fail.

        ``max_draws_mb``: when the draws of ``expected_rna`` (``num_samples x cells x genes``
        float32) would take more than this, they are not kept: every latent site's draws are,
        and ``expected_rna`` is recomputed from them a chunk of spots at a time wherever it is
        used (:meth:`draw_chunks`; exports, count splits, summaries), so memory stays bounded
        on large tissues. ``None``: always keep them.
        """
        sites = list(LOCAL_SITES) + (list(EDGE_DECODER_SITES) if self.model.bayesian_edge_decoder else [])
        if getattr(self.model, "bayesian_decoder", False):
            sites.append("rna_weight")  # the global read-out: summarised in uns["pyrospatial"]["globals"]
        replayed: tuple[str, ...] = ()
        draws_mb = 4.0 * num_samples * self.dataset.n_cells * self.dataset.n_genes / 2**20
        if max_draws_mb is not None and draws_mb > float(max_draws_mb):
            latent = latent_site_plates(self.model, next(self.dataset.chunks(1)))
            replayed = ("expected_rna",)
            sites = [s for s in sites if s not in replayed] + [s for s in latent if s not in sites]
        if method == "local" and refine_kwargs.get("graph"):
            method = "hmc"  # the graph couples every cell: no per-spot blocks
        if method in ("local", "hmc", "refine"):
            if self.refined:  # Monte Carlo EM ran once after training: later draws keep its estimates
                refine_kwargs.setdefault("em_params", ())
            if method == "local":
                from pyrospatial.engine.local import local_posterior as sampler
            else:
                from pyrospatial.engine.refine import refine_posterior as sampler
            draws = sampler(
                self.model, self.guide, self.dataset, num_samples, sites=sites,
                seed=seed, progress=progress, **refine_kwargs,
            )
            self.refined = self.refined or refine_kwargs.get("em_params", None) != ()
            warn_unconverged(draws.diagnostics, context=f"CORAL.sample(method={method!r})")
        elif method == "guide":
            draws = sample_posterior(
                self.model, self.guide, self.dataset, num_samples, sites=sites,
                chunk_size=chunk_size, seed=seed,
            )
        else:
            raise ValueError(f"method must be 'local', 'hmc' (or 'refine') or 'guide', got {method!r}")
        edge_prob = self._edge_probabilities(dict(draws), self.dataset.edges)
        self.posterior = CoralPosterior(
            samples=dict(draws), edge_prob=edge_prob, plates=dict(draws.plates), method=method,
            diagnostics=dict(getattr(draws, "diagnostics", {}) or {}), replayed=replayed, seed=int(seed),
        )
        return self.posterior

    def draw_chunks(self, name: str = "expected_rna", *, max_mb: float | None = None) -> Iterator[tuple[Batch, np.ndarray]]:
        """``(batch, draws)`` for spot-complete chunks of the tissue covering every cell once:
        ``draws`` are the ``(S, batch.n_cells, ...)`` posterior draws of the cells-plate site
        ``name`` for the batch's cells (``batch.cell_index``), sliced from the kept draws or
        recomputed from the latents' draws when the posterior did not keep them
        (:attr:`CoralPosterior.replayed`). Chunks hold about ``max_mb`` (default
        :attr:`chunk_mb`) of draws each."""
        posterior = self._require_posterior()
        max_mb = self.chunk_mb if max_mb is None else float(max_mb)
        S = posterior.num_samples
        width = self.dataset.n_genes if name in posterior.replayed else int(np.prod(posterior.samples[name].shape[2:]))
        max_cells = max(1.0, max_mb * 2**20 / (4.0 * S * max(width, 1)))
        cells_per_unit = self.dataset.n_cells / max(self.dataset.n_units, 1)
        for batch in self.dataset.chunks(max(1, int(max_cells / cells_per_unit))):
            if name in posterior.replayed:
                yield batch, replay_site(self.model, batch, posterior.samples, name)
            else:
                yield batch, posterior.samples[name][:, batch.cell_index.numpy()]

    def site_draws(self, name: str, cells: np.ndarray | None = None) -> np.ndarray:
        """``(S, n, ...)`` posterior draws of the cells-plate site ``name`` for ``cells`` (indices;
        default all), recomputed chunk by chunk when the posterior did not keep them."""
        posterior = self._require_posterior()
        if name not in posterior.replayed:
            draws = posterior.samples[name]
            return draws if cells is None else draws[:, np.asarray(cells)]
        rows = np.arange(self.dataset.n_cells) if cells is None else np.asarray(cells)
        position = np.full(self.dataset.n_cells, -1, dtype=np.int64)
        position[rows] = np.arange(rows.size)
        out: np.ndarray | None = None
        for batch, draws in self.draw_chunks(name):
            where = position[batch.cell_index.numpy()]
            if out is None:
                out = np.empty((draws.shape[0], rows.size) + draws.shape[2:], dtype=draws.dtype)
            out[:, where[where >= 0]] = draws[:, where >= 0]
        return out

    @torch.no_grad()
    def _edge_probabilities(self, samples: dict[str, np.ndarray], pairs: np.ndarray, chunk: int = 16) -> np.ndarray:
        """The model's :meth:`~pyrospatial.models.CoralModel.edge_probability` for every draw and
        pair (chunked over draws), with each draw's own decoder when it is Bayesian."""
        device = module_device(self.model)
        pairs_t = torch.as_tensor(pairs, device=device)
        z_draws = samples["z"]
        sites = EDGE_DECODER_SITES if self.model.bayesian_edge_decoder else ()
        out = []
        for lo in range(0, z_draws.shape[0], chunk):
            z = torch.as_tensor(z_draws[lo : lo + chunk], device=device, dtype=torch.float32)
            decoder = {site: torch.as_tensor(samples[site][lo : lo + chunk], device=device, dtype=torch.float32)
                       for site in sites}
            out.append(self.model.edge_probability(z, pairs_t, **decoder).cpu().numpy())
        return np.concatenate(out, axis=0)

    def edge_probabilities(self, pairs: np.ndarray) -> np.ndarray:
        """(S, K) posterior draws of the edge probability of arbitrary cell pairs (2, K)."""
        posterior = self._require_posterior()
        return self._edge_probabilities(posterior.samples, np.asarray(pairs))

    def _require_posterior(self) -> CoralPosterior:
        if self.posterior is None:
            self.sample()
        return self.posterior

    # ------------------------------------------------------------------------------------
    def split_spot_counts(
        self, *, method: Literal["multinomial", "dirichlet_multinomial"] = "dirichlet_multinomial",
        seed: int = 0, keep_draws: bool = False,
    ) -> CountSplit:
        """Per-cell counts that split each spot's observed counts among its cells under the
        posterior draws of their expected expression (see
        :func:`pyrospatial.methods.analysis.split_spot_counts`); every draw adds up exactly. With the
        model's default ``spot_dispersion="sum"``, ``theta_g`` is each cell's inverse dispersion
        (``dispersion="cell"``); with ``"spot"`` it is the spot's."""
        return self._per_chunk(count_method=method, seed=seed, keep_draws=keep_draws, summaries=False)[0]

    def _per_chunk(self, *, count_method: str, seed: int, keep_draws: bool = False, summaries: bool = True,
                   ) -> tuple[CountSplit, dict[str, np.ndarray], dict[str, np.ndarray]]:
        """One pass over spot-complete chunks (:meth:`draw_chunks`) computing what needs the
        draws of ``expected_rna``: the count split (:meth:`split_spot_counts`) and, with
        ``summaries``, the summaries of ``expected_rna`` per cell and of its sum over each
        spot's cells (the spot's expected counts). A chunk's split needs only its own spots'
        cells; one chunk, on a small tissue, draws exactly as one call on the whole tissue."""
        ds = self.dataset
        theta = self.model.rna_inverse_dispersion.detach().cpu().numpy()
        dispersion = "cell" if getattr(self.model, "spot_dispersion", "spot") == "sum" else "spot"
        split = {stat: np.full((ds.n_cells, ds.n_genes), np.nan, dtype=np.float32)
                 for stat in ("mean", "sd", "q05", "q50", "q95")}
        cell_stats: dict[str, np.ndarray] = {}
        spot_stats: dict[str, np.ndarray] = {}
        kept = None
        max_error = 0.0

        def fill(store: dict[str, np.ndarray], rows: np.ndarray, total: int, stats: dict[str, np.ndarray]) -> None:
            for stat, value in stats.items():
                if stat not in store:
                    store[stat] = np.zeros((total,) + value.shape[1:], dtype=np.float32)
                store[stat][rows] = value

        # no enumerate: it keeps the last (batch, draws) pair until the next one is made, so two
        # chunks' draws (256 MB each by default) would be held at once
        index = -1
        for batch, rates in self.draw_chunks("expected_rna"):
            index += 1
            cells = batch.cell_index.numpy()
            chunk_seed = seed if index == 0 else int(np.random.SeedSequence((seed, index)).generate_state(1)[0])
            part = split_spot_counts(
                batch.spot_counts.numpy(), batch.cell_spot.numpy(), rates, method=count_method,
                inverse_dispersion=theta, seed=chunk_seed, keep_draws=keep_draws, dispersion=dispersion,
            )
            for stat, values in split.items():
                values[cells] = getattr(part, stat)
            max_error = max(max_error, part.max_abs_spot_error)
            if keep_draws:
                kept = np.zeros((rates.shape[0], ds.n_cells, ds.n_genes), dtype=np.int64) if kept is None else kept
                kept[:, cells] = part.draws
            if summaries:
                fill(cell_stats, cells, ds.n_cells, summarise({"x": rates})["x"])
                fill(spot_stats, batch.spot_index.numpy(), ds.n_spots, self._spot_sums(batch, rates))
            del rates, part  # freed before the next chunk's draws are made, not once they replace these
            release_free_memory(collect=False)  # the chunk's temporaries would stay resident in a fragmented heap
        return CountSplit(max_abs_spot_error=max_error, draws=kept, **split), cell_stats, spot_stats

    def deconvolve_counts(self, **kwargs: Any) -> CountSplit:
        """Deprecated name of :meth:`split_spot_counts` (same keywords); warns with a
        ``DeprecationWarning``."""
        warnings.warn("CORAL.deconvolve_counts is deprecated: call CORAL.split_spot_counts (same keywords).",
                      DeprecationWarning, stacklevel=2)
        return self.split_spot_counts(**kwargs)

    def interactions(self, *, recalibrate: bool | None = None) -> dict[str, Any]:
        """Cell-type x cell-type interaction matrix (mean, sd, q05, q50, q95 over draws).

        Entry ``(a, b)`` is the mean edge probability over the graph's a-b edges
        (:func:`~pyrospatial.methods.analysis.interaction_matrix`). Its draws depend on which
        posterior was drawn:

        - a posterior that leaves the graph out (the default ``sample()``, and ``"guide"``): the
          edge decoder is drawn from its posterior given the graph and the states' posterior
          mean, with every edge and sampled non-edges weighted as in training (cost linear in
          cells; :mod:`pyrospatial.methods.edge_decoder_posterior`), and the entries are read at
          the states' posterior mean. 90% intervals covered 0.80 and 0.83 of the entries on the
          scored simulations (``benchmarks/results/interaction_calibration.md``, seeds 0-4;
          ``interaction_calibration_seeds5to14.md``) and 0.92 on those held apart to choose the
          method (``benchmarks/results/interaction_decoder_choice.md``).
        - ``sample(graph=True)``: the sampled states and decoder as they are (with
          ``model_kwargs={"bayesian_edge_decoder": True}`` widened by the recalibration below).

        Parameters
        ----------
        recalibrate
            Widen the intervals by the factor of
            :data:`~pyrospatial.criticism.recalibration.INTERACTION_RECALIBRATION`, fitted on simulations
            held apart from those it is evaluated on. It was fitted for the graph-conditioned
            posterior with a Bayesian edge decoder, whose chains do not converge in the default
            budget and whose raw 90% intervals are too narrow. None (default): widen exactly
            when the posterior is that one; False: never; True: insist (an error for another
            posterior, where the factor means nothing).

        Returns
        -------
        dict
            ``mean``, ``sd``, ``q05``, ``q50``, ``q95``, ``n_edges`` (T, T; NaN for type pairs
            without an edge), ``cell_types``, ``posterior`` (which posterior the intervals come
            from, and the widening when applied), ``recalibration`` (the applied
            :class:`~pyrospatial.criticism.recalibration.Recalibration` as a dict, or None) and
            ``rhat_max``: the largest split-R-hat of the entries across the refinement's chains
            (:func:`~pyrospatial.criticism.convergence.chain_convergence`; NaN for independent
            draws: the guide's and the edge decoder's given the states). Above about 1.05 the
            chains disagree.
        """
        posterior = self._require_posterior()
        graph = bool(posterior.diagnostics.get("graph", False))
        fitted_for = posterior.method in ("hmc", "refine") and graph and self.model.bayesian_edge_decoder
        if recalibrate and not fitted_for:
            raise InputError(
                "interactions(recalibrate=True): the recalibration was fitted for "
                f"{INTERACTION_RECALIBRATION.posterior}; this posterior is method={posterior.method}, graph={graph}. "
                "Draw it with sample(graph=True) on a CORAL built with model_kwargs={'bayesian_edge_decoder': True}, "
                "or pass recalibrate=False.")
        if graph:
            edge_prob = posterior.edge_prob
            decoder = "bayesian" if self.model.bayesian_edge_decoder else "point estimate"
            how = f"method={posterior.method}, graph=True, edge decoder: {decoder}"
            chains = posterior.diagnostics.get("num_chains") if posterior.method in MCMC_METHODS else None
            if not self.model.bayesian_edge_decoder:
                warnings.warn(
                    "CORAL.interactions(): this graph-conditioned posterior holds a point-estimated edge decoder; its "
                    "90% interaction intervals covered 0.6 of simulated truths "
                    "(benchmarks/results/interaction_calibration.md). The default posterior's (sample() without graph) "
                    "draw the decoder given the graph.", UserWarning, stacklevel=2)
        else:
            z_mean = posterior.samples["z"].mean(0)
            if posterior.edge_decoder is None:
                decoder_samples = {k: posterior.samples[k] for k in EDGE_DECODER_SITES if k in posterior.samples}
                posterior.edge_decoder = coral_edge_decoder_posterior(
                    self.model, self.dataset, z_mean, posterior.num_samples, seed=posterior.seed,
                    decoder_samples=decoder_samples or None)
            edge_prob = edge_probabilities(z_mean, self.dataset.edges, posterior.edge_decoder)
            how = (f"method={posterior.method}, graph=False; edge decoder drawn from its posterior given the graph "
                   "(every edge, sampled non-edges) at the states' posterior mean (Laplace)")
            chains = None
            laplace = posterior.edge_decoder
            if not laplace.converged:
                warnings.warn(f"CORAL.interactions(): Newton's method for the edge decoder's posterior stopped at its "
                              f"iteration cap short of its tolerance in {laplace.unconverged_draws} of "
                              f"{len(laplace.bias)} draws; those draws are not at their mode and the intervals may be "
                              "off.", UserWarning, stacklevel=2)
        result = interaction_matrix(edge_prob, self.dataset.edges, self.dataset.cell_type, self.dataset.n_types,
                                    keep_draws=True)
        draws = result.pop("draws")
        result["cell_types"] = np.asarray(self.dataset.cell_types)
        result["posterior"] = how
        result["rhat_max"] = chain_convergence(draws, chains)[0] if chains else float("nan")
        if not graph:
            result["intervals_calibrated"] = True  # read by pyrospatial.plotting.interaction_interval_caveat
        result["recalibration"] = None
        if fitted_for and recalibrate is not False:
            factor = INTERACTION_RECALIBRATION.factor
            widened = summarise_draws(widen(draws, factor))
            result.update({k: widened[k] for k in ("mean", "sd", "q05", "q50", "q95")})
            result["recalibration"] = INTERACTION_RECALIBRATION.as_dict()
            result["posterior"] += (f"; intervals widened x{factor:.3f} around the mean by a recalibration fitted on "
                                    "held-apart simulations (pyrospatial.criticism.recalibration)")
        return result

    def domains(self, n_domains: int, *, smooth: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
        """Spatial domains from posterior z with co-clustering confidence."""
        posterior = self._require_posterior()
        return spatial_domains(posterior.samples["z"], self.dataset.edges, n_domains, smooth=smooth, seed=seed)

    @torch.no_grad()
    def attention(self) -> sp.csr_matrix:
        """(N, N) sparse GAT attention of the guide's last layer, mean over heads (target row,
        source column), on the full graph."""
        batch = self.dataset.full_batch().to(module_device(self.guide))
        edge_index, alpha = self.guide.attention(batch)
        cells = batch.cell_index.cpu().numpy()
        src, dst = edge_index.cpu().numpy()
        n = self.dataset.n_cells
        return sp.csr_matrix((alpha.mean(-1).cpu().numpy(), (cells[dst], cells[src])), shape=(n, n))

    # ------------------------------------------------------------------------------------
    def export(self, *, n_domains: int | None = None, count_method: str = "dirichlet_multinomial",
               seed: int = 0) -> tuple[AnnData, AnnData | None]:
        """Cells x genes and spots AnnData with every result and its spread (module docstring)."""
        ds = self.dataset
        posterior = self._require_posterior()
        # the heap a sampler freed (1.1 GB after the default posterior on 100k cells) would
        # otherwise stay resident under the arrays made below, which are too large to reuse it
        release_free_memory()
        # first what needs all draws of the graph or of z (the GAT over every cell, S x E edge
        # probabilities): small results, but large working memory, which is thus not added to
        # that of the cells x genes summaries below
        graph = self._graph_outputs()
        domains = self.domains(n_domains, seed=seed) if n_domains else None
        release_free_memory(collect=False)  # the GAT's freed tensors (160 MB of heap on 100k cells)
        # every site of the draws: local ones go to layers/obsm/obs, those with plate "global"
        # to uns["pyrospatial"]["globals"] (mean, sd, q05, q50, q95)
        summary = summarise({k: v for k, v in posterior.samples.items() if k != "expected_rna"})
        summary.plates.update(posterior.plates)
        split, summary["expected_rna"], spot_stats = self._per_chunk(count_method=count_method, seed=seed)
        summary.plates["expected_rna"] = "cells"

        obs = self.cells.obs.loc[ds.cell_names].copy() if self.cells is not None else pd.DataFrame(index=ds.cell_names)
        stale = [column for column in ("domain", "domain_confidence") if column in obs.columns]
        if stale:  # e.g. the cells of an earlier output: never pass them off as this fit's domains
            warnings.warn(
                f"the input cells have obs column(s) {stale}, which CORAL.export writes itself; they are kept as "
                f"{[f'input_{c}' for c in stale]} (this fit's domains are written only with n_domains).",
                UserWarning, stacklevel=2)
            obs = obs.rename(columns={column: f"input_{column}" for column in stale})
        cells_rna = AnnData(  # X is copied from the layer's array by export_summaries' copy
            X=summary["expected_rna"]["mean"].astype(np.float32, copy=False),
            obs=obs,
            var=pd.DataFrame(index=pd.Index(ds.gene_names, name="gene")),
        )
        cells_rna.obsm["spatial"] = ds.cell_coords.astype(np.float64)
        cells_rna.obsm["proteins"] = ds.cell_features
        spots_in = self.spots[ds.spot_names] if self.spots is not None else None
        locations = {"z": "obsm"}
        cells_rna, spots_out = export_summaries(
            cells_rna, None, summary, settings=self._settings(), locations=locations,
        )
        # spot-consistent counts
        for stat in ("mean", "sd", "q05", "q50", "q95"):  # float32 already: a copy would double them
            cells_rna.layers[f"counts_{stat}"] = getattr(split, stat).astype(np.float32, copy=False)
        cells_rna.uns["pyrospatial"]["spot_sum_max_abs_error"] = float(split.max_abs_spot_error)
        cells_rna.uns["pyrospatial"]["n_cells_outside_spots"] = int(np.sum(ds.cell_spot < 0))
        cells_rna.uns["pyrospatial"]["protein_names"] = np.asarray(ds.feature_names, dtype=str)
        # graph quantities
        for key, matrix in graph["obsp"].items():
            cells_rna.obsp[key] = matrix
        cells_rna.uns["pyrospatial"]["interactions"] = graph["interactions"]
        if domains is not None:
            cells_rna.obs["domain"] = pd.Categorical(domains["labels"].astype(str))
            cells_rna.obs["domain_confidence"] = domains["confidence"]
        # spots
        if spots_in is not None:
            spots_out = spots_in.copy()
            member = sp.csr_matrix(ds.membership)
            for stat, value in spot_stats.items():
                spots_out.layers[f"expected_counts_{stat}"] = value.astype(np.float32)
            spots_out.obs["n_cells"] = np.asarray(member.sum(1)).ravel().astype(int)
            spots_out.uns["pyrospatial"] = {"settings": cells_rna.uns["pyrospatial"]["settings"]}
            add_spatial_uns(spots_out, spot_diameter=ds.settings.get("spot_diameter") or None)
        # scverse: scanpy's uns['spatial'] (the spots' image when they have one), squidpy's graph keys
        template = spots_out.uns.get("spatial") if spots_out is not None else None
        add_spatial_uns(cells_rna, template=template if isinstance(template, dict) and template else None)
        add_spatial_graph(cells_rna, ds.edges, params={
            "coord_type": "generic", "graph": ds.settings.get("graph", "knn"), "n_neighbors": ds.settings.get("k"),
            "radius": ds.settings.get("graph_radius"), "transform": None})
        return cells_rna, spots_out

    def _graph_outputs(self) -> dict[str, Any]:
        """The graph's outputs of :meth:`export`: ``obsp`` (``edge_prob_mean``, ``edge_prob_sd``,
        ``attention``: sparse (N, N)) and ``interactions`` (its ``uns`` record: NaN as -1,
        ``recalibration_factor``, ``note``)."""
        ds = self.dataset
        n = ds.n_cells
        edge_stats = summarise_draws(self._require_posterior().edge_prob)
        rows = np.concatenate([ds.edges[0], ds.edges[1]])
        cols = np.concatenate([ds.edges[1], ds.edges[0]])
        obsp = {}
        for stat in ("mean", "sd"):
            values = np.concatenate([edge_stats[stat], edge_stats[stat]])
            obsp[f"edge_prob_{stat}"] = sp.csr_matrix((values, (rows, cols)), shape=(n, n))
        obsp["attention"] = self.attention()
        interactions = self.interactions()
        recalibration = interactions.pop("recalibration")
        record = {
            key: (np.nan_to_num(value, nan=-1.0) if isinstance(value, np.ndarray) and value.dtype.kind == "f" else value)
            for key, value in interactions.items()
        }
        record["recalibration_factor"] = float(recalibration["factor"]) if recalibration else 1.0
        record["note"] = (
            "entries with no edge between the two types are -1; 'posterior' says where the draws come from (see "
            "CORAL.interactions); recalibration_factor is the widening applied to them (1: none; fitted on "
            "held-apart simulations, pyrospatial.criticism.recalibration)"
        )
        return {"obsp": obsp, "interactions": record}

    @staticmethod
    def _spot_sums(batch: Batch, draws: np.ndarray) -> dict[str, np.ndarray]:
        """Summaries of the draws summed over each of the batch's spots' cells."""
        if batch.n_spots == 0:
            return {}
        member = batch.membership.coalesce()
        rows, cols = member.indices().numpy()
        matrix = sp.csr_matrix((np.ones(rows.size, dtype=np.float32), (rows, cols)), shape=tuple(member.shape))
        return summarise_draws(np.stack([matrix @ draw for draw in draws]))

    def _settings(self) -> dict[str, Any]:
        settings = {"method": "CORAL", **{f"data_{k}": v for k, v in self.dataset.settings.items()}}
        settings.update({f"model_{k}": v for k, v in self.model_kwargs.items() if np.isscalar(v)})
        if self.fit_result is not None:
            settings.update({f"fit_{k}": v for k, v in self.fit_result.settings.items() if np.isscalar(v)})
        if self.posterior is not None:
            settings["num_samples"] = self.posterior.num_samples
            settings["posterior_method"] = self.posterior.method
        return settings

