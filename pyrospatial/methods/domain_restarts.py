"""Several fits of the domain model pooled into one posterior.

A single SVI fit of :class:`~pyrospatial.models.domains.DomainModel` finds one mode of a
posterior that has several: fits from other starting points split or merge layers
differently. Its domain probabilities only describe the uncertainty *within* its mode, so they
are over-confident against the fit-to-fit disagreement: on DLPFC 151673 one fit's mean
confidence was 0.92-0.93 while independent fits gave the same domain to 0.77-0.85 of the spots
(``benchmarks/results/domain_restarts.md``). Pooling the draws of several fits (restarts) treats the
modes as a mixture with equal weights, as a deep ensemble does.

Restarts label their domains arbitrarily and place their embeddings in arbitrarily rotated
latent spaces, so before pooling every restart is matched to a reference (the restart of
lowest final loss):

- domains by the Hungarian matching of their posterior-mean probabilities
  (maximum ``sum_i p_ref(i, k) p_r(i, perm(k))``);
- the embedding by orthogonal Procrustes of its posterior mean onto the reference's (centred),
  applied to every draw of ``embedding`` and ``domain_mean``.

After pooling, the restarts are compared like MCMC chains: the split-R-hat of every spot's
domain probabilities with one chain per restart (ArviZ). Where it exceeds 1.1 the restarts put
that spot in different domains (their disagreement is larger than the spread of draws within
one fit); the share of such probabilities is recorded, and
:meth:`~pyrospatial.methods.domains.Domains.to_inference_data` keeps one chain per restart so
that ``arviz.summary`` reports the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.linalg import orthogonal_procrustes
from scipy.optimize import linear_sum_assignment

from pyrospatial.criticism.convergence import convergence_detail

if TYPE_CHECKING:
    from pyrospatial.methods.domains import Domains

__all__ = ["final_loss", "match_domains", "pool_restarts", "restart_rhat", "restart_seed"]

#: steps of the loss history averaged into a restart's final loss
FINAL_LOSS_STEPS = 25


def restart_seed(seed: int, restart: int, restarts: int) -> int:
    """Seed of restart ``restart`` of ``restarts`` for the user's ``seed``: ``seed * restarts +
    restart``, so one restart keeps ``seed`` and the restarts of different seeds never overlap."""
    return int(seed) * int(restarts) + int(restart)


def final_loss(method: Domains) -> float:
    """Mean loss (negative ELBO) of the last :data:`FINAL_LOSS_STEPS` steps of a trained fit."""
    elbo = np.asarray(method.train_record["elbo"], dtype=np.float64)
    return float(elbo[-FINAL_LOSS_STEPS:].mean())


def match_domains(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """``perm`` such that domain ``perm[k]`` of ``other`` is domain ``k`` of ``reference``
    (both ``(n_spots, K)`` probabilities; Hungarian matching of their overlap)."""
    rows, cols = linear_sum_assignment(-(np.asarray(reference).T @ np.asarray(other)))
    perm = np.empty(reference.shape[1], dtype=np.int64)
    perm[rows] = cols
    return perm


def restart_rhat(prob_per_restart: list[np.ndarray]) -> dict[str, float]:
    """Split-R-hat of the domain probabilities with one chain per restart (each ``(D, n_spots,
    K)``, matched to one reference): ``rhat_max`` and ``rhat_above`` (the share of spot x domain
    probabilities above 1.1), NaN with fewer than 2 restarts, unequal draw counts or fewer than
    4 draws each (see :func:`~pyrospatial.criticism.convergence.convergence_detail`)."""
    sizes = {p.shape[0] for p in prob_per_restart}
    if len(prob_per_restart) < 2 or len(sizes) != 1:
        return {"rhat_max": float("nan"), "rhat_above": float("nan")}
    # convergence_detail reads row k * R + r as the k-th draw of chain r
    interleaved = np.stack(prob_per_restart, axis=1).reshape((-1,) + prob_per_restart[0].shape[1:])
    detail = convergence_detail(interleaved, len(prob_per_restart))
    return {"rhat_max": detail["rhat_max"], "rhat_above": detail["rhat_above"]}


def pool_restarts(methods: list[Domains]) -> Domains:
    """The restart of lowest final loss, its draws replaced by every restart's draws matched to it
    (see the module docstring); ``restart_record`` says what was pooled: ``seeds``,
    ``final_loss``, ``reference`` (index), ``agreement`` (per restart, the fraction of spots
    whose most probable domain is the reference's after matching), ``draws`` per restart, and
    the between-restart ``rhat_max`` and ``rhat_above`` of the domain probabilities
    (:func:`restart_rhat`)."""
    if not methods:
        raise ValueError("pool_restarts needs at least one fitted Domains")
    losses = [final_loss(m) for m in methods]
    ref_index = int(np.argmin(losses))
    reference = methods[ref_index]
    ref_draws = reference._require_draws()
    ref_prob = np.asarray(ref_draws["domain_prob"]).mean(0)
    ref_embedding = np.asarray(ref_draws["embedding"]).mean(0)
    ref_centre = ref_embedding.mean(0)
    n_draws = [int(np.asarray(m._require_draws()["domain_prob"]).shape[0]) for m in methods]
    pooled: dict[str, list[np.ndarray]] = {name: [] for name in ref_draws}
    agreement = []
    for method in methods:
        draws = {name: np.asarray(value) for name, value in method._require_draws().items()}
        perm = match_domains(ref_prob, draws["domain_prob"].mean(0))
        prob = draws["domain_prob"][..., perm]
        agreement.append(float(np.mean(prob.mean(0).argmax(1) == ref_prob.argmax(1))))
        embedding_mean = draws["embedding"].mean(0)
        centre = embedding_mean.mean(0)
        rotation, _ = orthogonal_procrustes(embedding_mean - centre, ref_embedding - ref_centre)
        aligned = {
            "domain_prob": prob,
            "domain_frequency": draws["domain_frequency"][..., perm],
            "embedding": (draws["embedding"] - centre) @ rotation + ref_centre,
            "domain_mean": (draws["domain_mean"][:, perm, :] - centre) @ rotation + ref_centre,
        }
        for name in pooled:
            pooled[name].append(aligned.get(name, draws[name]).astype(np.asarray(draws[name]).dtype, copy=False))
    reference.draws = {name: np.concatenate(values, axis=0) for name, values in pooled.items()}
    record: dict[str, Any] = {
        "restarts": len(methods), "seeds": [int(m.settings["init_seed"]) for m in methods],
        "final_loss": losses, "reference": ref_index, "agreement": agreement,
        "draws": n_draws,
        **restart_rhat(pooled["domain_prob"]),
        "seconds": float(sum(m.train_record["seconds"] + m.sample_record["seconds"] for m in methods)),
    }
    reference.sample_record = {**reference.sample_record, "num_samples": int(reference.draws["domain_prob"].shape[0])}
    reference.restart_record = record
    return reference
