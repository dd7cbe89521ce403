"""Alignment of two slices: OT coupling as a latent (models/alignment.py, guides/alignment.py,
pyrospatial/alignment.py).

Statistical tests use fixed seeds; each tolerance is justified next to its assertion.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import anndata as ad
import numpy as np
import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

import pyrospatial as ps
from pyrospatial.methods.alignment import align, align_slices, simulate_pair
from pyrospatial.errors import CoordinateError, InputError
from pyrospatial.guides.alignment import sparse_unbalanced_sinkhorn
from pyrospatial.models.alignment import AlignmentBatch, candidate_pairs

ANGLE, SHIFT = 0.5, (30.0, -20.0)


@pytest.fixture(scope="module")
def pair():
    return simulate_pair(300, angle=ANGLE, translation=SHIFT, drop_fraction=0.1, seed=1)


@pytest.fixture(scope="module")
def fitted(pair):
    a, b, truth = pair
    return align(a, b, label_keys=["cell_type"], feature_keys=list(b.var_names[:3]), progress=False, seed=0)


# ------------------------------------------------------------------------------------------
# recovery, calibration-type checks
# ------------------------------------------------------------------------------------------
def test_recovers_known_rotation_and_translation(fitted):
    t = fitted.transform
    # 270 matched cells with jitter 0.1 spacing pin the angle to ~0.003 rad (posterior sd);
    # 0.02 rad (~1 degree) is a generous bound that a wrong pre-registration (>= 5 degrees off) fails
    assert abs(t["angle"]["mean"] - ANGLE) < 0.02
    q05, q95 = fitted.interval("angle")
    assert q05 <= ANGLE <= q95, (q05, q95)
    assert q95 - q05 < 0.05  # the interval is informative, not a blanket
    # translation: within 1 µm (the cell spacing is ~10 µm) of the truth
    assert np.allclose(t["translation"]["mean"], SHIFT, atol=1.0), t["translation"]["mean"]
    assert all(sd > 0 for sd in t["translation"]["sd"])


def test_match_accuracy_far_above_chance(pair, fitted):
    a, b, truth = pair
    kept = np.flatnonzero(truth >= 0)
    on_truth = np.asarray(fitted.match_prob[kept, truth[kept]]).ravel()
    # chance is 1/270; cells 0.1 spacing from their partner should be found almost always
    assert on_truth.mean() > 0.8
    best = np.asarray(fitted.match_prob.argmax(1)).ravel()
    assert (best[kept] == truth[kept]).mean() > 0.85


def test_removed_cells_get_high_unmatched_probability(pair, fitted):
    a, b, truth = pair
    dropped, kept = truth < 0, truth >= 0
    # 30 dropped cells have no partner within ~1 spacing except other cells' partners, which the
    # one-to-one prior keeps for their owners
    assert fitted.p_unmatched[dropped].mean() > 0.6
    assert fitted.p_unmatched[kept].mean() < 0.1


def test_outputs_are_probabilities_and_keys_are_documented(pair, fitted):
    a, b, truth = pair
    out = fitted.adata
    P = out.obsm["align_match_prob"]
    assert P.shape == (a.n_obs, b.n_obs)
    rows = np.asarray(P.sum(1)).ravel() + out.obs["align_p_unmatched"].to_numpy()
    np.testing.assert_allclose(rows, 1.0, atol=1e-4)  # each cell: partners + unmatched = 1
    assert (out.obs["align_match_entropy"] >= -1e-9).all()
    assert out.obsm["spatial_aligned"].shape == (a.n_obs, 2)
    assert (out.obsm["spatial_aligned_sd"] >= 0).all()
    probs = out.obsm["align_cell_type_probs"]
    np.testing.assert_allclose(probs.to_numpy().sum(1), 1.0, atol=1e-4)
    assert out.obsm["align_cell_type_probs_sd"].shape == probs.shape
    kept = truth >= 0
    agree = out.obs["align_cell_type"].astype(str).to_numpy() == a.obs["cell_type"].astype(str).to_numpy()
    assert agree[kept].mean() > 0.85
    assert out.obsm["align_features_mean"].shape == (a.n_obs, 3)
    assert (out.obsm["align_features_sd"] >= 0).all()
    tr = out.uns["pyrospatial"]["alignment"]["transform"]
    assert set(tr["angle"]) >= {"mean", "sd", "q05", "q50", "q95"}


def test_aligned_coordinates_land_on_partners(pair, fitted):
    a, b, truth = pair
    kept = np.flatnonzero(truth >= 0)
    err = np.linalg.norm(fitted.aligned[kept] - b.obsm["spatial"][truth[kept]], axis=1)
    spacing = fitted.settings["unit"]
    # jitter is 0.1 spacing per axis: the median error must be well below one spacing
    assert np.median(err) < 0.3 * spacing


def test_result_writes_to_h5ad(tmp_path, fitted):
    path = tmp_path / "a.h5ad"
    fitted.adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert back.obsm["align_match_prob"].shape == fitted.match_prob.shape
    assert "alignment" in back.uns["pyrospatial"]


# ------------------------------------------------------------------------------------------
# the coupling
# ------------------------------------------------------------------------------------------
def test_sparse_sinkhorn_matches_pot_and_its_marginals():
    ot = pytest.importorskip("ot")
    rng = np.random.default_rng(0)
    n, m, lam = 12, 9, 5.0
    S = torch.tensor(rng.normal(size=(n, m)), dtype=torch.float64)
    cand = torch.arange(m).repeat(n, 1)
    scores = torch.cat([S, torch.full((n, 1), -float("inf"), dtype=torch.float64)], 1)  # no dustbin here
    beta = torch.full((m,), n / m, dtype=torch.float64)
    T, _ = sparse_unbalanced_sinkhorn(scores, cand, m, beta, lam, n_iter=5000, tol=1e-12)
    ref = ot.unbalanced.sinkhorn_unbalanced(np.ones(n), beta.numpy(), -S.numpy(), 1.0, (float("inf"), lam),
                                            reg_type="entropy", numItermax=100000, stopThr=1e-12)
    np.testing.assert_allclose(T[:, :m].numpy(), ref, atol=1e-6)
    # exact row marginals, and the KL-relaxed column marginals of the same fixed point as POT
    np.testing.assert_allclose(T.sum(1).numpy(), 1.0, atol=1e-10)
    np.testing.assert_allclose(T[:, :m].sum(0).numpy(), ref.sum(0), atol=1e-6)


def test_strong_column_constraint_balances_columns():
    rng = np.random.default_rng(1)
    n = m = 30
    S = torch.tensor(rng.normal(size=(n, m)) * 3, dtype=torch.float64)
    cand = torch.arange(m).repeat(n, 1)
    scores = torch.cat([S, torch.full((n, 1), -50.0, dtype=torch.float64)], 1)
    beta = torch.ones(m, dtype=torch.float64)
    T, _ = sparse_unbalanced_sinkhorn(scores, cand, m, beta, 1e4, n_iter=3000, tol=1e-10)
    # lam = 1e4 makes the relaxed constraint nearly exact: every column receives ~1 unit
    np.testing.assert_allclose(T[:, :m].sum(0).numpy(), 1.0, atol=0.02)
    # lam = 0: independent rows (column sums free), each row a softmax
    T0, _ = sparse_unbalanced_sinkhorn(scores, cand, m, beta, 0.0)
    np.testing.assert_allclose(T0.numpy(), torch.softmax(scores, 1).numpy(), atol=1e-12)


def _exact_plan(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates 0..k-1 per row with all mass on candidate 0 (the true partner)."""
    T = torch.zeros(n, k + 1, dtype=torch.float64)
    T[:, 0] = 1.0
    cand = torch.arange(k).repeat(n, 1) + torch.arange(n).unsqueeze(1) * k
    return T, cand, torch.ones(n, k, dtype=torch.bool)


@pytest.mark.parametrize("kind", ["grid", "gaussian"])
def test_noise_update_recovers_the_spatial_error_shape(kind):
    from pyrospatial.models.alignment import best_power, noise_update

    rng = np.random.default_rng(2)
    n, k, d = 2000, 3, 2
    T, cand, valid = _exact_plan(n, k)
    coords_b = torch.tensor(rng.uniform(0, 50, size=(n * k, 2)))
    if kind == "grid":  # positions snapped to a unit grid: error uniform on [-0.5, 0.5]^2
        err = rng.uniform(-0.5, 0.5, size=(n, 2))
    else:  # Gaussian jitter, sd 0.3 per axis
        err = rng.normal(0.0, 0.3, size=(n, 2))
    moved = coords_b[cand[:, 0]] + torch.tensor(err)
    u = torch.tensor(rng.normal(size=(n * k, d)))
    out = noise_update(T, moved, coords_b, u[cand[:, 0]], u, cand, valid, torch.ones(d), 8.0)
    power, sigma = best_power(out["power_stats"], out["mass"])
    if kind == "grid":
        # the uniform square is the limit p -> inf with sigma = 0.5: the grid's sharp end wins
        assert power >= 8, power
        assert abs(float(sigma) - 0.5) < 0.05, float(sigma)
    else:
        # a Normal is p = 2 with sigma = sqrt(2) sd; 2000 cells pin p to the grid's 2 (1.5-3 allowed)
        assert 1.5 <= power <= 3, power
        assert abs(float(sigma) - math.sqrt(2) * 0.3) < 0.08, float(sigma)


def test_noise_update_gives_noise_dimensions_no_weight():
    from pyrospatial.models.alignment import noise_update

    rng = np.random.default_rng(3)
    n, k = 3000, 2
    T, cand, valid = _exact_plan(n, k)
    z = rng.normal(size=(n * k, 2))
    u_b = torch.tensor(z + rng.normal(0.0, 0.1, size=z.shape))
    # dimension 0: a's embedding is its partner's signal plus small noise; dimension 1: unrelated noise
    partner = z[cand[:, 0].numpy()]
    u_a = torch.tensor(np.c_[partner[:, 0] + rng.normal(0, 0.1, n), rng.normal(size=n)])
    coords = torch.zeros(n * k, 2, dtype=torch.float64)
    out = noise_update(T, coords[cand[:, 0]], coords, u_a, u_b, cand, valid, torch.ones(2, dtype=torch.float64), 1e3)
    slope, tau = out["slope"].numpy(), out["tau"].numpy()
    # signal / total variance: ~1 / (1 + 0.01) for the shared dimension, ~0 (+- 3/sqrt(n)) for noise
    assert abs(slope[0] - 1.0) < 0.05 and abs(slope[1]) < 0.06, slope
    # the matched residual sd: ~sqrt(0.1^2 + 0.1^2) for the shared dimension, ~1 for the noise one
    assert abs(tau[0] - math.sqrt(0.02)) < 0.03 and abs(tau[1] - 1.0) < 0.06, tau


def _peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def test_sparse_path_never_builds_a_dense_matrix():
    from scipy.spatial import cKDTree

    from pyrospatial.guides.alignment import AlignmentGuide
    from pyrospatial.models.alignment import AlignmentModel

    n = m = 30_000  # a dense n x m float32 matrix would take 3.6 GB
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 170, size=(n, 2))
    feats = torch.tensor(rng.normal(size=(n, 4)), dtype=torch.float32)
    batch = AlignmentBatch(features_a=feats, features_b=feats.clone(), coords_a=torch.tensor(xy, dtype=torch.float32),
                           coords_b=torch.tensor(xy + 0.05, dtype=torch.float32),
                           centre_a=torch.tensor(xy.mean(0), dtype=torch.float32), log_area_b=2 * math.log(170),
                           tree_b=cKDTree(xy + 0.05))
    model = AlignmentModel(4, 4, 4, torch.zeros(3), torch.ones(3), k=8, radius=3.0)
    guide = AlignmentGuide(model, 4, 4, n_iter=5)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    before = _peak_rss_mb()
    loss = Trace_ELBO().differentiable_loss(model, guide, batch)
    loss.backward()
    after = _peak_rss_mb()
    out = guide(batch)
    assert out["T"].shape == (n, 9)  # the coupling is (n, k + 1): O(n k)
    assert torch.isfinite(loss)
    if before is not None and after is not None:
        # a dense float32 n x m matrix is 3433 MB; the sparse step needs tens of MB
        assert after - before < 500, (before, after)


# ------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("features", ["shared", "separate"])
def test_every_parameter_gets_a_gradient_after_one_step(features):
    a, b, _ = simulate_pair(120, seed=3)
    res = align(a, b, features=features, steps=1, num_samples=2, progress=False)
    model, guide = res.model, res.guide
    model.train(), guide.train()
    params = dict(model.named_parameters()) | {f"guide.{k}": v for k, v in guide.named_parameters()}
    for p in params.values():
        p.grad = None
    loss = Trace_ELBO().differentiable_loss(model, guide, res.batch)
    loss.backward()
    missing = [k for k, p in params.items() if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not missing, missing
    # shared features are the embedding itself (no encoders); separate panels learn encoders/decoders
    names = set(params)
    assert any(k.startswith("guide.transform_loc") for k in names)
    assert any(k.startswith("guide.transform_scale_tril") for k in names)
    assert any(k.startswith("guide.encoder_a") for k in names) == (features == "separate")
    assert any(k.startswith("decoder_b") for k in names) == (features == "separate")


# ------------------------------------------------------------------------------------------
# other modes
# ------------------------------------------------------------------------------------------
def test_modalities_without_shared_features_align(pair):
    a, b, truth = pair
    b2 = b.copy()
    b2.var_names = [f"protein_{i}" for i in range(b2.n_vars)]
    res = align(a, b2, init={"angle": ANGLE + 0.05, "translation": (SHIFT[0] + 3, SHIFT[1] - 3)},
                steps=100, num_samples=10, progress=False)
    assert res.settings["features"] == "separate"
    kept = np.flatnonzero(truth >= 0)
    # positions alone (jitter 0.1 spacing) still identify most partners
    assert np.asarray(res.match_prob[kept, truth[kept]]).ravel().mean() > 0.5
    assert abs(res.transform["angle"]["mean"] - ANGLE) < 0.02


def test_align_slices_sequential_brings_three_slices_into_one_frame():
    a, b, truth_b = simulate_pair(150, angle=0.2, translation=(5.0, 5.0), drop_fraction=0.0, seed=4)
    _, c, truth_c = simulate_pair(150, angle=-0.15, translation=(-5.0, 3.0), drop_fraction=0.0, seed=4)
    results = align_slices([a, b, c], mode="sequential", steps=80, num_samples=5, progress=False)
    assert results[0] is None
    # b and c are two moved views of a's tissue; c is aligned onto b-as-aligned, so both end
    # in a's frame, where each cell must land on its own position in a
    for res, truth in zip(results[1:], (truth_b, truth_c)):
        err = np.linalg.norm(res.aligned[truth] - a.obsm["spatial"], axis=1)
        # jitter 0.1 spacing per view; two chained steps stay well below half a spacing
        assert np.median(err) < 0.5 * res.settings["unit"], np.median(err)


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------
def test_clear_errors_on_bad_input(pair):
    a, b, _ = pair
    with pytest.raises(InputError, match="empty"):
        align(a[:0].copy(), b, progress=False)
    nan = a.copy()
    nan.obsm["spatial"] = nan.obsm["spatial"].copy()
    nan.obsm["spatial"][3] = np.nan
    with pytest.raises(CoordinateError, match=r"obsm\['spatial'\].*NaN"):
        align(nan, b, progress=False)
    nokey = a.copy()
    del nokey.obsm["spatial"]
    with pytest.raises(CoordinateError, match="missing"):
        align(nokey, b, progress=False)
    other = b.copy()
    other.var_names = [f"x{i}" for i in range(other.n_vars)]
    with pytest.raises(InputError, match="share no feature"):
        align(a, other, features="shared", progress=False)
    with pytest.raises(InputError, match="label key"):
        align(a, b, label_keys=["nope"], progress=False)
    with pytest.raises(InputError, match="features must be"):
        align(a, b, features="both", progress=False)


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------
def test_cli_align_writes_results_and_figures(tmp_path, capsys):
    from pyrospatial.cli import main

    a, b, _ = simulate_pair(120, seed=5)
    a.write_h5ad(tmp_path / "A.h5ad")
    b.write_h5ad(tmp_path / "B.h5ad")
    out = tmp_path / "out"
    code = main(["align", str(tmp_path / "A.h5ad"), str(tmp_path / "B.h5ad"), "--out", str(out), "--label-key",
                 "cell_type", "--steps", "20", "--num-samples", "3", "--no-progress"])
    assert code == 0
    res = ad.read_h5ad(out / "aligned_a.h5ad")
    assert {"align_match_prob", "spatial_aligned", "align_cell_type_probs"} <= set(res.obsm)
    assert (out / "figures" / "overlay.png").stat().st_size > 0
    assert (out / "figures" / "match_confidence.png").stat().st_size > 0
    assert "angle" in __import__("json").loads((out / "alignment.json").read_text())["transform"]
    # bad input: a clear message and exit status 2, not a traceback
    a.obsm["spatial"][0] = np.nan
    a.write_h5ad(tmp_path / "A_nan.h5ad")
    code = main(["align", str(tmp_path / "A_nan.h5ad"), str(tmp_path / "B.h5ad"), "--out", str(out), "--overwrite"])
    assert code == 2
    assert "NaN" in capsys.readouterr().err
    assert (out / "aligned_a.h5ad").exists()  # an input error leaves the earlier results in place
