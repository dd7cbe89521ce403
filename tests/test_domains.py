"""Spatial domains (issue 19): model shapes, recovery on simulated layers, morphology-only
signal, labels shared across sections, calibration of the confidence, input errors, and the
method's save/load round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score

import pyrospatial as ps
from pyrospatial.data.domain_data import DomainData
from pyrospatial.data.sim_domains import simulate_domains
from pyrospatial.errors import CountsError, InputError
from pyrospatial.image import add_image_features, spot_features
from pyrospatial.methods.domains import Domains


def _fit(sections, n_domains, modalities, steps=300, seed=0):
    method = Domains(sections, n_domains, modalities=modalities, seed=seed)
    method.train(steps, seed=seed)
    method.sample(40, seed=seed)
    return method, method.export()


def _stack(outs, key):
    return np.concatenate([np.asarray(o.obs[key]) for o in outs])


def _matched_correct(truth, label, k):
    """Per spot: label correct after the Hungarian matching of labels to true domains."""
    table = np.zeros((k, k))
    np.add.at(table, (label, truth), 1)
    rows, cols = linear_sum_assignment(-table)
    mapping = dict(zip(rows, cols))
    return np.array([mapping[a] == b for a, b in zip(label, truth)])


def _ece(confidence, correct, bins=10):
    idx = np.clip((confidence * bins).astype(int), 0, bins - 1)
    return sum(abs(correct[idx == b].mean() - confidence[idx == b].mean()) * (idx == b).mean()
               for b in range(bins) if (idx == b).any())


# --------------------------------------------------------------------------------- model
def test_model_trace_shapes_and_exact_domain_posterior():
    from pyro import poutine

    sections = simulate_domains(2, 3, grid=8, n_genes=30, markers_per_domain=5, seed=3)
    for i, adata in enumerate(sections):
        adata.obsm["protein"] = np.random.default_rng(i).gamma(2.0, 1.0, (adata.n_obs, 5))
    method = Domains(sections, 3, latent_dim=4, seed=0)  # every modality present: counts, proteins, morphology
    assert method.settings["modalities"] == ["counts", "proteins", "morphology"]
    batch = method.data.full_batch()
    guide_trace = poutine.trace(method.guide).get_trace(batch)
    trace = poutine.trace(poutine.replay(method.model, trace=guide_trace)).get_trace(batch)
    n = 128
    assert trace.nodes["embedding"]["value"].shape == (n, 4)
    assert trace.nodes["domain_logits"]["value"].shape == (n, 3)
    assert trace.nodes["count_offset"]["value"].shape == (2, 30)
    assert trace.nodes["morphology_offset"]["value"].shape == (2, 3)
    assert trace.nodes["protein_offset"]["value"].shape == (2, 5)
    assert trace.nodes["proteins"]["value"].shape == (n, 5)
    prob = trace.nodes["domain_prob"]["value"]
    torch.testing.assert_close(prob.sum(-1), torch.ones(n))
    # the deterministic site is Bayes' rule on the mixture: pi_k N_k(z) / sum
    z, u = trace.nodes["embedding"]["value"], trace.nodes["domain_logits"]["value"]
    rho, mu = trace.nodes["domain_frequency"]["value"], trace.nodes["domain_mean"]["value"]
    log_pi = torch.log_softmax(rho.log() + u, -1)
    log_n = method.model.components(mu).log_prob(z.unsqueeze(-2))
    torch.testing.assert_close(prob, torch.softmax(log_pi + log_n, -1))
    # minibatches: a spatially compact half of the spots, scaled by 2
    half = next(iter(method.data.dataloader(64, seed=0)))
    assert half.n_spots == 64 and half.spot_scale == 2.0
    assert half.edge_index.max() < 64


def test_count_likelihood_is_the_negative_binomial():
    from pyrospatial.models.blocks import negative_binomial
    from pyrospatial.models.domains import CountLikelihood, _nonzero

    rng = np.random.default_rng(0)
    counts = rng.negative_binomial(2, 0.5, (40, 25)).astype(np.float32) * (rng.uniform(size=(40, 25)) < 0.3)
    counts[:, 0] += 1  # no empty spot
    log_mean = torch.randn(40, 25, requires_grad=True)
    theta = torch.rand(25) * 5 + 0.2
    data = DomainData(np.zeros((40, 2)), rng.uniform(0, 5, (40, 2)), np.zeros(40, dtype=int), counts=counts)
    x = torch.as_tensor(counts)
    want = negative_binomial(log_mean.exp(), theta).log_prob(x)
    # the non-zero entries found from the value, and those the batch carries (a subset of spots)
    torch.testing.assert_close(CountLikelihood(log_mean, theta).log_prob(x), want, rtol=1e-5, atol=1e-3)
    batch = data.make_batch(np.arange(7, 29), 2)
    idx = batch.spot_index
    got = CountLikelihood(log_mean[idx], theta, nonzero=_nonzero(batch)).log_prob(batch.counts)
    torch.testing.assert_close(got, want[idx], rtol=1e-5, atol=1e-3)
    g_got, = torch.autograd.grad(got.sum(), log_mean)
    g_want, = torch.autograd.grad(want[idx].sum(), log_mean)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-4)
    # leading draw dimensions broadcast
    assert CountLikelihood(log_mean.expand(3, 40, 25), theta).log_prob(x).shape == (3, 40)


def test_minibatch_graph_term_counts_every_edge_once():
    # the batches of one partition add up to the whole graph: sum_b edge_scale_b * E_b = E
    rng = np.random.default_rng(1)
    coords = rng.uniform(0, 10, (300, 2))
    data = DomainData(np.zeros((300, 2)), coords, np.zeros(300, dtype=int), n_neighbours=6)
    batches = list(data.chunks(75))
    assert len(batches) == 4 and sum(b.n_spots for b in batches) == 300
    total = sum(b.edge_scale * b.edge_index.shape[1] for b in batches)
    assert abs(total - data.edges.shape[1]) < 1e-6 * data.edges.shape[1]
    assert all(b.edge_scale > 1.0 for b in batches)  # cut edges are made up for
    assert data.full_batch().edge_scale == 1.0


def test_graph_has_no_edge_between_sections():
    coords = np.concatenate([np.random.default_rng(0).uniform(0, 5, (20, 2))] * 2)
    section = np.repeat([0, 1], 20)
    data = DomainData(np.zeros((40, 2)), coords, section, n_neighbours=4)
    assert (section[data.edges[0]] == section[data.edges[1]]).all()


# ------------------------------------------------------------------------------ recovery
@pytest.fixture(scope="module")
def joint_fit():
    # two sections, weak signal in each modality (per-spot k-means on the starting embedding
    # reaches ARI ~0.3): the spatial prior has to pool neighbours
    sections = simulate_domains(2, 4, grid=20, expression_signal=0.5, morphology_signal=0.5, seed=1)
    return sections, _fit(sections, 4, ("counts", "morphology"))


def test_recovers_simulated_domains(joint_fit):
    sections, (_, outs) = joint_fit
    truth, label = _stack(sections, "domain_true"), _stack(outs, "domain")
    # measured 0.8 at this seed; per-spot clustering of the starting embedding gives ~0.3
    assert adjusted_rand_score(truth, label) > 0.6
    for out in outs:
        prob = out.obsm["domain_prob_mean"]
        assert prob.shape == (out.n_obs, 4)
        np.testing.assert_allclose(prob.sum(1), 1.0, atol=1e-4)
        assert (out.obsm["domain_prob_q05"] <= out.obsm["domain_prob_q95"] + 1e-6).all()
        assert (out.obsm["domain_prob_q05"] >= 0).all() and (out.obsm["domain_prob_q95"] <= 1 + 1e-6).all()
        assert (out.obsm["domain_prob_sd"] >= 0).all()
        np.testing.assert_allclose(out.obs["domain_confidence"], prob.max(1), rtol=1e-5)
        assert out.obsm["domain_embedding_mean"].shape == out.obsm["domain_embedding_sd"].shape
        assert list(out.obs["domain"].cat.categories) == ["0", "1", "2", "3"]
        assert out.uns["domains"]["settings"]["n_domains"] == 4
        assert "spatial" in out.uns


def test_two_sections_share_labels(joint_fit):
    sections, (_, outs) = joint_fit
    # the matching of labels to true domains learnt on section 0 holds on section 1
    t0, l0 = sections[0].obs["domain_true"].astype(int).to_numpy(), outs[0].obs["domain"].astype(int).to_numpy()
    t1, l1 = sections[1].obs["domain_true"].astype(int).to_numpy(), outs[1].obs["domain"].astype(int).to_numpy()
    table = np.zeros((4, 4))
    np.add.at(table, (l0, t0), 1)
    rows, cols = linear_sum_assignment(-table)
    mapping = dict(zip(rows, cols))
    accuracy_1 = np.mean([mapping[a] == b for a, b in zip(l1, t1)])
    assert accuracy_1 > 0.75


def test_domain_confidence_is_calibrated(joint_fit):
    sections, (_, outs) = joint_fit
    truth = _stack(sections, "domain_true").astype(int)
    label = _stack(outs, "domain").astype(int)
    confidence = _stack(outs, "domain_confidence")
    correct = _matched_correct(truth, label, 4)
    # the confidence is never far above the accuracy (no overconfidence) ...
    assert confidence.mean() < correct.mean() + 0.05
    # ... and orders spots by correctness: the most confident half is more often right
    top = confidence >= np.median(confidence)
    assert correct[top].mean() > correct[~top].mean() + 0.05


def test_morphology_alone_carries_the_domains():
    sections = simulate_domains(1, 4, grid=20, expression_signal=0.0, morphology_signal=1.0, seed=2)
    truth = sections[0].obs["domain_true"]
    _, (with_morph,) = _fit(sections, 4, ("counts", "morphology"), steps=250)
    _, (counts_only,) = _fit(sections, 4, ("counts",), steps=150)
    ari_morph = adjusted_rand_score(truth, with_morph.obs["domain"])
    ari_counts = adjusted_rand_score(truth, counts_only.obs["domain"])
    # expression holds no domain signal: chance level without morphology
    assert ari_counts < 0.1
    assert ari_morph > 0.25


# ---------------------------------------------------------------------------- API / errors
def test_bad_inputs_raise_named_errors():
    (section,) = simulate_domains(1, 3, grid=6, n_genes=30, markers_per_domain=5, seed=0)
    with pytest.raises(InputError, match="n_domains"):
        Domains(section, 1)
    with pytest.raises(InputError, match="obsm\\['embedding_uni'\\]"):
        Domains(section, 3, modalities=("counts", "morphology"), morphology_key="embedding_uni")
    with pytest.raises(InputError, match="modalities"):
        Domains(section, 3, modalities=("rna",))
    bad = section.copy()
    del bad.obsm["spatial"]
    with pytest.raises(InputError, match="spatial"):
        Domains(bad, 3)
    bad = section.copy()
    bad.X = bad.X + 0.5
    with pytest.raises(CountsError):
        Domains(bad, 3, modalities=("counts",))
    with pytest.raises(InputError, match="not trained"):
        Domains(section, 3).sample(5)


def test_save_load_round_trip(tmp_path):
    sections = simulate_domains(2, 3, grid=8, n_genes=30, markers_per_domain=5, seed=4)
    method = Domains(sections, 3, latent_dim=4, seed=0)
    method.train(30, seed=0)
    draws = method.sample(10, seed=5)
    path = tmp_path / "domains.pt"
    method.save(str(path))
    torch.load(path, weights_only=True)  # tensors, numbers and strings only
    again = Domains(sections, 3, latent_dim=4, seed=0).load(str(path))
    redrawn = again.sample(10, seed=5)
    np.testing.assert_allclose(redrawn["domain_prob"], draws["domain_prob"], rtol=1e-5, atol=1e-6)
    assert again.train_record["steps"] == 30
    with pytest.raises(InputError, match="n_domains"):
        Domains(sections, 4, latent_dim=4, seed=0).load(str(path))
    idata = again.to_inference_data()
    assert idata.posterior["domain_prob"].shape == (1, 10, 128, 3)
    # the one-call wrapper returns the shape it was given
    outs = ps.domains(sections, 3, latent_dim=4, max_steps=5, num_samples=3)
    assert isinstance(outs, list) and len(outs) == 2
    one = ps.domains(sections[0], 3, latent_dim=4, max_steps=5, num_samples=3)
    assert one.n_obs == sections[0].n_obs and "domain" in one.obs


# ------------------------------------------------------------------------------- images
def test_spot_features_see_colour_and_texture():
    rng = np.random.default_rng(0)
    image = np.full((60, 60, 3), 0.9)
    image[:, 30:] = [0.6, 0.2, 0.6]  # a purple (haematoxylin-rich) right half
    image[30:, :30] = rng.uniform(0, 1, (30, 30, 3))  # a textured bottom-left quadrant
    coords = np.array([[10.0, 10.0], [50.0, 10.0], [10.0, 50.0]])  # x, y in pixel units
    frame = spot_features(image, coords, 1.0, spot_diameter=10.0)
    assert frame.shape == (3, 16)
    assert frame.loc[1, "haematoxylin_mean"] > frame.loc[0, "haematoxylin_mean"]
    assert frame.loc[2, "texture_contrast"] > frame.loc[0, "texture_contrast"] + 1
    assert np.isfinite(frame.to_numpy()).all()


def test_add_image_features_reads_uns_spatial():
    (section,) = simulate_domains(1, 3, grid=6, n_genes=30, markers_per_domain=5, seed=0)
    section.obs["nuclei"] = np.arange(section.n_obs, dtype=float)
    section.uns["spatial"] = {"lib": {"images": {"lowres": np.full((20, 20, 3), 0.5)},
                                      "scalefactors": {"tissue_lowres_scalef": 3.0, "spot_diameter_fullres": 1.0}}}
    frame = add_image_features(section, "image_features", obs_columns=("nuclei",))
    assert section.obsm["image_features"].shape == (section.n_obs, 17)
    assert list(frame.columns)[-1] == "nuclei"
    with pytest.raises(InputError, match="hires"):
        add_image_features(section, image="hires")


def test_cli_domains_writes_one_file_per_section(tmp_path):
    from pyrospatial.cli import main

    paths = []
    for i, adata in enumerate(simulate_domains(2, 3, grid=8, n_genes=30, markers_per_domain=5, seed=6)):
        paths.append(str(tmp_path / f"s{i}.h5ad"))
        adata.write_h5ad(paths[-1])
    out = tmp_path / "out"
    assert main(["domains", "--sections", *paths, "--n-domains", "3", "--out", str(out), "--max-epochs", "5",
                 "--num-samples", "3", "--restarts", "2", "--no-progress"]) == 0
    assert (out / "domains_0.h5ad").exists() and (out / "domains_1.h5ad").exists()
    assert (out / "figures" / "domains.png").exists() and (out / "domains.json").exists()
    import json

    summary = json.loads((out / "domains.json").read_text())
    assert summary["restarts"]["restarts"] == 2 and len(summary["restarts"]["agreement"]) == 2
    assert main(["domains", "--sections", str(tmp_path / "missing.h5ad"), "--n-domains", "3",
                 "--out", str(tmp_path / "out2")]) == 2


def test_cli_domains_defaults_follow_the_api():
    # the CLI once kept full batches and smoothness 1 after the API moved to minibatches and 0.1
    import inspect

    from pyrospatial.cli import build_parser
    from pyrospatial.methods.domains import domains

    args = build_parser().parse_args(["domains", "--sections", "a.h5ad", "--n-domains", "3", "--out", "o"])
    api = inspect.signature(domains).parameters
    for name in ("smoothness", "batch_size", "lr", "n_neighbours", "num_samples", "restarts"):
        assert getattr(args, name) == api[name].default, name


def test_training_stops_when_the_loss_levels_off():
    from pyrospatial.methods.domains import ElboPlateau

    rule = ElboPlateau(window=10, rel_tol=1e-3, min_steps=20)
    falling = list(1000.0 * np.exp(-np.arange(200) / 30.0) + 1000.0)
    fired = next(n for n in range(1, 201) if rule.should_stop(falling[:n]))
    assert fired % 10 == 0 and 20 <= fired < 200
    # a loss still falling fast does not stop; the fit itself stops before max_steps
    assert not ElboPlateau(window=10, rel_tol=1e-3, min_steps=20).should_stop(falling[:40])
    sections = simulate_domains(1, 3, grid=8, n_genes=30, markers_per_domain=5, seed=4)
    method = Domains(sections, 3, latent_dim=4, seed=0)
    method.train(2000, seed=0, stop_tol=1e-2, stop_window=5)
    steps = method.train_record["steps"]
    assert steps < 2000 and steps == method.train_record["stopped_at"] and steps % 5 == 0


def test_graph_prior_log_normaliser_normalises_the_prior():
    # N(u; 0, s^2 I) exp(-lambda/2 u'Lu) + the normaliser = the Gaussian N(u; 0, (I/s^2 + lambda L)^-1)
    from pyrospatial.methods.domains import graph_prior_log_normaliser

    edges = np.array([[0, 1, 2, 4], [1, 2, 3, 5]])  # a path 0-1-2-3 and a pair 4-5
    n, s, lam = 6, 2.0, 0.7
    lap = np.zeros((n, n))
    for i, j in edges.T:
        lap[i, j] = lap[j, i] = -1.0
    lap[np.diag_indices(n)] = -lap.sum(1)
    u = torch.randn(n, dtype=torch.float64)
    precision = torch.as_tensor(np.eye(n) / s**2 + lam * lap)
    want = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=torch.float64), precision_matrix=precision)
    unnormalised = torch.distributions.Normal(0.0, s).log_prob(u).sum() - 0.5 * lam * u @ torch.as_tensor(lap) @ u
    got = unnormalised + graph_prior_log_normaliser(edges, n, 1, s, lam)
    torch.testing.assert_close(got, want.log_prob(u))
    assert graph_prior_log_normaliser(edges, n, 3, s, 0.0) == 0.0
