"""Tests of the SVI engine (pyrospatial.engine.infer) on tiny simulated data.

Every test uses fixed seeds; tolerances are justified next to each assertion.
"""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer.autoguide import AutoDelta, AutoNormal
from pyro.nn import PyroModule, PyroParam, PyroSample

from pyrospatial.engine.batch import batch_plates, cell_plate, spot_plate
from pyrospatial.data.dataset import SpatialDataset
from pyrospatial.errors import CheckpointError, FitError, InputError
from pyrospatial.engine.infer import SVIModule, fit, load_checkpoint
from pyrospatial.engine.summary import summarise_posterior

pytestmark = pytest.mark.filterwarnings(
    "ignore:Found plate statements in guide but not model",
    "ignore:.*does not have many workers",
)


# ------------------------------------------------------------------------------ toy data
def toy_anndata(n_side=10, cells_per_spot=2, n_genes=4, seed=0, spot_counts=None, cell_y=None):
    """A square grid of spots (10 units apart) with ``cells_per_spot`` cells jittered around
    each centre; cells have 2 positive features, spots integer counts."""
    rng = np.random.default_rng(seed)
    sx, sy = np.meshgrid(np.arange(n_side) * 10.0, np.arange(n_side) * 10.0)
    spot_xy = np.stack([sx.ravel(), sy.ravel()], 1)
    m = spot_xy.shape[0]
    cell_xy = np.repeat(spot_xy, cells_per_spot, 0) + rng.uniform(-2.5, 2.5, (m * cells_per_spot, 2))
    n = cell_xy.shape[0]
    features = rng.gamma(2.0, 1.0, (n, 2)) if cell_y is None else cell_y
    cells = ad.AnnData(np.asarray(features, dtype=np.float32))
    cells.obs_names = [f"c{i}" for i in range(n)]
    cells.obs["cell_type"] = pd.Categorical(rng.choice(["a", "b"], n))
    cells.obsm["spatial"] = cell_xy
    X = rng.poisson(10.0, (m, n_genes)) + 1 if spot_counts is None else spot_counts
    spots = ad.AnnData(np.asarray(X, dtype=np.float32))
    spots.obs_names = [f"s{j}" for j in range(m)]
    spots.var_names = [f"g{g}" for g in range(X.shape[1])]
    spots.obsm["spatial"] = spot_xy
    return cells, spots


def make_dataset(**kwargs) -> SpatialDataset:
    cells, spots = toy_anndata(**kwargs)
    return SpatialDataset.from_anndata(cells, spots, cell_type_key="cell_type", spot_diameter=8.0)


@pytest.fixture(scope="module")
def small_ds():
    return make_dataset()


# ------------------------------------------------------------------------------ toy models
class NBRegression(PyroModule):
    """X_jg ~ NB(mean = exp(log_mu_g), inverse dispersion theta_g = exp(log_theta_g)),
    GammaPoisson(theta, theta / mean); global per-gene latents with wide Normal priors."""

    def __init__(self, n_genes: int):
        super().__init__()
        self.n_genes = n_genes
        self.log_mu = PyroSample(dist.Normal(torch.zeros(n_genes), 3.0).to_event(1))
        self.log_theta = PyroSample(dist.Normal(torch.zeros(n_genes), 3.0).to_event(1))

    def forward(self, batch):
        log_mu, log_theta = self.log_mu, self.log_theta
        theta = log_theta.exp()
        with pyro.plate("genes", self.n_genes, dim=-1), spot_plate(batch, dim=-2):
            pyro.sample("X", dist.GammaPoisson(theta, theta / log_mu.exp()), obs=batch.spot_counts)


class GlobalLocal(PyroModule):
    """g ~ N(0, 1) (global); z_i | g ~ N(g, 1) per cell; y_ip | z_i ~ N(z_i, 1);
    X_jg ~ Poisson(exp(g + 2)) per spot; edges ~ Bernoulli(sigmoid(a)), non-edges likewise,
    with a global logit a ~ N(0, 1): every term of the batch protocol appears once."""

    def forward(self, batch):
        g = pyro.sample("g", dist.Normal(0.0, 1.0))
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        with cell_plate(batch):
            z = pyro.sample("z", dist.Normal(g, 1.0))
            pyro.sample("y", dist.Normal(z.unsqueeze(-1), 1.0).to_event(1), obs=batch.cell_features)
        with spot_plate(batch):
            rate = (g + 2.0).exp().expand(batch.spot_counts.shape)
            pyro.sample("X", dist.Poisson(rate).to_event(1), obs=batch.spot_counts)
        pairs, nonedges = batch.edge_pairs, batch.nonedge_index
        with poutine.scale(scale=batch.edge_scale), pyro.plate("edges_plate", pairs.shape[1]):
            pyro.sample("edges", dist.Bernoulli(logits=a), obs=torch.ones(pairs.shape[1]))
        with poutine.scale(scale=batch.nonedge_scale), pyro.plate("nonedges_plate", nonedges.shape[1]):
            pyro.sample("nonedges", dist.Bernoulli(logits=a), obs=torch.zeros(nonedges.shape[1]))


class Conjugate(PyroModule):
    """z_i ~ N(0, 1) per cell, y_i ~ N(z_i, 0.3) with y_i the cell's first feature.
    Posterior: N(y_i / (1 + 0.09), sqrt(0.09 / 1.09))."""

    def forward(self, batch):
        with cell_plate(batch):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(z, 0.3), obs=batch.cell_features[:, 0])


def _epoch_losses(module: SVIModule, dataset, batch_size: int, seed: int) -> list[float]:
    out = []
    for i, batch in enumerate(dataset.dataloader(batch_size, seed=seed)):
        torch.manual_seed(1000 + seed * 100 + i)
        with torch.no_grad():
            out.append(float(module.loss(batch)))
    return out


# ------------------------------------------------------------------------------ tests
def test_minibatch_elbo_is_unbiased_for_full_elbo_exact(small_ds):
    """With a deterministic guide (AutoDelta) the mean of the scaled minibatch losses over one
    epoch's partition equals the full-batch loss: cell and spot terms are each counted once
    times n_batches / n_batches; with a constant edge logit, edge and non-edge terms sum to
    n_edges*log p(1) and n_nonedges*log p(0) exactly (see batch.py's scaling)."""
    model = GlobalLocal()
    guide = AutoDelta(model, create_plates=batch_plates)
    module = SVIModule(model, guide)
    full = small_ds.full_batch()
    with torch.no_grad():
        module.loss(full)  # creates the guide's parameters
        for p in guide.parameters():  # arbitrary but fixed guide parameters
            p.copy_(torch.linspace(-0.5, 0.7, p.numel()).reshape(p.shape))
        full_loss = float(module.loss(full))
    for epoch_seed in (0, 1):
        losses = _epoch_losses(module, small_ds, batch_size=20, seed=epoch_seed)
        assert len(losses) == 5
        # float32 sums of ~1e4 terms: relative error ~1e-6; 1e-4 leaves room, yet a wrong
        # scale (e.g. n/len(subsample) instead of n_batches) is off by percents.
        assert np.mean(losses) == pytest.approx(full_loss, rel=1e-4)
        assert np.std(losses) > 1e-3 * abs(full_loss)  # batches differ: the check is not vacuous


def test_minibatch_elbo_matches_full_elbo_within_mc_error(small_ds):
    """AutoNormal (stochastic guide, fixed parameters): average of scaled minibatch losses
    over R epochs x 5 batches vs R full-batch losses; both estimate the same negative ELBO."""
    model = GlobalLocal()
    guide = AutoNormal(model, create_plates=batch_plates, init_scale=0.05)
    module = SVIModule(model, guide)
    full = small_ds.full_batch()
    torch.manual_seed(0)
    with torch.no_grad():
        module.loss(full)
    R = 30
    epoch_means, fulls = [], []
    for r in range(R):
        epoch_means.append(np.mean(_epoch_losses(module, small_ds, batch_size=20, seed=r)))
        torch.manual_seed(10_000 + r)
        with torch.no_grad():
            fulls.append(float(module.loss(full)))
    diff = np.mean(epoch_means) - np.mean(fulls)
    se = math.sqrt(np.var(epoch_means, ddof=1) / R + np.var(fulls, ddof=1) / R)
    # 4 standard errors: a false alarm has probability ~6e-5; a mis-scaled plate shifts the
    # mean by hundreds of SEs (the loss is ~1e3, the SE ~1).
    assert abs(diff) < 4 * se + 1e-5 * abs(np.mean(fulls)), (diff, se)


def test_recovers_nb_regression_parameters():
    """Per-gene NB means and inverse dispersions are recovered from 400 spots."""
    rng = np.random.default_rng(1)
    mu = np.array([5.0, 10.0, 20.0, 50.0])
    theta = np.array([2.0, 4.0, 8.0, 5.0])
    n_side = 20
    counts = rng.negative_binomial(theta, theta / (theta + mu), size=(n_side * n_side, 4))
    counts[:, 0] += 1 - counts.sum(1).clip(max=1)  # no all-zero spot (they would be dropped)
    ds = make_dataset(n_side=n_side, cells_per_spot=1, spot_counts=counts, seed=1)
    pyro.set_rng_seed(0)
    model = NBRegression(4)
    guide = AutoNormal(model, create_plates=batch_plates)
    # lr decays 10x over the 400 steps (ClippedAdam-style lrd) so the last steps average noise
    result = fit(model, guide, ds, max_epochs=100, batch_size=100, lr=0.05, lr_decay=0.1 ** (1 / 400),
                 seed=0, progress=False)
    assert result.elbo_history.shape == (400,)
    assert result.elbo_history[-40:].mean() < result.elbo_history[:10].mean()
    est = guide.median()
    # MLE standard errors with n=400: sd(log mu_g) ~ sqrt((1/mu + 1/theta)/n) <= 0.04 and
    # sd(log theta_g) <= ~0.2 (theta=2..8); tolerances are ~4 SE plus SVI noise at lr 0.05.
    np.testing.assert_allclose(est["log_mu"].numpy(), np.log(mu), atol=0.15)
    np.testing.assert_allclose(est["log_theta"].numpy(), np.log(theta), atol=0.6)
    # The sample mean of the data is the MLE of mu: the fit must be far closer than that
    # tolerance to it (checks convergence rather than luck).
    np.testing.assert_allclose(est["log_mu"].numpy(), np.log(ds.spot_counts.toarray().mean(0)), atol=0.03)
    s = result.settings
    assert (s["seed"], s["batch_size"], s["steps"], s["epochs"], s["device"]) == (0, 100, 400, 100, "cpu")
    assert set(s["versions"]) >= {"torch", "pyro", "lightning", "pyrospatial"}
    assert result.fit_seconds > 0 and result.checkpoint_path is None


def test_autonormal_with_local_latents_trains_to_known_posterior():
    """Conjugate model with one latent per cell, AutoNormal(create_plates=batch_plates),
    minibatches: posterior means/sds approach the exact Normal posterior."""
    rng = np.random.default_rng(2)
    z = rng.normal(size=200)
    y = np.stack([np.abs(z) + rng.normal(0, 0.3, 200).clip(-0.2, 0.2) + 0.5, np.ones(200)], 1)
    ds = make_dataset(cell_y=y, seed=2)
    model = Conjugate()
    guide = AutoNormal(model, create_plates=batch_plates)
    # 100 epochs x 4 batches, lr decaying 10x over the 400 steps
    result = fit(model, guide, ds, max_epochs=100, batch_size=50, lr=0.05, lr_decay=0.1 ** (1 / 400),
                 seed=3, progress=False)
    assert np.isfinite(result.elbo_history).all()
    post = summarise_posterior(model, guide, ds, num_samples=200, sites=["z"], chunk_size=50, seed=0)
    exact_mean = ds.cell_features[:, 0] / 1.09
    exact_sd = math.sqrt(0.09 / 1.09)
    # Untrained, the error would be ~1.3 (the mean of exact_mean). Measured SVI error with one
    # particle is ~0.04 on average (max ~0.15); the MC error of a 200-draw mean adds
    # 0.287/sqrt(200) = 0.02. Tolerances: 2.5x the measured values.
    err = np.abs(post["z"]["mean"] - exact_mean)
    assert err.mean() < 0.1 and err.max() < 0.4, (err.mean(), err.max())
    # sd: a 200-draw sample sd has relative SE 5%; SVI scale estimates are within ~10% here.
    assert np.median(post["z"]["sd"]) == pytest.approx(exact_sd, rel=0.2)


def test_checkpoint_load_gives_identical_posterior_summaries(small_ds, tmp_path):
    model = Conjugate()
    guide = AutoNormal(model, create_plates=batch_plates)
    result = fit(model, guide, small_ds, max_epochs=3, batch_size=25, seed=0, progress=False,
                 checkpoint_dir=tmp_path)
    assert result.checkpoint_path == str(tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    # nothing pickled: plain weights_only loading works
    torch.load(result.checkpoint_path, weights_only=True)
    before = summarise_posterior(model, guide, small_ds, 10, ["z"], chunk_size=40, seed=5)

    model2 = Conjugate()
    guide2 = AutoNormal(model2, create_plates=batch_plates)
    load_checkpoint(model2, guide2, small_ds, result.checkpoint_path)
    after = summarise_posterior(model2, guide2, small_ds, 10, ["z"], chunk_size=40, seed=5)
    for stat in before["z"]:
        np.testing.assert_array_equal(before["z"][stat], after["z"][stat])

    # a checkpoint of another model is rejected, naming the keys
    other = NBRegression(small_ds.n_genes)
    other_guide = AutoNormal(other, create_plates=batch_plates)
    with pytest.raises(CheckpointError, match="locs.z"):
        load_checkpoint(other, other_guide, small_ds, result.checkpoint_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(model2, guide2, small_ds, tmp_path / "nope.ckpt")
    # pickled objects are refused (torch.load(weights_only=True))
    unsafe = torch.load(result.checkpoint_path, weights_only=True)
    unsafe["extra"] = _Pickled()
    torch.save(unsafe, tmp_path / "unsafe.ckpt")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(model2, guide2, small_ds, tmp_path / "unsafe.ckpt")


class _Pickled:
    """An arbitrary Python object: not loadable with weights_only=True."""


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_resume_reaches_same_parameters_as_uninterrupted_fit(small_ds, tmp_path):
    kwargs = dict(batch_size=20, lr=0.05, lr_decay=0.99, seed=7, progress=False)
    m_a = GlobalLocal()
    g_a = AutoNormal(m_a, create_plates=batch_plates)
    full = fit(m_a, g_a, small_ds, max_epochs=6, checkpoint_dir=tmp_path / "a", **kwargs)

    m_b = GlobalLocal()
    g_b = AutoNormal(m_b, create_plates=batch_plates)
    first = fit(m_b, g_b, small_ds, max_epochs=3, checkpoint_dir=tmp_path / "b", **kwargs)
    assert first.settings["steps"] == 15
    # a fresh process would rebuild the model and guide from scratch
    m_c = GlobalLocal()
    g_c = AutoNormal(m_c, create_plates=batch_plates)
    resumed = fit(m_c, g_c, small_ds, max_epochs=6, checkpoint_dir=tmp_path / "b", resume="last", **kwargs)
    assert resumed.settings["steps"] == full.settings["steps"] == 30
    a, c = _state(g_a), _state(g_c)
    assert a.keys() == c.keys()
    for key in a:
        # same arithmetic in the same order on one CPU thread: equal up to float32 rounding
        torch.testing.assert_close(a[key], c[key], rtol=0, atol=1e-6)
    np.testing.assert_allclose(resumed.elbo_history, full.elbo_history, rtol=1e-6)
    # and the resumed state really differs from the state at the interruption
    assert not torch.allclose(_state(g_b)["locs.g_unconstrained"], a["locs.g_unconstrained"])
    # a different seed takes a different path (the comparison above is not vacuous)
    m_d = GlobalLocal()
    g_d = AutoNormal(m_d, create_plates=batch_plates)
    fit(m_d, g_d, small_ds, max_epochs=6, **{**kwargs, "seed": 8})
    assert not torch.allclose(_state(g_d)["locs.g_unconstrained"], a["locs.g_unconstrained"], atol=1e-6)


class ExplodingModel(PyroModule):
    """y ~ Normal(0, 1e-30) observed far away: log_prob overflows to -inf in float32."""

    def __init__(self):
        super().__init__()
        self.loc = PyroParam(torch.zeros(()))

    def forward(self, batch):
        with cell_plate(batch):
            pyro.sample("ok", dist.Normal(self.loc, 1.0), obs=batch.cell_features[:, 1])
            pyro.sample("y", dist.Normal(self.loc, 1e-30), obs=batch.cell_features[:, 0] + 1e10)


class LateNaN(PyroModule):
    """Finite for the first 3 calls (the initialisation run + steps 0 and 1), then the
    observation scale becomes NaN-producing (0 * inf) at step 2."""

    def __init__(self):
        super().__init__()
        self.loc = PyroParam(torch.zeros(()))
        self.calls = 0

    def forward(self, batch):
        self.calls += 1
        bad = float("inf") if self.calls > 3 else 1.0
        with cell_plate(batch), pyro.validation_enabled(False):
            pyro.sample("late", dist.Normal(self.loc * bad, 1.0), obs=batch.cell_features[:, 0])


class EmptyGuide(PyroModule):
    def forward(self, batch):
        return None


def test_nonfinite_loss_raises_fit_error_naming_the_site(small_ds):
    with pytest.raises(FitError) as info:
        fit(ExplodingModel(), EmptyGuide(), small_ds, max_epochs=1, batch_size=25, progress=False)
    message = str(info.value)
    assert "step 0" in message and "'y'" in message and "'ok'" not in message
    with pytest.raises(FitError, match=r"step 2 .*'late'"):
        fit(LateNaN(), EmptyGuide(), small_ds, max_epochs=2, batch_size=25, progress=False)


def test_nan_parameter_is_named(small_ds):
    model = ExplodingModel()
    with torch.no_grad():
        model.loc_unconstrained.fill_(float("nan"))
    with pytest.raises(FitError, match="loc"):
        fit(model, EmptyGuide(), small_ds, max_epochs=1, batch_size=25, progress=False)


def test_rejects_global_param_store_guides_and_missing_cuda(small_ds):
    def function_guide(batch):
        loc = pyro.param("fn_loc", torch.zeros(()))
        with cell_plate(batch):
            pyro.sample("z", dist.Normal(loc, 1.0))

    with pytest.raises(InputError, match="global param store"):
        fit(Conjugate(), function_guide, small_ds, max_epochs=1, progress=False)

    class StoreGuide(PyroModule):
        def forward(self, batch):
            loc = pyro.param("store_loc", torch.zeros(()))
            with cell_plate(batch):
                pyro.sample("z", dist.Normal(loc, 1.0))

    pyro.clear_param_store()
    with pytest.raises(InputError, match="pyro.param"):
        fit(Conjugate(), StoreGuide(), small_ds, max_epochs=1, progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="cuda"):
            fit(Conjugate(), EmptyGuide(), small_ds, max_epochs=1, device="cuda", progress=False)


def test_early_stopping_lr_decay_and_no_litter(small_ds, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = Conjugate()
    guide = AutoNormal(model, create_plates=batch_plates)
    # min_delta larger than any improvement: stops after patience + 1 epochs
    result = fit(model, guide, small_ds, max_epochs=50, batch_size=50, lr=0.01, lr_decay=0.9,
                 early_stopping={"patience": 1, "min_delta": 1e9}, progress=False)
    assert result.settings["epochs"] == 2 and result.settings["stopped_early"]
    optimizer = result.module.trainer.optimizers[0]
    steps = result.settings["steps"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.9**steps)
    assert list(tmp_path.iterdir()) == []  # no lightning_logs / checkpoints in cwd


def test_same_seed_same_result_and_ddp_arguments_pass_through(small_ds):
    runs = []
    for _ in range(2):
        model = Conjugate()
        guide = AutoNormal(model, create_plates=batch_plates)
        runs.append(fit(model, guide, small_ds, max_steps=7, batch_size=30, seed=11, progress=False,
                        accumulate_grad_batches=1))
    np.testing.assert_array_equal(runs[0].elbo_history, runs[1].elbo_history)
    assert runs[0].settings["steps"] == 7


# ------------------------------------------------------------------------------ resume of every method
class _Interrupt(Exception):
    """Raised by :class:`_InterruptAt`: the fit stops as if killed (no final checkpoint)."""


class _InterruptAt(__import__("lightning").Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise _Interrupt()


def _interrupted_then_resumed(train, tmp_path, step: int):
    """``train(**fit_kwargs)`` uninterrupted, interrupted before ``step`` (checkpoints every 5
    steps) and resumed; returns (uninterrupted, resumed) as ``(FitResult, parameters)``."""
    full = train()
    with pytest.raises(_Interrupt):
        train(checkpoint_dir=tmp_path, checkpoint_every_n_steps=5, callbacks=[_InterruptAt(step)])
    # the last write: every 5 steps or at an epoch's end, whichever came last before the interruption
    assert step - 5 < torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] <= step
    return full, train(checkpoint_dir=tmp_path, resume="last")


def _assert_same(full, resumed) -> None:
    (r_full, p_full), (r_res, p_res) = full, resumed
    assert r_res.settings["steps"] == r_full.settings["steps"]
    np.testing.assert_array_equal(r_res.elbo_history, r_full.elbo_history)
    assert p_full.keys() == p_res.keys()
    for key in p_full:
        assert torch.equal(p_full[key], p_res[key]), key


def test_deconvolution_and_alignment_resume_exactly(tmp_path):
    """Deconvolution (minibatches, mid-epoch) and Alignment (its M-step callback and the Sinkhorn
    warm start, a non-persistent buffer) resumed from a mid-run checkpoint equal an
    uninterrupted fit bit for bit on CPU."""
    import sys
    from pathlib import Path

    import pyrospatial as ps
    from pyrospatial.methods.alignment import Alignment, simulate_pair

    sys.path.insert(0, str(Path(__file__).parent))
    from test_deconvolution import simulate

    reference, spots, _ = simulate()

    def deconvolution(**kwargs):
        method = ps.Deconvolution(spots, reference, "cell_type", cells_per_spot=6.0)
        result = method.train(max_steps=40, batch_size=20, progress=False, seed=0, **kwargs)
        return result, {k: v.detach().clone() for k, v in SVIModule(method.model, method.guide).state_dict().items()}

    _assert_same(*_interrupted_then_resumed(deconvolution, tmp_path / "d", 23))

    a, b, _ = simulate_pair(150, angle=0.5, translation=(30.0, -20.0), drop_fraction=0.1, seed=1)

    def alignment(**kwargs):
        method = Alignment(a, b, seed=0)
        result = method.train(30, seed=0, progress=False, **kwargs)
        state = SVIModule(method.model, method.guide).state_dict()
        state["guide.g_potential"] = method.guide.g_potential
        return result, {k: v.detach().clone() for k, v in state.items()}

    _assert_same(*_interrupted_then_resumed(alignment, tmp_path / "a", 17))


def test_the_training_loss_asks_the_model_for_the_density_only_and_equals_the_full_elbo():
    """SVIModule.loss passes CORAL a density-only batch (per-cell RNA for the cells inside a
    spot only, no deterministic sites); the negative ELBO is the same as on the batch as is,
    draw for draw (same seed), so training optimises the same objective."""
    from dataclasses import replace

    from pyro.infer import Trace_ELBO

    from pyrospatial.data.sim import simulate_tissue
    from pyrospatial.methods.coral import CORAL

    tissue = simulate_tissue(n_cells=200, n_types=3, n_proteins=6, n_genes=12, seed=3)
    coral = CORAL(tissue.cells, tissue.spots, cell_type_key="cell_type", spot_diameter=55.0, seed=0)
    batch = coral.dataset.full_batch()
    assert 0 < int((batch.cell_spot >= 0).sum()) < batch.n_cells  # cells inside and between spots
    module = SVIModule(coral.model, coral.guide)
    seen = []
    forward = coral.model.forward

    def spy(b, *args, **kwargs):
        seen.append(b.density_only)
        return forward(b, *args, **kwargs)

    coral.model.forward = spy
    pyro.set_rng_seed(5)
    fast = float(module.loss(batch))
    coral.model.forward = forward
    pyro.set_rng_seed(5)
    full = float(Trace_ELBO().differentiable_loss(coral.model, coral.guide, replace(batch, density_only=False)))
    assert seen and all(seen)
    assert fast == pytest.approx(full, rel=1e-5)
