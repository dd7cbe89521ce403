"""Restarts of the domain model pooled into one posterior: label switching and rotations of the
embedding undone before pooling, the reference chosen by the loss, seeds and checkpoints per
restart, and one restart equal to the single fit."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from scipy.stats import special_ortho_group

import pyrospatial as ps
from pyrospatial.data.sim_domains import simulate_domains
from pyrospatial.errors import InputError
from pyrospatial.methods.domain_restarts import match_domains, pool_restarts, restart_seed
from pyrospatial.methods.domains import Domains


@pytest.fixture(scope="module")
def small_fit():
    sections = simulate_domains(1, 3, grid=8, n_genes=30, markers_per_domain=5, seed=4)
    method = Domains(sections, 3, latent_dim=4, seed=0)
    method.train(120, seed=0)
    method.sample(12, seed=0)
    return sections, method


def _relabelled_copy(method: Domains, perm: np.ndarray, rotation: np.ndarray, shift: np.ndarray,
                     loss_offset: float) -> Domains:
    """The same fit with its domains renamed (domain ``perm[k]`` of the copy is domain ``k`` of
    the original), its embedding rotated and shifted, and a different final loss."""
    other = copy.copy(method)
    inverse = np.argsort(perm)
    d = method.draws
    other.draws = {
        "domain_prob": d["domain_prob"][..., inverse],
        "domain_frequency": d["domain_frequency"][..., inverse],
        "embedding": d["embedding"] @ rotation + shift,
        "domain_mean": d["domain_mean"][:, inverse, :] @ rotation + shift,
    }
    other.train_record = {**method.train_record, "elbo": np.asarray(method.train_record["elbo"]) + loss_offset}
    other.settings = {**method.settings, "init_seed": 99}
    return other


def test_pooling_undoes_label_switching_and_rotation(small_fit):
    _, method = small_fit
    original = {k: np.asarray(v).copy() for k, v in method.draws.items()}
    perm = np.array([2, 0, 1])
    rotation = special_ortho_group.rvs(4, random_state=3)
    worse = _relabelled_copy(method, perm, rotation, np.array([5.0, -2.0, 1.0, 0.5]), loss_offset=+10.0)
    # the matching finds the renaming from the probabilities alone
    np.testing.assert_array_equal(match_domains(original["domain_prob"].mean(0), worse.draws["domain_prob"].mean(0)), perm)
    pooled_from = copy.copy(method)
    pooled = pool_restarts([worse, pooled_from])
    assert pooled is pooled_from  # the restart of lowest final loss is the reference
    record = pooled.restart_record
    assert record["reference"] == 1 and record["restarts"] == 2 and record["seeds"] == [99, 0]
    np.testing.assert_allclose(record["agreement"], [1.0, 1.0])
    S = original["domain_prob"].shape[0]
    for name in ("domain_prob", "domain_frequency"):
        np.testing.assert_allclose(pooled.draws[name][:S], original[name], atol=1e-6)
        np.testing.assert_allclose(pooled.draws[name][S:], original[name], atol=1e-6)
    for name in ("embedding", "domain_mean"):
        np.testing.assert_allclose(pooled.draws[name][:S], original[name], atol=1e-3)
    # the export reads the pooled draws and records the restarts
    out = pooled.export()[0]
    assert out.uns["domains"]["settings"]["restarts"] == 2
    assert out.uns["domains"]["settings"]["num_samples"] == 2 * S
    np.testing.assert_allclose(out.obsm["domain_prob_mean"], original["domain_prob"].mean(0), atol=1e-5)


def test_pooled_confidence_falls_where_restarts_disagree(small_fit):
    _, method = small_fit
    base = {k: np.asarray(v).copy() for k, v in method.draws.items()}
    single = base["domain_prob"].mean(0)
    # a second restart that agrees everywhere except on the first 20 spots, where it is sure of another domain
    other = copy.copy(method)
    flipped = base["domain_prob"].copy()
    label = single.argmax(1)
    flipped[:, :20, :] = 0.0
    flipped[:, np.arange(20), (label[:20] + 1) % 3] = 1.0
    other.draws = {**base, "domain_prob": flipped}
    other.train_record = {**method.train_record, "elbo": np.asarray(method.train_record["elbo"]) + 1.0}
    pooled = pool_restarts([copy.copy(method), other])
    prob = pooled.draws["domain_prob"].mean(0)
    confidence = prob.max(1)
    assert np.all(confidence[:20] <= 0.5 * single.max(1)[:20] + 0.5 + 1e-6)
    assert np.all(confidence[:20] < single.max(1)[:20] - 0.05)
    np.testing.assert_allclose(prob[20:], single[20:], atol=1e-6)
    assert pooled.restart_record["agreement"][1] == pytest.approx(1 - 20 / single.shape[0], abs=0.02)


def test_restarts_have_their_own_seeds_and_checkpoints(small_fit, tmp_path):
    sections, _ = small_fit
    assert [restart_seed(2, r, 3) for r in range(3)] == [6, 7, 8] and restart_seed(5, 0, 1) == 5
    out = ps.domains(sections[0], 3, latent_dim=4, max_steps=40, num_samples=4, restarts=2, seed=1,
                     checkpoint_dir=str(tmp_path / "ck"))
    rec = out.uns["domains"]["restarts"]
    assert list(rec["seeds"]) == [2, 3] and int(rec["restarts"]) == 2
    assert (tmp_path / "ck" / "restart_0" / "last.ckpt").exists()
    assert (tmp_path / "ck" / "restart_1" / "last.ckpt").exists()
    with pytest.raises(InputError, match="resume='last'"):
        ps.domains(sections[0], 3, latent_dim=4, max_steps=40, restarts=2, checkpoint_dir=str(tmp_path / "ck"),
                   resume=str(tmp_path / "ck" / "restart_0" / "last.ckpt"))
    with pytest.raises(InputError, match="restarts"):
        ps.domains(sections[0], 3, restarts=0)


def test_one_restart_is_the_single_fit(small_fit):
    sections, _ = small_fit
    one = ps.domains(sections[0], 3, latent_dim=4, max_steps=40, num_samples=6, restarts=1, seed=3)
    method = Domains(sections[0], 3, latent_dim=4, seed=3)
    method.train(40, seed=3)
    method.sample(6, seed=3)
    np.testing.assert_allclose(one.obsm["domain_prob_mean"], method.export()[0].obsm["domain_prob_mean"], atol=1e-6)
    assert int(one.uns["domains"]["settings"]["restarts"]) == 1


def test_restarts_are_chains_for_rhat(small_fit):
    """Pooled restarts are compared like MCMC chains: R-hat near 1 where they agree, far above
    1.1 on the spots where one restart puts the spot in another domain, and one ArviZ chain per
    restart in ``to_inference_data``."""
    import arviz as az

    _, method = small_fit
    # two sets of draws of the same fit (other seeds): the restarts agree up to draw noise
    first, twin = copy.copy(method), copy.copy(method)
    first.sample(40, seed=1)
    twin.sample(40, seed=2)
    twin.train_record = {**method.train_record, "elbo": np.asarray(method.train_record["elbo"]) + 1.0}
    base = {k: np.asarray(v).copy() for k, v in first.draws.items()}
    agreeing = pool_restarts([copy.copy(first), twin]).restart_record
    assert agreeing["rhat_above"] < 0.05

    # the same, except that the second restart is sure of another domain on the first 20 spots
    other = copy.copy(twin)
    flipped = np.asarray(twin.draws["domain_prob"]).copy()
    label = flipped.mean(0).argmax(1)
    flipped[:, :20, :] = 0.0
    flipped[:, np.arange(20), (label[:20] + 1) % 3] = 1.0
    other.draws = {**twin.draws, "domain_prob": flipped}
    pooled = pool_restarts([copy.copy(first), other])
    record = pooled.restart_record
    assert record["rhat_max"] > 2.0
    n_coords = base["domain_prob"][0].size  # spots x 3 domains
    # at least the two domains swapped on each of the 20 spots, at most all 3, plus draw noise
    assert 20 * 2 / n_coords <= record["rhat_above"] <= 20 * 3 / n_coords + 0.05

    idata = pooled.to_inference_data()
    assert idata.posterior.sizes["chain"] == 2 and idata.posterior.sizes["draw"] == 40
    rhat = az.rhat(idata, var_names=["domain_prob"])["domain_prob"].values  # (spot, domain)
    assert np.nanmin(rhat[:20].max(1)) > 1.1
    out = pooled.export()[0]
    assert float(out.uns["domains"]["restarts"]["rhat_max"]) == pytest.approx(record["rhat_max"])
    assert first.to_inference_data().posterior.sizes["chain"] == 1  # a single fit: one chain
