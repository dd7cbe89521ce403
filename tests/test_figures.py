"""Every figure the package writes explains itself (issue 22, item 2).

Each figure type is rendered on small synthetic inputs with matplotlib's Agg backend and its
objects are checked, not its pixels: a title on every axes (or a figure suptitle), named x and
y axes, a legend where several line styles or marker groups are drawn, a label on every colour
bar; the reliability diagram's title gives both ECEs and shows the pairs per bin; the
interaction figure carries a visible caveat when its run distrusts the intervals.
"""

from __future__ import annotations

from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pyrospatial import plotting
from pyrospatial.criticism import plots
from pyrospatial.criticism.calibration import expected_calibration_error
from pyrospatial.criticism.ppc import PPCSummary


@pytest.fixture
def captured(monkeypatch):
    """The figures a plotting call closes, kept open for inspection (closed after the test)."""
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    yield figures
    monkeypatch.undo()
    for fig in figures:
        plt.close(fig)


def _plot_axes(fig):
    """The axes that show data: not colour bars, not switched off."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.axison]


def _colorbar_axes(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.texts]


def assert_readable(fig, *, legend: bool = False) -> None:
    """Titles, axis labels and colour-bar labels are there; a legend when ``legend``."""
    suptitle = fig._suptitle.get_text() if fig._suptitle is not None else ""
    axes = _plot_axes(fig)
    assert axes, "the figure has no axes with data"
    for ax in axes:
        assert ax.get_title() or suptitle, f"axes {ax} has no title and the figure no suptitle"
        assert ax.get_xlabel().strip(), f"axes titled {ax.get_title()!r} has no x label"
        assert ax.get_ylabel().strip(), f"axes titled {ax.get_title()!r} has no y label"
    for cax in _colorbar_axes(fig):
        label = cax.get_ylabel() or cax.get_xlabel()
        assert label.strip(), "a colour bar has no label"
    if legend:
        assert fig.legends or any(ax.get_legend() is not None for ax in axes), "no legend"


def _only(figures):
    assert len(figures) == 1, f"expected one figure, got {len(figures)}"
    return figures[0]


# ------------------------------------------------------------------------------------------
# pyrospatial.plotting
# ------------------------------------------------------------------------------------------
@pytest.fixture
def xy():
    return np.random.default_rng(0).uniform(0, 100, size=(60, 2))


def test_elbo_and_calibration_figures(captured, tmp_path):
    plotting.plot_elbo(np.linspace(100, 10, 200), tmp_path / "elbo.png")
    plotting.plot_calibration([0.5, 0.9], {"a": np.array([0.4, 0.85]), "b": np.array([0.5, 0.9])},
                              tmp_path / "cal.png")
    elbo, cal = captured
    assert_readable(elbo, legend=True)
    assert_readable(cal, legend=True)


def test_spatial_panels_label_their_colour_bars_and_axes(captured, tmp_path, xy):
    values = np.arange(60.0)
    plotting.plot_spatial_panels(xy, [("truth", values), ("mean", values), ("sd", values / 10)], tmp_path / "g.png",
                                 shared_scale=(0, 1), colorbar_labels=("counts", "counts", "sd (counts)"),
                                 spatial_unit="µm", suptitle="gene")
    fig = _only(captured)
    assert_readable(fig)
    assert [c.get_ylabel() for c in _colorbar_axes(fig)] == ["counts", "counts", "sd (counts)"]
    assert _plot_axes(fig)[0].get_xlabel() == "x (µm)"
    # the default signature still works, and every colour bar still has a label
    plotting.plot_spatial_panels(xy, [("v", values)], tmp_path / "h.png")
    assert_readable(captured[1])


def test_domains_figure_names_its_colours_and_shows_the_truth(captured, tmp_path, xy):
    truth = np.repeat(["L1", "L2", "L3"], 20)
    labels = np.repeat(["2", "0", "1"], 20)  # the same partition under other names
    confidence = np.full(60, 0.8)
    plotting.plot_domains(xy, labels, confidence, tmp_path / "d.png")
    plotting.plot_domains(xy, labels, confidence, tmp_path / "dt.png", truth=truth, truth_title="true layer")
    plain, with_truth = captured
    assert len(_plot_axes(plain)) == 2 and len(_plot_axes(with_truth)) == 3
    for fig in (plain, with_truth):
        assert_readable(fig)
        legends = [ax.get_legend() for ax in _plot_axes(fig) if ax.get_legend() is not None]
        assert any(lg.get_title().get_text() == "domain" for lg in legends)
    truth_ax, domain_ax, _ = _plot_axes(with_truth)
    assert truth_ax.get_title() == "true layer"
    # colours follow the truth: domain "2" covers L1's cells, so it takes L1's colour
    truth_colours = {t.get_text(): h.get_facecolor()[0].tolist()
                     for t, h in zip(truth_ax.get_legend().get_texts(), truth_ax.get_legend().legend_handles)}
    domain_colours = {t.get_text(): h.get_facecolor()[0].tolist()
                      for t, h in zip(domain_ax.get_legend().get_texts(), domain_ax.get_legend().legend_handles)}
    assert domain_colours["2"] == truth_colours["L1"] and domain_colours["0"] == truth_colours["L2"]


def _interactions(**extra):
    rng = np.random.default_rng(1)
    mean = rng.uniform(0.1, 0.9, size=(3, 3))
    out = {"cell_types": np.array(["A", "B", "C"]), "mean": mean, "q05": mean - 0.01, "q95": mean + 0.01}
    out.update(extra)
    return out


def _caveats(fig) -> list[str]:
    return [t.get_text() for t in fig.texts if t.get_gid() == "interval-caveat"]


def test_interactions_without_graph_carry_a_visible_caveat(captured, tmp_path):
    untrusted = _interactions(posterior="method=refine, graph=False, edge decoder: point estimate",
                              recalibration_factor=1.0, rhat_max=float("nan"))
    plotting.plot_interactions(untrusted, tmp_path / "i.png")
    plotting.plot_interactions(untrusted, tmp_path / "j.png", untrusted="hide")
    shown, hidden = captured
    for fig in (shown, hidden):
        assert_readable(fig)
        caveat = _caveats(fig)
        assert len(caveat) == 1 and "graph" in caveat[0] and fig.texts[0].get_visible()
    assert any("NOT CALIBRATED" in ax.get_title() for ax in _plot_axes(shown))
    assert len(_plot_axes(hidden)) == 1  # the interval panel is left out


def test_interactions_explicit_flags_decide(captured, tmp_path):
    plotting.plot_interactions(_interactions(warning="intervals too narrow"), tmp_path / "a.png")
    plotting.plot_interactions(_interactions(intervals_calibrated=False), tmp_path / "b.png")
    plotting.plot_interactions(_interactions(intervals_calibrated=True), tmp_path / "c.png")
    warned, flagged, trusted = captured
    assert "intervals too narrow" in _caveats(warned)[0]
    assert _caveats(flagged)
    assert not _caveats(trusted) and not any("NOT" in ax.get_title() for ax in _plot_axes(trusted))


def test_recalibrated_interactions_have_no_caveat_unless_chains_disagree(captured, tmp_path):
    graph = "method=refine, graph=True, edge decoder: bayesian"
    plotting.plot_interactions(_interactions(posterior=graph, recalibration={"factor": 2.5}, rhat_max=1.01),
                               tmp_path / "a.png")
    plotting.plot_interactions(_interactions(posterior=graph, recalibration_factor=2.5, rhat_max=1.3),
                               tmp_path / "b.png")
    good, stuck = captured
    assert_readable(good)
    assert not _caveats(good)
    assert "widened x2.50" in _plot_axes(good)[1].get_title()
    assert "R-hat" in _caveats(stuck)[0]


# ------------------------------------------------------------------------------------------
# pyrospatial.criticism.plots
# ------------------------------------------------------------------------------------------
def _edge_like(seed: int = 0):
    """Sampled pairs as in a CORAL check: observed edges (outcome 1, weight 1) predicted at
    0.2-0.6 (far under the diagonal's 1), and sampled non-edges (outcome 0) predicted near 0,
    each standing for 50 pairs, whose weight swamps the edges' bins in a weighted ECE."""
    rng = np.random.default_rng(seed)
    prob = np.concatenate([rng.uniform(0.2, 0.6, 300), rng.uniform(0.0, 0.02, 1000)])
    outcome = np.concatenate([np.ones(300), np.zeros(1000)])
    weight = np.concatenate([np.ones(300), np.full(1000, 50.0)])
    return prob, outcome, weight


def test_reliability_title_gives_weighted_and_unweighted_ece_and_bin_counts(captured, tmp_path):
    prob, outcome, weight = _edge_like()
    plots.plot_reliability(prob, outcome, tmp_path / "r.png", weights=weight)
    fig = _only(captured)
    assert_readable(fig, legend=True)
    main, counts = _plot_axes(fig)
    title = main.get_title()
    assert "ECE weighted" in title and "unweighted" in title
    b = plots.reliability_bins(prob, outcome, weights=weight)
    ece_w = np.sum(b["weight"] * np.abs(b["pred_w"] - b["freq_w"])) / b["weight"].sum()
    ece_u = np.sum(b["count"] * np.abs(b["pred"] - b["freq"])) / b["count"].sum()
    assert f"weighted {ece_w:.3f}" in title and f"unweighted {ece_u:.3f}" in title
    assert ece_w < 0.02 and ece_u > 0.1  # the non-edges' weight hides the off-diagonal edge bins
    # quantile bins: about the same number of pairs in each; the bar panel shows them
    assert b["count"].sum() == len(prob) and b["count"].max() <= 2 * b["count"].min()
    heights = sorted(p.get_height() for p in counts.patches)
    assert heights == sorted(np.concatenate([b["count"], b["weight"]]).tolist())
    assert len(main.texts) == len(b["count"])  # each point annotated with its pairs


def test_reliability_uniform_bins_agree_with_expected_calibration_error():
    prob, outcome, weight = _edge_like(1)
    b = plots.reliability_bins(prob, outcome, weights=weight, binning="uniform")
    ece_w = np.sum(b["weight"] * np.abs(b["pred_w"] - b["freq_w"])) / b["weight"].sum()
    assert ece_w == pytest.approx(expected_calibration_error(prob, outcome, weights=weight), abs=1e-12)


def test_pvalue_and_coverage_figures(captured, tmp_path):
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"group": ["g"] * 30, "feature": [f"f{i}" for i in range(30)],
                          "p_mean": rng.uniform(size=30), "p_var": rng.uniform(size=30)})
    plots.plot_pvalues(PPCSummary(table=table, extreme_fraction=0.1), tmp_path / "p.png")
    plots.plot_coverage([0.5, 0.9], {"a": np.array([0.5, 0.8]), "b": np.array([0.4, 0.9])}, tmp_path / "c.png")
    for fig in captured:
        assert_readable(fig, legend=True)
        for ax in _plot_axes(fig):
            if len({(line.get_linestyle(), line.get_color()) for line in ax.get_lines()}) > 1:
                assert ax.get_legend() is not None, ax.get_title()


def test_ppc_figure_has_a_legend_for_its_three_line_styles_and_a_y_label(captured, tmp_path):
    az = pytest.importorskip("arviz")
    rng = np.random.default_rng(0)
    idata = az.from_dict(
        observed_data={"y": rng.poisson(3.0, (40, 2)).astype(float)},
        posterior_predictive={"y": rng.poisson(3.0, (1, 20, 40, 2)).astype(float)},
        dims={"y": ["obs", "feature"]}, coords={"feature": ["a", "b"]},
    )
    plots.plot_ppc(idata, "y", ["a", "b"], tmp_path / "ppc.png", num_pp_samples=10)
    fig = _only(captured)
    assert_readable(fig, legend=True)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(labels) == 3 and any("observed" in s for s in labels) and any("mean" in s for s in labels)
    assert all(ax.get_ylabel() == "density" for ax in _plot_axes(fig))
    assert "count" in _plot_axes(fig)[0].get_xlabel()


# ------------------------------------------------------------------------------------------
# methods: deconvolution and alignment
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["mean", "width"])
def test_abundance_maps_label_every_colour_bar(captured, tmp_path, xy, what):
    from anndata import AnnData

    from pyrospatial.methods.deconvolution import UNS_KEY
    from pyrospatial.methods.deconvolution_report import plot_abundance_maps

    types = ["T1", "T2", "T3"]
    rng = np.random.default_rng(0)
    mean = pd.DataFrame(rng.uniform(0, 3, (60, 3)), columns=types)
    result = AnnData(np.zeros((60, 1)))
    mean.index = result.obs_names
    result.obsm["spatial"] = xy
    result.obsm["abundance_mean"] = mean
    result.obsm["abundance_q05"] = mean * 0.5
    result.obsm["abundance_q95"] = mean * 1.5
    result.uns[UNS_KEY] = {"cell_types": types}
    plot_abundance_maps(result, tmp_path / "ab.png", what=what)
    fig = _only(captured)
    assert_readable(fig)
    assert len(_colorbar_axes(fig)) == 3


def test_alignment_figures(captured, tmp_path, xy):
    from anndata import AnnData

    from pyrospatial.methods.alignment_plots import plot_alignment

    a, b = AnnData(np.zeros((60, 1))), AnnData(np.zeros((60, 1)))
    a.obsm["spatial"], b.obsm["spatial"] = xy + 5.0, xy
    result = SimpleNamespace(
        aligned=xy + 0.5, transform={"angle_deg": {"mean": 1.0, "q05": 0.5, "q95": 1.5}},
        match_prob=sp.csr_matrix(np.eye(60) * 0.9), p_unmatched=np.full(60, 0.1),
    )
    plot_alignment(result, a, b, tmp_path, spatial_unit="µm")
    overlay, confidence = captured
    assert_readable(overlay, legend=True)
    assert_readable(confidence)
    assert len(_colorbar_axes(confidence)) == 2
