"""Spatial domains from expression, proteins and morphology, over one or several sections.

::

    import pyrospatial as ps
    outs = ps.domains([section1, section2], n_domains=7, modalities=("counts", "morphology"))
    outs[0].obs["domain"]                 # labels shared by both sections
    outs[0].obs["domain_confidence"]      # posterior probability of that label
    outs[0].obsm["domain_prob_mean"]      # spots x domains

The model is :class:`pyrospatial.models.domains.DomainModel` (its docstring is the generative
story), the guide :class:`pyrospatial.guides.domains.DomainGuide`; both are trained by
:func:`pyrospatial.fit` on a :class:`~pyrospatial.data.domain_data.DomainData` and summarised
from joint posterior draws by :func:`pyrospatial.sample_posterior`. One set of domain
parameters serves every section, so a domain label means the same in every section.

:class:`Domains` is one fit: build (validation, data, model, guide), ``train``, ``sample``,
``export``; also ``to_inference_data``, ``save``, ``load``. :func:`domains` runs ``restarts``
(default 3) of them from different starting points and pools their draws
(:mod:`pyrospatial.methods.domain_restarts`), since one fit knows only its own mode.

Documented keys of every returned AnnData (a copy of the input)
---------------------------------------------------------------
- ``obs['domain']``: categorical ``"0".."K-1"``, the domain of highest posterior mean
  probability, the same labels in every section;
- ``obs['domain_confidence']``: that domain's posterior mean probability;
- ``obsm['domain_prob_{mean,sd,q05,q95}']``: ``(n_obs, K)``, summaries of the exact domain
  posterior ``P(d_i = k | z_i, u_i, globals)`` over joint posterior draws of the globals,
  ``z_i`` and ``u_i``;
- ``obsm['domain_embedding_{mean,sd}']``: ``(n_obs, latent_dim)``, the latent state ``z_i``
  (with several restarts, each rotated onto the reference restart's before pooling);
- ``uns['domains']``: ``settings``, ``modalities``, ``sections``, ``genes`` (used),
  ``versions``, ``elbo`` (loss per step of the reference restart), ``fit_seconds`` (all
  restarts), ``domain_frequency_mean``, ``restarts`` (``restarts``, ``seeds``, ``reference``:
  the restart of lowest final loss, ``final_loss`` and ``agreement`` with the reference per
  restart; with several restarts ``rhat_max`` and ``rhat_above``: the split-R-hat of the domain
  probabilities with one chain per restart, its largest value and the share above 1.1, i.e.
  where the restarts disagree) (h5ad-safe);
- ``uns['spatial']``: kept (e.g. with the H&E image), or created without image.

Errors: :class:`~pyrospatial.errors.InputError` (``n_domains < 2``, an unknown modality, a
missing obsm key, named), :class:`~pyrospatial.errors.CountsError` (counts that are not raw).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyro
import torch
from anndata import AnnData

from pyrospatial.data.domain_data import DomainData
from pyrospatial.engine.export import add_spatial_uns, h5ad_safe
from pyrospatial.engine.infer import FitResult, fit
from pyrospatial.engine.posterior import sample_posterior
from pyrospatial.engine.summary import summarise
from pyrospatial.errors import InputError
from pyrospatial.methods.domain_restarts import final_loss, pool_restarts, restart_seed
from pyrospatial.methods.domains_inputs import MODALITIES, read_domain_inputs
from pyrospatial.methods.method_io import (
    SAVE_FORMAT,
    check_saved,
    draws_to_inference_data,
)

__all__ = ["MODALITIES", "UNS_KEY", "Domains", "domains"]

#: Key of the run record in each returned AnnData's ``uns``.
UNS_KEY = "domains"

#: Sites drawn by :meth:`Domains.sample`.
SITES = ("domain_prob", "embedding", "domain_frequency", "domain_mean")

DIMS = {"domain_prob": ("spot", "domain"), "embedding": ("spot", "latent"), "domain_frequency": ("domain",),
        "domain_mean": ("domain", "latent")}


class Domains:
    """Spatial domains of one or several sections (the method behind :func:`domains`).

    Building it validates the inputs and builds the data, the model and the guide (the
    encoder starts at the principal axes of the neighbour-averaged inputs and the domain
    centres at their k-means centres, seeded by ``seed``); nothing is trained yet.

    Parameters are those of :func:`domains` up to ``smoothness`` (and ``seed``, which seeds
    the starting point).

    Raises
    ------
    InputError, CountsError
    """

    def __init__(
        self,
        adatas: AnnData | Sequence[AnnData],
        n_domains: int = 7,
        *,
        modalities: Sequence[str] | None = None,
        layer: str | None = None,
        protein_key: str = "protein",
        morphology_key: str = "morphology",
        spatial_key: str = "spatial",
        section_key: str | None = None,
        n_neighbours: int = 6,
        latent_dim: int = 10,
        state_dim: int = 3,
        n_pcs: int = 30,
        n_top_genes: int | None = 2000,
        smoothness: float = 0.1,
        logit_scale: float = 5.0,
        seed: int = 0,
    ) -> None:
        from pyrospatial.guides.domains import DomainGuide
        from pyrospatial.models.domains import DomainModel

        if isinstance(n_domains, bool) or int(n_domains) != n_domains or int(n_domains) < 2:
            raise InputError(f"n_domains must be an integer >= 2, got {n_domains!r}.")
        for name, value in (("latent_dim", latent_dim), ("state_dim", state_dim), ("n_pcs", n_pcs)):
            if int(value) < 1:
                raise InputError(f"{name} must be >= 1, got {value}.")
        if smoothness < 0 or logit_scale <= 0:
            raise InputError(f"smoothness must be >= 0 and logit_scale > 0, got {smoothness}, {logit_scale}.")
        K = int(n_domains)
        inputs = read_domain_inputs(
            adatas, modalities, layer=layer, protein_key=protein_key, morphology_key=morphology_key,
            spatial_key=spatial_key, section_key=section_key, n_neighbours=int(n_neighbours),
            n_top_genes=n_top_genes, n_pcs=int(n_pcs), seed=int(seed))
        n = inputs.features.shape[0]
        if n < K:
            raise InputError(f"n_domains={K} exceeds the number of spots ({n}).")
        self.inputs = inputs
        self.data = DomainData(inputs.features, inputs.coords, inputs.section, counts=inputs.counts,
                               proteins=inputs.proteins, morphology=inputs.morphology, n_neighbours=int(n_neighbours))
        Z = min(int(latent_dim), inputs.smoothed.shape[1])
        projection, centre, z0 = _starting_embedding(inputs.features, inputs.smoothed.shape[1], Z)
        centres, within, logits0 = _kmeans(z0, K, int(seed))
        counts = inputs.counts
        gene_logits = None
        if counts is not None:
            prop = counts.sum(0) + 0.5
            gene_logits = torch.as_tensor(np.log(prop / prop.sum()), dtype=torch.float32)
        morph_mean = None if inputs.morphology is None else torch.as_tensor(inputs.morphology.mean(0))
        prot_mean = None if inputs.proteins is None else torch.as_tensor(np.log(inputs.proteins.mean(0)),
                                                                          dtype=torch.float32)
        sizes = (0 if counts is None else counts.shape[1], 0 if inputs.proteins is None else inputs.proteins.shape[1],
                 0 if inputs.morphology is None else inputs.morphology.shape[1], len(inputs.section_names))
        torch.manual_seed(int(seed))
        self.model = DomainModel(K, Z, int(state_dim), *sizes, smoothness=smoothness, logit_scale=logit_scale,
                                 init_gene_logits=gene_logits, init_morphology_mean=morph_mean,
                                 init_protein_log_mean=prot_mean, init_state_scale=within)
        self.guide = DomainGuide(n, inputs.features.shape[1], K, Z, *sizes,
                                 init_projection=torch.as_tensor(projection, dtype=torch.float32),
                                 init_centre=torch.as_tensor(centre, dtype=torch.float32),
                                 init_domain_mean=torch.as_tensor(centres, dtype=torch.float32),
                                 init_logits=torch.as_tensor(logits0, dtype=torch.float32))
        #: the constructor's settings, recorded in ``uns['domains']['settings']``
        self.settings: dict[str, Any] = {
            "n_domains": K, "modalities": list(inputs.modalities), "layer": layer, "protein_key": protein_key,
            "morphology_key": morphology_key, "spatial_key": spatial_key, "section_key": section_key,
            "n_neighbours": int(n_neighbours), "latent_dim": Z, "state_dim": int(state_dim), "n_pcs": int(n_pcs),
            "n_top_genes": None if n_top_genes is None else int(n_top_genes), "smoothness": float(smoothness),
            "logit_scale": float(logit_scale), "init_seed": int(seed),
        }
        self.fit_result: FitResult | None = None
        self.train_record: dict[str, Any] | None = None
        self.draws: dict[str, np.ndarray] | None = None
        self.sample_record: dict[str, Any] | None = None
        #: set by :func:`~pyrospatial.methods.domain_restarts.pool_restarts` when the draws pool several fits
        self.restart_record: dict[str, Any] | None = None

    @property
    def n_domains(self) -> int:
        return int(self.settings["n_domains"])

    # ------------------------------------------------------------------------------------
    def train(self, max_steps: int = 3000, *, lr: float = 0.01, batch_size: int | None = 1024, seed: int = 0,
              device: str = "cpu", progress: bool = False, stop_tol: float | None = 1e-4, stop_window: int = 25,
              **fit_kwargs: Any) -> FitResult:
        """Fit by SVI with :func:`pyrospatial.fit` (Adam at ``lr``, decayed 10x over
        ``max_steps``; ``batch_size`` spots per spatially compact minibatch, ``None`` = all).

        Stopping rule (``stop_tol=None`` turns it off: ``max_steps`` steps): every
        ``stop_window`` epochs (passes over the spots), once ``2 * stop_window`` epochs have run,
        the mean loss of the last ``stop_window`` epochs is compared with that of the
        ``stop_window`` epochs before; training stops when it improved by less than ``stop_tol``
        of its absolute value (:class:`ElboPlateau`). Other ``fit`` options (``checkpoint_dir``,
        ``resume``, ...) pass through."""
        started = time.perf_counter()
        n = int(self.data.n_spots)
        per_epoch = 1 if batch_size is None else max(1, min(n, -(-n // int(batch_size))))
        callbacks = list(fit_kwargs.pop("callbacks", []) or [])
        plateau = None
        if stop_tol is not None:
            window = max(1, int(stop_window)) * per_epoch
            plateau = ElboPlateau(window=window, rel_tol=float(stop_tol), min_steps=2 * window)
            callbacks.append(plateau.callback)
        with pyro.validation_enabled(False):
            result = fit(self.model, self.guide, self.data, max_steps=int(max_steps), batch_size=batch_size, lr=lr,
                         lr_decay=0.1 ** (1.0 / max(int(max_steps), 1)), seed=seed, device=device,
                         progress=progress, callbacks=callbacks, **fit_kwargs)
        self.fit_result = result
        self.train_record = {
            "max_steps": int(max_steps), "steps": len(result.elbo_history), "lr": float(lr),
            "batch_size": None if batch_size is None else int(batch_size), "seed": int(seed),
            "device": str(result.settings.get("device", device)),
            "stop_tol": -1.0 if stop_tol is None else float(stop_tol), "stop_window": int(stop_window),
            "stopped_at": -1 if plateau is None or plateau.stopped_at is None else int(plateau.stopped_at),
            "elbo": np.asarray(result.elbo_history, dtype=np.float64),
            "versions": dict(result.settings.get("versions", {})), "seconds": time.perf_counter() - started,
        }
        self.draws = None
        return result

    def sample(self, num_samples: int = 100, *, seed: int = 0) -> dict[str, np.ndarray]:
        """Joint posterior draws (site -> ``(num_samples, ...)``) of the domain probabilities,
        the embedding, the domain frequencies and centres."""
        self._require_trained()
        started = time.perf_counter()
        self.model.to("cpu")
        self.guide.to("cpu")
        with pyro.validation_enabled(False):
            draws = dict(sample_posterior(self.model, self.guide, self.data, num_samples=int(num_samples),
                                          sites=list(SITES), seed=seed))
        self.draws = draws
        self.sample_record = {"num_samples": int(num_samples), "seed": int(seed),
                              "seconds": time.perf_counter() - started}
        return draws

    def export(self) -> list[AnnData]:
        """One AnnData per input (copies, in the input order) with the keys of the module docstring."""
        draws, record = self._require_draws(), self.train_record
        summary = summarise({"domain_prob": np.asarray(draws["domain_prob"], dtype=np.float64),
                             "embedding": np.asarray(draws["embedding"], dtype=np.float64)})
        prob = summary["domain_prob"]
        label = prob["mean"].argmax(1)
        confidence = prob["mean"][np.arange(label.size), label]
        categories = [str(k) for k in range(self.n_domains)]
        settings = dict(self.settings)
        settings.update({k: record[k] for k in ("max_steps", "steps", "lr", "batch_size", "seed", "device")
                         if k in record})
        settings.update({k: record[k] for k in ("stop_tol", "stop_window", "stopped_at") if k in record})
        settings["num_samples"] = self.sample_record["num_samples"]
        restarts = self.restart_record or {"restarts": 1, "seeds": [self.settings["init_seed"]], "reference": 0,
                                           "final_loss": [final_loss(self)], "agreement": [1.0]}
        settings["restarts"] = int(restarts["restarts"])
        rec = h5ad_safe({
            "settings": settings, "modalities": list(self.inputs.modalities),
            "sections": list(self.inputs.section_names), "genes": list(self.inputs.genes),
            "versions": record["versions"], "elbo": np.asarray(record["elbo"], dtype=np.float64),
            "fit_seconds": float(restarts["seconds"]) if "seconds" in restarts else
            float(record["seconds"] + self.sample_record["seconds"]),
            "domain_frequency_mean": np.asarray(draws["domain_frequency"]).mean(0).astype(np.float64),
            "restarts": {k: restarts[k] for k in ("restarts", "seeds", "reference", "final_loss", "agreement",
                                                  "rhat_max", "rhat_above") if k in restarts},
        })
        outs = []
        for adata, rows in zip(self.inputs.adatas, self.inputs.rows):
            out = adata.copy()
            out.obs["domain"] = pd.Categorical([categories[k] for k in label[rows]], categories=categories)
            out.obs["domain_confidence"] = confidence[rows].astype(np.float64)
            for stat in ("mean", "sd", "q05", "q95"):
                out.obsm[f"domain_prob_{stat}"] = prob[stat][rows].astype(np.float32)
            for stat in ("mean", "sd"):
                out.obsm[f"domain_embedding_{stat}"] = summary["embedding"][stat][rows].astype(np.float32)
            out.uns[UNS_KEY] = rec
            add_spatial_uns(out, spatial_key=self.settings["spatial_key"])
            outs.append(out)
        return outs

    def to_inference_data(self):
        """``arviz.InferenceData`` of the draws, dims ``spot`` (``"<section>:<obs_name>"``),
        ``domain``, ``latent``; the loss per step in ``sample_stats``. One chain per restart
        when several were pooled with equal draws (so ``arviz.rhat`` and ``arviz.summary`` say
        where the restarts disagree; the restarts' ``sample_stats`` hold the reference's loss),
        else one chain."""
        draws = self._require_draws()
        spots = [f"{self.inputs.section_names[s]}:{name}" for s, name in
                 zip(self.inputs.section, np.concatenate([np.asarray(a.obs_names, dtype=str)
                                                          for a in self.inputs.adatas]))]
        coords = {"spot": spots, "domain": [str(k) for k in range(self.n_domains)],
                  "latent": list(range(int(self.settings["latent_dim"])))}
        return draws_to_inference_data({k: draws[k] for k in SITES}, DIMS, coords,
                                       elbo=self.train_record["elbo"] if self.train_record else None,
                                       attrs={"method": "Domains", "seed": self.sample_record["seed"]},
                                       chains=self._restart_chains())

    def _restart_chains(self) -> int:
        """Chains of the draws: one per pooled restart when they drew equally many, else 1."""
        record = self.restart_record
        if not record or len(set(record["draws"])) != 1:
            return 1
        return int(record["restarts"])

    # ------------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Save the trained model and guide (state dicts), the settings and the training record
        (tensors, numbers and strings only: :meth:`load` reads it with ``weights_only=True``)."""
        record = self._require_trained()
        state = {
            "method": "Domains", "format": SAVE_FORMAT, "identity": self._identity(),
            "model": self.model.state_dict(), "guide": self.guide.state_dict(),
            "train": {**{k: v for k, v in record.items() if k != "elbo"}, "elbo": torch.as_tensor(record["elbo"])},
        }
        torch.save(state, path)

    def load(self, path: str) -> Domains:
        """Load what :meth:`save` wrote into a :class:`Domains` built on the same inputs and
        settings (a mismatch raises :class:`~pyrospatial.errors.InputError` naming the field);
        draws are not saved: call :meth:`sample` again (same seed, same draws)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        check_saved(state, "Domains", self._identity(), path)
        self.model.load_state_dict(state["model"])
        self.guide.load_state_dict(state["guide"])
        train = dict(state["train"])
        train["elbo"] = train["elbo"].numpy().astype(np.float64)
        self.train_record, self.fit_result, self.draws, self.restart_record = train, None, None, None
        return self

    def _identity(self) -> dict[str, Any]:
        return {**self.settings, "sections": list(self.inputs.section_names), "genes": list(self.inputs.genes),
                "n_spots": int(self.data.n_spots)}

    def _require_trained(self) -> dict[str, Any]:
        if self.train_record is None:
            raise InputError("this Domains is not trained: call train() (or load() a saved one) first.")
        return self.train_record

    def _require_draws(self) -> dict[str, np.ndarray]:
        if self.draws is None:
            raise InputError("no posterior draws: call sample(num_samples) after train() first.")
        return self.draws


class ElboPlateau:
    """Stops :func:`pyrospatial.fit` once the loss has levelled off: after ``min_steps``, every
    ``window`` steps the mean loss of the last ``window`` steps is compared with that of the
    ``window`` before; the fit stops when it improved by less than ``rel_tol`` of the loss's
    absolute value. ``callback`` is the Lightning callback to pass to ``fit(callbacks=...)``."""

    def __init__(self, window: int = 50, rel_tol: float = 1e-4, min_steps: int = 200) -> None:
        import lightning.pytorch as lp

        self.window, self.rel_tol, self.min_steps = int(window), float(rel_tol), int(min_steps)
        self.stopped_at: int | None = None
        rule = self

        class _Callback(lp.Callback):
            def on_train_batch_end(self, trainer, pl_module, *args, **kwargs) -> None:
                if rule.should_stop(getattr(pl_module, "elbo_history", [])):
                    trainer.should_stop = True

        self.callback = _Callback()

    def should_stop(self, history) -> bool:
        """The rule on a loss history (one value per step); records the step it fired at."""
        n, w = len(history), self.window
        if self.stopped_at is not None:
            return True
        if n < max(self.min_steps, 2 * w) or n % w:
            return False
        last, before = float(np.mean(history[-w:])), float(np.mean(history[-2 * w:-w]))
        if before - last < self.rel_tol * abs(last):
            self.stopped_at = n
            return True
        return False


def graph_prior_log_normaliser(edges: np.ndarray, n_spots: int, n_domains: int, logit_scale: float,
                               smoothness: float) -> float:
    """``0.5 K log det(I + s^2 lambda L)`` (``L`` the Laplacian of the spot graph ``edges``,
    ``s = logit_scale``): what the normalised prior of the domain logits,
    ``N(u; 0, (I / s^2 + lambda L)^-1)`` per domain, adds to the model's
    ``Normal(0, s^2) x exp(-lambda / 2 sum_E ||u_i - u_j||^2)``. A constant during training, it
    makes losses with different ``smoothness`` comparable (``loss - this``). Dense
    eigenvalues per connected block of the graph (sections): for sections up to ~10^4 spots."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    edges = np.asarray(edges, dtype=np.int64).reshape(2, -1)
    adj = sp.coo_matrix((np.ones(edges.shape[1]), (edges[0], edges[1])), shape=(n_spots, n_spots)).tocsr()
    adj = ((adj + adj.T) > 0).astype(np.float64)
    _, block = connected_components(adj, directed=False)
    total = 0.0
    for b in np.unique(block):
        idx = np.flatnonzero(block == b)
        if idx.size < 2:
            continue
        a = adj[idx][:, idx].toarray()
        eig = np.clip(np.linalg.eigvalsh(np.diag(a.sum(1)) - a), 0.0, None)
        total += float(np.log1p(float(logit_scale) ** 2 * float(smoothness) * eig).sum())
    return 0.5 * int(n_domains) * total


def _starting_embedding(features: np.ndarray, n_smoothed: int, Z: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The encoder's linear start: principal axes of the neighbour-averaged half of the inputs
    (the last ``n_smoothed`` columns), scaled so the first axis has unit standard deviation."""
    centre = features.mean(0).astype(np.float64)
    smooth = features[:, -n_smoothed:] - centre[-n_smoothed:]
    _, svals, vt = np.linalg.svd(smooth, full_matrices=False)
    scale = svals[0] / np.sqrt(max(smooth.shape[0] - 1, 1)) + 1e-8
    projection = np.zeros((features.shape[1], Z))
    projection[-n_smoothed:] = vt[:Z].T / scale
    return projection, centre, (features - centre) @ projection


def _kmeans(z: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, float, np.ndarray]:
    """k-means centres of the starting embedding, the mean within-domain standard deviation
    ``s`` and starting domain logits: the centred log soft assignments
    ``-||z_i - c_k||^2 / (2 s^2)``, clipped to ``[-4, 4]``."""
    from sklearn.cluster import KMeans

    km = KMeans(k, n_init=10, random_state=seed).fit(z)
    resid = z - km.cluster_centers_[km.labels_]
    within = float(max(resid.std(0).mean(), 0.05))
    d2 = ((z[:, None, :] - km.cluster_centers_[None]) ** 2).sum(-1)
    logits = -d2 / (2 * within**2)
    logits -= logits.mean(1, keepdims=True)
    return km.cluster_centers_, within, np.clip(logits, -4.0, 4.0)


def domains(
    adatas: AnnData | Sequence[AnnData],
    n_domains: int = 7,
    *,
    modalities: Sequence[str] | None = None,
    layer: str | None = None,
    protein_key: str = "protein",
    morphology_key: str = "morphology",
    spatial_key: str = "spatial",
    section_key: str | None = None,
    n_neighbours: int = 6,
    latent_dim: int = 10,
    state_dim: int = 3,
    n_pcs: int = 30,
    n_top_genes: int | None = 2000,
    smoothness: float = 0.1,
    logit_scale: float = 5.0,
    max_steps: int = 3000,
    lr: float = 0.01,
    batch_size: int | None = 1024,
    stop_tol: float | None = 1e-4,
    num_samples: int = 100,
    restarts: int = 3,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
    checkpoint_dir: str | None = None,
    resume: str | None = None,
) -> AnnData | list[AnnData]:
    """Spatial domains with calibrated probabilities, from any of counts, proteins and morphology,
    over one section or several sections fitted jointly (labels shared across sections).

    Parameters
    ----------
    adatas
        One AnnData, or a list with one AnnData per section (fitted jointly). Spots (or cells)
        x genes; coordinates in ``obsm[spatial_key]``.
    n_domains
        Number of domains ``K`` (>= 2).
    modalities
        Subset of ``("counts", "proteins", "morphology")``; ``None``: counts, plus proteins and
        morphology when every section has their obsm key. ``counts``: raw integer counts in
        ``.X`` (or ``layers[layer]``), genes intersected across sections; ``proteins``:
        positive values in ``obsm[protein_key]``; ``morphology``: any numeric matrix in
        ``obsm[morphology_key]`` (e.g. :func:`pyrospatial.image.add_image_features`, a
        histology foundation-model embedding, nucleus counts).
    section_key
        Column of ``obs`` splitting one AnnData into sections (each gets its own offsets).
    n_neighbours
        Degree of the spot graph (k nearest spots, per section) of the spatial prior and of
        the encoder's neighbour averages.
    latent_dim, state_dim
        Dimensions of the embedding ``z`` and of the within-domain state ``v``.
    n_pcs, n_top_genes
        Principal components per modality of the encoder input; counts use the
        ``n_top_genes`` genes of highest variance of log-normalised expression (``None``: all).
    smoothness, logit_scale
        ``lambda`` of the graph prior on domain logits (0: no spatial prior) and the logits'
        prior scale (see :class:`~pyrospatial.models.domains.DomainModel`). The default 0.1
        was chosen by the ELBO, not by labels: over ``lambda`` in {0.1, 0.3, 1, 3} the final
        loss plus the graph prior's log-normaliser (:func:`graph_prior_log_normaliser`, a
        constant during training that the loss leaves out, so it must be added before losses
        with different ``lambda`` are compared) was lowest at 0.1 on DLPFC 151673 and osmFISH.
    max_steps, lr, batch_size, stop_tol
        SVI budget, learning rate (decayed 10x over ``max_steps``), spots per spatially compact
        minibatch (``None``: all), and the stopping rule of :meth:`Domains.train` (``None``:
        ``max_steps`` steps).
    num_samples
        Joint posterior draws behind every summary (split over the restarts).
    restarts
        Independent fits (starting points and seeds ``seed * restarts + r``) whose draws are
        pooled after matching their domains and embeddings to the fit of lowest final loss
        (:mod:`pyrospatial.methods.domain_restarts`). One fit describes only its own mode of the
        posterior and is over-confident against the disagreement between fits: on DLPFC 151673
        (6 fits; ``benchmarks/results/domain_restarts.md``) one fit's confidence against how
        often independent fits agree had an ECE of 0.07-0.16, a pool of 3 of 0.02-0.04, at the
        same mean ARI. Costs ``restarts`` fits; 1 gives the single fit of ``seed``.
    seed, device, progress, checkpoint_dir, resume
        Seed of the start, the fit and the draws; torch device; progress bar; checkpoints as
        for :func:`pyrospatial.fit` (with several restarts, one folder per restart,
        ``checkpoint_dir/restart_R``, and ``resume="last"`` resumes each that has one).

    Returns
    -------
    AnnData or list of AnnData
        Copies of the inputs (one AnnData for one input, else a list in the input order) with
        the keys of the module docstring.

    Raises
    ------
    InputError, CountsError
    """
    if isinstance(restarts, bool) or int(restarts) != restarts or int(restarts) < 1:
        raise InputError(f"restarts must be an integer >= 1, got {restarts!r}.")
    R = int(restarts)
    if R > 1 and resume is not None and str(resume) != "last":
        raise InputError(f"resume={resume!r} with restarts={R}: each restart has its own checkpoint; pass "
                         "resume='last' with the same checkpoint_dir (or restarts=1).")
    fits = []
    for r in range(R):
        run_seed = restart_seed(seed, r, R)
        folder, resume_r = checkpoint_dir, resume
        if R > 1 and checkpoint_dir is not None:
            folder = str(Path(checkpoint_dir) / f"restart_{r}")
            resume_r = resume if (Path(folder) / "last.ckpt").exists() else None
        method = Domains(adatas, n_domains, modalities=modalities, layer=layer, protein_key=protein_key,
                         morphology_key=morphology_key, spatial_key=spatial_key, section_key=section_key,
                         n_neighbours=n_neighbours, latent_dim=latent_dim, state_dim=state_dim, n_pcs=n_pcs,
                         n_top_genes=n_top_genes, smoothness=smoothness, logit_scale=logit_scale, seed=run_seed)
        method.train(max_steps, lr=lr, batch_size=batch_size, seed=run_seed, device=device, progress=progress,
                     stop_tol=stop_tol, checkpoint_dir=folder, resume=resume_r)
        method.sample(-(-int(num_samples) // R), seed=run_seed)
        fits.append(method)
    method = fits[0] if R == 1 else pool_restarts(fits)
    outs = method.export()
    return outs[0] if isinstance(adatas, AnnData) else outs
