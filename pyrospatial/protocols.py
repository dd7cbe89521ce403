"""The contracts between the layers: what a data source gives the engine, what a model declares.

The engine (:mod:`pyrospatial.engine`) and criticism (:mod:`pyrospatial.criticism`) know no
method. They talk to data through :class:`DataSource` / :class:`BatchLike` and learn a model's
sites from its :class:`ModelContract`, a class attribute ``contract`` of the model (in the
spirit of declaring, per model, which sites are observed and in which plate, rather than
hard-coding their names in the inference code)::

    class MyModel(PyroModule):
        contract = ModelContract(
            observed=(ObservedSite("counts", plate="spots", dims=("spot", "gene")),),
            local={"spots": ("level",)},
            global_sites=("mean",),
        )

Plates
------
Sites are routed by the name of their plate: ``"cells"`` and ``"spots"`` are the *local*
plates (subsampled by the data source; rows in dataset order through ``batch.cell_index`` /
``batch.spot_index``), a plate whose name contains ``"edge"`` holds pair-level sites (one
value per graph edge or sampled pair), and a site outside every plate is *global*
(:func:`pyrospatial.engine.posterior.site_plate`). A model's plates must use ``dim=-1`` so that
:func:`~pyrospatial.engine.refine.refine_posterior` can run chains at ``dim=-2``.

Who needs the contract
----------------------
:func:`~pyrospatial.engine.infer.fit` and :func:`~pyrospatial.engine.posterior.sample_posterior`
do not: any model/guide pair (e.g. with an ``AutoNormal`` guide) trains and samples without
one. :func:`~pyrospatial.engine.refine.refine_posterior` reads its defaults from it (EM
parameters, non-centred sites, graph-only sites) and uses none without it.
:func:`~pyrospatial.criticism.ppc.posterior_predictive` and
:func:`~pyrospatial.criticism.arviz.to_inference_data` need its ``observed`` sites and raise
an :class:`~pyrospatial.errors.InputError` when the model has no contract.

Guides
------
A guide is any callable taking the model's arguments. One hook is optional: a context manager
method ``repeated_draws()``, which :func:`~pyrospatial.engine.posterior.sample_posterior` enters
while it draws ``S`` times from each batch (without gradients, in eval mode). Inside it a guide
may compute once per batch what no draw changes, such as an encoder's output
(:meth:`pyrospatial.guides.CoralGuide.repeated_draws`); its draws must stay those of fresh calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Iterator, Mapping, Protocol, runtime_checkable

import torch

from pyrospatial.errors import InputError

__all__ = [
    "PLATE_DIMS", "BatchLike", "DataSource", "ObservedSite", "ModelContract", "contract_of", "require_contract",
]

#: ArviZ dimension name of each local plate (rows of a per-cell / per-spot site).
PLATE_DIMS: Mapping[str, str] = MappingProxyType({"cells": "cell", "spots": "spot"})

_PLATES = ("cells", "spots", "edge", "global")


@runtime_checkable
class BatchLike(Protocol):
    """What the engine reads from a minibatch: dataset row indices of its local units, their
    counts, its device and a way to move it. Everything else is between model and data."""

    cell_index: torch.Tensor  # (n,) long, dataset index of each cell (empty without cells)
    spot_index: torch.Tensor  # (m,) long, dataset index of each spot (empty without spots)

    @property
    def n_cells(self) -> int: ...

    @property
    def n_spots(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def to(self, device: torch.device | str) -> "BatchLike": ...


@runtime_checkable
class DataSource(Protocol):
    """What a data set gives the engine.

    - plate sizes ``n_cells`` and ``n_spots`` (0 when a plate is absent);
    - ``dataloader(batch_size, seed=, shuffle=)``: one epoch of training batches
      (:func:`~pyrospatial.engine.infer.fit`); settings of the batches themselves (e.g.
      :attr:`~pyrospatial.data.dataset.SpatialDataset.nonedge_ratio`) belong to the data source;
    - ``chunks(chunk_size)``: a fixed partition covering every row once (posterior assembly);
    - ``full_batch()``: everything in one batch with scale 1 (refinement, criticism).

    Optional: ``n_edges`` (a graph, for ``refine_posterior(graph=True)``) and ``{dim}_names``
    attributes that label an ArviZ dimension ``dim`` (e.g. ``gene_names``).
    """

    @property
    def n_cells(self) -> int: ...

    @property
    def n_spots(self) -> int: ...

    def dataloader(self, batch_size: int | None = None, *, seed: int = 0, shuffle: bool = True) -> Iterable[Any]: ...

    def chunks(self, chunk_size: int | None = None) -> Iterator[Any]: ...

    def full_batch(self) -> Any: ...


def _names(value: Any, what: str) -> tuple[str, ...]:
    """A tuple of site / parameter names (a single string is one name)."""
    names = (value,) if isinstance(value, str) else tuple(value)
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise InputError(f"ModelContract.{what} must hold non-empty strings, got {bad}.")
    return names


@dataclass(frozen=True)
class ObservedSite:
    """An observed site of a model and how criticism lays it out.

    Parameters
    ----------
    name
        The sample site (observed in ``model(batch)``, drawn in ``model(batch, predictive=True)``).
    plate
        ``"cells"`` or ``"spots"`` (rows are reordered into dataset order), ``"edge"`` (one
        value per pair of the batch) or ``"global"`` (a plate of its own, not subsampled by the
        data source); the last two keep the batch's order.
    dims
        ArviZ dimension names of one draw: the row dimension, then one per feature axis
        (e.g. ``("spot", "gene")``, or ``("edge",)`` for pairs).
    moments
        Likelihood moments recorded in the posterior group under each draw (``"mean"``,
        ``"variance"``); by default as ``{name}_lik_{moment}``.
    mean_name
        Posterior variable of the likelihood mean instead of ``{name}_lik_mean`` (e.g. the
        edge probabilities of a Bernoulli site).
    pairs
        For an ``"edge"`` site: the batch attribute holding its ``(2, K)`` pairs (local cell
        indices), recorded by criticism as ``constant_data[f"{dims[0]}_pairs"]``.
    """

    name: str
    plate: str
    dims: tuple[str, ...]
    moments: tuple[str, ...] = ("mean", "variance")
    mean_name: str | None = None
    pairs: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InputError(f"ObservedSite.name must be a non-empty string, got {self.name!r}.")
        if self.plate not in _PLATES:
            raise InputError(f"ObservedSite('{self.name}').plate must be one of {_PLATES}, got {self.plate!r}.")
        object.__setattr__(self, "dims", _names(self.dims, f"observed['{self.name}'].dims"))
        if not self.dims:
            raise InputError(f"ObservedSite('{self.name}').dims needs at least the row dimension.")
        moments = _names(self.moments, f"observed['{self.name}'].moments")
        unknown = set(moments) - {"mean", "variance"}
        if unknown:
            raise InputError(f"ObservedSite('{self.name}').moments: unknown {sorted(unknown)}; use 'mean', 'variance'.")
        object.__setattr__(self, "moments", moments)

    def moment_name(self, moment: str) -> str:
        """Posterior variable holding the likelihood's ``moment`` under each draw."""
        if moment == "mean" and self.mean_name:
            return self.mean_name
        return f"{self.name}_lik_{moment}"


@dataclass(frozen=True)
class ModelContract:
    """What a model declares about its sites, for the engine and criticism (see module docstring).

    Parameters
    ----------
    observed
        The observed sites (:class:`ObservedSite`), in the order they are reported.
    local
        Latent sites per local plate, e.g. ``{"cells": ("v", "z"), "spots": ("capture",)}``.
    global_sites
        Latent sites outside every plate (or in a plate of their own, e.g. per gene), shared by
        all rows.
    deterministic
        ``pyro.deterministic`` sites worth reporting (exported and checked with the latents).
    em_parameters
        Model parameters (``named_parameters`` names, without ``_unconstrained``) that
        :func:`~pyrospatial.engine.refine.refine_posterior` re-estimates by Monte Carlo EM by
        default; absent ones are skipped (they may depend on the model's options).
    graph_em_parameters
        Also re-estimated when the refinement conditions on the graph (``graph=True``).
    graph_sites
        Latent sites that only the graph terms inform: held at the guide's draws when the
        refinement leaves the graph out.
    noncentred
        Normal / LogNormal latent sites the refinement samples in non-centred coordinates.
    dims
        ArviZ dimension names of latent or deterministic sites, from their first axis
        (the plate's, for a local site), e.g. ``{"weight": ("gene",)}``; undeclared axes are
        named ``{site}_dim_{k}``.
    """

    observed: tuple[ObservedSite, ...] = ()
    local: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    global_sites: tuple[str, ...] = ()
    deterministic: tuple[str, ...] = ()
    em_parameters: tuple[str, ...] = ()
    graph_em_parameters: tuple[str, ...] = ()
    graph_sites: tuple[str, ...] = ()
    noncentred: tuple[str, ...] = ()
    dims: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        observed = tuple(self.observed)
        if not all(isinstance(o, ObservedSite) for o in observed):
            raise InputError("ModelContract.observed must hold ObservedSite(...) entries.")
        object.__setattr__(self, "observed", observed)
        local = {}
        for plate, sites in dict(self.local).items():
            if plate not in ("cells", "spots"):
                raise InputError(f"ModelContract.local: plate must be 'cells' or 'spots', got {plate!r}.")
            local[plate] = _names(sites, f"local['{plate}']")
        object.__setattr__(self, "local", MappingProxyType(local))
        for what in ("global_sites", "deterministic", "em_parameters", "graph_em_parameters", "graph_sites", "noncentred"):
            object.__setattr__(self, what, _names(getattr(self, what), what))
        dims = {str(site): _names(d, f"dims['{site}']") for site, d in dict(self.dims).items()}
        object.__setattr__(self, "dims", MappingProxyType(dims))
        names = [o.name for o in observed]
        latent = [s for sites in local.values() for s in sites] + list(self.global_sites)
        both = sorted(set(names) & set(latent))
        if both or len(set(names)) != len(names):
            raise InputError(f"ModelContract: observed sites must be distinct and not latent (got {names}, latent {latent}).")

    # ------------------------------------------------------------------------------------
    @property
    def observed_names(self) -> tuple[str, ...]:
        """Names of the observed sites, in declaration order."""
        return tuple(o.name for o in self.observed)

    @property
    def latent_sites(self) -> tuple[str, ...]:
        """Every declared latent site (local, then global)."""
        return tuple(s for sites in self.local.values() for s in sites) + self.global_sites

    def observed_site(self, name: str) -> ObservedSite:
        """The declaration of observed site ``name``."""
        for o in self.observed:
            if o.name == name:
                return o
        raise InputError(f"'{name}' is not an observed site of this model (declared: {list(self.observed_names)}).")


def contract_of(model: Any) -> ModelContract | None:
    """The model's :class:`ModelContract` (its ``contract`` attribute), or None."""
    contract = getattr(model, "contract", None)
    if contract is not None and not isinstance(contract, ModelContract):
        raise InputError(
            f"{type(model).__name__}.contract must be a pyrospatial.protocols.ModelContract, got {type(contract).__name__}."
        )
    return contract


def require_contract(model: Any, purpose: str) -> ModelContract:
    """The model's contract; an :class:`InputError` naming the fix when it has none."""
    contract = contract_of(model)
    if contract is None:
        raise InputError(
            f"{purpose} needs the model to declare its sites: give {type(model).__name__} a class attribute "
            "`contract = pyrospatial.protocols.ModelContract(observed=(ObservedSite(name, plate, dims), ...), ...)` "
            "naming at least its observed sites."
        )
    return contract
