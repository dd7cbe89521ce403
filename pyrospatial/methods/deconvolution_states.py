"""Deconvolution with a continuous state per spot and cell type (``deconvolve(model="states")``),
and the choice of settings by held-out genes (no ground truth).

The fixed per-type signatures of :class:`~pyrospatial.methods.deconvolution.Deconvolution` cannot
follow a type whose expression drifts across the tissue. :class:`StateDeconvolution` first learns
each type's state space from the reference cells
(:class:`~pyrospatial.models.celltype_states.CellTypeStateReferenceModel`: a decoder per type
from a state ``v`` of ``n_states`` numbers to the type's log-expression shift), freezes the
decoders, then fits the spots with
:class:`~pyrospatial.models.celltype_states.CellTypeStatesModel`: per spot ``j`` and type ``t``
an abundance ``w_jt`` and a state ``v_jt``, the spot's expected counts
``sum_t w_jt s_t(v_jt)`` (plus platform effects, background, detection).

Keys added to those of :mod:`pyrospatial.methods.deconvolution` (``stat`` in ``mean, sd, q05,
q50, q95``):

- ``obsm[f"type_state_{stat}"]``: DataFrame spots x ``T * K`` with columns ``f"{type}_v{k}"``
  (``k = 1..K``), the posterior of each spot's state of each type (``type_state_mean`` columns
  also in ``obs`` as ``type_state_mean_{type}_v{k}``, for maps). A state reads on the axes the
  reference cells of that type span (prior ``Normal(0, 1)`` per axis); a type absent from a
  spot keeps a state near its prior (sd near 1);
- ``obsm[f"type_expression_{stat}"]`` (only with ``expression_genes``): DataFrame spots x
  ``T * len(expression_genes)`` with columns ``f"{type}:{gene}"``, ``m_g s_t(v_jt)_g``, the
  expected counts of gene ``g`` in one cell of type ``t`` in spot ``j`` (spots' platform, before
  the spot's detection efficiency);
- ``uns["deconvolution"]["states"]``: ``n_states``, ``state_columns``, ``expression_genes``,
  the reference fit (``reference_steps``, ``reference_final_loss``) and
  ``abundance_width_factor`` (the scaling of ``q(w)``'s width chosen after training by the
  importance-weighted bound, :mod:`~pyrospatial.methods.deconvolution_width`);
- ``uns["deconvolution"]["globals"]`` has no ``signature`` (the decoders replace it).

:func:`choose_settings` scores candidate settings (model and steps) by held-out genes and
returns the best: the same call on every data set, never reading any truth.

Why ``model="states"`` is the default of :func:`~pyrospatial.methods.deconvolution.deconvolve`:
:func:`choose_settings` (3 gene folds, 250 steps, seed 0) preferred it on every data set of
``benchmarks/deconvolution.py`` built from another random split than the scored one
(reference/spatial split seed 1 for osmFISH, simulator seed 1 for ``sim_gradient``), with the
true counts deleted before any fit. Mean held-out-gene Poisson deviance, signatures against
states: sim_gradient 19.28 / 4.36, osmFISH broad classes 100 µm 22.54 / 17.67 and 50 µm
11.69 / 9.88, osmFISH 31 types 100 µm 16.60 / 13.24 and 50 µm 9.72 / 7.96. It costs a reference
fit on top (about 2 to 3 times the signatures model's CPU time). Run :func:`choose_settings` on
your own data to choose there.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyro
import torch
from anndata import AnnData

from pyrospatial.data.spot_counts import SpotCounts
from pyrospatial.engine.export import h5ad_safe
from pyrospatial.engine.infer import fit
from pyrospatial.engine.posterior import sample_posterior
from pyrospatial.engine.summary import summarise
from pyrospatial.errors import InputError
from pyrospatial.methods.deconvolution import (  # noqa: F401  (WIDTH_FACTORS re-exported)
    DIMS,
    STATS,
    UNS_KEY,
    WIDTH_FACTORS,
    Deconvolution,
    round_at_random,
)

__all__ = ["MODELS", "StateDeconvolution", "check_model_name", "check_n_states", "choose_settings",
           "states_heldout_score"]

#: The values of ``deconvolve(model=...)``.
MODELS = ("signatures", "states")

#: Default shape of the abundances' Gamma guide at the start (the signatures model's is 2).
#: A tighter start (coefficient of variation 0.32 instead of 0.71) keeps the sampled abundances
#: from drowning the states' gradients in noise early on: on simulate_gradient(seed=1) of
#: ``tests/test_deconvolution_states.py`` (400 steps) the proportion RMSE went from 0.075 (shape 2)
#: to 0.041 (shape 10); the signatures model did not gain (0.089 to 0.090).
STATES_INIT_SHAPE = 10.0



def check_model_name(model: str) -> str:
    """``model`` if it is one of :data:`MODELS`, else an :class:`InputError` naming the field."""
    if not isinstance(model, str) or model not in MODELS:
        raise InputError(f"model must be one of {list(MODELS)}, got {model!r}: 'signatures' (fixed per-type "
                         "signatures) or 'states' (a continuous state per spot and type).")
    return model


def check_n_states(n_states: Any) -> int:
    """``n_states`` as an int >= 1, else an :class:`InputError` naming the field."""
    if isinstance(n_states, bool) or not isinstance(n_states, (int, np.integer)) or int(n_states) < 1:
        raise InputError(f"n_states must be an integer >= 1 (the dimension of each type's state; 2 to 5 is "
                         f"usual), got {n_states!r}.")
    return int(n_states)


class StateDeconvolution(Deconvolution):
    """Deconvolution with a continuous state per spot and type (``model="states"``).

    Built on the same inputs as :class:`~pyrospatial.methods.deconvolution.Deconvolution`
    (``kwargs``: ``cells_per_spot``, ``layer``, priors, ...; ``smoothness`` and ``total_cv`` are
    not part of this model; ``init_shape`` defaults to :data:`STATES_INIT_SHAPE`), plus:

    Parameters
    ----------
    n_states
        ``K``, the dimension of each type's state (>= 1; 2 to 5 is usual).
    expression_genes
        Genes whose per-spot per-type expected expression is exported (``type_expression_*``).
    heldout_genes
        Genes left out of the spots' likelihood (still in the reference model): what
        :func:`states_heldout_score` predicts.
    decoder_hidden
        Hidden units of each type's decoder.
    seed
        Seed of the networks' initial weights (decoders, encoders): the same seed builds the
        same modules (the global torch generator is left as it was).
    """

    global_sites = ("platform_effect", "background", "inv_sqrt_dispersion", "type_frequency", "concentration")
    #: the mean-field guide treats w_jt and the state v_jt apart: the ELBO's width of q(w) is the
    #: width given v, too narrow (see :mod:`~pyrospatial.methods.deconvolution_width`)
    WIDTH_CRITERION = "importance_weighted"
    dims: ClassVar[dict[str, tuple[str, ...]]] = {**DIMS, "state": ("spot", "cell_type", "state_axis"),
            "type_expression": ("spot", "cell_type", "expression_gene")}

    def __init__(
        self,
        spots: AnnData,
        reference: AnnData,
        cell_type_key: str = "cell_type",
        *,
        n_states: int = 3,
        expression_genes: list[str] | None = None,
        heldout_genes: list[str] | None = None,
        decoder_hidden: int = 16,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        from pyrospatial.guides.celltype_states import (
            CellTypeStateReferenceGuide,
            CellTypeStatesGuide,
        )
        from pyrospatial.models.celltype_states import (
            CellTypeStateReferenceModel,
            CellTypeStatesModel,
            TypeStateDecoder,
        )

        K = check_n_states(n_states)
        for name in ("smoothness", "total_cv"):
            if kwargs.get(name) not in (None, 0, 0.0):
                raise InputError(f"{name}={kwargs[name]!r} is not part of model='states'; leave it at its default "
                                 "or use model='signatures'.")
        kwargs.setdefault("init_shape", STATES_INIT_SHAPE)
        super().__init__(spots, reference, cell_type_key, **kwargs)
        genes = list(self.genes)
        self.expression_genes = self._gene_list(expression_genes, "expression_genes")
        heldout = self._gene_list(heldout_genes, "heldout_genes")
        fit_genes = np.asarray([g for g, name in enumerate(genes) if name not in set(heldout)], dtype=np.int64)
        if fit_genes.size == 0:
            raise InputError("heldout_genes leaves no gene to fit the spots on: hold out fewer genes.")
        T = len(self.cell_types)
        codes = np.asarray(self._labels.codes, dtype=np.int64)
        sums = np.zeros((T, len(genes)))
        np.add.at(sums, codes, self._ref_counts)
        mean = (sums + 0.1) / np.bincount(codes, minlength=T)[:, None]
        # the reference cells as a SpotCounts (random coordinates: random minibatches of cells)
        rng = np.random.default_rng(seed)
        self.reference_data = SpotCounts(self._ref_counts, rng.random((codes.size, 2)), T, n_neighbours=0,
                                         gene_names=genes)
        hint, s = self.hint, self.settings
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.decoder = TypeStateDecoder(torch.as_tensor(mean, dtype=torch.float32), K, hidden=int(decoder_hidden))
            self.reference_model = CellTypeStateReferenceModel(self.decoder, torch.as_tensor(codes))
            ref_lib = float(np.log(np.maximum(self._ref_counts.sum(1), 1.0)).mean())
            self.reference_guide = CellTypeStateReferenceGuide(len(genes), T, K, torch.as_tensor(codes),
                                                               log_library_mean=ref_lib)
            self.model = CellTypeStatesModel(
                self.decoder, torch.as_tensor(hint if hint.size > 1 else hint[0]),
                concentration_mean=s["concentration_mean"], concentration_shape=s["concentration_shape"],
                platform_cv=s["platform_cv"], detection_cv=s["detection_cv"],
                background_fraction=s["background_fraction"], fit_genes=torch.as_tensor(fit_genes),
            )
            self.guide = CellTypeStatesGuide(
                len(genes), K, torch.as_tensor(self._init_abundance), self.model.background_mean,
                fit_genes=torch.as_tensor(fit_genes), detection=s["detection_cv"] > 0, init_shape=s["init_shape"],
                init_concentration=s["concentration_mean"],
                log_library_mean=float(np.log(np.maximum(self._spot_counts[:, fit_genes].sum(1), 1.0)).mean()),
            )
        self.n_states = K
        self.settings.update({"model": "states", "n_states": K, "decoder_hidden": int(decoder_hidden),
                              "heldout_genes": list(heldout), "init_seed": int(seed)})

    def _gene_list(self, genes: list[str] | None, field: str) -> list[str]:
        if genes is None:
            return []
        genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
        missing = [g for g in genes if g not in set(self.genes)]
        if missing:
            raise InputError(f"{field} has gene(s) not shared by spots and reference: {missing[:5]}; pick from "
                             "the genes in both (spots.var_names and reference.var_names).")
        return genes

    # ------------------------------------------------------------------------------------
    def train(self, max_steps: int = 250, *, reference_steps: int = 400, reference_lr: float = 0.01,
              reference_batch_size: int | None = None, seed: int = 0, device: str = "cpu",
              progress: bool = True, **kwargs: Any):
        """Fit the reference model (``reference_steps`` Adam steps at ``reference_lr``; minibatches
        of ``reference_batch_size`` cells, ``None``: all cells up to 4096), freeze the decoders,
        then fit the spots as :meth:`Deconvolution.train` does (``kwargs`` pass through)."""
        started = time.perf_counter()
        n_cells = self.reference_data.n_spots
        size = reference_batch_size if reference_batch_size is not None else (None if n_cells <= 4096 else 4096)
        self.decoder.requires_grad_(True)
        with pyro.validation_enabled(False):
            ref = fit(self.reference_model, self.reference_guide, self.reference_data, max_steps=int(reference_steps),
                      batch_size=size, lr=reference_lr, lr_decay=0.1 ** (1.0 / max(int(reference_steps), 1)),
                      seed=seed, device=device, progress=progress, checkpoint_dir=None)
        self.decoder.requires_grad_(False)
        self.decoder.to("cpu")
        reference_seconds = time.perf_counter() - started
        result = super().train(max_steps, seed=seed, device=device, progress=progress, **kwargs)
        history = np.asarray(ref.elbo_history, dtype=np.float64)
        self.train_record.update({"reference_steps": int(history.size), "reference_lr": float(reference_lr),
                                  "reference_final_loss": float(history[-20:].mean() / n_cells),
                                  "reference_seconds": float(reference_seconds)})
        self.train_record["seconds"] += reference_seconds
        return result

    def sample(self, num_samples: int = 300, *, return_expression: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
        """Joint posterior draws: abundances, proportions, states, globals, detection, integer cell
        counts, and (``expression_genes``) ``type_expression``; ``return_expression`` adds
        ``expected_expression`` (``l_j m_g w_jt s_t(v_jt)_g``, spots x types x genes).

        The integer cell counts are each abundance draw rounded at random (``floor(w) + 1`` with
        probability ``w - floor(w)``; mean ``w``), not ``Poisson(w)``: the likelihood reads ``w``
        as the spot's number of cells, so the data already pin it; a Poisson draw on top adds the
        sampling of cells a second time (on ``sim_gradient``-type simulations, seeds 1 and 2, the
        Poisson intervals held every true count, 1.000, at every guide width)."""
        self._require_trained()
        started = time.perf_counter()
        sites = ["abundance", "proportion", "state", *self.global_sites]
        if self.settings["detection_cv"] > 0:
            sites.append("detection")
        with pyro.validation_enabled(False):
            draws = dict(sample_posterior(self.model, self.guide, self.data, num_samples=int(num_samples),
                                          sites=sites, seed=seed))
        draws["cell_count"] = round_at_random(draws["abundance"], seed)
        draws.update(self._expression_draws(draws, return_expression))
        self.draws = draws
        self.sample_record = {"num_samples": int(num_samples), "seed": int(seed),
                              "seconds": time.perf_counter() - started}
        return draws

    def _expression_draws(self, draws: dict[str, np.ndarray], everything: bool) -> dict[str, np.ndarray]:
        """``type_expression`` (selected genes) and, if ``everything``, ``expected_expression``,
        computed from the state draws through the decoders, chunk by chunk over spots."""
        genes = [self.genes.index(g) for g in self.expression_genes]
        if not genes and not everything:
            return {}
        state = torch.as_tensor(draws["state"], dtype=torch.float32)
        m = torch.as_tensor(draws["platform_effect"], dtype=torch.float32)[:, None, None, :]
        w = torch.as_tensor(draws["abundance"], dtype=torch.float32)
        det = torch.as_tensor(draws["detection"], dtype=torch.float32) if "detection" in draws else torch.ones(w.shape[:2])
        typed, expected = [], []
        with torch.no_grad():
            for lo in range(0, state.shape[1], 256):
                per_cell = m * self.decoder(state[:, lo:lo + 256])  # (S, c, T, G)
                typed.append(per_cell[..., genes].numpy())
                if everything:
                    scaled = det[:, lo:lo + 256, None, None] * w[:, lo:lo + 256, :, None] * per_cell
                    expected.append(scaled.numpy())
        out = {"type_expression": np.concatenate(typed, 1)} if genes else {}
        if everything:
            out["expected_expression"] = np.concatenate(expected, 1)
        return out

    def export(self, *, keep_draws: bool = False) -> AnnData:
        """:meth:`Deconvolution.export` plus the states' keys (module docstring)."""
        out = super().export(keep_draws=keep_draws)
        draws, index, types = self._require_draws(), pd.Index(out.obs_names), self.cell_types
        K = self.n_states
        state_columns = [f"{t}_v{k + 1}" for t in types for k in range(K)]
        sites = {"state": draws["state"].reshape(draws["state"].shape[0], -1)}
        columns = {"state": state_columns}
        if "type_expression" in draws:
            sites["type_expression"] = draws["type_expression"].reshape(draws["type_expression"].shape[0], len(index), -1)
            columns["type_expression"] = [f"{t}:{g}" for t in types for g in self.expression_genes]
        summary = summarise({k: np.asarray(v, dtype=np.float64).reshape(v.shape[0], len(index), -1)
                             for k, v in sites.items()})
        names = {"state": "type_state", "type_expression": "type_expression"}
        for site, frame_columns in columns.items():
            for stat in STATS:
                out.obsm[f"{names[site]}_{stat}"] = pd.DataFrame(summary[site][stat], index=index, columns=frame_columns)
        # the mean states also as obs columns (scanpy's color=), added at once (T * K columns)
        columns_obs = out.obsm["type_state_mean"].add_prefix("type_state_mean_")
        out.obs = pd.concat([out.obs.drop(columns=columns_obs.columns, errors="ignore"), columns_obs], axis=1)
        record = dict(out.uns[UNS_KEY])
        record["states"] = h5ad_safe({
            "n_states": K, "state_columns": np.asarray(state_columns, dtype=str),
            "expression_genes": np.asarray(self.expression_genes, dtype=str),
            "reference_steps": int(self.train_record.get("reference_steps", 0)),
            "reference_final_loss": float(self.train_record.get("reference_final_loss", float("nan"))),
            "abundance_width_factor": float(self.train_record.get("abundance_width_factor", 1.0)),
        })
        out.uns[UNS_KEY] = record
        return out


# ------------------------------------------------------------------------------------------
# settings without the truth: held-out genes
# ------------------------------------------------------------------------------------------
def _gene_folds(n_genes: int, n_folds: int, seed: int) -> list[np.ndarray]:
    """The folds of :func:`~pyrospatial.methods.deconvolution_report.heldout_gene_score` (same
    seed, same split)."""
    return np.array_split(np.random.default_rng(seed).permutation(n_genes), int(n_folds))


def _poisson_deviance(x: np.ndarray, pred: np.ndarray) -> float:
    """Mean Poisson deviance per entry after rescaling each gene's prediction to its observed total
    (as :func:`~pyrospatial.methods.deconvolution_report.heldout_gene_score` does)."""
    pred = pred * (x.sum(0) / np.maximum(pred.sum(0), 1e-12))
    pred = np.maximum(pred, 1e-8)
    with np.errstate(divide="ignore", invalid="ignore"):
        term = np.where(x > 0, x * np.log(x / pred), 0.0)
    return float(np.mean(2.0 * (term - (x - pred))))


def states_heldout_score(spots: AnnData, reference: AnnData, cell_type_key: str = "cell_type", *,
                         n_folds: int = 3, seed: int = 0, num_samples: int = 50, **kwargs: Any) -> dict:
    """Held-out-gene score of ``deconvolve(model="states", **kwargs)``, comparable with
    :func:`~pyrospatial.methods.deconvolution_report.heldout_gene_score` (same folds, same spots,
    same rescaling, same Poisson deviance; lower is better).

    For each fold the spots are fitted without the held-out genes (``heldout_genes``; the
    reference model still learns them from the reference cells) and the held-out genes are
    predicted as the posterior mean of ``sum_t w_jt s_t(v_jt)_g``. Returns ``{"deviance",
    "per_fold", "n_folds"}``.
    """
    from pyrospatial.methods.deconvolution_inputs import (
        _matrix,
        _raw_counts,
        _shared_genes,
    )

    genes = _shared_genes(spots, reference)
    counts = _raw_counts(_matrix(spots, kwargs.get("layer"), "spots")[0], "spots")
    counts = counts[:, pd.Index(map(str, spots.var_names)).get_indexer(genes)]
    train_keys = ("max_steps", "min_steps", "convergence_window", "lr", "batch_size", "device",
                  "reference_steps", "reference_lr", "reference_batch_size")
    train_kw = {k: kwargs.pop(k) for k in train_keys if k in kwargs}
    for key in ("model", "progress", "num_samples", "return_expression", "keep_draws", "seed", "checkpoint_dir",
                "resume", "expression_genes"):
        kwargs.pop(key, None)
    per_fold = []
    for held in _gene_folds(len(genes), n_folds, seed):
        keep = np.setdiff1d(np.arange(len(genes)), held)
        keep_spots = np.asarray(counts[:, keep].sum(1) > 0)
        method = StateDeconvolution(spots[keep_spots], reference, cell_type_key,
                                    heldout_genes=[genes[g] for g in held], seed=seed, **kwargs)
        method.train(seed=seed, progress=False, **train_kw)
        draws = method.sample(num_samples, seed=seed)
        with torch.no_grad():
            s = method.decoder(torch.as_tensor(draws["state"], dtype=torch.float32)).numpy()  # (S, n, T, G)
        pred = np.einsum("snt,sntg->ng", draws["abundance"], s[..., held]) / s.shape[0]
        per_fold.append(_poisson_deviance(counts[keep_spots][:, held], pred))
    return {"deviance": float(np.mean(per_fold)), "per_fold": per_fold, "n_folds": int(n_folds)}


def choose_settings(spots: AnnData, reference: AnnData, cell_type_key: str = "cell_type", *,
                    models: tuple[str, ...] = MODELS, steps: tuple[int, ...] = (250, 500), n_folds: int = 3,
                    seed: int = 0, **kwargs: Any) -> dict:
    """Choose the model (``"signatures"`` or ``"states"``) and the number of steps by held-out
    genes' predictive score, never reading any truth: the same call on every data set.

    Every pair ``(model, max_steps)`` is scored by the Poisson deviance of held-out genes over
    ``n_folds`` gene folds (``seed``): :func:`~pyrospatial.methods.deconvolution_report.heldout_gene_score`
    for ``"signatures"``, :func:`states_heldout_score` for ``"states"`` (same folds and
    spots). ``kwargs`` go to both (e.g. ``cells_per_spot``; ``n_states`` to ``"states"`` only).

    Returns ``{"scores": [{"model", "max_steps", "deviance", "per_fold"}, ...], "best": {"model",
    "max_steps"}}``; pass ``best`` to :func:`~pyrospatial.methods.deconvolution.deconvolve`.
    """
    from pyrospatial.methods.deconvolution_report import heldout_gene_score

    for model in models:
        check_model_name(model)
    n_states = kwargs.pop("n_states", 3)
    scores = []
    for model in models:
        for n in steps:
            if model == "signatures":
                res = heldout_gene_score(spots, reference, cell_type_key, n_folds=n_folds, seed=seed,
                                         max_steps=int(n), **kwargs)
            else:
                res = states_heldout_score(spots, reference, cell_type_key, n_folds=n_folds, seed=seed,
                                           max_steps=int(n), n_states=n_states, **dict(kwargs))
            scores.append({"model": model, "max_steps": int(n), "deviance": res["deviance"],
                           "per_fold": res["per_fold"]})
    best = min(scores, key=lambda r: r["deviance"])
    return {"scores": scores, "best": {"model": best["model"], "max_steps": best["max_steps"]}}
