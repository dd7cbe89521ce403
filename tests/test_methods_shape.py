"""One shape for every method (issue 16): Deconvolution and Alignment, like CORAL, are classes with
train / sample / export / to_inference_data / save / load; deconvolve and align are one call of
them; each method has its own batch type; one summariser and one h5ad sanitiser; the alignment's
M-step runs in a Lightning callback, never inside the guide."""

from __future__ import annotations

import dataclasses

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import pyrospatial as ps
from pyrospatial.data.alignment_data import AlignmentData
from pyrospatial.data.spot_counts import SpotBatch, SpotCounts
from pyrospatial.engine.batch import spot_plate
from pyrospatial.engine.export import h5ad_safe
from pyrospatial.engine.summary import summarise
from pyrospatial.errors import InputError
from pyrospatial.methods import Alignment, Deconvolution
from pyrospatial.methods.alignment import align, simulate_pair
from pyrospatial.methods.alignment_em import NoiseMStep

DEC_SETTINGS = {"cells_per_spot": None, "min_cells_per_type": 5}
ALIGN_SETTINGS = {"label_keys": ["cell_type"], "k": 8}


# ------------------------------------------------------------------------------------------
# small simulated inputs
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spots_and_reference():
    """Spots of a simulated tissue and, as the labelled reference, its cells' own RNA counts."""
    tissue = ps.sim.simulate_tissue(n_cells=300, seed=0)
    spots = tissue.spots.copy()
    reference = ad.AnnData(np.asarray(tissue.cells.obsm["true_spot_gene_counts"], dtype=np.float32),
                           obs=pd.DataFrame({"cell_type": tissue.cells.obs["cell_type"].astype(str).to_numpy()},
                                            index=tissue.cells.obs_names),
                           var=pd.DataFrame(index=spots.var_names))
    return spots, reference


@pytest.fixture(scope="module")
def deconvolution(spots_and_reference):
    spots, reference = spots_and_reference
    method = Deconvolution(spots, reference, "cell_type", **DEC_SETTINGS)
    method.train(20, seed=0, progress=False)
    method.sample(30, seed=1)
    return method


@pytest.fixture(scope="module")
def pair():
    return simulate_pair(150, seed=2)


@pytest.fixture(scope="module")
def alignment(pair):
    a, b, _ = pair
    method = Alignment(a, b, feature_keys=list(b.var_names[:2]), seed=0, **ALIGN_SETTINGS)
    method.train(15, seed=0, progress=False)
    method.sample(10, seed=0)
    return method


def _same_obsm(x: ad.AnnData, y: ad.AnnData) -> None:
    assert set(x.obsm) == set(y.obsm)
    for key in x.obsm:
        left, right = x.obsm[key], y.obsm[key]
        left = left.toarray() if hasattr(left, "toarray") else np.asarray(left)
        right = right.toarray() if hasattr(right, "toarray") else np.asarray(right)
        np.testing.assert_array_equal(left, right, err_msg=key)


# ------------------------------------------------------------------------------------------
# Deconvolution
# ------------------------------------------------------------------------------------------
def test_deconvolve_is_one_call_of_the_class(spots_and_reference, deconvolution):
    spots, reference = spots_and_reference
    out = ps.deconvolve(spots, reference, "cell_type", model="signatures", max_steps=20, num_samples=30, seed=0,
                        progress=False, **DEC_SETTINGS)
    # the wrapper samples with its one seed; the class was sampled with seed=1: resample to compare
    mine = Deconvolution(spots, reference, "cell_type", **DEC_SETTINGS)
    mine.train(20, seed=0, progress=False)
    mine.sample(30, seed=0)
    _same_obsm(out, mine.export())
    np.testing.assert_array_equal(out.uns["deconvolution"]["elbo"], mine.export().uns["deconvolution"]["elbo"])


def test_deconvolution_train_sample_export_shapes(spots_and_reference, deconvolution):
    spots, _reference = spots_and_reference
    draws = deconvolution.draws
    T = len(deconvolution.cell_types)
    assert draws["abundance"].shape == (30, spots.n_obs, T)
    assert draws["cell_count"].dtype.kind == "i" and (draws["cell_count"] >= 0).all()
    out = deconvolution.export(keep_draws=True)
    assert out.obsm["cell_count_q95"].shape == (spots.n_obs, T)
    # integer intervals: the count quantiles are draws themselves
    q95 = out.obsm["cell_count_q95"].to_numpy()
    assert np.array_equal(q95, np.round(q95))
    assert out.uns["deconvolution"]["settings"]["steps"] == 20


def test_deconvolution_inference_data(spots_and_reference, deconvolution):
    spots, _ = spots_and_reference
    idata = deconvolution.to_inference_data()
    ab = idata.posterior["abundance"]
    assert ab.dims == ("chain", "draw", "spot", "cell_type")
    assert ab.shape == (1, 30, spots.n_obs, len(deconvolution.cell_types))
    assert list(idata.posterior["spot"].values) == list(spots.obs_names)
    assert idata.posterior["signature"].dims == ("chain", "draw", "cell_type", "gene")
    np.testing.assert_array_equal(ab.values[0], deconvolution.draws["abundance"])
    np.testing.assert_array_equal(idata.observed_data["spot_counts"].values, deconvolution.data.counts)
    assert idata.sample_stats["loss"].shape == (20,)


def test_deconvolution_save_load_round_trip(tmp_path, spots_and_reference, deconvolution):
    spots, reference = spots_and_reference
    before = deconvolution.export()
    path = tmp_path / "deconvolution.pt"
    deconvolution.save(str(path))
    state = torch.load(path, weights_only=True)  # tensors, numbers and strings only: no pickle
    assert state["method"] == "Deconvolution"
    loaded = Deconvolution(spots, reference, "cell_type", **DEC_SETTINGS).load(str(path))
    with pytest.raises(InputError, match="sample"):
        loaded.export()
    loaded.sample(30, seed=1)
    after = loaded.export()
    _same_obsm(before, after)
    for site, stats in before.uns["deconvolution"]["globals"].items():
        for stat, value in stats.items():
            np.testing.assert_array_equal(value, after.uns["deconvolution"]["globals"][site][stat])
    np.testing.assert_array_equal(before.uns["deconvolution"]["elbo"], after.uns["deconvolution"]["elbo"])
    assert after.uns["deconvolution"]["settings"]["stopped_by"] == before.uns["deconvolution"]["settings"]["stopped_by"]
    # another setting, or another method's file, is refused with the field named
    other = Deconvolution(spots, reference, "cell_type", concentration_mean=1.0, **DEC_SETTINGS)
    with pytest.raises(InputError, match="concentration_mean"):
        other.load(str(path))


def test_deconvolution_needs_training_before_sampling(spots_and_reference):
    spots, reference = spots_and_reference
    method = Deconvolution(spots, reference, "cell_type", **DEC_SETTINGS)
    with pytest.raises(InputError, match="train"):
        method.sample(5)
    with pytest.raises(InputError, match="train"):
        method.save("never.pt")


# ------------------------------------------------------------------------------------------
# Alignment
# ------------------------------------------------------------------------------------------
def test_align_is_one_call_of_the_class(pair, alignment):
    a, b, _ = pair
    res = align(a, b, feature_keys=list(b.var_names[:2]), steps=15, num_samples=10, seed=0, progress=False,
                **ALIGN_SETTINGS)
    mine = alignment.export()
    _same_obsm(res.adata, mine.adata)
    np.testing.assert_array_equal(res.transform_draws, mine.transform_draws)
    assert res.transform == mine.transform


def test_alignment_inference_data(pair, alignment):
    a, _b, _ = pair
    idata = alignment.to_inference_data()
    assert idata.posterior["aligned"].dims == ("chain", "draw", "cell_a", "axis")
    assert idata.posterior["aligned"].shape == (1, 10, a.n_obs, 2)
    assert idata.posterior["angle"].shape == (1, 10)
    probs = idata.posterior["label_probs_cell_type"]
    assert probs.dims == ("chain", "draw", "cell_a", "cell_type")
    np.testing.assert_allclose(probs.values.sum(-1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(idata.posterior["angle"].values[0], alignment.draws["transform"][:, 0])
    assert idata.sample_stats["loss"].shape == (15,)


def test_alignment_save_load_round_trip(tmp_path, pair, alignment):
    a, b, _ = pair
    before = alignment.export()
    path = tmp_path / "alignment.pt"
    alignment.save(str(path))
    loaded = Alignment(a, b, feature_keys=list(b.var_names[:2]), seed=0, **ALIGN_SETTINGS).load(str(path))
    loaded.sample(10, seed=0)
    after = loaded.export()
    _same_obsm(before.adata, after.adata)
    assert before.transform == after.transform
    for key in ("align_p_unmatched", "align_best_match", "align_cell_type"):
        assert (before.adata.obs[key] == after.adata.obs[key]).all(), key
    other_method = tmp_path / "other.pt"
    torch.save({"method": "Deconvolution", "format": 1}, other_method)
    with pytest.raises(InputError, match="not a saved Alignment"):
        loaded.load(str(other_method))
    other = Alignment(a, b, feature_keys=list(b.var_names[:2]), seed=0, label_keys=["cell_type"], k=6)
    with pytest.raises(InputError, match="k="):
        other.load(str(path))


def test_guide_only_samples_and_the_callback_runs_the_m_step(pair):
    a, b, _ = pair
    method = Alignment(a, b, seed=0, **ALIGN_SETTINGS)
    model, guide = method.model, method.guide
    guide.train()
    before = {name: buf.clone() for name, buf in model.named_buffers()}
    guide(method.batch)
    for name, buf in model.named_buffers():
        assert torch.equal(buf, before[name]), f"the guide wrote the model's buffer {name}"
    assert guide.last_draw is not None and guide.last_draw["T"].shape[1] == model.k + 1
    step = NoiseMStep(model, guide)
    step.on_train_batch_end(None, None, None, method.batch, 0)
    assert step.steps == 1 and guide.last_draw is None
    assert not torch.equal(model.sigma_xy, before["sigma_xy"])  # the M-step moved the noise
    # trained through fit: one M-step per SVI step, and the noise leaves its start
    method.train(3, seed=0, progress=False)
    assert float(method.model.sigma_xy) != pytest.approx(0.5)


# ------------------------------------------------------------------------------------------
# one h5ad writer, one summariser, one batch type per method
# ------------------------------------------------------------------------------------------
def test_h5ad_of_both_methods_reads_back_with_none_written_alike(tmp_path, deconvolution, alignment):
    assert h5ad_safe(None) == "None"
    assert h5ad_safe({"x": [None, "a"]})["x"].tolist() == ["None", "a"]
    spots_out = deconvolution.export()
    aligned = alignment.export().adata
    spots_out.write_h5ad(tmp_path / "spots.h5ad")
    aligned.write_h5ad(tmp_path / "aligned.h5ad")
    spots_back = ad.read_h5ad(tmp_path / "spots.h5ad")
    aligned_back = ad.read_h5ad(tmp_path / "aligned.h5ad")
    # layer=None / layer_a=None: the one rule of engine.export.h5ad_safe, in both methods
    assert spots_back.uns["deconvolution"]["settings"]["layer"] == "None"
    assert aligned_back.uns["pyrospatial"]["alignment"]["settings"]["layer_a"] == "None"
    np.testing.assert_array_equal(np.asarray(spots_back.obsm["cell_count_q95"]), spots_out.obsm["cell_count_q95"].to_numpy())
    np.testing.assert_array_equal(aligned_back.obsm["spatial_aligned"], aligned.obsm["spatial_aligned"])
    tr = aligned_back.uns["pyrospatial"]["alignment"]["transform"]["angle"]
    assert float(tr["q05"]) <= float(tr["mean"]) <= float(tr["q95"])


def test_integer_quantiles_are_draws_themselves():
    rng = np.random.default_rng(0)
    draws = {"n": rng.poisson(3.0, size=(301, 7)), "w": rng.gamma(2.0, size=(301, 7))}
    out = summarise(draws, integer_sites=["n"])
    for q, key in ((0.05, "q05"), (0.5, "q50"), (0.95, "q95")):
        np.testing.assert_array_equal(out["n"][key], np.quantile(draws["n"], q, axis=0, method="inverted_cdf"))
        np.testing.assert_allclose(out["w"][key], np.quantile(draws["w"], q, axis=0))
    with pytest.raises(InputError, match="integer_sites"):
        summarise(draws, integer_sites=["missing"])


def test_each_method_has_its_own_batch(spots_and_reference, alignment):
    spots, _ = spots_and_reference
    data = SpotCounts(np.asarray(spots.X), spots.obsm["spatial"], 4, n_neighbours=3)
    batch = next(iter(data.dataloader(3, seed=0)))
    assert isinstance(batch, SpotBatch)
    names = {f.name for f in dataclasses.fields(batch)}
    assert not any(name.startswith("cell") or name in ("membership", "edge_index", "nonedge_index") for name in names)
    plate = spot_plate(batch)
    assert plate.size == spots.n_obs and plate.subsample_size == batch.n_spots
    assert batch.to("cpu").spot_counts.shape == (batch.n_spots, spots.n_vars)
    # the engine's batch protocol sees no cells plate; the full batch holds every spot at scale 1
    assert batch.n_cells == 0 and batch.cell_index.numel() == 0
    full = data.full_batch()
    assert full.n_spots == spots.n_obs and full.spot_scale == 1.0
    assert not hasattr(AlignmentData(alignment.batch), "n_spots")
