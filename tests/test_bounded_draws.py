"""Bounded memory on large tissues (issue 23): ``CORAL.sample(max_draws_mb=...)`` keeps every
latent's draws but not those of ``expected_rna`` (S x cells x genes), which are recomputed from
the latents chunk by chunk wherever they are used. The recomputed draws must be exactly the
ones the sampler would have kept, and every export computed chunk by chunk must equal the one
computed at once."""

from __future__ import annotations

import numpy as np
import pytest

from pyrospatial.data.sim import simulate_tissue
from pyrospatial.engine.replay import replay_site
from pyrospatial.errors import InputError
from pyrospatial.methods.coral import CORAL


@pytest.fixture(scope="module")
def coral():
    tissue = simulate_tissue(n_cells=300, n_types=3, n_proteins=8, n_genes=15, seed=5, cells_per_spot=8.0)
    model = CORAL(tissue.cells, tissue.spots, cell_type_key="cell_type", spot_diameter=55.0, seed=0)
    model.train(max_epochs=30, batch_size=None, progress=False, seed=1)
    return model


def _pair(coral, **kwargs):
    kept = coral.sample(12, seed=2, max_draws_mb=None, **kwargs)
    lean = coral.sample(12, seed=2, max_draws_mb=0.0, **kwargs)
    return kept, lean


@pytest.mark.parametrize("method", ["guide", "local"])
def test_recomputed_expected_rna_equals_the_kept_draws(coral, method):
    # no EM: it would move the model between the two runs (same chains otherwise)
    kwargs = {"num_chains": 2, "num_warmup": 6, "thin": 1, "em_params": ()} if method == "local" else {}
    kept, lean = _pair(coral, method=method, **kwargs)
    assert "expected_rna" in kept.samples and kept.replayed == ()
    assert "expected_rna" not in lean.samples and lean.replayed == ("expected_rna",)
    for site in ("z", "v", "cell_size"):  # same seed, same latents: only what is stored differs
        np.testing.assert_array_equal(kept.samples[site], lean.samples[site])
    recomputed = coral.site_draws("expected_rna")
    np.testing.assert_allclose(recomputed, kept.samples["expected_rna"], rtol=1e-5, atol=1e-6)
    cells = np.array([3, 150, 7])
    np.testing.assert_allclose(coral.site_draws("expected_rna", cells), kept.samples["expected_rna"][:, cells],
                               rtol=1e-5, atol=1e-6)


def test_chunked_export_equals_the_export_at_once(coral):
    coral.sample(12, seed=2, method="guide", max_draws_mb=None)
    coral.chunk_mb = 1e9
    cells_once, spots_once = coral.export()
    coral.sample(12, seed=2, method="guide", max_draws_mb=0.0)
    coral.chunk_mb = 0.002  # a handful of spots per chunk
    chunks = list(coral.draw_chunks("expected_rna"))
    assert len(chunks) > 5
    seen = np.concatenate([batch.cell_index.numpy() for batch, _ in chunks])
    assert np.array_equal(np.sort(seen), np.arange(coral.dataset.n_cells))  # every cell exactly once
    cells, spots = coral.export()
    coral.chunk_mb = 256.0
    for stat in ("mean", "sd", "q05", "q50", "q95"):
        np.testing.assert_allclose(cells.layers[f"expected_rna_{stat}"], cells_once.layers[f"expected_rna_{stat}"],
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(spots.layers[f"expected_counts_{stat}"], spots_once.layers[f"expected_counts_{stat}"],
                                   rtol=1e-4, atol=1e-4)
    # the count split, chunk by chunk: NaN exactly for cells outside every spot, and every
    # draw adds up to the spot's counts, so the means do too
    outside = coral.dataset.cell_spot < 0
    assert np.isnan(cells.layers["counts_mean"][outside]).all()
    assert not np.isnan(cells.layers["counts_mean"][~outside]).any()
    assert cells.uns["pyrospatial"]["spot_sum_max_abs_error"] == 0.0
    member = coral.dataset.membership
    spot_counts = coral.dataset.spot_counts.toarray() if hasattr(coral.dataset.spot_counts, "toarray") \
        else np.asarray(coral.dataset.spot_counts)
    sums = member @ np.nan_to_num(cells.layers["counts_mean"].astype(np.float64))
    np.testing.assert_allclose(sums, spot_counts, atol=1e-3)


def test_replay_refuses_draws_without_every_latent(coral):
    posterior = coral.sample(4, seed=0, method="guide", max_draws_mb=0.0)
    batch = next(coral.dataset.chunks(4))
    draws = {k: v for k, v in posterior.samples.items() if k != "cell_size"}
    with pytest.raises(InputError, match="cell_size"):
        replay_site(coral.model, batch, draws, "expected_rna")
    with pytest.raises(InputError, match="not a deterministic site"):
        replay_site(coral.model, batch, posterior.samples, "z")


def _assert_same_anndata(a, b) -> None:
    """Bitwise equal X, layers, obsm, obsp and obs (NaN equal to NaN)."""
    np.testing.assert_array_equal(a.X, b.X)
    for slot in ("layers", "obsm", "obsp"):
        left, right = getattr(a, slot), getattr(b, slot)
        assert list(left.keys()) == list(right.keys())
        for key in left.keys():
            x, y = left[key], right[key]
            if hasattr(x, "toarray"):
                x, y = x.toarray(), y.toarray()
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{slot}[{key!r}]")
    assert a.obs.equals(b.obs)


def test_summaries_by_blocks_equal_the_summaries_at_once(coral, monkeypatch):
    # every summary of the export (latent sites, expected RNA, spot sums, the count split's
    # quantiles, edge probabilities) is computed a block of rows at a time; with blocks of a
    # few rows the values must be exactly those of one block
    from pyrospatial.engine import summary

    coral.sample(12, seed=2, method="guide", max_draws_mb=0.0)
    monkeypatch.setattr(summary, "BLOCK_MB", 1e9)
    cells_once, spots_once = coral.export()
    monkeypatch.setattr(summary, "BLOCK_MB", 1e-4)  # 2-3 rows per block
    cells, spots = coral.export()
    _assert_same_anndata(cells, cells_once)
    _assert_same_anndata(spots, spots_once)
    # X holds the same values as the layer of expected-RNA means, in its own array
    assert not np.shares_memory(cells.X, cells.layers["expected_rna_mean"])
    for stat, value in cells_once.uns["pyrospatial"]["globals"]["rna_weight"].items():
        np.testing.assert_array_equal(cells.uns["pyrospatial"]["globals"]["rna_weight"][stat], value)


@pytest.mark.parametrize("shape, dtype, integer", [
    ((9, 40), np.float32, False),          # (S, E), e.g. edge probabilities
    ((9, 41, 1), np.float32, False),       # one value per row, e.g. a 1-D v
    ((9, 40, 3), np.float64, False),
    ((9, 40, 3), np.int64, True),          # integer draws: quantiles are draws themselves
    ((1, 40, 2), np.float32, False),       # a single draw: sd 0
])
def test_blockwise_statistics_equal_one_call(shape, dtype, integer):
    from pyrospatial.engine.summary import _summary_stats, blockwise, draw_quantiles  # noqa: F401

    draws = (np.random.default_rng(0).gamma(0.5, 3.0, shape) * 10).astype(dtype)
    row_mb = draws.nbytes / shape[1] / 2**20
    at_once = _summary_stats(draws, (0.05, 0.5, 0.95), integer)
    calls = []

    def stats(block):
        calls.append(block.shape[1])
        from pyrospatial.engine.summary import _block_stats
        return _block_stats(block, (0.05, 0.5, 0.95), integer)

    by_blocks = blockwise(stats, draws, block_mb=2.5 * row_mb)
    assert len(calls) > 5 and min(calls) >= 2 and sum(calls) == shape[1]
    assert list(by_blocks) == list(at_once)
    for key, value in at_once.items():
        assert by_blocks[key].dtype == value.dtype
        np.testing.assert_array_equal(by_blocks[key], value, err_msg=key)


@pytest.mark.parametrize("n_draws", [1, 2, 3, 7, 25, 100])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
def test_linear_quantiles_equal_numpys_value_for_value(n_draws, dtype):
    """The summaries' quantiles come from one sort along the draws instead of np.quantile's
    partition (5x faster on cells x genes draws); they must be np.quantile's values exactly,
    ties, integer draws, single draws and NaN columns included."""
    from pyrospatial.engine.summary import linear_quantiles

    rng = np.random.default_rng(n_draws)
    draws = (rng.gamma(0.7, 4.0, (n_draws, 30, 5)) * (10 if np.dtype(dtype).kind == "i" else 1)).astype(dtype)
    if np.dtype(dtype).kind == "f":
        draws[rng.integers(0, n_draws), 3, 2] = np.nan
        draws[:, 4, 1] = draws[0, 4, 1]  # every draw equal
    levels = (0.05, 0.5, 0.95, 0.0, 1.0, 0.33)
    expected = np.quantile(draws, levels, axis=0)
    for level, value, want in zip(levels, linear_quantiles(draws, levels), expected):
        assert value.dtype == np.float64
        np.testing.assert_array_equal(value, want, err_msg=f"q={level}")


def test_the_export_holds_one_chunk_of_draws_at_a_time(coral, monkeypatch):
    # a chunk's draws of expected RNA (256 MB by default) must be released before the next
    # chunk's are made: holding two at once was most of the export's peak memory on 100k cells
    import weakref

    coral.sample(12, seed=2, method="guide", max_draws_mb=0.0)
    coral.chunk_mb = 0.002
    original = CORAL.draw_chunks
    alive_when_made: list[bool] = []

    def watched(self, name="expected_rna", **kwargs):
        previous = None
        for batch, draws in original(self, name, **kwargs):
            alive_when_made.append(previous is not None and previous() is not None)
            previous = weakref.ref(draws)
            yield batch, draws
            del draws

    monkeypatch.setattr(CORAL, "draw_chunks", watched)
    try:
        coral.export()
    finally:
        coral.chunk_mb = 256.0
    assert len(alive_when_made) > 5
    assert not any(alive_when_made)
