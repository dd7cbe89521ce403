"""The global read-out's target summed over chunks of spots (issue 23): on CORAL, the log
density, its gradient and the dense per-gene mass built piece by piece equal the ones of the
whole tissue at once, so sampling the read-out across chunks changes memory, not the target."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyrospatial.data.sim import simulate_tissue
from pyrospatial.engine.hmc import _HMC, _Part
from pyrospatial.engine.local import _chunk_part, _global_pieces, _hand_over, spot_chunks
from pyrospatial.engine.posterior import _EvalMode
from pyrospatial.engine.refine import _guide_starts
from pyrospatial.methods.coral import CORAL

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("fresh_pyro")  # tests/conftest.py
C = 3


def _global_kernel(coral, max_cells: int, with_lone_cells: bool = False) -> tuple[_HMC, int]:
    full = coral.dataset.full_batch()
    model, guide = coral.model, coral.guide
    torch.manual_seed(4)
    sampled, _, site_list, inits = _guide_starts(model, guide, full, model.contract.noncentred, C)
    moving = [s for s in site_list if s.plate in ("cells", "spots")]
    held = [s for s in site_list if s.plate not in ("cells", "spots")]
    chunks = spot_chunks(full.cell_spot.numpy(), full.n_spots, max_cells)
    parts = [_chunk_part(full, chunk, moving, held, inits, C, torch.device("cpu")) for chunk in chunks]
    pieces = _global_pieces(parts, held)
    if with_lone_cells:  # the former pieces: every cell of the chunk, those outside every spot too
        pieces = [_Part("globals", part.batch, part.cells, held, per_cell=False, local_terms_only=i > 0,
                        state=pieces[0].state, conditioned=dict(piece.conditioned))
                  for i, (part, piece) in enumerate(zip(parts, pieces))]
    for part, piece in zip(parts, pieces):  # the cells' values the read-out's step conditions on
        _hand_over(part, piece)
    torch.manual_seed(5)  # the same random-sign probes for the dense mass
    kernel = _HMC(sampled, pieces[0], C, num_steps=4, step_size=0.05, target_accept=0.7,
                  dense=tuple(s.name for s in held), pieces=pieces)
    return kernel, len(chunks)


def test_the_read_out_target_in_chunks_equals_the_whole_tissue():
    tissue = simulate_tissue(n_cells=300, n_types=3, n_proteins=8, n_genes=15, seed=5, cells_per_spot=8.0)
    coral = CORAL(tissue.cells, tissue.spots, cell_type_key="cell_type", spot_diameter=55.0, seed=0)
    coral.train(max_epochs=5, batch_size=None, progress=False, seed=1)
    with _EvalMode(coral.model, coral.guide):
        whole, n_whole = _global_kernel(coral, 10**6)
        chunked, n_chunked = _global_kernel(coral, 80)
    assert n_whole == 1 and n_chunked >= 3
    assert set(whole.part.state) == {"rna_weight"} and whole.dense == ("rna_weight",)
    # the globals' prior counted once: counted per chunk, the density would differ by
    # (chunks - 1) x the prior's log density, far above this tolerance
    torch.testing.assert_close(chunked.lp, whole.lp, rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(chunked.grad["rna_weight"], whole.grad["rna_weight"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(chunked.dense_cov["rna_weight"], whole.dense_cov["rna_weight"], rtol=1e-3, atol=1e-5)
    # and the check has teeth: the read-out moves the density, its gradient is not zero
    assert whole.grad["rna_weight"].abs().max() > 1.0
    assert not np.allclose(whole.dense_cov["rna_weight"].numpy(), np.eye(whole.dense_cov["rna_weight"].shape[-1]))


def test_the_read_out_step_leaves_out_the_cells_between_spots_at_a_constant():
    """The read-out's pieces hold each chunk's spots and their cells only: the cells outside
    every spot share no term with the read-out, so leaving them out shifts its log density by
    a constant per chain (the same at every read-out value: the accept ratio is unchanged) and
    changes neither its gradient nor its dense mass."""
    tissue = simulate_tissue(n_cells=300, n_types=3, n_proteins=8, n_genes=15, seed=5, cells_per_spot=8.0)
    coral = CORAL(tissue.cells, tissue.spots, cell_type_key="cell_type", spot_diameter=55.0, seed=0)
    coral.train(max_epochs=5, batch_size=None, progress=False, seed=1)
    assert (coral.dataset.cell_spot < 0).sum() > 50  # many cells between spots
    with _EvalMode(coral.model, coral.guide):
        members, _ = _global_kernel(coral, 80)
        everyone, _ = _global_kernel(coral, 80, with_lone_cells=True)
        assert sum(p.batch.n_cells for p in members.pieces) == int((coral.dataset.cell_spot >= 0).sum())
        torch.testing.assert_close(members.grad["rna_weight"], everyone.grad["rna_weight"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(members.dense_cov["rna_weight"], everyone.dense_cov["rna_weight"],
                                   rtol=1e-3, atol=1e-5)
        shift = everyone.lp - members.lp
        assert float(shift.abs().min()) > 1.0  # the lone cells' terms were there, and are gone
        for kernel in (members, everyone):  # another read-out value, the same for both
            kernel.part.state["rna_weight"] = kernel.part.state["rna_weight"] + 0.3
            kernel.refresh()
        torch.testing.assert_close(everyone.lp - members.lp, shift, rtol=1e-5, atol=1e-2)


def test_graph_only_globals_keep_their_guide_draws_while_the_read_out_moves():
    """The per-spot posterior leaves the cell graph out, so a Bayesian edge decoder (the
    contract's graph_sites) has no data in its target there: sampled, it drifted to its prior
    (sd 0.29 against the guide's 0.01 on this tissue). It keeps one guide draw per chain, is
    left out of the convergence check, and the read-out is still sampled across chunks."""
    tissue = simulate_tissue(n_cells=300, n_types=3, n_proteins=8, n_genes=15, seed=5, cells_per_spot=8.0)
    coral = CORAL(tissue.cells, tissue.spots, cell_type_key="cell_type", spot_diameter=55.0, seed=0,
                  model_kwargs={"bayesian_edge_decoder": True})
    coral.train(max_epochs=5, batch_size=None, progress=False, seed=1)
    draws = coral.sample(16, seed=2, num_chains=4, num_warmup=6, thin=1, max_cells_per_chunk=80, em_params=())
    samples, d = draws.samples, draws.diagnostics
    assert d["chunks"] >= 3
    for site in ("edge_weight", "edge_bias"):
        values = np.asarray(samples[site]).reshape(4, 4, -1)  # (kept state, chain, ...)
        assert np.array_equal(values, np.broadcast_to(values[:1], values.shape))  # never moved
        assert np.unique(values[0], axis=0).shape[0] == 4  # one guide draw per chain
        assert site not in d["rhat_max"]
    omega = np.asarray(samples["rna_weight"]).reshape(16, -1)
    assert np.unique(omega, axis=0).shape[0] > 4 and "rna_weight" in d["rhat_max"]
