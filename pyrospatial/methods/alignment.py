"""Align two unpaired slices or modalities with match probabilities and a posterior over the transform.

::

    res = pyrospatial.align(a, b, label_keys=["cell_type"])
    res.adata.obsm["spatial_aligned"]          # a's cells in b's frame (posterior mean)
    res.transform["angle"]                      # {"mean", "sd", "q05", "q50", "q95"} in radians

The model is :class:`pyrospatial.models.AlignmentModel` (its docstring is the generative
story), the guide :class:`pyrospatial.guides.AlignmentGuide`; they are trained by the one SVI
engine, :func:`pyrospatial.fit`, on an :class:`~pyrospatial.data.alignment_data.AlignmentData`
(the whole pair is one batch: the coupling lives on O(n k) candidate pairs, so no minibatching
is needed), with the M-step of the match noise as a Lightning callback
(:class:`~pyrospatial.methods.alignment_em.NoiseMStep`).

:func:`align` is one call of the method class :class:`Alignment` (the shape of
:class:`~pyrospatial.methods.coral.CORAL`)::

    method = Alignment(a, b, label_keys=["cell_type"])   # validated inputs, features, model, guide
    method.train(steps=60)
    method.sample(num_samples=50)
    res = method.export()                                 # the AlignmentResult of align
    idata = method.to_inference_data()
    method.save("alignment.pt")                           # tensors and settings only (no pickle)

Keys written into a copy of ``a`` (``res.adata``; ``n`` cells of a, ``m`` cells of b)
-----------------------------------------------------------------------------------
==========================================  =========================================================
``obsm["align_match_prob"]``                 scipy CSR ``(n, m)``: posterior probability that a's cell
                                             ``i`` is b's cell ``j`` (mean over posterior draws of the
                                             Sinkhorn plan); columns in the order of
                                             ``uns["pyrospatial"]["alignment"]["b_obs_names"]``
``obs["align_p_unmatched"]``                 probability that the cell has no partner in b
``obs["align_match_entropy"]``               entropy (nats) of the cell's match distribution,
                                             unmatched slot included
``obs["align_best_match"]``                  name of the most probable partner in b
``obs["align_best_match_prob"]``             its probability
``obsm["spatial_aligned"]``                  posterior mean of the cell's coordinates in b's frame
``obsm["spatial_aligned_sd"]``               their posterior sd (per axis)
``obs["align_{key}"]``                       label ``key`` of b transferred: most probable label
``obs["align_{key}_prob"]``                  its probability (mean over draws; given a match; a
                                             cell with no match mass gets b's label frequencies)
``obsm["align_{key}_probs"]`` / ``_sd``      DataFrame (n, labels): probability of every label and
                                             its posterior sd across draws (given a match)
``obsm["align_features_mean"]`` / ``_sd``    b's features ``feature_keys`` (log1p-normalised) carried
                                             to a: mixture mean and sd over matches and draws
``uns["spatial"]``                           scanpy's layout, kept from ``a`` or created (no image)
``uns["pyrospatial"]["alignment"]``          ``transform`` (``angle`` rad, ``translation`` (2,),
                                             ``scale``; each ``mean``/``sd``/``q05``/``q50``/``q95``;
                                             ``angle_deg`` too), ``preregistration``,
                                             ``settings``, ``elbo``, ``b_obs_names``,
                                             ``feature_names``, ``versions`` (through
                                             :func:`~pyrospatial.engine.export.h5ad_safe`:
                                             ``None`` is written ``"None"``)
==========================================  =========================================================

The transform maps a's coordinates ``s`` to b's frame:
``phi(s) = scale * R(angle) (s - centre_a) + centre_a + translation`` with ``centre_a`` a's
centroid (``uns[...]["settings"]["centre_a"]``) and ``R`` a counter-clockwise rotation.
"""


from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pyro
import scipy.sparse as sp
import torch
from scipy.spatial import cKDTree

from pyrospatial.data.alignment_data import AlignmentBatch, AlignmentData
from pyrospatial.engine.export import add_spatial_uns, h5ad_safe
from pyrospatial.engine.infer import FitResult, fit, versions
from pyrospatial.engine.summary import summarise
from pyrospatial.errors import CoordinateError, InputError
from pyrospatial.guides.alignment import AlignmentGuide
from pyrospatial.methods.alignment_em import NoiseMStep
from pyrospatial.methods.alignment_features import (
    _coords,
    _matrix,
    _normalise,
    prepare_features,
    preregister,
    simulate_pair,
)
from pyrospatial.methods.method_io import (
    SAVE_FORMAT,
    check_saved,
    draws_to_inference_data,
)
from pyrospatial.models.alignment import AlignmentModel

__all__ = ["Alignment", "AlignmentResult", "align", "align_slices", "simulate_pair"]


# ------------------------------------------------------------------------------------------
# result
# ------------------------------------------------------------------------------------------
@dataclass
class AlignmentResult:
    """What :func:`align` (and :meth:`Alignment.export`) returns.

    ``adata``: a copy of ``a`` with every result under the keys of the module docstring;
    ``match_prob``: CSR ``(n, m)``; ``p_unmatched``, ``entropy``: ``(n,)``; ``transform``:
    ``{"angle", "angle_deg", "translation", "scale"}`` each ``{"mean", "sd", "q05", "q50",
    "q95"}``; ``aligned``/``aligned_sd``: ``(n, 2)``; ``transform_draws``: ``(S, 3|4)`` draws
    of ``(angle, tx, ty[, log_scale])`` in a's coordinate units; ``fit``: the engine's
    :class:`~pyrospatial.engine.infer.FitResult`.
    """

    adata: ad.AnnData
    match_prob: sp.csr_matrix
    p_unmatched: np.ndarray
    entropy: np.ndarray
    transform: dict[str, dict[str, Any]]
    aligned: np.ndarray
    aligned_sd: np.ndarray
    transform_draws: np.ndarray
    preregistration: dict[str, Any]
    settings: dict[str, Any]
    fit: Any = field(default=None, repr=False)
    model: Any = field(default=None, repr=False)
    guide: Any = field(default=None, repr=False)
    batch: Any = field(default=None, repr=False)

    def interval(self, name: str = "angle") -> tuple[float, float]:
        """The 90% central interval (q05, q95) of a scalar transform quantity."""
        s = self.transform[name]
        return float(s["q05"]), float(s["q95"])


# ------------------------------------------------------------------------------------------
# the method
# ------------------------------------------------------------------------------------------
class Alignment:
    """Alignment of slice/modality ``a`` onto ``b`` (the method behind :func:`align`).

    Building it validates the inputs, computes the features and the pre-registration, and
    builds the batch (the whole pair), the model and the guide; nothing is trained yet. Then
    :meth:`train`, :meth:`sample`, :meth:`export` (and :meth:`to_inference_data`, :meth:`save`,
    :meth:`load`). Parameters are those of :func:`align` that describe the data and the model;
    ``seed`` seeds the features' PCA and the model's initial weights (``align`` passes its seed).

    Raises
    ------
    InputError, CoordinateError
        As :func:`align`.
    """

    def __init__(
        self,
        a: ad.AnnData,
        b: ad.AnnData,
        *,
        spatial_key: str = "spatial",
        features: str = "auto",
        layer_a: str | None = None,
        layer_b: str | None = None,
        n_components: int = 20,
        label_keys: Sequence[str] | str | None = None,
        feature_keys: Sequence[str] | None = None,
        scale: bool = False,
        init: dict[str, Any] | None = None,
        angle_prior_sd: float = 0.2,
        translation_prior_sd: float = 3.0,
        k: int = 12,
        radius: float = 3.0,
        rho: float = 0.1,
        lam: float = 10.0,
        spatial_weight: float = 1.0,
        embedding_weight: float = 1.0,
        sinkhorn_iter: int = 20,
        footprint: float = 1.0,
        seed: int = 0,
    ) -> None:
        started = time.perf_counter()
        xy_a = _coords(a, spatial_key, "a")
        xy_b = _coords(b, spatial_key, "b")
        label_keys = [label_keys] if isinstance(label_keys, str) else list(label_keys or [])
        for key in label_keys:
            if key not in b.obs:
                raise InputError(f"label key {key!r} is not a column of b.obs (columns: {list(b.obs.columns)}).")
        feature_keys = list(feature_keys or [])
        missing = [g for g in feature_keys if g not in b.var_names]
        if missing:
            raise InputError(f"feature_keys {missing[:5]} are not in b.var_names.")
        if int(k) < 1:
            raise InputError(f"k must be >= 1, got {k}.")
        if not radius > 0:
            raise InputError(f"radius must be > 0 (in units of b's cell spacing), got {radius}.")
        if not 0 < rho < 1:
            raise InputError(f"rho (prior probability of no partner) must lie in (0, 1), got {rho}.")
        if not footprint >= 0:
            raise InputError(f"footprint must be >= 0 (side of a b spot's footprint in units of b's spacing), "
                             f"got {footprint}.")
        pyro.set_rng_seed(seed)

        x_a, x_b, mode, shared = prepare_features(a, b, features=features, n_components=n_components,
                                                  layer_a=layer_a, layer_b=layer_b, seed=seed)
        tree_b = cKDTree(xy_b)
        unit = float(np.median(tree_b.query(xy_b, k=2)[0][:, 1]))
        if not unit > 0:
            raise CoordinateError("b.obsm['spatial'] has duplicated coordinates for most cells (median spacing 0).")
        if init is not None:
            pre = {"angle": float(init["angle"]), "translation": np.asarray(init.get("translation", (0.0, 0.0)), float),
                   "centre_a": xy_a.mean(0), "score": float("nan"), "unit": unit, "given": True}
        else:
            pre = preregister(xy_a, xy_b, x_a if mode == "shared" else None, x_b if mode == "shared" else None,
                              unit=unit)
        # work in units of b's spacing h: coordinates / h
        span = (xy_b.max(0) - xy_b.min(0)) / unit + 1.0
        self.batch = AlignmentBatch(
            features_a=torch.tensor(x_a, dtype=torch.float32), features_b=torch.tensor(x_b, dtype=torch.float32),
            coords_a=torch.tensor(xy_a / unit, dtype=torch.float32), coords_b=torch.tensor(xy_b / unit, dtype=torch.float32),
            centre_a=torch.tensor(pre["centre_a"] / unit, dtype=torch.float32), log_area_b=float(np.log(span).sum()),
            tree_b=cKDTree(xy_b / unit),
        )
        loc = [pre["angle"], pre["translation"][0] / unit, pre["translation"][1] / unit] + ([0.0] if scale else [])
        sd = [angle_prior_sd, translation_prior_sd, translation_prior_sd] + ([0.1] if scale else [])
        beta = min(1.0, a.n_obs / b.n_obs)
        self.model = AlignmentModel(
            x_a.shape[1], x_b.shape[1], x_a.shape[1], torch.tensor(loc), torch.tensor(sd), sigma_xy_init=0.5, rho=rho,
            lam=lam, beta=beta, spatial_weight=spatial_weight, embedding_weight=embedding_weight,
            identity_decoders=(mode == "shared"), k=k, observed_embedding=(mode == "shared"), radius=radius,
            footprint_var=float(footprint) ** 2 / 12.0,
        )
        self.guide = AlignmentGuide(self.model, x_a.shape[1], x_b.shape[1], identity_encoders=(mode == "shared"),
                                    n_iter=sinkhorn_iter)
        self.a, self.b = a, b
        self.layer_a, self.layer_b = layer_a, layer_b
        self.unit, self.mode, self.label_keys, self.feature_keys = unit, mode, label_keys, feature_keys
        self.preregistration = {"angle": pre["angle"], "translation": np.asarray(pre["translation"], float),
                                "score": pre["score"], "given": bool(pre.get("given", False))}
        #: data and model settings, as recorded in ``uns["pyrospatial"]["alignment"]["settings"]``
        self.settings: dict[str, Any] = {
            "features": mode, "n_shared_features": len(shared), "n_components": int(x_a.shape[1]),
            "spatial_key": spatial_key, "layer_a": layer_a, "layer_b": layer_b, "scale": bool(scale),
            "angle_prior_sd": angle_prior_sd,
            "translation_prior_sd": translation_prior_sd * unit, "k": int(k), "radius": radius * unit,
            "unit": unit, "rho": rho, "lam": lam, "beta": beta, "spatial_weight": spatial_weight,
            "embedding_weight": embedding_weight, "sinkhorn_iter": int(sinkhorn_iter), "seed": int(seed),
            "footprint": float(footprint) * unit,
            "centre_a": pre["centre_a"], "label_keys": label_keys, "feature_keys": feature_keys,
        }
        self.setup_seconds = time.perf_counter() - started
        self.fit_result: FitResult | None = None
        #: what :meth:`train` did (steps, ELBO, settings); restored by :meth:`load`
        self.train_record: dict[str, Any] | None = None
        #: per-draw arrays of the last :meth:`sample` (see there), or None
        self.draws: dict[str, np.ndarray] | None = None
        self._moments: dict[str, Any] | None = None
        self.trained_potential = torch.zeros(0)

    # ------------------------------------------------------------------------------------
    def train(self, steps: int = 60, *, lr: float = 0.02, seed: int = 0, device: str = "cpu", progress: bool = True,
              **fit_kwargs: Any) -> FitResult:
        """Variational EM by :func:`pyrospatial.fit`: ``steps`` SVI steps (Adam at ``lr``, decayed
        10x over the run), each followed by the M-step of the match noise
        (:class:`~pyrospatial.methods.alignment_em.NoiseMStep`, a Lightning callback)."""
        if int(steps) < 1:
            raise InputError(f"steps must be >= 1, got {steps}.")
        started = time.perf_counter()
        data = AlignmentData(self.batch, steps_per_epoch=min(int(steps), 50))
        callbacks = list(fit_kwargs.pop("callbacks", []) or []) + [NoiseMStep(self.model, self.guide)]
        self.model.train(), self.guide.train()
        result = fit(self.model, self.guide, data, max_steps=int(steps), batch_size=data.batch_size, lr=lr,
                     lr_decay=0.1 ** (1.0 / max(int(steps), 1)), device=device, seed=seed, progress=progress,
                     callbacks=callbacks, **fit_kwargs)
        self.model.eval(), self.guide.eval()
        self.guide.last_draw = None
        # the Sinkhorn potentials at the end of training warm-start every sample() (same draws each time)
        self.trained_potential = self.guide.g_potential.detach().cpu().clone()
        self.fit_result = result
        self.train_record = {"steps": int(steps), "lr": float(lr), "train_seed": int(seed), "device": str(device),
                             "elbo": np.asarray(result.elbo_history, dtype=np.float64),
                             "seconds": time.perf_counter() - started}
        self.draws = None
        return result

    @torch.no_grad()
    def sample(self, num_samples: int = 50, *, seed: int = 0, progress: bool = False) -> dict[str, np.ndarray]:
        """Joint posterior draws: each draw is a transform, the embeddings and the Sinkhorn plan.

        Returns (and keeps in :attr:`draws`) per-draw arrays: ``transform`` ``(S, 3|4)``
        (``angle`` rad, ``tx``, ``ty`` in a's coordinate units[, ``log_scale``]), ``aligned``
        ``(S, n, 2)`` (a's cells in b's frame), ``p_unmatched`` ``(S, n)`` and, per label key,
        ``label_probs_{key}`` ``(S, n, labels)``. The match probabilities and the transferred
        features are averaged over the draws as they are made (their per-draw plans are
        ``(n, k)`` each). The torch RNG is seeded with ``seed + 1`` and the Sinkhorn iterations
        start from the potentials at the end of training, so equal seeds give equal draws.
        """
        self._require_trained()
        if int(num_samples) < 1:
            raise InputError(f"num_samples must be >= 1, got {num_samples}.")
        started = time.perf_counter()
        b, n, m = self.b, self.a.n_obs, self.b.n_obs
        batch = self.batch.to("cpu")
        self.model.cpu(), self.guide.cpu()
        self.model.eval(), self.guide.eval()
        unit, S = self.unit, int(num_samples)
        match = sp.csr_matrix((n, m), dtype=np.float64)
        label_codes = {}
        for key in self.label_keys:
            cat = pd.Categorical(b.obs[key].astype(str))
            label_codes[key] = (cat.categories, np.asarray(cat.codes))
        draws: dict[str, list[np.ndarray]] = {"transform": [], "aligned": [], "p_unmatched": []}
        draws.update({f"label_probs_{key}": [] for key in self.label_keys})
        if self.feature_keys:
            Fb = _normalise(_matrix(b, self.layer_b, "b"))[:, b.var_names.get_indexer(self.feature_keys)]
            f_mean = np.zeros((n, len(self.feature_keys)))
            f_sq = np.zeros((n, len(self.feature_keys)))
        torch.manual_seed(seed + 1)
        self.guide.g_potential = self.trained_potential.clone()
        sinkhorn_iter = self.guide.n_iter
        self.guide.n_iter = 2 * self.settings["sinkhorn_iter"]
        iterator = range(S)
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc="posterior draws", leave=False)
        try:
            for _ in iterator:
                out = self.guide(batch)
                T = out["T"].numpy().astype(np.float64)
                cand = out["candidates"].numpy()
                kk = cand.shape[1]
                r = np.repeat(np.arange(n), kk)
                Tm = T[:, :kk] * out["valid"].numpy()
                P = sp.csr_matrix((Tm.ravel(), (r, cand.ravel())), shape=(n, m))
                P.sum_duplicates()
                match = match + P
                draws["p_unmatched"].append(T[:, kk])
                draws["aligned"].append(out["moved"].numpy().astype(np.float64) * unit)
                tr = out["transform"].numpy().astype(np.float64).copy()
                tr[1:3] *= unit
                draws["transform"].append(tr)
                pm = np.maximum(Tm.sum(1, keepdims=True), 1e-12)
                for key in self.label_keys:
                    cats, codes = label_codes[key]
                    probs = np.zeros((n, len(cats)))
                    np.add.at(probs, (r, codes[cand.ravel()]), Tm.ravel())
                    # given a match; a cell with (almost) no match mass falls back to b's label frequencies
                    freq = np.bincount(codes, minlength=len(cats)) / len(codes)
                    draws[f"label_probs_{key}"].append((probs + 1e-6 * freq) / (pm + 1e-6))
                if self.feature_keys:
                    W = P.multiply(1.0 / pm).tocsr()
                    f_mean += W @ Fb
                    f_sq += W @ (Fb**2)
        finally:
            self.guide.n_iter = sinkhorn_iter
        match = (match / S).tocsr()
        match.eliminate_zeros()
        self.draws = {key: np.asarray(values) for key, values in draws.items()}
        self._moments = {"match_prob": match, "num_samples": S, "seed": int(seed),
                         "seconds": time.perf_counter() - started,
                         "label_categories": {key: list(label_codes[key][0]) for key in self.label_keys}}
        if self.feature_keys:
            self._moments["features_mean"] = f_mean / S
            self._moments["features_sq"] = f_sq / S
        return self.draws

    def export(self) -> AlignmentResult:
        """An :class:`AlignmentResult` whose ``adata`` (a copy of ``a``) holds every result under
        the keys of the module docstring (``uns`` through :func:`~pyrospatial.engine.export.h5ad_safe`)."""
        draws, moments, record = self._require_draws(), self._moments, self.train_record
        b, scale = self.b, self.settings["scale"]
        transform_draws = draws["transform"]
        summary = summarise({
            "angle": transform_draws[:, 0], "angle_deg": np.degrees(transform_draws[:, 0]),
            "translation": transform_draws[:, 1:3],
            "scale": np.exp(transform_draws[:, 3]) if scale else np.ones(len(transform_draws)),
            "aligned": draws["aligned"], "p_unmatched": draws["p_unmatched"],
            **{key: values for key, values in draws.items() if key.startswith("label_probs_")},
        })
        transform = {name: {stat: np.asarray(v).tolist() if np.ndim(v) else float(v) for stat, v in summary[name].items()}
                     for name in ("angle", "angle_deg", "translation", "scale")}
        match = moments["match_prob"]
        unmatched = summary["p_unmatched"]["mean"]
        aligned, aligned_sd = summary["aligned"]["mean"], summary["aligned"]["sd"]
        n = match.shape[0]
        p = match.data
        ent = np.zeros(n)
        np.add.at(ent, np.repeat(np.arange(n), np.diff(match.indptr)), -p * np.log(np.maximum(p, 1e-300)))
        ent += -unmatched * np.log(np.maximum(unmatched, 1e-300))
        best = np.asarray(match.argmax(axis=1)).ravel()
        best_p = np.asarray(match.max(axis=1).todense()).ravel()

        out_ad = self.a.copy()
        out_ad.obsm["align_match_prob"] = match
        out_ad.obs["align_p_unmatched"] = unmatched
        out_ad.obs["align_match_entropy"] = ent
        out_ad.obs["align_best_match"] = np.asarray(b.obs_names)[best]
        out_ad.obs["align_best_match_prob"] = best_p
        out_ad.obsm["spatial_aligned"] = aligned
        out_ad.obsm["spatial_aligned_sd"] = aligned_sd
        for key in self.label_keys:
            cats = moments["label_categories"][key]
            pm, psd = summary[f"label_probs_{key}"]["mean"], summary[f"label_probs_{key}"]["sd"]
            out_ad.obsm[f"align_{key}_probs"] = pd.DataFrame(pm, index=out_ad.obs_names, columns=cats)
            out_ad.obsm[f"align_{key}_probs_sd"] = pd.DataFrame(psd, index=out_ad.obs_names, columns=cats)
            out_ad.obs[f"align_{key}"] = pd.Categorical(np.asarray(cats)[pm.argmax(1)], categories=cats)
            out_ad.obs[f"align_{key}_prob"] = pm.max(1)
        if self.feature_keys:
            fm = moments["features_mean"]
            out_ad.obsm["align_features_mean"] = fm
            out_ad.obsm["align_features_sd"] = np.sqrt(np.maximum(moments["features_sq"] - fm**2, 0.0))
        settings = {
            **self.settings, "steps": record["steps"], "lr": record["lr"], "num_samples": moments["num_samples"],
            "sigma_xy": float(self.model.sigma_xy) * self.unit, "power": float(self.model.power),
            "tau": self.model.tau.tolist(), "nu": float(self.model.nu), "slope": self.model.slope.tolist(),
            "seconds": self.setup_seconds + record["seconds"] + moments["seconds"],
        }
        out_ad.uns["pyrospatial"] = dict(out_ad.uns.get("pyrospatial", {}))
        out_ad.uns["pyrospatial"]["alignment"] = h5ad_safe({
            "transform": transform, "preregistration": self.preregistration, "settings": settings,
            "elbo": record["elbo"], "b_obs_names": list(map(str, b.obs_names)),
            "feature_names": self.feature_keys, "versions": versions(),
        })
        add_spatial_uns(out_ad)  # scanpy's uns['spatial']: a's own (e.g. Visium's) kept, else one without image
        return AlignmentResult(
            adata=out_ad, match_prob=match, p_unmatched=unmatched, entropy=ent, transform=transform,
            aligned=aligned, aligned_sd=aligned_sd, transform_draws=transform_draws,
            preregistration=self.preregistration, settings=settings, fit=self.fit_result, model=self.model,
            guide=self.guide, batch=self.batch,
        )

    def to_inference_data(self):
        """``arviz.InferenceData`` of the last :meth:`sample`'s draws (one chain): ``angle``,
        ``translation`` (``axis``), ``scale`` (with ``scale=True``), ``aligned`` (``cell_a``,
        ``axis``), ``p_unmatched`` (``cell_a``) and ``label_probs_{key}`` (``cell_a``, ``{key}``),
        and the training loss per step in ``sample_stats``."""
        draws = self._require_draws()
        transform = draws["transform"]
        posterior = {"angle": transform[:, 0], "translation": transform[:, 1:3], "aligned": draws["aligned"],
                     "p_unmatched": draws["p_unmatched"]}
        dims = {"angle": [], "translation": ["axis"], "aligned": ["cell_a", "axis"], "p_unmatched": ["cell_a"],
                "scale": []}
        coords: dict[str, Any] = {"axis": ["x", "y"], "cell_a": list(map(str, self.a.obs_names))}
        if self.settings["scale"]:
            posterior["scale"] = np.exp(transform[:, 3])
        for key, cats in self._moments["label_categories"].items():
            posterior[f"label_probs_{key}"] = draws[f"label_probs_{key}"]
            dims[f"label_probs_{key}"] = ["cell_a", str(key)]
            coords[str(key)] = cats
        return draws_to_inference_data(posterior, dims, coords, elbo=self.train_record["elbo"],
                                       attrs={"method": "Alignment", "seed": self._moments["seed"]})

    # ------------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Save the trained model and guide (state dicts, and the Sinkhorn potentials at the end
        of training, which warm-start the first draw), the settings and the training record (tensors,
        numbers and strings only; read back by :meth:`load` with ``weights_only=True``)."""
        record = self._require_trained()
        state = {
            "method": "Alignment", "format": SAVE_FORMAT, "identity": self._identity(),
            "model": self.model.state_dict(), "guide": self.guide.state_dict(),
            "g_potential": self.trained_potential,
            "train": {**{k: v for k, v in record.items() if k != "elbo"}, "elbo": torch.as_tensor(record["elbo"])},
        }
        torch.save(state, path)

    def load(self, path: str) -> Alignment:
        """Load what :meth:`save` wrote, into an :class:`Alignment` built on the same inputs and
        settings (checked: a mismatch raises :class:`~pyrospatial.errors.InputError` naming the field).
        Draws are not saved: call :meth:`sample` again (same seed, same draws)."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        check_saved(state, "Alignment", self._identity(), path)
        self.model.load_state_dict(state["model"])
        self.guide.load_state_dict(state["guide"])
        self.trained_potential = state["g_potential"].clone()
        self.model.eval(), self.guide.eval()
        train = dict(state["train"])
        train["elbo"] = train["elbo"].numpy().astype(np.float64)
        self.train_record, self.fit_result, self.draws, self._moments = train, None, None, None
        return self

    # ------------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        identity = {key: (value.tolist() if isinstance(value, np.ndarray) else value)
                    for key, value in self.settings.items()}
        return {**identity, "n_a": int(self.a.n_obs), "n_b": int(self.b.n_obs)}

    def _require_trained(self) -> dict[str, Any]:
        if self.train_record is None:
            raise InputError("this Alignment is not trained: call train() (or load() a saved one) first.")
        return self.train_record

    def _require_draws(self) -> dict[str, np.ndarray]:
        if self.draws is None:
            raise InputError("no posterior draws: call sample(num_samples) after train() first.")
        return self.draws


# ------------------------------------------------------------------------------------------
# one call
# ------------------------------------------------------------------------------------------
def align(
    a: ad.AnnData,
    b: ad.AnnData,
    *,
    spatial_key: str = "spatial",
    features: str = "auto",
    layer_a: str | None = None,
    layer_b: str | None = None,
    n_components: int = 20,
    label_keys: Sequence[str] | str | None = None,
    feature_keys: Sequence[str] | None = None,
    scale: bool = False,
    init: dict[str, Any] | None = None,
    angle_prior_sd: float = 0.2,
    translation_prior_sd: float = 3.0,
    k: int = 12,
    radius: float = 3.0,
    rho: float = 0.1,
    lam: float = 10.0,
    spatial_weight: float = 1.0,
    embedding_weight: float = 1.0,
    steps: int = 60,
    lr: float = 0.02,
    num_samples: int = 50,
    sinkhorn_iter: int = 20,
    footprint: float = 1.0,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    checkpoint_dir: str | None = None,
    resume: str | None = None,
) -> AlignmentResult:
    """Align slice/modality ``a`` onto ``b``: match probabilities, a transform posterior, transfers.

    One call of :class:`Alignment`: build it (validation, features, pre-registration, model,
    guide), ``train``, ``sample`` and ``export``.

    Parameters
    ----------
    a, b
        AnnData with features in ``X`` (or ``layer_a``/``layer_b``) and ``obsm[spatial_key]``
        (n, 2). a's cells are matched to b's and moved into b's frame.
    features
        ``"shared"`` (genes in both, one joint PCA, which is the embedding itself), ``"separate"``
        (different panels; one PCA per side, learned encoders/decoders into a latent embedding),
        ``"auto"`` (shared when >= 2 features are shared).
    n_components
        Principal components per modality (the embedding dimension).
    label_keys
        ``b.obs`` columns to transfer to a (with probabilities and their sd).
    feature_keys
        ``b.var_names`` whose log1p-normalised values are transferred (mixture mean and sd).
    scale
        Also infer an isotropic scale (``log_scale`` latent, prior Normal(0, 0.1)).
    init
        ``{"angle": rad, "translation": (tx, ty)}`` to use instead of the automatic
        pre-registration (:func:`preregister`) as the prior centre.
    angle_prior_sd, translation_prior_sd
        Prior sd of the angle (rad) and of the translation (in units of b's median
        nearest-neighbour spacing ``h``) around the pre-registration.
    k, radius
        Candidate partners: the ``k`` nearest b cells within ``radius * h`` of each moved a cell.
    rho, lam
        Prior probability of no partner; strength of the soft one-to-one constraint.
    spatial_weight, embedding_weight
        Weights of the coordinate and embedding terms of the match log-likelihood (1, the
        plain likelihood, by default; nothing is hand-tempered). The evidence of each embedding
        dimension is set by the model's fitted per-dimension slope, scale and Student-t degrees
        of freedom (see :class:`~pyrospatial.models.alignment.AlignmentModel`), so components
        that carry only noise do not over-count.
    steps, lr
        SVI steps (``fit``'s ``max_steps``) and Adam's learning rate (decayed 10x over the run).
        Only q(transform) (and, for ``features="separate"``, the encoders/decoders) is learned
        by gradient steps; the match noise is set by closed-form M-steps after every step, so
        60 steps suffice from the pre-registration.
    num_samples
        Posterior draws for the summaries (each draw: transform, embeddings, Sinkhorn plan).
    sinkhorn_iter
        Sinkhorn iterations per step (warm-started; 5x on the first step and on each draw).
    footprint
        Side of a b cell's or spot's footprint in units of b's spacing ``h`` (1 by default: a
        spot stands for the tissue of its grid cell). The tissue matching an a cell lies anywhere
        in its partner's footprint, so the per-axis variance of the spatial error is held at or
        above ``(footprint h)^2 / 12`` (see ``footprint_var`` of
        :class:`~pyrospatial.models.alignment.AlignmentModel`); this keeps two sections on one
        spot lattice from collapsing the spatial error, and the coupling, onto the nearest spot
        once the grids coincide. 0 leaves the spatial error scale free.
    seed, device, progress, checkpoint_dir, resume
        As for :func:`pyrospatial.fit` (``last.ckpt`` written in ``checkpoint_dir`` during
        training; ``resume="last"`` continues a killed fit from it).

    Raises
    ------
    InputError, CoordinateError
        Empty slices, missing/NaN coordinates, no shared features when ``features="shared"``,
        unknown label/feature keys, bad settings.
    """
    for name, value in (("steps", steps), ("num_samples", num_samples)):
        if int(value) < 1:
            raise InputError(f"{name} must be >= 1, got {value}.")
    method = Alignment(
        a, b, spatial_key=spatial_key, features=features, layer_a=layer_a, layer_b=layer_b,
        n_components=n_components, label_keys=label_keys, feature_keys=feature_keys, scale=scale, init=init,
        angle_prior_sd=angle_prior_sd, translation_prior_sd=translation_prior_sd, k=k, radius=radius, rho=rho,
        lam=lam, spatial_weight=spatial_weight, embedding_weight=embedding_weight, sinkhorn_iter=sinkhorn_iter,
        footprint=footprint, seed=seed,
    )
    method.train(steps, lr=lr, seed=seed, device=device, progress=progress, checkpoint_dir=checkpoint_dir,
                 resume=resume)
    method.sample(num_samples, seed=seed, progress=progress)
    return method.export()


def align_slices(slices: Sequence[ad.AnnData], *, mode: str = "sequential", reference: int = 0,
                 **kwargs: Any) -> list[AlignmentResult | None]:
    """Bring several slices into one coordinate frame (the frame of ``slices[reference]``).

    ``mode="sequential"``: slice ``i`` is aligned onto slice ``i - 1`` *as already aligned*
    (its ``obsm["spatial_aligned"]``), walking outwards from ``reference``, so each transform
    is between neighbours; ``mode="center"`` (or ``"centre"``): every slice is aligned directly
    onto the reference. Returns one :class:`AlignmentResult` per slice (``None`` for the
    reference, whose coordinates are kept); every result's ``adata.obsm["spatial_aligned"]``
    is in the reference frame. ``kwargs`` go to :func:`align`. In sequential mode the sd
    of the aligned coordinates is that of the last pairwise step only.
    """
    if mode not in ("sequential", "center", "centre"):
        raise InputError(f"mode must be 'sequential' or 'center', got {mode!r}.")
    if len(slices) < 2:
        raise InputError(f"align_slices needs at least 2 slices, got {len(slices)}.")
    if not 0 <= reference < len(slices):
        raise InputError(f"reference must index slices (0..{len(slices) - 1}), got {reference}.")
    spatial_key = kwargs.get("spatial_key", "spatial")
    results: list[AlignmentResult | None] = [None] * len(slices)
    frames: dict[int, ad.AnnData] = {reference: slices[reference]}
    order = list(range(reference + 1, len(slices))) + list(range(reference - 1, -1, -1))
    for i in order:
        if mode == "sequential":
            j = i - 1 if i > reference else i + 1
        else:
            j = reference
        res = align(slices[i], frames[j], **kwargs)
        results[i] = res
        moved = slices[i].copy()
        moved.obsm[spatial_key] = res.aligned
        frames[i] = moved
    return results
