"""Align two unpaired slices or modalities with match probabilities and a posterior over the transform.

::

    res = pyrospatial.align(a, b, label_keys=["cell_type"])
    res.adata.obsm["spatial_aligned"]          # a's cells in b's frame (posterior mean)
    res.transform["angle"]                      # {"mean", "sd", "q05", "q50", "q95"} in radians

The model is :class:`pyrospatial.models.AlignmentModel` (its docstring is the generative
story), the guide :class:`pyrospatial.guides.AlignmentGuide`; they are trained by the one SVI
engine, :func:`pyrospatial.fit`, on an :class:`AlignmentData` (the whole pair is one batch:
the coupling lives on O(n k) candidate pairs, so no minibatching is needed).

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
``uns["pyrospatial"]["alignment"]``          ``transform`` (``angle`` rad, ``translation`` (2,),
                                             ``scale``; each ``mean``/``sd``/``q05``/``q50``/``q95``;
                                             ``angle_deg`` too), ``preregistration``,
                                             ``settings``, ``elbo``, ``b_obs_names``,
                                             ``feature_names``, ``versions``
==========================================  =========================================================

The transform maps a's coordinates ``s`` to b's frame:
``phi(s) = scale * R(angle) (s - centre_a) + centre_a + translation`` with ``centre_a`` a's
centroid (``uns[...]["settings"]["centre_a"]``) and ``R`` a counter-clockwise rotation.
"""


from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import pyro
import scipy.sparse as sp
import torch
from scipy.spatial import cKDTree

from pyrospatial.errors import CoordinateError, InputError
from pyrospatial.guides.alignment import AlignmentGuide
from pyrospatial.engine.infer import fit, versions
from pyrospatial.models.alignment import AlignmentBatch, AlignmentModel
from pyrospatial.engine.summary import summarise
from pyrospatial.data.alignment_data import AlignmentData
from pyrospatial.methods.alignment_features import _coords, _matrix, _normalise, _rot, prepare_features, preregister


__all__ = ["AlignmentResult", "align", "align_slices", "simulate_pair"]


# ------------------------------------------------------------------------------------------
# result
# ------------------------------------------------------------------------------------------
@dataclass
class AlignmentResult:
    """What :func:`align` returns.

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


def _h5ad_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _h5ad_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        arr = np.asarray(x)
        return arr if arr.dtype.kind in "fiub" else np.asarray([str(v) for v in x], dtype=object)
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if x is None:
        return ""
    return x


# ------------------------------------------------------------------------------------------
# align
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
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> AlignmentResult:
    """Align slice/modality ``a`` onto ``b``: match probabilities, a transform posterior, transfers.

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
        by gradient steps; the match noise is set by closed-form M-steps at every step, so 60
        steps suffice from the pre-registration.
    num_samples
        Posterior draws for the summaries (each draw: transform, embeddings, Sinkhorn plan).
    sinkhorn_iter
        Sinkhorn iterations per step (warm-started; 5x on the first step and on each draw).
    seed, device, progress
        As for :func:`pyrospatial.fit`.

    Raises
    ------
    InputError, CoordinateError
        Empty slices, missing/NaN coordinates, no shared features when ``features="shared"``,
        unknown label/feature keys, bad settings.
    """
    start = time.perf_counter()
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
    for name, value in (("k", k), ("steps", steps), ("num_samples", num_samples)):
        if int(value) < 1:
            raise InputError(f"{name} must be >= 1, got {value}.")
    if not radius > 0:
        raise InputError(f"radius must be > 0 (in units of b's cell spacing), got {radius}.")
    if not 0 < rho < 1:
        raise InputError(f"rho (prior probability of no partner) must lie in (0, 1), got {rho}.")
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
    ca = torch.tensor(xy_a / unit, dtype=torch.float32)
    cb = torch.tensor(xy_b / unit, dtype=torch.float32)
    centre_a = torch.tensor(pre["centre_a"] / unit, dtype=torch.float32)
    span = (xy_b.max(0) - xy_b.min(0)) / unit + 1.0
    batch = AlignmentBatch(
        features_a=torch.tensor(x_a, dtype=torch.float32), features_b=torch.tensor(x_b, dtype=torch.float32),
        coords_a=ca, coords_b=cb, centre_a=centre_a, log_area_b=float(np.log(span).sum()),
        tree_b=cKDTree(xy_b / unit),
    )
    loc = [pre["angle"], pre["translation"][0] / unit, pre["translation"][1] / unit] + ([0.0] if scale else [])
    sd = [angle_prior_sd, translation_prior_sd, translation_prior_sd] + ([0.1] if scale else [])
    d = x_a.shape[1]
    beta = min(1.0, a.n_obs / b.n_obs)
    model = AlignmentModel(x_a.shape[1], x_b.shape[1], d, torch.tensor(loc), torch.tensor(sd),
                           sigma_xy_init=0.5, rho=rho, lam=lam, beta=beta, spatial_weight=spatial_weight,
                           embedding_weight=embedding_weight, identity_decoders=(mode == "shared"), k=k,
                           observed_embedding=(mode == "shared"),
                           radius=radius)
    guide = AlignmentGuide(model, x_a.shape[1], x_b.shape[1], identity_encoders=(mode == "shared"),
                           n_iter=sinkhorn_iter)
    data = AlignmentData(batch, steps_per_epoch=min(int(steps), 50))
    result = fit(model, guide, data, max_steps=int(steps), lr=lr, lr_decay=0.1 ** (1.0 / max(int(steps), 1)),
                 device=device, seed=seed, progress=progress)
    model.eval(), guide.eval()

    # ---- posterior draws ------------------------------------------------------------------
    n, m = a.n_obs, b.n_obs
    batch = batch.to("cpu")
    model.cpu(), guide.cpu()
    match = sp.csr_matrix((n, m), dtype=np.float64)
    unmatched = np.zeros(n)
    moved_sum, moved_sq = np.zeros((n, 2)), np.zeros((n, 2))
    draws = []
    label_codes = {}
    for key in label_keys:
        cat = pd.Categorical(b.obs[key].astype(str))
        label_codes[key] = (cat.categories, np.asarray(cat.codes))
    label_draws = {key: [] for key in label_keys}
    if feature_keys:
        Fb = _normalise(_matrix(b, layer_b, "b"))[:, b.var_names.get_indexer(feature_keys)]
        f_mean = np.zeros((n, len(feature_keys)))
        f_sq = np.zeros((n, len(feature_keys)))
    torch.manual_seed(seed + 1)
    rows = np.repeat(np.arange(n), model.k)
    guide.n_iter = 2 * sinkhorn_iter
    iterator = range(int(num_samples))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="posterior draws", leave=False)
    with torch.no_grad():
        for _ in iterator:
            out = guide(batch)
            T = out["T"].numpy().astype(np.float64)
            cand = out["candidates"].numpy()
            kk = cand.shape[1]
            r = np.repeat(np.arange(n), kk)
            Tm = T[:, :kk] * out["valid"].numpy()
            P = sp.csr_matrix((Tm.ravel(), (r, cand.ravel())), shape=(n, m))
            P.sum_duplicates()
            match = match + P
            unmatched += T[:, kk]
            moved = out["moved"].numpy().astype(np.float64) * unit
            moved_sum += moved
            moved_sq += moved**2
            tr = out["transform"].numpy().astype(np.float64).copy()
            tr[1:3] *= unit
            draws.append(tr)
            pm = np.maximum(Tm.sum(1, keepdims=True), 1e-12)
            for key in label_keys:
                cats, codes = label_codes[key]
                probs = np.zeros((n, len(cats)))
                np.add.at(probs, (r, codes[cand.ravel()]), Tm.ravel())
                # given a match; a cell with (almost) no match mass falls back to b's label frequencies
                freq = np.bincount(codes, minlength=len(cats)) / len(codes)
                label_draws[key].append((probs + 1e-6 * freq) / (pm + 1e-6))
            if feature_keys:
                W = P.multiply(1.0 / pm).tocsr()
                mu = W @ Fb
                f_mean += mu
                f_sq += W @ (Fb**2)
    S = float(num_samples)
    match = (match / S).tocsr()
    match.eliminate_zeros()
    unmatched /= S
    aligned = moved_sum / S
    aligned_sd = np.sqrt(np.maximum(moved_sq / S - aligned**2, 0.0))
    draws = np.asarray(draws)
    dense_rows = match.copy()
    p = dense_rows.data
    ent = np.zeros(n)
    np.add.at(ent, np.repeat(np.arange(n), np.diff(match.indptr)), -p * np.log(np.maximum(p, 1e-300)))
    ent += -unmatched * np.log(np.maximum(unmatched, 1e-300))
    best = np.asarray(match.argmax(axis=1)).ravel()
    best_p = np.asarray(match.max(axis=1).todense()).ravel()

    samples = {"angle": draws[:, 0], "angle_deg": np.degrees(draws[:, 0]), "translation": draws[:, 1:3],
               "scale": np.exp(draws[:, 3]) if scale else np.ones(len(draws))}
    summary = summarise(samples)
    transform = {name: {stat: np.asarray(v).tolist() if np.ndim(v) else float(v) for stat, v in s.items()}
                 for name, s in summary.items()}

    out_ad = a.copy()
    out_ad.obsm["align_match_prob"] = match
    out_ad.obs["align_p_unmatched"] = unmatched
    out_ad.obs["align_match_entropy"] = ent
    out_ad.obs["align_best_match"] = np.asarray(b.obs_names)[best]
    out_ad.obs["align_best_match_prob"] = best_p
    out_ad.obsm["spatial_aligned"] = aligned
    out_ad.obsm["spatial_aligned_sd"] = aligned_sd
    for key in label_keys:
        cats = list(label_codes[key][0])
        stack = np.asarray(label_draws[key])
        pm, psd = stack.mean(0), stack.std(0, ddof=1) if len(stack) > 1 else np.zeros(stack.shape[1:])
        out_ad.obsm[f"align_{key}_probs"] = pd.DataFrame(pm, index=out_ad.obs_names, columns=cats)
        out_ad.obsm[f"align_{key}_probs_sd"] = pd.DataFrame(psd, index=out_ad.obs_names, columns=cats)
        out_ad.obs[f"align_{key}"] = pd.Categorical(np.asarray(cats)[pm.argmax(1)], categories=cats)
        out_ad.obs[f"align_{key}_prob"] = pm.max(1)
    if feature_keys:
        fm = f_mean / S
        out_ad.obsm["align_features_mean"] = fm
        out_ad.obsm["align_features_sd"] = np.sqrt(np.maximum(f_sq / S - fm**2, 0.0))
    settings = {
        "features": mode, "n_shared_features": len(shared), "n_components": int(x_a.shape[1]),
        "spatial_key": spatial_key, "scale": bool(scale), "angle_prior_sd": angle_prior_sd,
        "translation_prior_sd": translation_prior_sd * unit, "k": int(k), "radius": radius * unit,
        "unit": unit, "rho": rho, "lam": lam, "beta": beta, "spatial_weight": spatial_weight,
        "embedding_weight": embedding_weight, "steps": int(steps), "lr": lr, "num_samples": int(num_samples),
        "sinkhorn_iter": int(sinkhorn_iter), "seed": int(seed), "centre_a": pre["centre_a"],
        "sigma_xy": float(model.sigma_xy) * unit, "power": float(model.power), "tau": model.tau.tolist(),
        "nu": float(model.nu), "slope": model.slope.tolist(),
        "seconds": time.perf_counter() - start, "label_keys": label_keys, "feature_keys": feature_keys,
    }
    pre_out = {"angle": pre["angle"], "translation": np.asarray(pre["translation"], float),
               "score": pre["score"], "given": bool(pre.get("given", False))}
    out_ad.uns.setdefault("pyrospatial", {})
    out_ad.uns["pyrospatial"] = dict(out_ad.uns["pyrospatial"])
    out_ad.uns["pyrospatial"]["alignment"] = _h5ad_safe({
        "transform": transform, "preregistration": pre_out, "settings": settings,
        "elbo": result.elbo_history, "b_obs_names": list(map(str, b.obs_names)),
        "feature_names": feature_keys, "versions": versions(),
    })
    return AlignmentResult(
        adata=out_ad, match_prob=match, p_unmatched=unmatched, entropy=ent, transform=transform,
        aligned=aligned, aligned_sd=aligned_sd, transform_draws=draws, preregistration=pre_out,
        settings=settings, fit=result, model=model, guide=guide, batch=batch,
    )


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


def simulate_pair(n_cells: int = 500, *, angle: float = 0.5, translation: Sequence[float] = (30.0, -20.0),
                  drop_fraction: float = 0.1, jitter: float = 0.1, feature_noise: float = 0.3, seed: int = 0,
                  **tissue_kwargs: Any) -> tuple[ad.AnnData, ad.AnnData, np.ndarray]:
    """Two views of one simulated tissue with a known rigid transform and known matches.

    ``a`` is :func:`pyrospatial.data.sim.simulate_tissue`'s cells (proteins in ``X``,
    ``obs["cell_type"]``); ``b`` keeps a random ``1 - drop_fraction`` of them, moved by
    ``phi(s) = R(angle)(s - centroid_a) + centroid_a + translation`` plus Normal jitter of sd
    ``jitter`` x the median cell spacing, with features multiplied by LogNormal(0,
    ``feature_noise``) noise, in shuffled order. Returns ``(a, b, truth)`` with ``truth[i]``
    the row of b holding a's cell ``i`` (-1 when dropped).
    """
    from pyrospatial.data.sim import simulate_tissue

    rng = np.random.default_rng(seed)
    tissue = simulate_tissue(n_cells=n_cells, seed=seed, **tissue_kwargs)
    a = ad.AnnData(np.asarray(tissue.cells.X, dtype=np.float32), obs=tissue.cells.obs[["cell_type"]].copy(),
                   var=tissue.cells.var.copy())
    a.obsm["spatial"] = np.asarray(tissue.cells.obsm["spatial"], dtype=np.float64)
    n = a.n_obs
    keep = np.sort(rng.choice(n, size=int(round(n * (1 - drop_fraction))), replace=False))
    order = rng.permutation(len(keep))
    src = keep[order]
    xy = a.obsm["spatial"]
    spacing = float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1]))
    centre = xy.mean(0)
    moved = (xy[src] - centre) @ _rot(angle).T + centre + np.asarray(translation, float)
    moved += rng.normal(0.0, jitter * spacing, size=moved.shape)
    Xb = np.asarray(a.X[src], dtype=np.float64) * rng.lognormal(0.0, feature_noise, size=(len(src), a.n_vars))
    b = ad.AnnData(Xb.astype(np.float32), obs=a.obs.iloc[src].copy(), var=a.var.copy())
    b.obs_names = [f"b{i}" for i in range(len(src))]
    b.obsm["spatial"] = moved
    truth = -np.ones(n, dtype=np.int64)
    truth[src] = np.arange(len(src))
    return a, b, truth
