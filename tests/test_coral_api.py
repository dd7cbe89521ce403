"""CORAL end to end through the user API, the demo and the command line."""

from __future__ import annotations

import json
import warnings

import anndata as ad
import numpy as np
import pytest
import torch

from pyrospatial.cli import main
from pyrospatial.methods.coral import CORAL
from pyrospatial.demo import METRIC_KEYS, DemoConfig, run_demo
from pyrospatial.engine.infer import _accelerator
from pyrospatial.data.sim import simulate_tissue


@pytest.fixture(scope="module")
def tissue():
    return simulate_tissue(n_cells=500, n_types=3, n_proteins=10, n_genes=25, seed=3, cells_per_spot=8.0)


@pytest.fixture(scope="module")
def trained(tissue):
    coral = CORAL(tissue.cells, tissue.spots, cell_type_key="cell_type", spot_diameter=55.0)
    coral.train(max_epochs=60, batch_size=None, progress=False, seed=1)
    coral.sample(30, seed=2)
    return coral


def test_export_keys_shapes_and_h5ad_round_trip(trained, tmp_path):
    cells, spots = trained.export(n_domains=3)
    ds = trained.dataset
    assert cells.shape == (ds.n_cells, ds.n_genes)
    for stat in ("mean", "sd", "q05", "q50", "q95"):
        assert cells.layers[f"expected_rna_{stat}"].shape == cells.shape
        assert cells.layers[f"counts_{stat}"].shape == cells.shape
        assert cells.obsm[f"z_{stat}"].shape[0] == ds.n_cells
        assert spots.layers[f"expected_counts_{stat}"].shape == spots.shape
    lo, mid, hi = (cells.layers[f"expected_rna_{q}"] for q in ("q05", "q50", "q95"))
    assert (lo <= mid + 1e-6).all() and (mid <= hi + 1e-6).all()
    inter = cells.uns["pyrospatial"]["interactions"]
    assert inter["mean"].shape == (ds.n_types, ds.n_types)
    assert inter["posterior"].startswith("method=local, graph=False; edge decoder drawn from its posterior")
    assert inter["recalibration_factor"] == 1.0  # the recalibration is not for this posterior
    assert bool(inter["intervals_calibrated"])
    assert np.isnan(inter["rhat_max"])  # independent draws of the decoder: no chains
    assert cells.obsp["edge_prob_mean"].nnz == 2 * ds.n_edges
    # the global read-out's posterior, summarised (the default posterior samples it in turn)
    omega = cells.uns["pyrospatial"]["globals"]["rna_weight"]
    assert np.shape(omega["mean"]) == (ds.n_genes, trained.model.rna_width)
    assert (np.asarray(omega["q05"]) < np.asarray(omega["q95"])).all()
    assert set(cells.obs["domain"].cat.categories) <= {"0", "1", "2"}
    assert ((cells.obs["domain_confidence"] >= 0) & (cells.obs["domain_confidence"] <= 1)).all()
    cells.write_h5ad(tmp_path / "cells.h5ad")
    spots.write_h5ad(tmp_path / "spots.h5ad")
    back = ad.read_h5ad(tmp_path / "cells.h5ad")
    np.testing.assert_allclose(back.layers["counts_mean"], cells.layers["counts_mean"])
    assert str(back.uns["pyrospatial"]["interactions"]["posterior"]) == inter["posterior"]


def test_interactions_report_the_split_rhat_of_their_entries(trained, monkeypatch):
    from pyrospatial.methods.analysis import interaction_matrix
    from pyrospatial.criticism.convergence import chain_convergence

    posterior, ds = trained.posterior, trained.dataset
    # a graph-conditioned posterior's entries come from its chains (read the 30 draws as 5 chains
    # of 6: the fixture's 10 chains give too few per chain)
    monkeypatch.setitem(posterior.diagnostics, "graph", True)
    monkeypatch.setitem(posterior.diagnostics, "num_chains", 5)
    draws = interaction_matrix(posterior.edge_prob, ds.edges, ds.cell_type, ds.n_types, keep_draws=True)["draws"]
    expected = chain_convergence(draws, 5)[0]
    with pytest.warns(UserWarning, match="graph"):  # read as the graph posterior of a point decoder
        assert np.isfinite(expected) and trained.interactions()["rhat_max"] == pytest.approx(expected)


def test_graph_free_interactions_draw_the_edge_decoder_given_the_graph(trained):
    """The default posterior leaves the graph out: the entries' draws come from the edge
    decoder's posterior given the graph at the states' posterior mean, one decoder per draw,
    made once and kept on the posterior."""
    from pyrospatial.methods.analysis import interaction_matrix
    from pyrospatial.methods.edge_decoder_posterior import edge_probabilities

    posterior, ds = trained.posterior, trained.dataset
    posterior.edge_decoder = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = trained.interactions()
    decoders = posterior.edge_decoder
    assert decoders is not None and decoders.weight.shape[0] == posterior.num_samples and decoders.converged
    assert decoders.nonedges_per_draw == round(ds.nonedge_ratio * ds.n_edges)
    expected = interaction_matrix(edge_probabilities(posterior.samples["z"].mean(0), ds.edges, decoders),
                                  ds.edges, ds.cell_type, ds.n_types)
    for key in ("mean", "sd", "q05", "q95"):
        np.testing.assert_allclose(first[key], expected[key], equal_nan=True)
    assert np.nanmin(first["sd"]) > 0  # the decoder's own uncertainty is there
    second = trained.interactions()
    assert trained.posterior.edge_decoder is decoders
    np.testing.assert_array_equal(first["q95"], second["q95"])
    assert first["intervals_calibrated"] is True


def test_deconvolved_counts_add_up_exactly_to_every_spot(trained):
    split = trained.split_spot_counts(keep_draws=True, seed=5)
    ds = trained.dataset
    counts = ds.spot_counts.toarray()
    inside = ds.cell_spot >= 0
    for draw in split.draws:
        summed = np.zeros_like(counts)
        np.add.at(summed, ds.cell_spot[inside], draw[inside])
        np.testing.assert_array_equal(summed, counts)
    assert split.max_abs_spot_error == 0.0


def test_deconvolve_counts_is_a_deprecated_alias_of_split_spot_counts(trained):
    with pytest.warns(DeprecationWarning, match="split_spot_counts"):
        old = trained.deconvolve_counts(keep_draws=True, seed=5)
    new = trained.split_spot_counts(keep_draws=True, seed=5)
    np.testing.assert_array_equal(old.draws, new.draws)


def test_edge_probabilities_are_the_models_decoder_on_each_draw(trained):
    """CORAL's per-edge probabilities come from CoralModel.edge_probability: sigmoid(z_i^T W z_j + b)
    with the model's symmetric W, draw by draw (the numbers of the earlier re-implementation)."""
    posterior, ds = trained.posterior, trained.dataset
    decoder = trained.model.edge_decoder
    W = (0.5 * (decoder.weight + decoder.weight.T)).detach().cpu().numpy()
    b = float(decoder.bias.detach())
    z = posterior.samples["z"]
    i, j = ds.edges
    by_hand = 1.0 / (1.0 + np.exp(-(np.einsum("snk,kl,snl->sn", z[:, i], W, z[:, j]) + b)))
    np.testing.assert_allclose(posterior.edge_prob, by_hand, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(trained.edge_probabilities(ds.edges[:, :7]), by_hand[:, :7], rtol=1e-4, atol=1e-6)


def test_save_load_gives_identical_posterior_summaries(trained, tissue, tmp_path):
    path = tmp_path / "coral.pt"
    trained.save(path)
    again = CORAL(tissue.cells, tissue.spots, cell_type_key="cell_type", spot_diameter=55.0)
    again.load(path)
    assert again.refined  # the Monte Carlo EM estimates travel with the file: not re-run
    fixture_draws = trained.posterior
    short = dict(num_chains=5, num_warmup=10, thin=1)
    a = trained.sample(10, seed=7, **short).samples
    b = again.sample(10, seed=7, **short).samples
    for site in ("z", "v", "expected_rna"):
        np.testing.assert_allclose(a[site], b[site], rtol=1e-5, atol=1e-6)
    a = trained.sample(10, seed=7, method="guide").samples
    b = again.sample(10, seed=7, method="guide").samples
    for site in ("z", "v", "expected_rna"):
        np.testing.assert_allclose(a[site], b[site], rtol=1e-5, atol=1e-6)
    trained.posterior = fixture_draws  # restore the fixture's draws for other tests


def test_demo_writes_results_with_the_documented_metrics(tmp_path):
    config = DemoConfig(n_cells=400, n_types=3, n_proteins=8, n_genes=20, n_layers=3, max_epochs=40,
                        batch_size=None, num_samples=20)
    metrics = run_demo(tmp_path, config=config, seed=0, progress=False)
    assert list(json.loads((tmp_path / "metrics.json").read_text())) == list(METRIC_KEYS)
    for name in ("cells.h5ad", "spots.h5ad", "report.md", "figures/elbo.png", "figures/calibration.png",
                 "figures/domains.png", "figures/interactions.png"):
        assert (tmp_path / name).is_file(), name
    assert len(list((tmp_path / "figures").glob("gene_*.png"))) == 3
    assert metrics["spot_sum_max_abs_error"] == 0.0
    assert metrics["n_cells"] == 400 and metrics["device"] == "cpu"
    assert "Pearson" in (tmp_path / "report.md").read_text()


def test_cli_fit_on_h5ad_files_and_clear_error_on_bad_input(tissue, tmp_path, capsys):
    tissue.cells.write_h5ad(tmp_path / "cells.h5ad")
    tissue.spots.write_h5ad(tmp_path / "spots.h5ad")
    code = main(["fit", "--cells", str(tmp_path / "cells.h5ad"), "--spots", str(tmp_path / "spots.h5ad"),
                 "--cell-type-key", "cell_type", "--spot-diameter", "55", "--epochs", "3", "--num-samples", "5",
                 "--n-domains", "2", "--no-progress", "--out", str(tmp_path / "out")])
    assert code == 0
    assert (tmp_path / "out" / "cells.h5ad").is_file() and (tmp_path / "out" / "figures" / "domains.png").is_file()
    code = main(["fit", "--cells", str(tmp_path / "cells.h5ad"), "--spots", str(tmp_path / "spots.h5ad"),
                 "--cell-type-key", "celltype", "--spot-diameter", "55", "--out", str(tmp_path / "bad")])
    assert code == 2
    assert "obs['celltype'] is missing" in capsys.readouterr().err


def test_auto_device_selects_cpu_without_a_gpu_and_refuses_missing_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the CUDA path is covered by test_cuda_path_selected_when_available")
    assert _accelerator("auto") == "cpu"
    from pyrospatial.errors import InputError

    with pytest.raises(InputError, match="cuda"):
        _accelerator("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine (CPU-only torch or no GPU)")
def test_cuda_path_selected_when_available(tissue):
    assert _accelerator("auto") == "gpu"
    coral = CORAL(tissue.cells, tissue.spots, cell_type_key="cell_type", spot_diameter=55.0)
    result = coral.train(max_epochs=2, device="cuda", progress=False)
    assert result.settings["device"].startswith("cuda")
    assert next(coral.model.parameters()).is_cuda


def test_interactions_widen_only_the_posterior_the_recalibration_was_fitted_for(trained, monkeypatch):
    from pyrospatial.errors import InputError
    from pyrospatial.criticism.recalibration import INTERACTION_RECALIBRATION

    raw = trained.interactions()  # graph-free posterior: the edge decoder drawn given the graph, not widened
    assert raw["recalibration"] is None and "widened" not in raw["posterior"]
    with pytest.raises(InputError, match="bayesian_edge_decoder"):
        trained.interactions(recalibrate=True)
    # pretend the posterior is the graph-conditioned one with a Bayesian decoder
    monkeypatch.setitem(trained.posterior.diagnostics, "graph", True)
    monkeypatch.setattr(trained.posterior, "method", "hmc")  # graph=True draws with the whole-tissue HMC
    monkeypatch.setattr(trained.model, "bayesian_edge_decoder", True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the posterior the package recommends: no warning
        wide, off = trained.interactions(), trained.interactions(recalibrate=False)
    factor = INTERACTION_RECALIBRATION.factor
    assert wide["recalibration"]["factor"] == factor and f"x{factor:.3f}" in wide["posterior"]
    assert off["recalibration"] is None
    np.testing.assert_allclose(wide["mean"], off["mean"], rtol=1e-10)
    for q in ("q05", "q95"):  # no entry is near 0 or 1 here, so nothing is clipped
        np.testing.assert_allclose(wide[q] - wide["mean"], factor * (off[q] - off["mean"]), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(wide["rhat_max"], off["rhat_max"], equal_nan=True)


def test_to_inference_data_holds_the_sampled_draws_and_the_contracts_observations(trained, tmp_path):
    """CORAL has the method shape of every method: its InferenceData carries the very draws
    of ``sample`` (criticism draws nothing new for the posterior group) and one replicate per
    draw of each observed site the model declares."""
    import arviz as az

    idata = trained.to_inference_data(path=tmp_path / "idata.nc", full_netcdf=True)  # the file keeps every draw
    S = trained.posterior.num_samples
    z = idata.posterior["z"]
    assert z.dims[:3] == ("chain", "draw", "cell") and z.shape[1] == S
    np.testing.assert_array_equal(z.values[0], trained.posterior.samples["z"])
    observed = [site.name for site in trained.model.contract.observed]
    for name in observed:
        assert idata.posterior_predictive[name].shape[:2] == (1, S), name
        assert name in idata.observed_data
    proteins = np.asarray(trained.cells.X.toarray() if hasattr(trained.cells.X, "toarray") else trained.cells.X)
    np.testing.assert_allclose(idata.observed_data["proteins"].values, proteins, rtol=1e-6)
    assert az.from_netcdf(tmp_path / "idata.nc").posterior["z"].shape == z.shape


def test_interactions_say_how_many_decoder_draws_did_not_converge(trained, monkeypatch):
    from pyrospatial.methods import edge_decoder_posterior as module

    monkeypatch.setattr(trained.posterior, "edge_decoder", None)  # drawn again, Newton capped at one step
    monkeypatch.setattr(module, "NEWTON_MAX_ITER", 1)
    with pytest.warns(UserWarning, match=r"iteration cap short of its tolerance in \d+ of 30 draws"):
        trained.interactions()
    assert 1 <= trained.posterior.edge_decoder.unconverged_draws <= 30
