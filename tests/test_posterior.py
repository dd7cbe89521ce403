"""Tests of posterior sampling, summaries and AnnData export (pyrospatial.engine.posterior)."""

from __future__ import annotations

from importlib import metadata

import anndata as ad
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Predictive
from pyro.nn import PyroModule, PyroParam

import pyrospatial  # noqa: F401  (switches on module-local parameters)
from pyrospatial.engine.batch import cell_plate, spot_plate
from pyrospatial.data.dataset import SpatialDataset
from pyrospatial.errors import InputError, PyrospatialError
from pyrospatial.engine.export import export
from pyrospatial.engine.posterior import sample_posterior
from pyrospatial.engine.summary import summarise, summarise_posterior

D = 3  # latent dimension (differs from the 2 cell features, so z goes to obsm)


# ------------------------------------------------------------------------------ toy data
def toy_anndata(n_side=8, cells_per_spot=2, n_genes=4, seed=0):
    rng = np.random.default_rng(seed)
    sx, sy = np.meshgrid(np.arange(n_side) * 10.0, np.arange(n_side) * 10.0)
    spot_xy = np.stack([sx.ravel(), sy.ravel()], 1)
    m = spot_xy.shape[0]
    cell_xy = np.repeat(spot_xy, cells_per_spot, 0) + rng.uniform(-2.5, 2.5, (m * cells_per_spot, 2))
    n = cell_xy.shape[0]
    cells = ad.AnnData(rng.gamma(2.0, 1.0, (n, 2)).astype(np.float32))
    cells.obs_names = [f"c{i}" for i in range(n)]
    cells.var_names = ["p0", "p1"]
    cells.obs["cell_type"] = pd.Categorical(rng.choice(["a", "b"], n))
    cells.obsm["spatial"] = cell_xy
    spots = ad.AnnData((rng.poisson(10.0, (m, n_genes)) + 1).astype(np.float32))
    spots.obs_names = [f"s{j}" for j in range(m)]
    spots.var_names = [f"g{g}" for g in range(n_genes)]
    spots.obsm["spatial"] = spot_xy
    return cells, spots


@pytest.fixture(scope="module")
def data():
    cells, spots = toy_anndata()
    ds = SpatialDataset.from_anndata(cells, spots, cell_type_key="cell_type", spot_diameter=8.0)
    assert ds.n_spots == spots.n_obs  # no spot dropped: the AnnDatas align with the dataset
    return cells, spots, ds


# ------------------------------------------------------------------------------ toy model
class Hier(PyroModule):
    """g ~ N(0, 1) (global); z_i | g ~ N(g, 1)^D per cell; zsum_i = sum_d z_id (deterministic);
    rate_jg = exp(g) * 10 per spot and gene (deterministic), X_jg ~ Poisson(rate_jg);
    g2 = 2 g (global deterministic); edges ~ Bernoulli(sigmoid(z_i . z_i')) (edge-level);
    with ``batch_site``, a deterministic outside every plate that depends on the batch."""

    def __init__(self, batch_site: bool = False):
        super().__init__()
        self.batch_site = batch_site

    def forward(self, batch):
        g = pyro.sample("g", dist.Normal(0.0, 1.0))
        pyro.deterministic("g2", 2 * g)
        with cell_plate(batch):
            z = pyro.sample("z", dist.Normal(g, 1.0).expand([D]).to_event(1))
            pyro.deterministic("zsum", z.sum(-1))
        with spot_plate(batch):
            rate = pyro.deterministic("rate", (g.exp() * 10.0).expand(batch.spot_counts.shape), event_dim=1)
            pyro.sample("X", dist.Poisson(rate).to_event(1), obs=batch.spot_counts)
        if self.batch_site:
            pyro.deterministic("batch_mean_z", z.mean(0))
        pairs = batch.edge_pairs
        logits = (z[pairs[0]] * z[pairs[1]]).sum(-1)
        with poutine.scale(scale=batch.edge_scale), pyro.plate("edges_plate", pairs.shape[1]):
            pyro.sample("edges", dist.Bernoulli(logits=logits), obs=torch.ones(pairs.shape[1]))


class CoherentGuide(PyroModule):
    """q(g) = N(g_loc, 1); q(z_i | g) = N(g + offset_i, 1e-3): every z depends on the global
    draw, so z_i - offset_i must equal g within a joint draw, in every chunk."""

    def __init__(self, n_cells: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.g_loc = PyroParam(torch.tensor(0.5))
        self.offset = PyroParam(torch.randn(n_cells, D, generator=gen), event_dim=1)

    def forward(self, batch):
        g = pyro.sample("g", dist.Normal(self.g_loc, 1.0))
        with cell_plate(batch):
            offset = self.offset  # subsampled to the batch's cells by the plate (event_dim=1)
            pyro.sample("z", dist.Normal(g + offset, 1e-3).to_event(1))


@pytest.fixture()
def pair(data):
    _, _, ds = data
    return Hier(), CoherentGuide(ds.n_cells)


# ------------------------------------------------------------------------------ tests
def test_joint_draws_are_coherent_across_chunks(data, pair):
    _, _, ds = data
    model, guide = pair
    n_chunks = len(list(ds.chunks(8)))
    assert n_chunks >= 6
    S = 20
    samples = sample_posterior(model, guide, ds, S, chunk_size=8, seed=1)
    assert samples["z"].shape == (S, ds.n_cells, D)
    assert samples["g"].shape == (S,)
    offset = guide.offset.detach().numpy()
    residual = samples["z"] - offset[None] - samples["g"][:, None, None]
    # q(z | g) has sd 1e-3: 10 sd over 20 x 128 x 3 draws never happens by chance, while
    # g varies with sd 1 between draws (so mixing globals across chunks is detected).
    assert np.abs(residual).max() < 1e-2
    assert samples["g"].std() > 0.5
    np.testing.assert_allclose(samples["g2"], 2 * samples["g"], rtol=1e-6)
    np.testing.assert_allclose(samples["zsum"], samples["z"].sum(-1), rtol=1e-5, atol=1e-5)
    assert samples.plates == {"g": "global", "g2": "global", "z": "cells", "zsum": "cells", "rate": "spots"}

    # negative control: independent per-chunk Predictive draws are NOT coherent
    z_naive = np.zeros((S, ds.n_cells, D))
    for chunk in ds.chunks(8):
        draws = Predictive(model, guide=guide, num_samples=S, return_sites=["z"])(chunk)
        z_naive[:, chunk.cell_index.numpy()] = draws["z"].detach().numpy().reshape(S, -1, D)
    naive = z_naive - offset[None]
    spread = (naive.max(1) - naive.min(1)).max()  # within-draw spread across cells
    assert spread > 0.5


def test_sample_and_streaming_summaries_agree(data, pair):
    _, _, ds = data
    model, guide = pair
    kwargs = dict(chunk_size=16, seed=3, return_observed=True)
    samples = sample_posterior(model, guide, ds, 12, **kwargs)
    assert samples["X"].shape == (12, ds.n_spots, ds.n_genes)
    assert samples["X_mean"].shape == (12, ds.n_spots, ds.n_genes)
    np.testing.assert_allclose(samples["X_mean"], samples["rate"], rtol=1e-6)
    assert np.all(samples["X"] == np.round(samples["X"]))  # Poisson replicates are counts
    assert "edges" not in samples  # edge-level sites are not assembled (documented)
    streamed = summarise_posterior(model, guide, ds, 12, **kwargs)
    direct = summarise(samples)
    assert streamed.keys() == direct.keys() and streamed.plates == direct.plates
    for site in direct:
        assert direct[site].keys() == {"mean", "sd", "q05", "q50", "q95"}
        for stat in direct[site]:
            np.testing.assert_allclose(streamed[site][stat], direct[site][stat], rtol=1e-6, atol=1e-6)


def test_batch_dependent_site_outside_plates_is_dropped(data):
    _, _, ds = data
    model, guide = Hier(batch_site=True), CoherentGuide(ds.n_cells)
    with pytest.warns(UserWarning, match="batch_mean_z"):
        samples = sample_posterior(model, guide, ds, 3, chunk_size=16)
    assert "batch_mean_z" not in samples and "g2" in samples and "z" in samples
    assert list(samples)[:2] == ["g", "g2"]  # globals first, then local sites


def test_summarise_exact_values():
    draws = np.arange(101, dtype=np.float64)[:, None] * np.array([1.0, -2.0])  # (101, 2)
    out = summarise({"x": draws})["x"]
    np.testing.assert_allclose(out["mean"], [50.0, -100.0])
    np.testing.assert_allclose(out["sd"], [np.std(np.arange(101), ddof=1)] * np.array([1, 2]))
    np.testing.assert_allclose(out["q05"], [5.0, -190.0])
    np.testing.assert_allclose(out["q50"], [50.0, -100.0])
    np.testing.assert_allclose(out["q95"], [95.0, -10.0])
    custom = summarise({"x": draws}, quantiles=(0.025, 0.975))["x"]
    assert set(custom) == {"mean", "sd", "q2.5", "q97.5"}


def test_summaries_match_a_known_posterior(data, pair):
    """q gives z_id ~ N(0.5 + offset_id, 1 + 1e-6) marginally."""
    _, _, ds = data
    model, guide = pair
    S = 400
    out = summarise_posterior(model, guide, ds, S, sites=["z", "g"], chunk_size=32, seed=0)
    assert set(out) == {"z", "g"}
    truth = 0.5 + guide.offset.detach().numpy()
    z = out["z"]
    assert z["mean"].shape == z["q05"].shape == (ds.n_cells, D)
    # All cells share g within a draw, so errors are common: mean error ~ N(0, 1/S), SE 0.05;
    # 4 SE = 0.2.
    assert np.abs(z["mean"] - truth).max() < 0.2
    # sample sd of 400 draws: relative SE 3.5%; 15% is > 4 SE.
    np.testing.assert_allclose(z["sd"], 1.0, rtol=0.15)
    # 5% / 95% quantiles: SE = sqrt(.05 * .95 / 400) / phi(1.645) = 0.106; 4 SE = 0.45.
    assert np.abs(z["q05"] - (truth - 1.645)).max() < 0.45
    assert np.abs(z["q95"] - (truth + 1.645)).max() < 0.45
    assert np.abs(z["q50"] - truth).max() < 0.3
    assert out["g"]["mean"].shape == () and abs(float(out["g"]["mean"]) - 0.5) < 0.2


def test_site_selection_errors(data, pair):
    _, _, ds = data
    model, guide = pair
    only = sample_posterior(model, guide, ds, 2, sites=["zsum"], chunk_size=16)
    assert set(only) == {"zsum"} and only["zsum"].shape == (2, ds.n_cells)
    with pytest.raises(InputError, match="nope"):
        sample_posterior(model, guide, ds, 2, sites=["nope"])
    with pytest.raises(InputError, match="edge-level"):
        sample_posterior(model, guide, ds, 2, sites=["edges"], return_observed=True)
    with pytest.raises(InputError, match="return_observed"):
        sample_posterior(model, guide, ds, 2, sites=["X"])


def test_export_keys_shapes_and_h5ad_roundtrip(data, pair, tmp_path):
    cells, spots, ds = data
    model, guide = pair
    summaries = summarise_posterior(model, guide, ds, 8, chunk_size=16, return_observed=True)
    settings = {"seed": 0, "lr": 0.01, "checkpoint": None, "mixed": (1, "a", 2.5), "nums": (1, 2),
                "nested": {"versions": {"torch": torch.__version__}, "empty": []}}
    cells_before, spots_before = cells.copy(), spots.copy()
    out_cells, out_spots = export(cells, spots, summaries, settings=settings)
    # inputs untouched
    assert set(cells.obsm) == set(cells_before.obsm) and not cells.layers and "pyrospatial" not in cells.uns
    assert not spots.layers and "pyrospatial" not in spots.uns
    for stat in ("mean", "sd", "q05", "q50", "q95"):
        assert out_cells.obsm[f"z_{stat}"].shape == (ds.n_cells, D)  # (N, D), D != n_vars
        assert out_cells.obs[f"zsum_{stat}"].shape == (ds.n_cells,)  # scalar per cell
        assert out_spots.layers[f"rate_{stat}"].shape == (ds.n_spots, ds.n_genes)  # D == n_vars
        assert out_spots.layers[f"X_mean_{stat}"].shape == (ds.n_spots, ds.n_genes)
        assert out_cells.uns["pyrospatial"]["globals"]["g"][stat].shape == ()
    np.testing.assert_array_equal(out_cells.obsm["z_mean"], summaries["z"]["mean"])
    assert "rate_mean" not in out_cells.layers and "z_mean" not in out_spots.obsm
    uns = out_cells.uns["pyrospatial"]
    assert set(uns["versions"]) >= {"pyrospatial", "torch", "pyro", "lightning", "anndata"}
    assert uns["sites"]["z"]["location"] == "obsm" and uns["sites"]["zsum"]["location"] == "obs"
    assert out_spots.uns["pyrospatial"]["sites"]["rate"]["location"] == "layers"

    # h5ad round trip of both
    for name, adata in (("cells", out_cells), ("spots", out_spots)):
        path = tmp_path / f"{name}.h5ad"
        adata.write_h5ad(path)
        back = ad.read_h5ad(path)
        for key in adata.obsm:
            np.testing.assert_array_equal(back.obsm[key], adata.obsm[key])
        for key in adata.layers:
            np.testing.assert_array_equal(back.layers[key], adata.layers[key])
        np.testing.assert_allclose(
            back.uns["pyrospatial"]["globals"]["g"]["q95"], adata.uns["pyrospatial"]["globals"]["g"]["q95"]
        )
        assert back.uns["pyrospatial"]["settings"]["checkpoint"] == "None"
        assert list(back.uns["pyrospatial"]["settings"]["mixed"]) == ["1", "a", "2.5"]
        assert back.uns["pyrospatial"]["versions"]["anndata"] == metadata.version("anndata")

    # forced location, and a mismatching AnnData is rejected
    forced, _ = export(cells, None, {"zsum": summaries["zsum"]}, plates={"zsum": "cells"},
                       locations={"zsum": "obsm"})
    assert forced.obsm["zsum_mean"].shape == (ds.n_cells, 1)
    with pytest.raises(InputError, match="rows"):
        export(cells[:10], spots, summaries)


# ------------------------------------------------------------------------------ CORAL's guide, drawn again and again
@pytest.mark.filterwarnings("ignore:site\\(s\\) \\[.edge_prob.\\]")
def test_coral_guide_encodes_once_per_chunk_and_gives_the_same_draws(data):
    """sample_posterior enters CoralGuide.repeated_draws: the graph-attention encoder runs once
    per distinct batch instead of once per draw, and the draws are those of a guide that encodes
    at every call (a plain function around the same guide has no hook), bit for bit."""
    from pyrospatial.guides import CoralGuide
    from pyrospatial.models import CoralModel

    _, _, ds = data
    pyro.set_rng_seed(0)
    model = CoralModel.from_dataset(ds, z_dim=3, hidden=8)
    guide = CoralGuide.from_dataset(ds, model=model, hidden=8, heads=2)
    calls = []
    guide.gat1.register_forward_hook(lambda *_: calls.append(1))
    S, chunk_size = 7, 20
    n_chunks = len(list(ds.chunks(chunk_size)))
    assert n_chunks >= 3

    reused = sample_posterior(model, guide, ds, S, chunk_size=chunk_size, seed=3)
    # the first chunk once for the global draws, then each chunk once (a fresh batch object)
    assert len(calls) == 1 + n_chunks
    calls.clear()
    fresh = sample_posterior(model, lambda batch, *a, **k: guide(batch, *a, **k), ds, S, chunk_size=chunk_size, seed=3)
    assert len(calls) == S * (1 + n_chunks)
    assert set(reused) == set(fresh) and {"z", "v", "cell_size", "expected_rna"} <= set(reused)
    for name in fresh:
        np.testing.assert_array_equal(reused[name], fresh[name], err_msg=name)
    assert guide._encoding_memo is None  # the context is left: training encodes afresh


def test_coral_guide_reuses_an_encoding_only_without_gradients_in_eval_mode_on_the_same_batch(data):
    from pyrospatial.guides import CoralGuide
    from pyrospatial.models import CoralModel

    _, _, ds = data
    model = CoralModel.from_dataset(ds, z_dim=3, hidden=8)
    guide = CoralGuide.from_dataset(ds, model=model, hidden=8, heads=2)
    calls = []
    guide.gat1.register_forward_hook(lambda *_: calls.append(1))
    batch, other = ds.full_batch(), ds.full_batch()
    with guide.repeated_draws():
        guide.train()
        with torch.no_grad():
            guide(batch), guide(batch)
        assert len(calls) == 2  # training mode: never reused (dropout-like layers would change it)
        guide.eval()
        guide(batch), guide(batch)
        assert len(calls) == 4  # gradients on: never reused (the graph must reach the encoder)
        with torch.no_grad():
            guide(batch), guide(batch), guide(other), guide(batch)
        assert len(calls) == 7  # the first call, then each change of batch object
    with torch.no_grad():
        guide(batch)
    assert len(calls) == 8 and guide._encoding_memo is None  # outside the context: afresh


def test_mcmc_starting_draws_encode_once(data):
    """The samplers' C starting draws (refine._guide_starts, under _EvalMode as both samplers
    call it) run CORAL's encoder once, not C + 2 times (a trace for the model's sites, one to list
    the latent sites, one per chain), and are the draws of fresh calls."""
    from pyrospatial.engine.posterior import _EvalMode
    from pyrospatial.engine.refine import _guide_starts
    from pyrospatial.guides import CoralGuide
    from pyrospatial.models import CoralModel

    _, _, ds = data
    model = CoralModel.from_dataset(ds, z_dim=3, hidden=8)
    guide = CoralGuide.from_dataset(ds, model=model, hidden=8, heads=2)
    calls = []
    guide.gat1.register_forward_hook(lambda *_: calls.append(1))
    full = ds.full_batch()
    starts = {}
    for label, g in (("reused", guide), ("fresh", lambda batch, *a, **k: guide(batch, *a, **k))):
        calls.clear()
        torch.manual_seed(5)
        with _EvalMode(model, guide):
            starts[label] = _guide_starts(model, g, full, (), 3)[3]
        assert len(calls) == (1 if label == "reused" else 3 + 2)
    for name, draws in starts["fresh"].items():
        for fresh, reused in zip(draws, starts["reused"][name]):
            torch.testing.assert_close(reused, fresh, rtol=0, atol=0)


class _Flaky(PyroModule):
    """A model whose cells-plate site ``extra`` is sampled in some draws only (or, with
    ``grow``, changes its shape from draw to draw): not a coherent set of draws."""

    def __init__(self, grow: bool = False):
        super().__init__()
        self.grow = grow

    def forward(self, batch):
        g = pyro.sample("g", dist.Normal(0.0, 1.0))
        with cell_plate(batch):
            pyro.sample("z", dist.Normal(g, 1.0).expand([D]).to_event(1))
            if self.grow:
                width = 1 + int(torch.randint(0, 2, ()))
                pyro.deterministic("extra", g.expand(batch.n_cells, width), event_dim=1)
            elif float(g) > 0:
                pyro.deterministic("extra", g.expand(batch.n_cells))


@pytest.mark.parametrize("grow", [False, True])
def test_a_site_missing_from_some_draws_or_changing_shape_is_an_error(data, grow):
    _, _, ds = data
    with pytest.raises(PyrospatialError, match="draws of chunk|must not depend on the draw"):
        sample_posterior(_Flaky(grow), CoherentGuide(ds.n_cells), ds, 12, chunk_size=16, seed=0)
