"""CORAL model, guide and building blocks: shapes, scales, gradients, hand computations, learning.

Batches are built directly here (no dependency on the data layer); fixed seeds throughout.
"""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive, Trace_ELBO
from pyro.poutine.util import site_is_subsample
from scipy.spatial import cKDTree

from pyrospatial.engine.batch import Batch
from pyrospatial.errors import InputError
from pyrospatial.guides import CoralGuide
from pyrospatial.models import CoralArcsinhModel, CoralConfig, CoralModel
from pyrospatial.models.blocks import (
    EdgeDecoder,
    HierarchicalPrior,
    bernoulli_edges,
    gamma_likelihood,
    negative_binomial,
    spot_sum,
    spot_sum_negative_binomial,
)

torch.set_num_threads(1)

SCALES = dict(cell_scale=10.0, spot_scale=10.0, edge_scale=3.0, nonedge_scale=50.0)


pytestmark = pytest.mark.usefixtures("fresh_pyro")  # tests/conftest.py


# ----------------------------------------------------------------------------- helpers


def is_sample(site: dict) -> bool:
    return site["type"] == "sample" and not site_is_subsample(site)


def knn_edges(xy: np.ndarray, k: int) -> np.ndarray:
    """Symmetric kNN graph, both directions, (2, E)."""
    _, nbr = cKDTree(xy).query(xy, k=k + 1)
    src = np.repeat(np.arange(len(xy)), k)
    dst = nbr[:, 1:].reshape(-1)
    e = np.concatenate([np.stack([src, dst]), np.stack([dst, src])], axis=1)
    return np.unique(e, axis=1)


def sample_nonedges(n: int, edges: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` distinct non-adjacent pairs i < i'."""
    adj = set(map(tuple, edges.T.tolist()))
    out = set()
    while len(out) < k:
        i, j = sorted(rng.choice(n, size=2, replace=False).tolist())
        if (i, j) not in adj:
            out.add((i, j))
    return np.array(sorted(out)).T.reshape(2, -1)


def make_batch(
    cell_type: np.ndarray,
    features: np.ndarray,
    spot_counts: np.ndarray,
    cell_spot: np.ndarray,
    xy: np.ndarray,
    *,
    k: int = 3,
    n_nonedges: int = 30,
    seed: int = 0,
    scales: dict | None = None,
    n_types: int | None = None,
    edges: np.ndarray | None = None,
) -> Batch:
    rng = np.random.default_rng(seed)
    n, m = len(cell_type), len(spot_counts)
    edges = knn_edges(xy, k) if edges is None else edges
    nonedges = sample_nonedges(n, edges, n_nonedges, rng) if n_nonedges else np.zeros((2, 0), np.int64)
    members = np.flatnonzero(cell_spot >= 0)
    membership = torch.sparse_coo_tensor(
        torch.as_tensor(np.stack([cell_spot[members], members])), torch.ones(len(members)), (m, n),
        check_invariants=False,
    ).coalesce()
    s = scales or SCALES
    return Batch(
        cell_index=torch.arange(n),
        cell_type=torch.as_tensor(cell_type, dtype=torch.long),
        cell_features=torch.as_tensor(features, dtype=torch.float32),
        cell_library=torch.as_tensor(features.sum(1), dtype=torch.float32),
        cell_coords=torch.as_tensor(xy, dtype=torch.float32),
        cell_spot=torch.as_tensor(cell_spot, dtype=torch.long),
        spot_index=torch.arange(m),
        spot_counts=torch.as_tensor(spot_counts, dtype=torch.float32),
        spot_library=torch.as_tensor(spot_counts.sum(1), dtype=torch.float32),
        membership=membership,
        edge_index=torch.as_tensor(edges, dtype=torch.long),
        nonedge_index=torch.as_tensor(nonedges, dtype=torch.long),
        n_types=int(n_types or cell_type.max() + 1),
        n_cells_total=int(n * s["cell_scale"]),
        n_spots_total=int(m * s["spot_scale"]),
        n_edges_total=int(edges.shape[1] // 2 * s["edge_scale"]),
        n_batches=int(s["cell_scale"]),
        **s,
    )


def random_batch(n=40, m=6, P=5, G=12, C=3, seed=0, **kw) -> Batch:
    """40 random cells in 6 spots (6 cells outside every spot), kNN edges, 30 non-edges."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 3, size=(n, 2))
    cell_type = np.arange(n) % C
    features = rng.gamma(3.0, 1.0, size=(n, P)) + 0.05
    cell_spot = np.where(np.arange(n) < n - 6, rng.permutation(n) % m, -1)  # 6 cells in no spot
    assert len(np.unique(cell_spot[cell_spot >= 0])) == m
    spot_counts = rng.poisson(20.0, size=(m, G)).astype(np.float64)
    return make_batch(cell_type, features, spot_counts, cell_spot, xy, seed=seed, **kw)


def model_guide(batch: Batch, **kw):
    P, G = batch.cell_features.shape[1], batch.spot_counts.shape[1]
    model_kw = {k: kw.pop(k) for k in list(kw) if k in ("laplacian_weight", "contrastive_weight", "capture_sd")}
    model = CoralModel(batch.n_types, P, G, z_dim=4, hidden=16, size_loc_init=1.0, **model_kw, **kw)
    guide = CoralGuide(model.config, hidden=16, heads=2)  # one config: sizes, capture, size_loc_init
    return model, guide


# ----------------------------------------------------------------------------- shapes and scales


@pytest.mark.parametrize("capture", [False, True])
def test_trace_sites_shapes_and_scales(capture):
    b = random_batch()
    n, m, P, G = b.n_cells, b.n_spots, 5, 12
    E, K = b.edge_pairs.shape[1], b.nonedge_index.shape[1]
    model, guide = model_guide(b, capture_sd=0.2 if capture else None)
    gtr = poutine.trace(guide).get_trace(b)
    mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(b)

    # name: (batch_shape, event_shape, scale)
    width = 4 + b.n_types  # linear read-out of z (z_dim=4) + one offset per type
    expected = {
        "rna_weight": ((G,), (width,), 1.0),
        "v": ((n,), (1,), b.cell_scale),
        "z": ((n,), (4,), b.cell_scale),
        "proteins": ((n,), (P,), b.cell_scale),
        "cell_size": ((n,), (), b.cell_scale),
        "spot_counts": ((m,), (G,), b.spot_scale),
        "edges": ((E,), (), b.edge_scale),
        "nonedges": ((K,), (), b.nonedge_scale),
    }
    if capture:
        expected["spot_capture"] = ((m,), (), b.spot_scale)
    samples = {k for k, s in mtr.nodes.items() if is_sample(s) and not s["infer"].get("_deterministic")}
    assert samples == set(expected)
    for name, (batch_shape, event_shape, scale) in expected.items():
        site = mtr.nodes[name]
        assert tuple(site["fn"].batch_shape) == batch_shape, name
        assert tuple(site["fn"].event_shape) == event_shape, name
        assert site["value"].shape == batch_shape + event_shape, name
        assert float(site["scale"]) == pytest.approx(scale), name
    assert mtr.nodes["expected_rna"]["value"].shape == (n, G)
    assert mtr.nodes["edge_prob"]["value"].shape == (E,)
    # observed sites carry the data
    assert torch.equal(mtr.nodes["proteins"]["value"], b.cell_features)
    assert torch.equal(mtr.nodes["spot_counts"]["value"], b.spot_counts)
    assert bool((mtr.nodes["edges"]["value"] == 1).all()) and bool((mtr.nodes["nonedges"]["value"] == 0).all())

    # the guide: exactly the latent sites, same shapes and scales
    latent = {"rna_weight", "z", "v", "cell_size"} | ({"spot_capture"} if capture else set())
    gsamples = {k for k, s in gtr.nodes.items() if is_sample(s)}
    assert gsamples == latent
    for name in latent:
        g, mm = gtr.nodes[name], mtr.nodes[name]
        assert g["fn"].batch_shape == mm["fn"].batch_shape and g["fn"].event_shape == mm["fn"].event_shape, name
        assert float(g["scale"]) == pytest.approx(float(mm["scale"])), name
    mtr.compute_log_prob()
    assert torch.isfinite(mtr.log_prob_sum())


def test_expected_rna_in_count_units_and_spot_mean_is_the_sum():
    b = random_batch()
    model, guide = model_guide(b)
    gtr = poutine.trace(guide).get_trace(b)
    mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(b)
    rho = mtr.nodes["expected_rna"]["value"]
    s = mtr.nodes["cell_size"]["value"]
    torch.testing.assert_close(rho.sum(-1), s)  # per-cell total = size factor (counts)
    mean = mtr.nodes["spot_counts"]["fn"].base_dist.mean
    U = b.membership.to_dense()
    torch.testing.assert_close(mean, U @ rho, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("capture", [False, True])
def test_density_only_batches_give_the_same_density_and_gradients_without_deterministic_sites(capture):
    # training and MCMC ask for the density alone (Batch.density_only): the model then computes
    # per-cell RNA for the cells inside a spot only (6 of these 40 cells are in none) and
    # records no expected_rna; the log density and every gradient must not change
    from dataclasses import replace

    b = random_batch()
    model, guide = model_guide(b, capture_sd=0.2 if capture else None)
    C = 3
    with poutine.trace() as tracer, pyro.plate("chains", C, dim=-2):
        model(b)
    latents = {k: node["value"].detach() for k, node in tracer.trace.nodes.items()
               if is_sample(node) and not node["is_observed"]}

    def density(batch):
        values = {k: v.clone().requires_grad_(True) for k, v in latents.items()}
        with poutine.trace() as run, pyro.plate("chains", C, dim=-2):
            poutine.condition(model, data=values)(batch)
        total = sum(node["fn"].log_prob(node["value"]).sum() for node in run.trace.nodes.values()
                    if is_sample(node) and node["is_observed"] and not node["infer"].get("_deterministic"))
        grads = torch.autograd.grad(total, list(values.values()))
        return total.detach(), dict(zip(values, grads)), run.trace.nodes

    full, full_grads, full_nodes = density(b)
    fast, fast_grads, fast_nodes = density(replace(b, density_only=True))
    assert "expected_rna" in full_nodes and "expected_rna" not in fast_nodes
    assert b.spot_members[0].numel() == b.n_cells - 6
    torch.testing.assert_close(fast, full)
    for name in full_grads:
        torch.testing.assert_close(fast_grads[name], full_grads[name])
    assert float(full_grads["cell_size"][:, b.cell_spot < 0].abs().sum()) > 0  # lone cells keep their prior term


def test_read_out_options_and_vectorised_chains():
    b = random_batch()
    n, G, C = b.n_cells, 12, 3
    # mlp read-out without type offsets: W is (G, hidden); point-estimate read-out: no site
    model = CoralModel(3, 5, G, z_dim=4, hidden=16, rna_readout="mlp", rna_type_effects=False)
    guide = CoralGuide(model.config, hidden=16, heads=2)  # q(omega) sized by config.rna_width
    tr = poutine.trace(poutine.replay(model, trace=poutine.trace(guide).get_trace(b))).get_trace(b)
    assert tr.nodes["rna_weight"]["value"].shape == (G, 16)
    # per-type slopes (partial pooling): features [z, onehot(c) (x) z, onehot(c)]
    slopes = CoralModel(3, 5, G, z_dim=4, hidden=16, rna_type_slopes=True)
    assert slopes.rna_width == 4 + 3 * 4 + 3
    z = torch.randn(n, 4)
    e = slopes.rna_features(z, b.cell_type)
    for i in range(3):
        c = int(b.cell_type[i])
        torch.testing.assert_close(e[i, 4 + 4 * c : 8 + 4 * c], z[i])
        assert float(e[i, 4:16].abs().sum() - z[i].abs().sum()) == pytest.approx(0.0, abs=1e-5)
    point = CoralModel(3, 5, G, z_dim=4, hidden=16, bayesian_decoder=False)
    assert "rna_weight" not in poutine.trace(point).get_trace(b).nodes
    with pytest.raises(ValueError):
        CoralModel(3, 5, G, rna_readout="deep")
    # the model runs vectorised under an outer plate at dim=-2 (one W per chain)
    model, guide = model_guide(b)
    with poutine.trace() as tracer, pyro.plate("chains", C, dim=-2):
        model(b)
    nodes = tracer.trace.nodes
    assert nodes["rna_weight"]["value"].shape == (C, G, 7)
    assert nodes["z"]["value"].shape == (C, n, 4)
    assert nodes["expected_rna"]["value"].shape == (C, n, G)
    assert nodes["spot_counts"]["fn"].batch_shape == (C, b.n_spots)
    # each chain's expected RNA is that chain's own read-out
    one = poutine.trace(poutine.condition(model, data={k: nodes[k]["value"][1] for k in ("rna_weight", "v", "z", "cell_size")})).get_trace(b)
    torch.testing.assert_close(one.nodes["expected_rna"]["value"], nodes["expected_rna"]["value"][1])


def test_spot_sum_negative_binomial_matches_a_sum_of_cell_counts():
    rng = np.random.default_rng(3)
    n, m, G = 9, 3, 4
    cell_spot = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    U = torch.sparse_coo_tensor(
        torch.as_tensor(np.stack([cell_spot, np.arange(n)])), torch.ones(n), (m, n), check_invariants=False
    )
    rho = torch.tensor(rng.gamma(2.0, 3.0, size=(n, G)), dtype=torch.float32)
    theta = torch.tensor([0.5, 2.0, 10.0, 100.0])
    capture = torch.tensor([1.0, 0.5, 2.0])
    d = spot_sum_negative_binomial(U, rho, theta, capture)
    Ud = U.to_dense()
    mu = capture[:, None] * (Ud @ rho)
    var = mu + capture[:, None] ** 2 * (Ud @ rho**2) / theta  # sum of independent NB(l rho, theta)
    torch.testing.assert_close(d.mean, mu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(d.variance, var, rtol=1e-4, atol=1e-3)
    # a spot of n equal cells behaves like one NB with theta * n; one cell: theta itself
    equal = spot_sum_negative_binomial(U, torch.ones(n, G), theta)
    torch.testing.assert_close(equal.base_dist.total_count[2], theta * 4)
    # the model uses it by default, the per-spot dispersion on request
    b = random_batch()
    model, guide = model_guide(b)
    tr = poutine.trace(poutine.replay(model, trace=poutine.trace(guide).get_trace(b))).get_trace(b)
    rho_b = tr.nodes["expected_rna"]["value"]
    expected = spot_sum_negative_binomial(b.membership, rho_b, model.rna_inverse_dispersion)
    torch.testing.assert_close(tr.nodes["spot_counts"]["fn"].base_dist.total_count, expected.base_dist.total_count)
    spot = CoralModel(3, 5, 12, z_dim=4, hidden=16, spot_dispersion="spot")
    tr = poutine.trace(poutine.replay(spot, trace=poutine.trace(guide).get_trace(b))).get_trace(b)
    torch.testing.assert_close(
        tr.nodes["spot_counts"]["fn"].base_dist.total_count, spot.rna_inverse_dispersion.expand(b.n_spots, 12)
    )


def test_regulariser_sites_off_by_default_and_equal_hand_computation():
    b = random_batch()
    model0, _ = model_guide(b)
    assert not {"laplacian", "contrastive"} & set(poutine.trace(model0).get_trace(b).nodes)

    pyro.clear_param_store()
    model, _ = model_guide(b, laplacian_weight=0.3, contrastive_weight=0.2)
    tr = poutine.trace(model).get_trace(b)
    tr.compute_log_prob()
    z = tr.nodes["z"]["value"].detach()
    ep, ne = b.edge_pairs, b.nonedge_index
    lap = sum(float(((z[i] - z[j]) ** 2).sum()) for i, j in ep.T.tolist())
    assert float(tr.nodes["laplacian"]["log_prob_sum"].detach()) == pytest.approx(
        -0.3 * b.edge_scale * lap, rel=1e-4
    )
    N = b.n_cells_total
    total = 0.0
    for (pairs, w) in ((ep, b.edge_scale), (ne, b.nonedge_scale)):
        for i, j in pairs.T.tolist():
            d = float((z[i] - z[j]).norm())
            same = int(b.cell_type[i]) == int(b.cell_type[j])
            total += w * (d**2 if same else max(0.0, 1.0 - d) ** 2)
    hand = -0.2 * total * N / (N * (N - 1) / 2)
    assert float(tr.nodes["contrastive"]["log_prob_sum"].detach()) == pytest.approx(hand, rel=1e-4)


def test_batch_without_spots_or_edges_runs():
    b = random_batch()
    n = b.n_cells
    empty = torch.zeros(2, 0, dtype=torch.long)
    nospot = Batch(
        **{
            **b.__dict__,
            "spot_index": torch.zeros(0, dtype=torch.long),
            "spot_counts": torch.zeros(0, 12),
            "spot_library": torch.zeros(0),
            "membership": torch.sparse_coo_tensor(empty, torch.zeros(0), (0, n), check_invariants=False),
            "cell_spot": torch.full((n,), -1, dtype=torch.long),
            "edge_index": empty,
            "nonedge_index": empty,
        }
    )
    for capture in (False, True):
        pyro.clear_param_store()
        model, guide = model_guide(nospot, capture_sd=0.2 if capture else None)
        loss = Trace_ELBO().differentiable_loss(model, guide, nospot)
        assert torch.isfinite(loss)
        mtr = poutine.trace(model).get_trace(nospot)
        assert not {"spot_counts", "spot_capture", "edges", "nonedges"} & set(mtr.nodes)
        assert mtr.nodes["edge_prob"]["value"].shape == (0,)
        ei, alpha = guide.attention(nospot)
        assert ei.shape == (2, 0) and alpha.shape == (0, 2)


def test_attention_weights_per_edge_and_head():
    b = random_batch()
    _, guide = model_guide(b)
    for layer in (1, 2):
        ei, alpha = guide.attention(b, layer=layer)
        assert alpha.shape == (b.edge_index.shape[1], 2) and (alpha > 0).all()
        assert set(map(tuple, ei.T.tolist())) == set(map(tuple, b.edge_index.T.tolist()))
        ei_all, alpha_all = guide.attention(b, layer=layer, remove_self_loops=False)
        assert ei_all.shape[1] == b.edge_index.shape[1] + b.n_cells  # self loops added
        per_target = torch.zeros(b.n_cells, 2).index_add_(0, ei_all[1], alpha_all)
        torch.testing.assert_close(per_target, torch.ones(b.n_cells, 2))


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("capture", [False, True])
def test_every_parameter_gets_a_finite_nonzero_gradient(capture):
    b = random_batch()
    model, guide = model_guide(b, capture_sd=0.2 if capture else None)
    guide(b)  # create lazily registered parameters
    params = dict(model.named_parameters(prefix="model")) | dict(guide.named_parameters(prefix="guide"))
    assert len(params) > 20
    before = {k: p.detach().clone() for k, p in params.items()}
    optim = torch.optim.Adam(params.values(), lr=1e-2)
    loss = Trace_ELBO().differentiable_loss(model, guide, b)
    optim.zero_grad()
    loss.backward()
    for name, p in params.items():
        assert p.grad is not None, f"{name}: no gradient (no loss reaches it)"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient"
    optim.step()
    for name, p in params.items():
        assert not torch.equal(p.detach(), before[name]), f"{name} unchanged by the step"


# ----------------------------------------------------------------------------- blocks


def test_spot_sum_matches_dense_brute_force():
    rng = np.random.default_rng(1)
    n, m, G = 25, 5, 7
    cell_spot = rng.integers(-1, m, size=n)
    rho = torch.tensor(rng.gamma(1.0, 1.0, size=(n, G)), dtype=torch.float32, requires_grad=True)
    idx = np.flatnonzero(cell_spot >= 0)
    U = torch.sparse_coo_tensor(
        torch.as_tensor(np.stack([cell_spot[idx], idx])), torch.ones(len(idx)), (m, n), check_invariants=False
    )
    out = spot_sum(U, rho)
    brute = torch.stack([sum((rho[i] for i in range(n) if cell_spot[i] == j), torch.zeros(G)) for j in range(m)])
    torch.testing.assert_close(out, brute)
    out.sum().backward()
    torch.testing.assert_close(rho.grad, torch.as_tensor((cell_spot >= 0)[:, None] * np.ones((1, G)), dtype=torch.float32))
    # leading sample dims
    rho3 = rho.detach().expand(3, n, G) * torch.arange(1.0, 4.0)[:, None, None]
    torch.testing.assert_close(spot_sum(U, rho3), torch.stack([brute.detach() * k for k in (1.0, 2.0, 3.0)]))


def test_edge_loglik_equals_hand_computation_with_scales():
    b = random_batch()
    model, _ = model_guide(b)
    with torch.no_grad():
        model.edge_decoder.weight.copy_(torch.randn(4, 4))
        model.edge_decoder.bias.fill_(-0.7)
    z = torch.randn(b.n_cells, 4)
    tr = poutine.trace(poutine.condition(model, data={"z": z})).get_trace(b)
    tr.compute_log_prob()
    got = {k: float(tr.nodes[k]["log_prob_sum"].detach()) for k in ("edges", "nonedges")}
    W = model.edge_decoder.weight.detach()
    Ws = (W + W.T) / 2

    def f(i, j):
        return float(z[i] @ Ws @ z[j]) - 0.7

    def log_sigmoid(x):
        return -math.log1p(math.exp(-x))

    hand_e = b.edge_scale * sum(log_sigmoid(f(i, j)) for i, j in b.edge_pairs.T.tolist())
    hand_ne = b.nonedge_scale * sum(log_sigmoid(-f(i, j)) for i, j in b.nonedge_index.T.tolist())
    assert got["edges"] == pytest.approx(hand_e, rel=1e-5)
    assert got["nonedges"] == pytest.approx(hand_ne, rel=1e-5)
    probs = tr.nodes["edge_prob"]["value"]
    torch.testing.assert_close(
        probs, torch.tensor([1 / (1 + math.exp(-f(i, j))) for i, j in b.edge_pairs.T.tolist()])
    )
    # the decoder is symmetric in its arguments
    ep = b.edge_pairs
    torch.testing.assert_close(model.edge_decoder(z, ep), model.edge_decoder(z, ep.flip(0)))


def test_likelihood_blocks_moments_and_prior_heads():
    mean = torch.tensor([[2.0, 5.0]])
    k = torch.tensor([4.0, 0.5])
    g = gamma_likelihood(mean, k)
    torch.testing.assert_close(g.mean, mean)
    torch.testing.assert_close(g.variance, mean**2 / k)
    theta = torch.tensor([3.0, 100.0])
    nb = negative_binomial(mean, theta)
    torch.testing.assert_close(nb.mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nb.variance, mean + mean**2 / theta, rtol=1e-4, atol=1e-4)
    # the NB block equals pyro's GammaPoisson with rate theta / mean
    x = torch.tensor([[0.0, 7.0]])
    gp = dist.GammaPoisson(theta, theta / mean).to_event(1)
    torch.testing.assert_close(nb.log_prob(x), gp.log_prob(x), rtol=1e-5, atol=1e-5)
    # prior heads: a cell's (mu, sigma) come from its own type's head only
    prior = HierarchicalPrior(3, v_dim=1, z_dim=2, hidden=4)
    v = torch.randn(6, 1)
    c = torch.tensor([0, 1, 2, 2, 1, 0])
    mu, sigma = prior(v, c)
    for i in range(6):
        mu_i, sigma_i = prior(v[i : i + 1], torch.tensor([int(c[i])]))
        torch.testing.assert_close(mu[i : i + 1], mu_i)
    assert (sigma > 0).all()
    assert not torch.allclose(prior(v, torch.zeros(6, dtype=torch.long))[0], mu)
    assert bernoulli_edges("x", torch.zeros(0), True) is None
    assert EdgeDecoder(3)(torch.randn(4, 3), torch.zeros(2, 0, dtype=torch.long)).shape == (0,)


def test_edge_decoder_dense_path_matches_pairwise_formula():
    """Many pairs take the dense z W z^T path: same logits as f(z_i, z_j) pair by pair, also
    under a leading chain dimension."""
    torch.manual_seed(0)
    decoder = EdgeDecoder(3, bias_init=-1.5)
    with torch.no_grad():
        decoder.weight.copy_(torch.randn(3, 3))
    z = torch.randn(2, 6, 3)  # (chains, cells, z_dim)
    all_pairs = torch.triu_indices(6, 6, 1)  # 15 pairs > 6 * 6 / 8: dense
    few_pairs = all_pairs[:, :4]  # 4 pairs: gathered
    W = 0.5 * (decoder.weight + decoder.weight.T)
    by_hand = torch.einsum("cpk,kl,cpl->cp", z[:, all_pairs[0]], W, z[:, all_pairs[1]]) + decoder.bias
    torch.testing.assert_close(decoder(z, all_pairs), by_hand)
    torch.testing.assert_close(decoder(z, few_pairs), by_hand[:, :4])


def test_model_edge_probability_is_the_decoder_of_the_trace_and_of_posterior_draws():
    """CoralModel.edge_probability gives the trace's "edge_prob" and, for stacked draws of z
    (and of a Bayesian decoder), sigmoid(z_i^T W z_j + b) draw by draw."""
    b = random_batch()
    pairs = b.edge_pairs
    model, guide = model_guide(b)
    tr = poutine.trace(poutine.replay(model, trace=poutine.trace(guide).get_trace(b))).get_trace(b)
    z = tr.nodes["z"]["value"]
    torch.testing.assert_close(model.edge_probability(z, pairs), tr.nodes["edge_prob"]["value"])
    W = 0.5 * (model.edge_decoder.weight + model.edge_decoder.weight.T)
    by_hand = torch.sigmoid(((z[pairs[0]] @ W) * z[pairs[1]]).sum(-1) + model.edge_decoder.bias)
    torch.testing.assert_close(model.edge_probability(z, pairs), by_hand)
    with pytest.raises(InputError, match="point estimate"):
        model.edge_probability(z, pairs, edge_weight=torch.zeros(10), edge_bias=torch.zeros(()))

    bayes = CoralModel(b.n_types, 5, 12, z_dim=4, hidden=16, bayesian_edge_decoder=True)
    bguide = CoralGuide(bayes.config, hidden=16, heads=2)
    tr = poutine.trace(poutine.replay(bayes, trace=poutine.trace(bguide).get_trace(b))).get_trace(b)
    z, upper, bias = (tr.nodes[k]["value"] for k in ("z", "edge_weight", "edge_bias"))
    torch.testing.assert_close(bayes.edge_probability(z, pairs, upper, bias), tr.nodes["edge_prob"]["value"])
    with pytest.raises(InputError, match="edge_weight"):
        bayes.edge_probability(z, pairs)
    # three posterior draws, each with its own decoder: (S, n, K), (S, K (K + 1) / 2), (S,)
    torch.manual_seed(1)
    zs, uppers, biases = torch.randn(3, b.n_cells, 4), torch.randn(3, 10), torch.randn(3)
    got = bayes.edge_probability(zs, pairs, uppers, biases)
    assert got.shape == (3, pairs.shape[1])
    rows, cols = torch.triu_indices(4, 4)
    for s in range(3):
        Ws = torch.zeros(4, 4)
        Ws[rows, cols] = uppers[s]
        Ws[cols, rows] = uppers[s]
        expected = torch.sigmoid(((zs[s, pairs[0]] @ Ws) * zs[s, pairs[1]]).sum(-1) + biases[s])
        torch.testing.assert_close(got[s], expected)


# ----------------------------------------------------------------------------- one config


def small_dataset(seed: int = 0):
    """A stand-in for SpatialDataset with the fields data_scales reads."""
    from types import SimpleNamespace

    rng = np.random.default_rng(seed)
    n, m, P, G = 40, 6, 5, 12
    return SimpleNamespace(
        n_types=3, n_features=P, n_genes=G, spot_counts=rng.poisson(20.0, (m, G)).astype(float),
        cell_library=rng.gamma(5.0, 2.0, n), cell_spot=np.where(np.arange(n) < 34, np.arange(n) % m, -1),
        cell_features=rng.gamma(3.0, 1.0, (n, P)), n_edges_total=80,
    )


def test_model_and_guide_share_one_config_and_every_value_is_written_once():
    cfg = CoralConfig(3, 5, 12, z_dim=4, rna_type_slopes=True, bayesian_edge_decoder=True, edge_bias_init=-2.0,
                      capture_sd=0.2, size_loc_init=1.5)
    model, guide = CoralModel(cfg), CoralGuide(cfg, hidden=16, heads=2)
    assert model.config is cfg and guide.config is cfg
    assert model.rna_width == cfg.rna_width == 4 + 3 * 4 + 3
    assert guide.rna_weight_loc.shape == (12, cfg.rna_width)  # q(omega) shaped by the model's read-out
    assert guide.capture and guide.size_loc_init == 1.5 and float(model.size_intercept.detach()) == 1.5
    # the edge decoder's prior mean, once: the model's prior and the start of the guide's q
    b = random_batch()
    mtr = poutine.trace(model).get_trace(b)
    torch.testing.assert_close(mtr.nodes["edge_weight"]["fn"].base_dist.loc, cfg.edge_weight_prior_loc())
    torch.testing.assert_close(guide.edge_weight_loc.detach(), cfg.edge_weight_prior_loc())
    assert float(mtr.nodes["edge_bias"]["fn"].loc) == float(guide.edge_bias_loc.detach()) == -2.0
    # the positional form builds the same config; keywords override a given config (a copy)
    assert CoralModel(3, 5, 12, z_dim=4).config == CoralConfig(3, 5, 12, z_dim=4)
    assert CoralModel(cfg, z_dim=2).z_dim == 2 and cfg.z_dim == 4
    with pytest.raises(InputError, match="z_dimm"):
        CoralModel(3, 5, 12, z_dimm=4)
    with pytest.raises(InputError, match="sizes come from the config"):
        CoralModel(cfg, 5, 12)
    with pytest.raises(InputError, match="CoralConfig"):
        CoralGuide(3)
    with pytest.raises(InputError, match="capture_sd"):
        CoralConfig(3, 5, 12, capture_sd=0.0)


def test_from_dataset_keywords_build_the_config_and_are_checked_against_the_model():
    from pyrospatial.models.coral import data_scales

    ds = small_dataset()
    model = CoralModel.from_dataset(ds, z_dim=4, hidden=16, capture_sd=0.2)
    assert model.config.size_loc_init == pytest.approx(data_scales(ds)["size_loc_init"])
    assert model.config.edge_bias_init == pytest.approx(data_scales(ds)["edge_bias_init"])
    # today's keywords keep working: guide options, and matching config fields / capture / decoder_hidden
    guide = CoralGuide.from_dataset(ds, model=model, hidden=16, heads=2, z_dim=4, capture=True,
                                    decoder_hidden=model.rna_width)
    assert guide.config is model.config and guide.hidden == 16 and guide.heads == 2
    with pytest.raises(InputError, match="z_dim=8"):
        CoralGuide.from_dataset(ds, model=model, z_dim=8)
    with pytest.raises(InputError, match="capture"):
        CoralGuide.from_dataset(ds, model=CoralModel.from_dataset(ds), capture=True)
    with pytest.raises(InputError, match="decoder_hidden"):
        CoralGuide.from_dataset(ds, model=model, decoder_hidden=99)
    with pytest.raises(InputError, match="unknown CoralConfig field"):
        CoralGuide.from_dataset(ds, model=model, hiddenn=3)
    # without a model the keywords build the config from the data
    alone = CoralGuide.from_dataset(ds, z_dim=4, hidden=16, heads=2)
    assert alone.config == CoralConfig.from_dataset(ds, z_dim=4) and alone.config.hidden == 64
    # a variant's own option goes to its constructor, the rest to the config
    arcsinh = CoralArcsinhModel.from_dataset(ds, z_dim=4, cofactor=2.0)
    assert arcsinh.cofactor == 2.0 and arcsinh.config.z_dim == 4


# ----------------------------------------------------------------------------- predictive


def test_predictive_mode_draws_replicated_observations():
    b = random_batch()
    model, guide = model_guide(b)
    guide(b)
    sites = ["proteins", "spot_counts", "edges", "nonedges"]
    rep = Predictive(model, guide=guide, num_samples=4, return_sites=sites)(b, predictive=True)
    obs = Predictive(model, guide=guide, num_samples=2, return_sites=sites)(b)
    assert rep["proteins"].shape == (4, b.n_cells, 5)
    assert rep["spot_counts"].shape == (4, b.n_spots, 12)
    assert not torch.equal(rep["proteins"][0], b.cell_features)
    assert not torch.equal(rep["spot_counts"][0], b.spot_counts)
    assert torch.equal(rep["spot_counts"], rep["spot_counts"].round()) and (rep["spot_counts"] >= 0).all()
    assert (rep["edges"] == 0).any() and (rep["nonedges"] == 1).any()
    # without the flag the observed sites return the data
    assert torch.equal(obs["proteins"][0], b.cell_features)
    assert torch.equal(obs["spot_counts"][1], b.spot_counts)


# ----------------------------------------------------------------------------- learning


def simulate_small(seed=0, n=150, per_spot=5, C=3, P=6, G=30):
    """Hand simulation: type-specific RNA profiles, random 5-cell spots, informative proteins."""
    rng = np.random.default_rng(seed)
    cell_type = rng.integers(0, C, size=n)
    cell_type[:C] = np.arange(C)
    profiles = rng.normal(0, 1.5, size=(C, G))
    profiles = np.exp(profiles) / np.exp(profiles).sum(1, keepdims=True)
    s = rng.lognormal(np.log(200.0), 0.25, size=n)
    truth = s[:, None] * profiles[cell_type]  # E[x_ig]
    counts = rng.poisson(rng.gamma(20.0, truth / 20.0))
    perm = rng.permutation(n)
    cell_spot = np.empty(n, dtype=np.int64)
    cell_spot[perm] = np.arange(n) // per_spot
    m = n // per_spot
    spot_counts = np.zeros((m, G))
    np.add.at(spot_counts, cell_spot, counts)
    plog = rng.normal(0, 1.0, size=(C, P))
    pmean = np.exp(plog[cell_type]) / np.exp(plog[cell_type]).sum(1, keepdims=True)
    lib = rng.lognormal(np.log(50.0), 0.2, size=n)
    features = rng.gamma(10.0, lib[:, None] * pmean / 10.0) + 1e-3
    xy = rng.uniform(0, 10, size=(n, 2))
    return cell_type, features, spot_counts, cell_spot, xy, truth


def pearson(a, b):
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def train(model, guide, batch, steps: int, lr: float = 0.02) -> list[float]:
    """Plain SVI, as the engine does it: Adam on the module parameters of model and guide."""
    guide(batch)
    optim = torch.optim.Adam(list(model.parameters()) + list(guide.parameters()), lr=lr)
    elbo = Trace_ELBO()
    losses = []
    for _ in range(steps):
        optim.zero_grad()
        loss = elbo.differentiable_loss(model, guide, batch)
        loss.backward()
        optim.step()
        losses.append(float(loss.detach()))
    return losses


def test_svi_learns_per_cell_expression_better_than_spot_means():
    cell_type, features, spot_counts, cell_spot, xy, truth = simulate_small()
    n = len(cell_type)
    edges = knn_edges(xy, 4)
    n_pairs = n * (n - 1) // 2 - edges.shape[1] // 2
    K = 200
    scales = dict(cell_scale=1.0, spot_scale=1.0, edge_scale=1.0, nonedge_scale=n_pairs / K)
    b = make_batch(cell_type, features, spot_counts, cell_spot, xy, n_nonedges=K, scales=scales, edges=edges)
    G = spot_counts.shape[1]
    a0 = math.log(np.median(spot_counts.sum(1)) / 5)
    gene_logits = torch.as_tensor(np.log(spot_counts.sum(0) + 0.5) - np.log(spot_counts.sum() + 0.5 * G), dtype=torch.float32)
    model = CoralModel(3, 6, G, z_dim=4, hidden=32, size_loc_init=a0, gene_logits_init=gene_logits)
    guide = CoralGuide(model.config, hidden=32, heads=2)
    losses = np.array(train(model, guide, b, steps=250)) / n
    assert np.all(np.isfinite(losses))
    assert losses[-20:].mean() < losses[:20].mean() - 2.0

    post = Predictive(model, guide=guide, num_samples=20, return_sites=["expected_rna"])(b)
    est = post["expected_rna"].mean(0).numpy()
    spot_mean = (spot_counts / np.bincount(cell_spot)[:, None])[cell_spot]
    r_model = pearson(np.log1p(est), np.log1p(truth))
    r_spot = pearson(np.log1p(spot_mean), np.log1p(truth))
    assert r_model > r_spot + 0.1, (r_model, r_spot)
    # count units: totals on the truth's scale
    assert 0.8 < est.sum() / truth.sum() < 1.25


def test_end_to_end_on_simulated_tissue():
    """simulate_tissue -> SpatialDataset -> fit -> sample_posterior, against the simulated truth."""
    from pyrospatial import data as data_mod
    from pyrospatial import engine as infer_mod
    from pyrospatial import engine as post_mod
    from pyrospatial.data import sim as sim_mod
    sim = sim_mod.simulate_tissue(
        n_cells=300, n_types=3, n_proteins=8, n_genes=30, seed=0, z_dim=4,
        cells_per_spot=6.0, spot_layout="square_tiles",
    )
    ds = data_mod.SpatialDataset.from_anndata(
        sim.cells, sim.spots, cell_type_key="cell_type", spot_diameter=55.0, assignment="nearest"
    )
    assert (ds.cell_spot >= 0).all()
    model = CoralModel.from_dataset(ds, z_dim=4, hidden=32)
    guide = CoralGuide.from_dataset(ds, z_dim=4, hidden=32, heads=2)
    assert model.cell_library_mean == pytest.approx(float(ds.cell_library.mean()), rel=1e-5)
    result = infer_mod.fit(model, guide, ds, max_steps=300, lr=0.02, progress=False, device="cpu", seed=0)
    h = np.asarray(result.elbo_history)
    assert np.isfinite(h).all() and h[-20:].mean() < 0.7 * h[:20].mean()

    post = post_mod.sample_posterior(model, guide, ds, num_samples=10, sites=["expected_rna"])
    est = np.asarray(post["expected_rna"]).mean(0)
    truth = sim.truth["expected_rna"]
    assert est.shape == truth.shape
    cs = ds.cell_spot
    counts = ds.spot_counts.toarray()
    spot_mean = counts[cs] / np.bincount(cs, minlength=ds.n_spots)[cs, None]
    r_model = pearson(np.log1p(est), np.log1p(truth))
    r_spot = pearson(np.log1p(spot_mean), np.log1p(truth))
    assert r_model > r_spot + 0.05, (r_model, r_spot)
    assert 0.8 < est.sum() / truth.sum() < 1.25
