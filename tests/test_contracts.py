"""The engine and criticism work for any model that declares a contract: a non-CORAL model,
with its own data source and batch type, goes through fit, sample_posterior,
refine_posterior, to_inference_data and ppc_summary using only its contract."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam
from torch import nn

import pyrospatial as ps
from pyrospatial import criticism as dg
from pyrospatial.engine.batch import ScaledPlate
from pyrospatial.errors import InputError
from pyrospatial.protocols import BatchLike, DataSource, ModelContract, ObservedSite

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("fresh_pyro")  # tests/conftest.py

# the simulated truth
TRUE_MEAN, TRUE_SPREAD = 1.0, 0.5
N_SPOTS, N_GENES = 200, 5


# ------------------------------------------------------------------------------------------
# a data source of spots with counts, and its batch type (no cells, no graph)
# ------------------------------------------------------------------------------------------
@dataclass
class CountsBatch:
    counts: torch.Tensor  # (m, G)
    spot_index: torch.Tensor  # (m,) dataset index of each spot
    n_spots_total: int
    scale: float  # batches per epoch: the minibatch log-likelihood times this is unbiased

    @property
    def cell_index(self) -> torch.Tensor:
        return self.spot_index[:0]

    @property
    def n_cells(self) -> int:
        return 0

    @property
    def n_spots(self) -> int:
        return int(self.spot_index.shape[0])

    @property
    def device(self) -> torch.device:
        return self.counts.device

    def to(self, device) -> "CountsBatch":
        return replace(self, counts=self.counts.to(device), spot_index=self.spot_index.to(device))


class _Batches(torch.utils.data.Dataset):
    def __init__(self, source: "CountsData", groups: list[np.ndarray]):
        self.source, self.groups = source, groups

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> CountsBatch:
        return self.source.batch(self.groups[i], len(self.groups))


class CountsData:
    """Spots x genes counts: a :class:`~pyrospatial.protocols.DataSource`."""

    def __init__(self, counts: np.ndarray, gene_names: list[str]):
        self.counts = torch.as_tensor(counts, dtype=torch.float32)
        self.gene_names = gene_names
        self.n_cells, self.n_spots = 0, int(counts.shape[0])

    def batch(self, spots: np.ndarray, n_batches: int) -> CountsBatch:
        index = torch.as_tensor(np.sort(spots), dtype=torch.long)
        return CountsBatch(self.counts[index], index, self.n_spots, float(n_batches))

    def _groups(self, size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
        order = np.arange(self.n_spots) if rng is None else rng.permutation(self.n_spots)
        return [order[i : i + size] for i in range(0, self.n_spots, size)]

    def dataloader(self, batch_size=None, *, seed: int = 0, shuffle: bool = True):
        groups = self._groups(batch_size or self.n_spots, np.random.default_rng(seed) if shuffle else None)
        return torch.utils.data.DataLoader(_Batches(self, groups), batch_size=None, shuffle=shuffle,
                                           generator=torch.Generator().manual_seed(seed), collate_fn=lambda b: b)

    def chunks(self, chunk_size=None):
        groups = self._groups(chunk_size or self.n_spots, None)
        return (self.batch(g, len(groups)) for g in groups)

    def full_batch(self) -> CountsBatch:
        return self.batch(np.arange(self.n_spots), 1)


def spots(batch: CountsBatch) -> ScaledPlate:
    return ScaledPlate("spots", batch.n_spots_total, batch.spot_index, batch.scale, dim=-1)


# ------------------------------------------------------------------------------------------
# a Poisson log-normal model of the spots and its guide
# ------------------------------------------------------------------------------------------
class SpotLevels(PyroModule):
    """mean ~ N(0, 2); level_j ~ N(mean, spread) per spot; counts_jg ~ Poisson(exp(level_j) w_g)
    with known gene weights ``w`` and ``spread`` a point estimate (SVI, then EM in refine)."""

    contract = ModelContract(
        observed=(ObservedSite("counts", "spots", ("spot", "gene")),),
        local={"spots": ("level",)},
        global_sites=("mean",),
        em_parameters=("spread",),
        noncentred=("level",),
    )

    def __init__(self, gene_weight: torch.Tensor):
        super().__init__()
        self.register_buffer("gene_weight", gene_weight)
        self.spread = PyroParam(torch.tensor(1.0), constraint=constraints.positive)

    def forward(self, batch: CountsBatch, predictive: bool = False) -> None:
        mean = pyro.sample("mean", dist.Normal(torch.tensor(0.0), 2.0))
        with spots(batch):
            level = pyro.sample("level", dist.Normal(mean, self.spread))
            rate = torch.exp(level).unsqueeze(-1) * self.gene_weight
            pyro.sample("counts", dist.Poisson(rate).to_event(1), obs=None if predictive else batch.counts)


class SpotLevelsGuide(PyroModule):
    """Mean-field Normal q for the global mean and every spot's level."""

    def __init__(self, n_spots: int):
        super().__init__()
        self.mean_loc = nn.Parameter(torch.tensor(0.0))
        self.mean_scale = PyroParam(torch.tensor(0.1), constraint=constraints.positive)
        self.level_loc = nn.Parameter(torch.zeros(n_spots))
        self.level_scale = PyroParam(torch.full((n_spots,), 0.1), constraint=constraints.positive)

    def forward(self, batch: CountsBatch, predictive: bool = False) -> None:
        pyro.sample("mean", dist.Normal(self.mean_loc, self.mean_scale))
        with spots(batch):
            i = batch.spot_index
            pyro.sample("level", dist.Normal(self.level_loc[i], self.level_scale[i]))


def simulate(seed: int = 0) -> tuple[CountsData, torch.Tensor]:
    rng = np.random.default_rng(seed)
    weight = np.array([0.5, 1.0, 2.0, 4.0, 8.0])
    level = rng.normal(TRUE_MEAN, TRUE_SPREAD, size=N_SPOTS)
    counts = rng.poisson(np.exp(level)[:, None] * weight)
    return CountsData(counts, [f"g{k}" for k in range(N_GENES)]), torch.as_tensor(weight, dtype=torch.float32)


@pytest.fixture(scope="module")
def trained():
    pyro.clear_param_store()
    data, weight = simulate()
    model, guide = SpotLevels(weight), SpotLevelsGuide(data.n_spots)
    result = ps.fit(model, guide, data, max_steps=600, batch_size=50, lr=0.05, progress=False, device="cpu", seed=0)
    return data, result


# ------------------------------------------------------------------------------------------
def test_the_toy_honours_the_protocols(trained):
    data, _ = trained
    assert isinstance(data, DataSource) and isinstance(data.full_batch(), BatchLike)


def test_fit_and_sample_posterior_recover_the_global_mean(trained):
    """200 spots with sd 0.5 around the mean: its posterior sd is about 0.5 / sqrt(200) = 0.035,
    so 0.15 (over 4 sd) holds unless training or the chunked assembly is wrong."""
    data, result = trained
    draws = ps.sample_posterior(result.model, result.guide, data, 100, chunk_size=64, seed=0)
    assert draws.plates == {"mean": "global", "level": "spots"}
    assert draws["level"].shape == (100, N_SPOTS) and draws["mean"].shape == (100,)
    assert abs(float(draws["mean"].mean()) - TRUE_MEAN) < 0.15
    # the spots' levels are identified by 5 genes each: their posterior means track the truth
    level_true = np.random.default_rng(0).normal(TRUE_MEAN, TRUE_SPREAD, size=N_SPOTS)
    assert np.corrcoef(draws["level"].mean(0), level_true)[0, 1] > 0.8


def test_refine_reads_em_parameters_and_noncentred_sites_from_the_contract(trained):
    """refine_posterior on a batch type it cannot split (one joint part), with the contract's
    EM parameter re-estimated and its non-centred site returned under its own name. The spread
    of 200 levels is estimated to within about 0.5 / sqrt(400) = 0.025 (plus the levels' own
    uncertainty); 0.15 allows for the short warm-up."""
    data, result = trained
    draws = ps.refine_posterior(result.model, result.guide, data, 40, num_chains=4, num_warmup=100, thin=2,
                                num_steps=5, seed=0)
    assert set(draws.diagnostics["acceptance"]) == {"all"}
    assert set(draws.diagnostics["em"]) == {"spread"}  # the contract's em_parameters
    assert set(draws) == {"mean", "level"}  # "level" was sampled non-centred, returned as itself
    assert draws["level"].shape == (40, N_SPOTS)
    assert abs(float(draws["mean"].mean()) - TRUE_MEAN) < 0.15
    assert abs(float(result.model.spread.detach()) - TRUE_SPREAD) < 0.15
    assert draws.diagnostics["acceptance"]["all"] > 0.3


def test_criticism_uses_the_declared_observed_site(trained):
    data, result = trained
    draws = ps.sample_posterior(result.model, result.guide, data, 20, seed=0)
    idata = dg.to_inference_data(result, data, draws, method="guide", seed=0)
    pp, obs, post = idata.posterior_predictive, idata.observed_data, idata.posterior
    assert set(pp.data_vars) == set(obs.data_vars) == {"counts"}
    assert pp["counts"].dims == ("chain", "draw", "spot", "gene") and pp["counts"].shape == (1, 20, N_SPOTS, N_GENES)
    np.testing.assert_array_equal(obs["counts"].values, data.counts.numpy())  # as the model conditions on it
    assert list(obs["gene"].values) == data.gene_names  # labelled by the data source's gene_names
    assert post["counts_lik_mean"].dims == ("chain", "draw", "spot", "gene")
    assert post["level"].dims == ("chain", "draw", "spot") and post["mean"].dims == ("chain", "draw")
    summary = dg.ppc_summary(idata)
    assert set(summary.by_group) == {"counts"} and len(summary.table) == N_GENES
    # the model is the simulator: replicated gene means match the observed ones within 10%
    table = summary.table
    np.testing.assert_allclose(table["replicated_mean"], table["observed_mean"], rtol=0.1)
    with pytest.raises(InputError, match="pair-level"):
        dg.edge_reliability_inputs(idata)


class NoContract(PyroModule):
    """The same model without a contract (an AutoNormal-style pair)."""

    def __init__(self, gene_weight: torch.Tensor):
        super().__init__()
        self.register_buffer("gene_weight", gene_weight)

    def forward(self, batch: CountsBatch, predictive: bool = False) -> None:
        mean = pyro.sample("mean", dist.Normal(torch.tensor(0.0), 2.0))
        with spots(batch):
            level = pyro.sample("level", dist.Normal(mean, 0.5))
            rate = torch.exp(level).unsqueeze(-1) * self.gene_weight
            pyro.sample("counts", dist.Poisson(rate).to_event(1), obs=None if predictive else batch.counts)


def test_a_model_without_contract_trains_and_samples_but_criticism_asks_for_one():
    data, weight = simulate(1)
    model = NoContract(weight)
    guide = pyro.infer.autoguide.AutoNormal(model, create_plates=spots)
    result = ps.fit(model, guide, data, max_steps=5, batch_size=100, progress=False, device="cpu", seed=0)
    draws = ps.sample_posterior(model, guide, data, 4, seed=0)
    assert draws["level"].shape == (4, N_SPOTS)
    with pytest.raises(InputError, match="contract"):
        dg.to_inference_data(result, data, draws)
    with pytest.raises(InputError, match="contract"):
        dg.posterior_predictive(model, data.full_batch(), draws, draws.plates)


def test_contract_declarations_are_checked():
    with pytest.raises(InputError, match="plate"):
        ObservedSite("x", "genes", ("gene",))
    with pytest.raises(InputError, match="observed sites must be distinct"):
        ModelContract(observed=(ObservedSite("x", "cells", ("cell",)),), global_sites=("x",))
    with pytest.raises(InputError, match="local"):
        ModelContract(local={"genes": ("w",)})
    c = ModelContract(observed=(ObservedSite("e", "edge", ("edge",), moments=("mean",), mean_name="p"),))
    assert c.observed_site("e").moment_name("mean") == "p" and c.observed_site("e").moment_name("variance") == "e_lik_variance"


def test_fit_nonedge_ratio_is_deprecated_and_sets_it_on_a_copy_of_the_data_set():
    tissue = ps.sim.simulate_tissue(n_cells=120, n_types=3, n_proteins=6, n_genes=12, seed=0)
    ds = ps.SpatialDataset.from_anndata(tissue.cells, tissue.spots, cell_type_key="cell_type", spot_diameter=55.0,
                                        nonedge_ratio=3.0)
    assert ds.nonedge_ratio == 3.0 and ds.with_nonedge_ratio(2.0).nonedge_ratio == 2.0 and ds.nonedge_ratio == 3.0
    batch = ds.full_batch()
    assert batch.nonedge_index.shape[1] == min(3 * ds.n_edges, ds.n_nonedges)
    with pytest.raises(InputError, match="nonedge_ratio"):
        ds.with_nonedge_ratio(-1.0)
    from pyrospatial.models import CoralModel
    from pyrospatial.guides import CoralGuide

    model = CoralModel.from_dataset(ds, z_dim=2, hidden=8)
    guide = CoralGuide.from_dataset(ds, model=model, hidden=8, heads=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = ps.fit(model, guide, ds, max_steps=1, nonedge_ratio=2.0, progress=False, device="cpu")
    assert any(issubclass(w.category, DeprecationWarning) and "nonedge_ratio" in str(w.message) for w in caught)
    assert result.settings["nonedge_ratio"] == 2.0 and ds.nonedge_ratio == 3.0  # the caller's data set is untouched


def test_coral_contract_matches_its_trace():
    """Every site CORAL declares is in its trace with the declared role and plate (with the
    options that create every site), and every latent of the trace is declared: a renamed
    site cannot silently drift from the contract that the engine and criticism read."""
    import pyro.poutine as poutine
    from pyro.poutine.util import site_is_subsample

    from pyrospatial.engine.posterior import site_plate
    from pyrospatial.methods.coral import CORAL

    tissue = ps.sim.simulate_tissue(n_cells=120, n_types=3, n_proteins=6, n_genes=12, seed=0)
    coral = CORAL(tissue.cells, tissue.spots, cell_type_key="cell_type", spot_diameter=55.0,
                  model_kwargs={"bayesian_edge_decoder": True, "capture_sd": 0.2, "z_dim": 2, "hidden": 8},
                  guide_kwargs={"hidden": 8, "heads": 1})
    batch = coral.dataset.full_batch()
    with torch.no_grad():
        guide_trace = poutine.trace(coral.guide).get_trace(batch)
        trace = poutine.trace(poutine.replay(coral.model, trace=guide_trace)).get_trace(batch)
    contract = coral.model.contract
    sites = {name: node for name, node in trace.nodes.items() if node["type"] == "sample"}
    for declared in contract.observed:
        assert sites[declared.name]["is_observed"] and site_plate(sites[declared.name]) == declared.plate
    for plate, names in contract.local.items():
        assert all(site_plate(sites[n]) == plate and not sites[n]["is_observed"] for n in names), plate
    assert all(site_plate(sites[n]) == "global" for n in contract.global_sites)
    assert all(sites[n]["infer"].get("_deterministic") for n in contract.deterministic)
    latent = {n for n, node in sites.items()
              if not node["is_observed"] and not node["infer"].get("_deterministic") and not site_is_subsample(node)}
    assert latent == set(contract.latent_sites)
    params = {name.removesuffix("_unconstrained") for name, _ in coral.model.named_parameters()}
    assert set(contract.em_parameters) <= params
