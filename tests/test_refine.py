"""refine_posterior: exact on a conjugate toy model, and the CORAL output layout."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule

from pyrospatial.engine.batch import Batch, cell_plate, spot_plate
from pyrospatial.errors import InputError
from pyrospatial.models.blocks import spot_sum
from pyrospatial.engine.refine import refine_posterior

torch.set_num_threads(1)


pytestmark = pytest.mark.usefixtures("fresh_pyro")  # tests/conftest.py


class OneBatch:
    """The dataset interface refine_posterior uses: sizes and one full batch."""

    def __init__(self, batch: Batch):
        self.batch = batch
        self.n_cells, self.n_spots = batch.n_cells, batch.n_spots

    def full_batch(self) -> Batch:
        return self.batch


def toy_batch(cell_spot: np.ndarray, y: np.ndarray) -> Batch:
    n, m = len(cell_spot), len(y)
    members = np.flatnonzero(cell_spot >= 0)
    membership = torch.sparse_coo_tensor(
        torch.as_tensor(np.stack([cell_spot[members], members])), torch.ones(len(members)), (m, n),
        check_invariants=False,
    ).coalesce()
    empty = torch.zeros(2, 0, dtype=torch.long)
    return Batch(
        cell_index=torch.arange(n), cell_type=torch.zeros(n, dtype=torch.long), cell_features=torch.ones(n, 1),
        cell_library=torch.ones(n), cell_coords=torch.zeros(n, 2), cell_spot=torch.as_tensor(cell_spot),
        spot_index=torch.arange(m), spot_counts=torch.as_tensor(y, dtype=torch.float32).reshape(m, 1),
        spot_library=torch.as_tensor(y, dtype=torch.float32), membership=membership, edge_index=empty,
        nonedge_index=empty, n_types=1, n_cells_total=n, n_spots_total=m, n_edges_total=0, n_batches=1,
    )


class ToyModel(PyroModule):
    """a ~ N(0, 1) (global); z_i ~ N(0, 1) per cell; y_j ~ N(a + sum_{i in j} z_i, sigma^2)."""

    sigma = 0.5

    def forward(self, batch: Batch, predictive: bool = False) -> None:
        a = pyro.sample("a", dist.Normal(torch.tensor(0.0), 1.0))
        with cell_plate(batch):
            z = pyro.sample("z", dist.Normal(torch.zeros(batch.n_cells), 1.0))
            pyro.deterministic("twice", 2.0 * z)
        if batch.n_spots > 0:
            with spot_plate(batch):
                mean = a + spot_sum(batch.membership, z.unsqueeze(-1)).squeeze(-1)
                pyro.sample("spot_counts", dist.Normal(mean, self.sigma), obs=batch.spot_counts[..., 0])


class NarrowGuide(PyroModule):
    """A deliberately over-confident guide: everything ~ N(0.3, 0.05)."""

    def forward(self, batch: Batch, predictive: bool = False) -> None:
        pyro.sample("a", dist.Normal(torch.tensor(0.3), 0.05))
        with cell_plate(batch):
            pyro.sample("z", dist.Normal(torch.full((batch.n_cells,), 0.3), 0.05))


def exact_posterior(cell_spot: np.ndarray, y: np.ndarray, sigma: float):
    """Mean and sd of (a, z_1..z_n) for the conjugate toy model."""
    n, m = len(cell_spot), len(y)
    H = np.zeros((m, n + 1))
    H[:, 0] = 1.0
    for i, j in enumerate(cell_spot):
        if j >= 0:
            H[j, i + 1] = 1.0
    cov = np.linalg.inv(np.eye(n + 1) + H.T @ H / sigma**2)
    return cov @ H.T @ y / sigma**2, np.sqrt(np.diag(cov))


def test_refine_recovers_the_exact_posterior_from_an_overconfident_guide():
    cell_spot = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, -1, -1])  # 3 spots, 2 cells outside
    y = np.array([2.5, -1.0, 0.7])
    batch, model, guide = toy_batch(cell_spot, y), ToyModel(), NarrowGuide()
    draws = refine_posterior(
        model, guide, OneBatch(batch), num_samples=1200, num_chains=60, num_warmup=150, thin=2, num_steps=8, seed=1
    )
    mean, sd = exact_posterior(cell_spot, y, ToyModel.sigma)
    assert draws["z"].shape == (1200, 11) and draws["a"].shape == (1200,)
    assert draws.plates == {"z": "cells", "a": "global", "twice": "cells"}
    est_mean = np.r_[draws["a"].mean(), draws["z"].mean(0)]
    est_sd = np.r_[draws["a"].std(), draws["z"].std(0)]
    # 1200 autocorrelated draws: loose but meaningful bounds (the guide's sd is 0.05, mean 0.3)
    np.testing.assert_allclose(est_mean, mean, atol=0.15)
    np.testing.assert_allclose(est_sd, sd, rtol=0.2)
    # cells outside every spot follow their prior N(0, 1); within a spot the cells are
    # negatively correlated (they share the spot's total), which a mean-field guide cannot say
    np.testing.assert_allclose(draws["z"][:, 9:].std(0), 1.0, rtol=0.2)
    assert np.corrcoef(draws["z"][:, 0], draws["z"][:, 1])[0, 1] < -0.2
    np.testing.assert_allclose(draws["twice"], 2.0 * draws["z"], rtol=1e-6)
    d = draws.diagnostics
    assert set(d["acceptance"]) == {"spots", "outside"} and all(0.3 < v <= 1.0 for v in d["acceptance"].values())
    assert d["em"] == {} and d["seconds"] > 0
    # converged chains agree: ArviZ's split-R-hat near 1 for every site (the classic 1.1 bound:
    # with 20 kept per chain the largest of 11 coordinates of this converged run is 1.04), and a
    # usable ESS (about 1100 here)
    assert set(d["rhat_max"]) == {"z", "a", "twice"} and max(d["rhat_max"].values()) < 1.1
    assert min(d["ess_bulk_min"].values()) > 100


def test_refine_rhat_flags_chains_that_have_not_mixed():
    """Chains frozen near their (different) guide draws: a tiny fixed step, no warm-up."""
    cell_spot = np.array([0, 0, 1, -1])
    batch = toy_batch(cell_spot, np.array([2.5, -1.0]))
    draws = refine_posterior(ToyModel(), NarrowGuide(), OneBatch(batch), num_samples=80, num_chains=8, num_warmup=0,
                             thin=1, num_steps=2, step_size=1e-4, seed=0)
    assert draws.diagnostics["rhat_max"]["z"] > 2.0 and draws.diagnostics["rhat_max"]["a"] > 2.0


def test_refine_arguments_are_checked():
    batch = toy_batch(np.array([0, 0, -1]), np.array([1.0]))
    with pytest.raises(InputError):
        refine_posterior(ToyModel(), NarrowGuide(), OneBatch(batch), num_samples=0)
    with pytest.raises(InputError):
        refine_posterior(ToyModel(), NarrowGuide(), OneBatch(batch), num_samples=4, em_params=("nope",))
    with pytest.raises(InputError):
        refine_posterior(ToyModel(), NarrowGuide(), OneBatch(batch), num_samples=4, num_warmup=2, sites=["nope"])


def test_refine_coral_layout_and_monte_carlo_em():
    from pyrospatial.data.dataset import SpatialDataset
    from pyrospatial.guides import CoralGuide
    from pyrospatial.engine.infer import fit
    from pyrospatial.models import CoralModel
    from pyrospatial.data.sim import simulate_tissue

    sim = simulate_tissue(n_cells=150, n_types=3, n_proteins=6, n_genes=12, seed=0, z_dim=4, cells_per_spot=6.0)
    ds = SpatialDataset.from_anndata(sim.cells, sim.spots, cell_type_key="cell_type", spot_diameter=55.0)
    assert (ds.cell_spot < 0).any() and (ds.cell_spot >= 0).any()
    model = CoralModel.from_dataset(ds, z_dim=4, hidden=16)
    guide = CoralGuide.from_dataset(ds, model=model, hidden=16, heads=2)
    fit(model, guide, ds, max_steps=20, lr=0.02, progress=False, device="cpu", seed=0)
    before = {k: float(getattr(model, k).detach().mean()) for k in ("size_scale", "rna_weight_scale", "rna_inverse_dispersion")}
    kwargs = dict(num_samples=6, num_chains=3, num_warmup=12, thin=1, num_steps=3)
    draws = refine_posterior(model, guide, ds, **kwargs)
    N, G, S = ds.n_cells, ds.n_genes, 6
    assert draws["expected_rna"].shape == (S, N, G) and draws["z"].shape == (S, N, 4)
    assert draws["cell_size"].shape == (S, N) and draws["v"].shape == (S, N, 1)
    assert draws["rna_weight"].shape == (S, G, model.rna_width)
    assert draws.plates["expected_rna"] == "cells" and draws.plates["rna_weight"] == "global"
    assert not any(k.endswith("_decentered") for k in draws)  # internal coordinates stay inside
    for value in draws.values():
        assert np.isfinite(value).all()
    # expected RNA sums to the size factor, in every draw and for every cell (also outside spots)
    np.testing.assert_allclose(draws["expected_rna"].sum(-1), draws["cell_size"], rtol=1e-4)
    after = {k: float(getattr(model, k).detach().mean()) for k in before}
    assert all(after[k] != before[k] for k in ("size_scale", "rna_inverse_dispersion")), (before, after)  # EM, in place
    assert set(draws.diagnostics["em"]) == {"size_scale", "rna_inverse_dispersion"}
    assert after["rna_weight_scale"] == before["rna_weight_scale"]  # the read-out's prior scale is kept
    # conditioning on the graph also re-estimates the edge decoder by default
    bias_before = float(model.edge_decoder.bias.detach())
    graphed = refine_posterior(model, guide, ds, graph=True, sites=["z"], **kwargs)
    assert set(graphed.diagnostics["em"]) == {"size_scale", "rna_inverse_dispersion", "edge_decoder.weight", "edge_decoder.bias"}
    assert float(model.edge_decoder.bias.detach()) != bias_before and graphed["z"].shape == (S, N, 4)
    # em_params=() leaves the model alone; a site subset is honoured
    state = {k: v.clone() for k, v in model.state_dict().items()}
    only = refine_posterior(model, guide, ds, sites=["expected_rna"], em_params=(), **kwargs)
    assert set(only) == {"expected_rna"}
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])


class ChainGraphModel(PyroModule):
    """z_i ~ N(0, 1) per cell; for each edge (i, i'): 0 ~ N(z_i - z_i', s^2) (a Gaussian field
    on the graph). The graph alone couples the cells, so the exact posterior has precision
    I + L / s^2 (L the graph Laplacian)."""

    s = 0.6

    def forward(self, batch: Batch, predictive: bool = False) -> None:
        with cell_plate(batch):
            z = pyro.sample("z", dist.Normal(torch.zeros(batch.n_cells), 1.0))
        pairs = batch.edge_pairs
        if pairs.shape[1] > 0:
            with pyro.plate("edge_plate", pairs.shape[1], dim=-1):
                diff = z.index_select(-1, pairs[0]) - z.index_select(-1, pairs[1])
                pyro.sample("edges", dist.Normal(diff, self.s), obs=torch.zeros(pairs.shape[1]))


class IndependentGuide(PyroModule):
    def forward(self, batch: Batch, predictive: bool = False) -> None:
        with cell_plate(batch):
            pyro.sample("z", dist.Normal(torch.zeros(batch.n_cells), 0.5))


class GraphData(OneBatch):
    """OneBatch with a graph: its size and ``full_batch(nonedge_ratio=...)``."""

    def __init__(self, batch: Batch):
        super().__init__(batch)
        self.n_edges = int(batch.edge_pairs.shape[1])

    def full_batch(self, nonedge_ratio: float = 1.0) -> Batch:
        return self.batch


def test_refine_conditions_on_the_graph_only_when_asked():
    n = 6  # a path 0 - 1 - 2 - 3 - 4 - 5, no spots
    src = torch.arange(n - 1)
    edge_index = torch.cat([torch.stack([src, src + 1]), torch.stack([src + 1, src])], dim=1)
    base = toy_batch(np.full(n, -1), np.zeros(0))
    from dataclasses import replace

    batch = replace(base, edge_index=edge_index, n_edges_total=n - 1)
    laplacian = np.diag(np.r_[1, 2, 2, 2, 2, 1]) - np.eye(n, k=1) - np.eye(n, k=-1)
    exact = np.linalg.inv(np.eye(n) + laplacian / ChainGraphModel.s**2)
    kwargs = dict(num_samples=1500, num_chains=50, num_warmup=150, thin=2, num_steps=8, seed=2)
    joint = refine_posterior(ChainGraphModel(), IndependentGuide(), GraphData(batch), graph=True, **kwargs)
    assert set(joint.diagnostics["acceptance"]) == {"all"}
    cov = np.cov(joint["z"].T)
    np.testing.assert_allclose(np.sqrt(np.diag(cov)), np.sqrt(np.diag(exact)), rtol=0.15)
    corr = cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1])
    exact_corr = exact[0, 1] / np.sqrt(exact[0, 0] * exact[1, 1])
    assert abs(corr - exact_corr) < 0.1 and exact_corr > 0.5
    # without graph=True the edge terms are not in the target: each cell follows its prior
    apart = refine_posterior(ChainGraphModel(), IndependentGuide(), GraphData(batch), **kwargs)
    np.testing.assert_allclose(apart["z"].std(0), 1.0, rtol=0.15)
    assert abs(np.corrcoef(apart["z"][:, 0], apart["z"][:, 1])[0, 1]) < 0.15
    with pytest.raises(InputError, match="graph=True"):
        refine_posterior(ChainGraphModel(), IndependentGuide(), GraphData(base), graph=True, num_samples=4)


def test_bayesian_edge_decoder_is_held_without_the_graph_and_sampled_with_it():
    from pyrospatial.methods.coral import CORAL
    from pyrospatial.data.dataset import SpatialDataset
    from pyrospatial.models.blocks import symmetric_from_upper
    from pyrospatial.data.sim import simulate_tissue

    sim = simulate_tissue(n_cells=120, n_types=3, n_proteins=6, n_genes=12, seed=0, z_dim=4, edge_candidates="all")
    ds = SpatialDataset.from_anndata(sim.cells, sim.spots, cell_type_key="cell_type", spot_diameter=55.0).with_edges(
        sim.truth["edge_index"])
    coral = CORAL(sim.cells, sim.spots, dataset=ds, model_kwargs={"bayesian_edge_decoder": True, "z_dim": 4, "hidden": 16},
                  guide_kwargs={"hidden": 16, "heads": 2})
    assert not any("edge_decoder" in name for name, _ in coral.model.named_parameters())  # no point estimates
    coral.train(max_epochs=15, batch_size=None, seed=0, progress=False)
    kwargs = dict(num_chains=3, num_warmup=12, thin=1, num_steps=3, em_params=())
    held = coral.sample(9, method="refine", **kwargs)
    assert held.samples["edge_weight"].shape == (9, 10) and held.samples["edge_bias"].shape == (9,)
    # without the graph: each chain keeps its guide draw (kept state k of chain c is row k * 3 + c)
    bias = held.samples["edge_bias"].reshape(3, 3)
    np.testing.assert_array_equal(bias, np.broadcast_to(bias[0], (3, 3)))
    assert len(set(bias[0].tolist())) == 3
    joint = coral.sample(9, method="refine", graph=True, **kwargs)
    assert len(set(joint.samples["edge_bias"].tolist())) > 3  # moved by HMC
    # each draw's edge probabilities use that draw's own decoder
    s, (i, j) = 4, ds.edges[:, 0]
    z = joint.samples["z"][s]
    W = symmetric_from_upper(torch.as_tensor(joint.samples["edge_weight"][s]), 4).numpy()
    logit = z[i] @ W @ z[j] + joint.samples["edge_bias"][s]
    assert joint.edge_prob[s, 0] == pytest.approx(1 / (1 + np.exp(-logit)), rel=1e-4)
