"""Outputs keep the README's promises (issue 22): the demo writes its inputs and a report that
ends with the command refitting them (and that command runs), ``globals`` holds every global
latent's summaries, the NaN rows of the count layers are the cells outside every spot and are
counted, an output passed back as an input is refused, ``check --out`` creates its folder,
and ``inference_data.nc`` holds what the checks read unless asked for everything."""

from __future__ import annotations

import re
import shlex
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from pyrospatial import cli
from pyrospatial.criticism.arviz import load_inference_data
from pyrospatial.criticism.ppc import ppc_summary
from pyrospatial.criticism.report import check_results
from pyrospatial.data.sim import simulate_tissue
from pyrospatial.demo import DemoConfig, run_demo
from pyrospatial.methods.coral import CORAL

#: small enough for the test suite; the same shape of run as the demo
CONFIG = DemoConfig(n_cells=400, n_types=3, n_proteins=8, n_genes=20, n_layers=3, max_epochs=40,
                    batch_size=None, num_samples=20)


#: the posterior of these tests: the guide's draws, seconds instead of the HMC's minute on 2
#: shared cores (the outputs' plumbing does not depend on how the draws were made; the demo
#: with its default posterior is run by tests/test_coral_api.py)
FAST_POSTERIOR = "guide"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    sample = CORAL.sample

    def fast_sample(self, num_samples=100, **kwargs):
        kwargs["method"] = FAST_POSTERIOR
        return sample(self, num_samples, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CORAL, "sample", fast_sample)
        metrics = run_demo(out, config=CONFIG, seed=0, progress=False)
    return out, metrics


def _refit_command(report: str) -> str:
    blocks = re.findall(r"```bash\n(.*?)\n```", report, flags=re.S)
    assert blocks, "report.md has no command block"
    return blocks[-1].strip()


def test_demo_writes_its_inputs_as_coral_reads_them(demo):
    out, metrics = demo
    cells = ad.read_h5ad(out / "inputs" / "cells.h5ad")
    spots = ad.read_h5ad(out / "inputs" / "spots.h5ad")
    assert cells.shape == (CONFIG.n_cells, CONFIG.n_proteins)  # proteins in X
    assert list(cells.obs.columns) == ["cell_type"] and cells.obsm["spatial"].shape == (CONFIG.n_cells, 2)
    assert spots.shape[1] == CONFIG.n_genes and spots.obsm["spatial"].shape == (spots.n_obs, 2)
    counts = np.asarray(spots.X)
    assert (counts >= 0).all() and np.array_equal(counts, np.round(counts))  # raw counts in X
    # none of the simulator's truth travels with the inputs
    assert "true_spot_gene_counts" not in cells.obsm and "cell_type_counts" not in spots.obsm


def test_report_is_a_summary_that_ends_with_the_refit_command(demo):
    out, metrics = demo
    report = (out / "report.md").read_text()
    for heading in ("**What was fitted.**", "## Checks at a glance", "**Convergence.**",
                    "**Posterior predictive checks.**", "**Calibration.**"):
        assert heading in report, heading
    table = report.split("## Checks at a glance")[1].split("\n\n")[1]
    for check in ("convergence", "posterior predictive", "calibration"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {check} |"))
        assert re.search(r"passed|\*\*failed\*\*|not assessed", row), row
    # the NaN rows of the count layers are counted, in words and in the files list
    n_out = metrics["n_cells_outside_spots"]
    assert f"{n_out} cells" in report and f"NaN for the {n_out} cells outside every spot" in report
    # figures inline: every linked image exists
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (out / link).is_file(), link
    assert "figures/ppc_pvalues.png" in report and "figures/calibration.png" in report
    command = _refit_command(report)
    assert report.rstrip().endswith("```") and report.rstrip()[: -3].rstrip().endswith(command)
    assert command.startswith("pyrospatial coral --cells inputs/cells.h5ad --spots inputs/spots.h5ad")


def test_count_layers_are_nan_exactly_outside_every_spot_and_counted(demo):
    out, metrics = demo
    cells = ad.read_h5ad(out / "cells.h5ad")
    nan_rows = np.isnan(cells.layers["counts_mean"]).all(axis=1)
    assert nan_rows.sum() == metrics["n_cells_outside_spots"] == cells.uns["pyrospatial"]["n_cells_outside_spots"]
    assert not np.isnan(cells.layers["counts_mean"][~nan_rows]).any()
    assert not np.isnan(cells.layers["expected_rna_mean"]).any()  # their expected RNA is estimated


def test_netcdf_holds_what_the_checks_read(demo):
    out, _ = demo
    idata = load_inference_data(out / "inference_data.nc")
    assert idata.posterior.attrs["netcdf_content"] == "checks"
    for local in ("z", "v", "expected_rna"):  # the per-cell draws are summarised in cells.h5ad
        assert local not in idata.posterior
    assert "spot_counts_lik_variance" in idata.posterior  # the dispersion statistic of the spots
    assert np.isfinite(ppc_summary(idata).table.query("group == 'spot_counts'")["p_dispersion"]).all()


def test_check_out_creates_its_folder(demo, tmp_path):
    out, _ = demo
    api = tmp_path / "a" / "b"
    check_results(out, out=api)
    assert (api / "check.md").is_file() and (api / "ppc_summary.csv").is_file()
    assert cli.main(["check", "--results", str(out), "--out", str(tmp_path / "c" / "d")]) == 0
    assert (tmp_path / "c" / "d" / "check.md").is_file()


def test_coral_refuses_the_demos_output_as_input(demo, capsys):
    out, _ = demo
    argv = ["coral", "--cells", str(out / "cells.h5ad"), "--spots", str(out / "inputs" / "spots.h5ad"),
            "--cell-type-key", "cell_type", "--spot-diameter", "55", "--out", str(out / "never")]
    assert cli.main(argv) == 2
    message = capsys.readouterr().err
    assert "looks like an output of pyrospatial" in message and str(out / "cells.h5ad") in message
    assert str(out / "inputs" / "cells.h5ad") in message  # what to pass instead
    assert not (out / "never").exists()


def test_the_reports_command_refits_the_written_inputs(demo, monkeypatch):
    """The last command of report.md, run as written in the demo's folder (with the fast
    posterior of these tests added), fits the inputs."""
    out, metrics = demo
    argv = shlex.split(_refit_command((out / "report.md").read_text()))
    assert argv[0] == "pyrospatial"
    monkeypatch.chdir(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. the interaction intervals' warning
        assert cli.main([*argv[1:], "--posterior", FAST_POSTERIOR, "--no-progress"]) == 0
    cells = ad.read_h5ad(out / "refit" / "cells.h5ad")
    assert cells.shape == (CONFIG.n_cells, CONFIG.n_genes)
    assert cells.obs["domain"].nunique() <= CONFIG.n_layers
    assert (out / "refit" / "inference_data.nc").is_file()


# ------------------------------------------------------------------------------------------
# the API: globals, carried-over domains, the full netcdf
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_coral():
    tissue = simulate_tissue(n_cells=200, n_types=2, n_proteins=5, n_genes=12, seed=4, n_layers=2)
    coral = CORAL(tissue.cells, tissue.spots, cell_type_key="cell_type", spot_diameter=55.0)
    coral.train(max_epochs=10, batch_size=None, progress=False)
    coral.sample(8, method="guide")
    return coral


def test_globals_hold_the_summaries_of_every_global_latent(small_coral, tmp_path):
    """Every entry of the posterior draws with plate "global" is summarised in
    uns["pyrospatial"]["globals"], and survives h5ad."""
    post = small_coral.posterior
    rng = np.random.default_rng(0)
    draws = rng.normal(size=(post.num_samples, 12, 3))
    post.samples["rna_weight"], post.plates["rna_weight"] = draws, "global"
    try:
        cells, _ = small_coral.export()
    finally:
        del post.samples["rna_weight"], post.plates["rna_weight"]
    record = cells.uns["pyrospatial"]["globals"]
    assert set(record) == {"rna_weight"}
    np.testing.assert_allclose(record["rna_weight"]["mean"], draws.mean(0), rtol=1e-6)
    np.testing.assert_allclose(record["rna_weight"]["sd"], draws.std(0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(record["rna_weight"]["q05"], np.quantile(draws, 0.05, axis=0), rtol=1e-5)
    np.testing.assert_allclose(record["rna_weight"]["q95"], np.quantile(draws, 0.95, axis=0), rtol=1e-5)
    cells.write_h5ad(tmp_path / "cells.h5ad")
    back = ad.read_h5ad(tmp_path / "cells.h5ad").uns["pyrospatial"]["globals"]["rna_weight"]
    np.testing.assert_array_equal(back["q95"], record["rna_weight"]["q95"])


def test_an_input_domain_column_is_never_passed_off_as_this_fits(small_coral):
    small_coral.cells.obs["domain"] = "old"
    try:
        with pytest.warns(UserWarning, match="obs column"):
            cells, _ = small_coral.export()
    finally:
        del small_coral.cells.obs["domain"]
    assert "domain" not in cells.obs and (cells.obs["input_domain"] == "old").all()


def test_full_netcdf_keeps_every_draw_and_both_give_the_same_checks(small_coral, tmp_path):
    slim = tmp_path / "slim.nc"
    full = tmp_path / "full.nc"
    idata = small_coral.to_inference_data(path=slim, seed=1)
    small_coral.to_inference_data(path=full, seed=1, full_netcdf=True)
    a, b = load_inference_data(slim), load_inference_data(full)
    assert "z" in idata.posterior and "z" in b.posterior and "z" not in a.posterior
    assert b.posterior.attrs["netcdf_content"] == "full"
    assert slim.stat().st_size < full.stat().st_size
    pd.testing.assert_frame_equal(ppc_summary(a).table, ppc_summary(b).table)
