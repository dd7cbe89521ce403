"""Command line: one command per method, ``pyrospatial coral | deconvolve | align | map``, plus
``demo`` and ``check`` (``pyrospatial -h``; ``pyrospatial COMMAND -h`` shows every default).

Every method command (and ``demo``) takes the same shared options: ``--device
{auto,cpu,cuda}`` (default ``auto``), ``--seed``, ``--out``, ``--max-epochs``,
``--progress/--no-progress`` and ``--threads N`` (torch's CPU threads, set before any work:
:func:`pyrospatial.engine.device.set_num_threads`). ``fit`` is an alias of ``coral``. Earlier spellings of the
training budget still work, hidden from the help: ``--epochs`` (``coral``/``fit``) and
``--steps`` (``deconvolve``, ``align``).

Heavy imports (torch, anndata, the methods) happen inside the command functions, so building
the parser imports nothing beyond the standard library and :mod:`pyrospatial.errors`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from pyrospatial.cli_checkpoints import add_checkpoint_options, checkpoint_kwargs, posterior_checkpoint_kwargs
from pyrospatial.errors import InputError, PyrospatialError

#: choices of ``--device`` (``auto``: a GPU when torch sees one, else the CPU)
DEVICES = ("auto", "cpu", "cuda")
#: choices of the input-format options (``auto``: detected from the path by pyrospatial.io.detect_format)
INPUT_FORMATS = ("auto", "visium", "xenium", "cosmx", "merscope", "10x_h5", "spatialdata", "h5ad")
#: input dest -> its format option's dest, for every command that reads data
INPUT_OPTIONS = {"cells": "cells_format", "spots": "spots_format", "reference": "reference_format",
                 "a": "a_format", "b": "b_format", "atlas": "atlas_format"}


def check_inputs(args: argparse.Namespace) -> None:
    """Every input path of the command exists: checked before any heavy import, so a typo
    fails in well under a second. Raises :class:`~pyrospatial.errors.InputError` naming the option."""
    for dest in INPUT_OPTIONS:
        value = getattr(args, dest, None)
        if value is not None and not Path(value).expanduser().exists():
            option = dest if dest in ("a", "b") else f"--{dest}"
            raise InputError(f"{option} {value!r} does not exist: pass an .h5ad file, a 10x .h5 file or a "
                             "platform's output folder (Space Ranger outs/, Xenium, CosMx, MERSCOPE, SpatialData .zarr).")


def sniff_h5ad_inputs(args: argparse.Namespace) -> None:
    """Inputs given as ``.h5ad`` (by suffix or ``--<dest>-format h5ad``) look like h5ad files:
    not empty, HDF5, not a 10x matrix (:func:`pyrospatial.input_files.sniff_h5ad`)."""
    from pyrospatial.input_files import sniff_h5ad

    for dest, format_dest in INPUT_OPTIONS.items():
        value = getattr(args, dest, None)
        if value is not None and (str(value).lower().endswith(".h5ad") or getattr(args, format_dest, None) == "h5ad"):
            sniff_h5ad(value, dest if dest in ("a", "b") else f"--{dest}")


def read_input(args: argparse.Namespace, dest: str):
    """The AnnData of input ``dest`` read with :func:`pyrospatial.io.read` in its ``--<dest>-format``
    (``auto``: detected from the path; ``.h5ad`` files are read as written)."""
    from pyrospatial.io import read

    return read(getattr(args, dest), format=getattr(args, INPUT_OPTIONS[dest], "auto"))


def read_spot_diameter(spots) -> float | None:
    """The spot diameter in microns recorded by :func:`pyrospatial.io.read_visium` (its
    ``uns['spatial']`` scale factors), else None (an h5ad's scale factors may be in pixels)."""
    record = spots.uns.get("pyrospatial_io", {})
    if not isinstance(record, dict) or str(record.get("platform")) != "visium":
        return None
    for library in dict(spots.uns.get("spatial", {})).values():
        diameter = dict(library.get("scalefactors", {})).get("spot_diameter_fullres")
        if diameter:
            return float(diameter)
    return None


def add_format_option(p: argparse.ArgumentParser, dest: str, what: str) -> None:
    """``--<dest>-format``: the platform of input ``dest`` (default ``auto``)."""
    p.add_argument(f"--{dest}-format", dest=INPUT_OPTIONS[dest], default="auto", choices=INPUT_FORMATS,
                   help=f"format of {what} (auto: detected from the path; see pyrospatial.io.read)")


#: the options every method command shares (dest names in the parsed namespace)
SHARED_OPTIONS = ("device", "seed", "out", "max_epochs", "progress", "threads")
#: what ``pyrospatial -h`` says above the commands
DESCRIPTION = """Probabilistic spatial multi-omics on Pyro: one command per method (coral, deconvolve,
align, domains), a demo, and posterior predictive checks (check).

Shared options of every method command (and demo): --device {auto,cpu,cuda} (default auto),
--seed, --out, --max-epochs, --progress/--no-progress, --threads N (torch CPU threads).
`pyrospatial COMMAND -h` shows every
default."""


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except a required option's (it has none)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required:
            return action.help
        return super()._get_help_string(action)


#: how each command's help is formatted: defaults shown
FORMATTER = DefaultsFormatter


def shared_options(
    *,
    max_epochs: int | None,
    max_epochs_help: str,
    out_default: str | None = None,
    hidden_spellings: tuple[str, ...] = (),
) -> argparse.ArgumentParser:
    """The parent parser of the shared options, for one command.

    Parameters
    ----------
    max_epochs, max_epochs_help
        Default and help of ``--max-epochs`` (what one epoch is depends on the method).
    out_default
        Default of ``--out``; None makes it required.
    hidden_spellings
        Earlier spellings of ``--max-epochs`` (e.g. ``"--epochs"``): accepted, not shown in
        the help, and stored in ``max_epochs``.

    A new parent per command, on purpose: argparse shares a parent's argument objects with
    every child, so one child's own default (``--max-epochs`` differs by method) would
    otherwise change the others'.
    """
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("shared options (every method command)")
    group.add_argument("--device", default="auto", choices=DEVICES,
                       help="where to train: auto (a GPU when torch sees one, else the CPU), cpu or cuda")
    group.add_argument("--seed", type=int, default=0, help="seed of the fit and of the posterior draws")
    group.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (None: OMP_NUM_THREADS when set, else 1 on a machine with <= 2 cores "
                            "or a loaded one, else min(4, cores); see docs/scaling.md)")
    group.add_argument("--out", default=out_default, required=out_default is None, help="output folder")
    group.add_argument("--max-epochs", type=int, default=max_epochs, help=max_epochs_help)
    group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                       help="show progress bars")
    group.add_argument("--overwrite", action="store_true",
                       help="replace a non-empty --out folder (only once the new results are complete)")
    group.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    for spelling in hidden_spellings:
        group.add_argument(spelling, dest="max_epochs", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parent


def apply_threads(args: argparse.Namespace) -> None:
    """Set torch's CPU threads from ``--threads`` before any work
    (:func:`pyrospatial.engine.device.set_num_threads`) and record the number used in
    ``args.threads`` (so ``run.json`` holds it); commands without the option are left alone."""
    if "threads" not in vars(args):
        return
    from pyrospatial.engine.device import set_num_threads

    args.threads = set_num_threads(args.threads)


# ------------------------------------------------------------------------------------------
# output folders: written beside --out, renamed at the end, run.json last (pyrospatial.outputs)
# ------------------------------------------------------------------------------------------
def _run_settings(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("func", "argv")}


def _into_output_folder(body):
    """Wrap ``body(args, out)`` so that it writes into a temporary folder beside ``--out``, renamed
    to ``--out`` with ``run.json`` once complete (:func:`pyrospatial.outputs.output_folder`);
    ``--skip-geometry-checks`` turns the statistical geometry checks off around it."""

    def command(args: argparse.Namespace) -> int:
        import contextlib

        from pyrospatial.data.geometry_checks import skip_geometry_checks
        from pyrospatial.outputs import output_folder

        checks = skip_geometry_checks() if getattr(args, "skip_geometry_checks", False) else contextlib.nullcontext()
        with checks, output_folder(args.out, command=args.command, settings=_run_settings(args),
                                   overwrite=getattr(args, "overwrite", False), argv=getattr(args, "argv", None)) as staging:
            return body(args, staging)

    command.__name__ = body.__name__.removesuffix("_into")
    command.__doc__ = body.__doc__
    return command


def add_skip_geometry_option(p: argparse.ArgumentParser) -> None:
    """``--skip-geometry-checks``: the override of :mod:`pyrospatial.data.geometry_checks`."""
    p.add_argument("--skip-geometry-checks", action="store_true",
                   help="skip the statistical checks that catch unit mismatches (pixels vs microns) and spot "
                        "layouts that lose cells; only for the rare real case they reject")


# ------------------------------------------------------------------------------------------
# pyrospatial demo --out DIR
# ------------------------------------------------------------------------------------------
def _demo_into(args: argparse.Namespace, out: Path) -> int:
    from dataclasses import replace

    from pyrospatial.demo import DemoConfig, run_demo

    config = DemoConfig.quick() if args.quick else DemoConfig()
    if args.max_epochs is not None:
        config = replace(config, max_epochs=args.max_epochs)
    metrics = run_demo(out, quick=args.quick, device=args.device, seed=args.seed, config=config,
                       progress=args.progress, full_netcdf=args.full_netcdf)
    print(json.dumps(metrics, indent=2))
    print(f"results, figures and report.md written to {args.out}")
    return 0


#: the command: ``_demo_into`` run into a temporary folder renamed to ``--out`` at the end
_demo = _into_output_folder(_demo_into)


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    parent = shared_options(max_epochs=None, out_default="results/demo",
                            max_epochs_help="training epochs (None: 300, or 150 with --quick)")
    p = sub.add_parser("demo", parents=[parent], formatter_class=FORMATTER,
                       help="CORAL on a simulated tissue with known truth",
                       description="CORAL on a simulated tissue with known truth: results, figures and report.md.")
    p.add_argument("--quick", action="store_true", help="a small tissue (< 2 min on 2 CPU cores)")
    add_full_netcdf_option(p)
    p.set_defaults(func=_demo)


# ------------------------------------------------------------------------------------------
# pyrospatial coral --cells C.h5ad --spots S.h5ad --cell-type-key KEY --out DIR   (alias: fit)
# ------------------------------------------------------------------------------------------
def refuse_own_outputs(args: argparse.Namespace, cells, spots) -> None:
    """``coral``/``fit`` inputs that are outputs of pyrospatial
    (:func:`pyrospatial.engine.export.output_markers`): an :class:`InputError` for the cells
    (an output's ``X`` holds RNA estimates, not protein features), a warning for the spots (their
    ``X`` still holds the counts), each naming the file and what to pass instead."""
    import warnings

    from pyrospatial.engine.export import output_markers

    given = Path(args.cells).expanduser()
    inputs = given.parent / "inputs"
    if (inputs / "cells.h5ad").is_file():
        instead = f"pass the inputs of that run: --cells {inputs / 'cells.h5ad'} --spots {inputs / 'spots.h5ad'}"
    else:
        instead = ("pass the files that run read (`pyrospatial demo` writes its simulated inputs to "
                   "DIR/inputs/cells.h5ad and DIR/inputs/spots.h5ad)")
    markers = output_markers(cells)
    if markers:
        raise InputError(
            f"--cells {args.cells!r} looks like an output of pyrospatial ({', '.join(markers)}): its X holds "
            f"estimated RNA, not the cells' protein features; {instead}.")
    markers = output_markers(spots)
    if markers:
        warnings.warn(
            f"--spots {args.spots!r} looks like an output of pyrospatial ({', '.join(markers)}); its X (the counts) "
            f"is used and its other keys are ignored; {instead.replace('inputs of that run', 'original inputs')}.",
            UserWarning, stacklevel=2)


def _coral_into(args: argparse.Namespace, out: Path) -> int:
    from pyrospatial.methods.coral import CORAL
    from pyrospatial.plotting import plot_domains, plot_elbo, plot_interactions

    (out / "figures").mkdir(parents=True, exist_ok=True)
    cells = read_input(args, "cells")
    spots = read_input(args, "spots")
    refuse_own_outputs(args, cells, spots)
    coral = CORAL(
        cells, spots, cell_type_key=args.cell_type_key, spot_diameter=args.spot_diameter or read_spot_diameter(spots),
        assignment=args.assignment, protein_layer=args.protein_layer, spot_layer=args.spot_layer,
        model_kwargs={"capture_sd": args.capture_sd} if args.capture_sd else None,
    )
    result = coral.train(max_epochs=args.max_epochs, batch_size=args.batch_size, lr=args.lr, device=args.device,
                         seed=args.seed, progress=args.progress, **checkpoint_kwargs(args))
    coral.sample(args.num_samples, seed=args.seed, method=args.posterior, progress=args.progress,
                 **posterior_checkpoint_kwargs(args))
    cells_out, spots_out = coral.export(n_domains=args.n_domains, seed=args.seed)
    cells_out.write_h5ad(out / "cells.h5ad")
    spots_out.write_h5ad(out / "spots.h5ad")
    _write_inference_data(coral, out, args.seed, full=args.full_netcdf)  # for `pyrospatial check --results OUT`
    plot_elbo(result.elbo_history, out / "figures" / "elbo.png")
    plot_interactions(cells_out.uns["pyrospatial"]["interactions"], out / "figures" / "interactions.png")
    if args.n_domains:
        plot_domains(cells_out.obsm["spatial"], cells_out.obs["domain"].to_numpy(),
                     cells_out.obs["domain_confidence"].to_numpy(), out / "figures" / "domains.png")
    print(f"{coral.dataset}\nresults written to {args.out}")
    return 0


#: the command: ``_coral_into`` run into a temporary folder renamed to ``--out`` at the end
_coral = _into_output_folder(_coral_into)


def _add_coral_parser(sub: argparse._SubParsersAction, name: str, help: str) -> None:
    parent = shared_options(max_epochs=300, max_epochs_help="training epochs (passes over the spots)",
                            hidden_spellings=("--epochs",))
    p = sub.add_parser(name, parents=[parent], formatter_class=FORMATTER, help=help,
                       description="CORAL on your cells (proteins) and spots (RNA counts): per-cell expression, "
                                   "spot-consistent counts, interactions and domains, each with its uncertainty.")
    p.add_argument("--cells", required=True, help="cells .h5ad: features in X, obs[cell-type-key], obsm['spatial']")
    p.add_argument("--spots", required=True, help="spots .h5ad: raw counts in X, obsm['spatial']")
    add_format_option(p, "cells", "--cells")
    add_format_option(p, "spots", "--spots")
    p.add_argument("--cell-type-key", required=True, help="column of the cells' obs with the cell types")
    p.add_argument("--spot-diameter", type=float, default=None,
                   help="in the coordinate unit (e.g. 55 for Visium in µm; None: the Visium reader's, "
                        "read from a Space Ranger folder)")
    p.add_argument("--assignment", default="radius", choices=["radius", "nearest"],
                   help="how cells are assigned to spots")
    p.add_argument("--protein-layer", default=None, help="layer of the cells with the features (None: X)")
    p.add_argument("--spot-layer", default=None, help="layer of the spots with the counts (None: X)")
    p.add_argument("--capture-sd", type=float, default=None,
                   help="per-spot capture efficiency prior sd (real data, e.g. 0.2; None: no capture latent)")
    p.add_argument("--batch-size", type=int, default=32, help="spots per minibatch")
    p.add_argument("--lr", type=float, default=1e-2, help="learning rate")
    p.add_argument("--num-samples", type=int, default=100, help="posterior draws")
    p.add_argument("--posterior", default="local", choices=["local", "hmc", "refine", "guide"],
                   help="local: HMC per spot from the trained guide, globals sampled in turn (calibrated, linear "
                        "in cells); hmc (alias refine): one HMC over the whole tissue, for audits; guide: the "
                        "guide's draws (fast, intervals too narrow)")
    p.add_argument("--n-domains", type=int, default=None, help="spatial domains to find (None: none)")
    add_full_netcdf_option(p)
    add_skip_geometry_option(p)
    add_checkpoint_options(p)
    p.set_defaults(func=_coral)


# ------------------------------------------------------------------------------------------
# pyrospatial deconvolve --spots S.h5ad --reference R.h5ad --cell-type-key KEY --out DIR
# ------------------------------------------------------------------------------------------
def deconvolve_steps(max_epochs: int, n_spots: int, batch_size: int | None) -> int:
    """SVI steps of ``max_epochs`` passes over ``n_spots`` spots in minibatches of
    ``batch_size`` (None: all spots, one step per epoch)."""
    per_epoch = 1 if batch_size is None else math.ceil(n_spots / max(int(batch_size), 1))
    return int(max_epochs) * max(per_epoch, 1)


def _deconvolve_into(args: argparse.Namespace, out: Path) -> int:
    from pyrospatial.methods.deconvolution import deconvolve
    from pyrospatial.methods.deconvolution_report import write_report

    spots = read_input(args, "spots")
    reference = read_input(args, "reference")
    # --steps (the earlier spelling) counts SVI steps exactly as before; --max-epochs counts passes
    steps = args.steps if args.steps is not None else deconvolve_steps(args.max_epochs, spots.n_obs, args.batch_size)
    result = deconvolve(
        spots, reference, args.cell_type_key, cells_per_spot=args.cells_per_spot, layer=args.spot_layer,
        reference_layer=args.reference_layer, min_cells_per_type=args.min_cells_per_type,
        smoothness=args.smoothness, max_steps=steps, lr=args.lr, batch_size=args.batch_size,
        num_samples=args.num_samples, return_expression=args.expression, seed=args.seed, device=args.device,
        model=args.model, n_states=args.n_states, progress=args.progress, **checkpoint_kwargs(args),
    )
    summary = write_report(result, out, spots_path=args.spots, reference_path=args.reference)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=2))
    print(f"result.h5ad, figures and report.md written to {args.out}")
    return 0


#: the command: ``_deconvolve_into`` run into a temporary folder renamed to ``--out`` at the end
_deconvolve = _into_output_folder(_deconvolve_into)


def _add_deconvolve_parser(sub: argparse._SubParsersAction) -> None:
    parent = shared_options(
        max_epochs=250,
        max_epochs_help="passes over the spots, one SVI step each with the full batch (the default); 250 was "
                        "chosen by held-out-gene prediction (see pyrospatial.deconvolve)",
    )
    p = sub.add_parser("deconvolve", parents=[parent], formatter_class=FORMATTER,
                       help="cell-type abundances of spots from a labelled single-cell reference",
                       description="Cell-type abundances and proportions of every spot, with their uncertainty, "
                                   "from a labelled single-cell reference.")
    p.add_argument("--spots", required=True, help="spots .h5ad: raw counts in X, optional obsm['spatial']")
    p.add_argument("--reference", required=True, help="reference .h5ad: raw counts in X, obs[cell-type-key]")
    add_format_option(p, "spots", "--spots")
    add_format_option(p, "reference", "--reference")
    p.add_argument("--cell-type-key", required=True, help="column of the reference's obs with the cell types")
    p.add_argument("--cells-per-spot", type=float, default=None,
                   help="expected cells per spot (None: estimated from library sizes)")
    p.add_argument("--spot-layer", default=None, help="layer of the spots with the counts (None: X)")
    p.add_argument("--reference-layer", default=None, help="layer of the reference with the counts (None: X)")
    p.add_argument("--min-cells-per-type", type=int, default=5, help="reference types with fewer cells are an error")
    p.add_argument("--smoothness", type=float, default=0.0, help="spatial smoothness weight (0: off)")
    # the earlier spelling: exactly that many SVI steps, whatever the batch size
    p.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--lr", type=float, default=0.02, help="learning rate")
    p.add_argument("--batch-size", type=int, default=None, help="spots per minibatch (None: all)")
    p.add_argument("--num-samples", type=int, default=300, help="posterior draws")
    p.add_argument("--expression", action="store_true", help="also export per-spot per-type expression")
    p.add_argument("--model", choices=("signatures", "states"), default="states",
                   help="a continuous state per spot and type (default; obsm type_state_*), or fixed signatures")
    p.add_argument("--n-states", type=int, default=3, help="dimension of each type's state (--model states)")
    add_checkpoint_options(p)
    p.set_defaults(func=_deconvolve)


# ------------------------------------------------------------------------------------------
# pyrospatial align A.h5ad B.h5ad --out DIR
# ------------------------------------------------------------------------------------------
def _align_into(args: argparse.Namespace, out: Path) -> int:
    from pyrospatial.methods.alignment import align
    from pyrospatial.methods.alignment_plots import plot_alignment

    a, b = read_input(args, "a"), read_input(args, "b")
    init = None
    if args.init_angle is not None:
        init = {"angle": args.init_angle, "translation": tuple(args.init_translation or (0.0, 0.0))}
    res = align(
        a, b, spatial_key=args.spatial_key, features=args.features, layer_a=args.layer_a, layer_b=args.layer_b,
        n_components=args.n_components, label_keys=args.label_key, scale=args.scale, init=init, k=args.k,
        radius=args.radius, rho=args.rho, lam=args.lam, steps=args.max_epochs, lr=args.lr,
        num_samples=args.num_samples, seed=args.seed, device=args.device, progress=args.progress,
        **checkpoint_kwargs(args),
    )
    (out / "figures").mkdir(parents=True, exist_ok=True)
    res.adata.write_h5ad(out / "aligned_a.h5ad")
    figures = plot_alignment(res, a, b, out / "figures", spatial_key=args.spatial_key)
    summary = {
        "transform": res.transform, "preregistration": {k: (v.tolist() if hasattr(v, "tolist") else v)
                                                        for k, v in res.preregistration.items()},
        "mean_p_unmatched": float(res.p_unmatched.mean()), "mean_best_match_prob":
        float(res.adata.obs["align_best_match_prob"].mean()), "figures": figures,
        "settings": {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in res.settings.items()},
    }
    (out / "alignment.json").write_text(json.dumps(summary, indent=2, default=float))
    print(json.dumps(summary["transform"]["angle_deg"], indent=2))
    print(f"aligned_a.h5ad, alignment.json and figures written to {args.out}")
    return 0


#: the command: ``_align_into`` run into a temporary folder renamed to ``--out`` at the end
_align = _into_output_folder(_align_into)


def _add_align_parser(sub: argparse._SubParsersAction) -> None:
    parent = shared_options(
        max_epochs=60, hidden_spellings=("--steps",),
        max_epochs_help="SVI steps for q(transform), each over all cells (the noise parameters have closed-form "
                        "updates)",
    )
    p = sub.add_parser("align", parents=[parent], formatter_class=FORMATTER,
                       help="align slice/modality A onto B: match probabilities, transform posterior",
                       description="Align slice/modality A onto B: match probabilities, a posterior over the "
                                   "transform, and label transfer.")
    p.add_argument("a", help="A.h5ad: features in X, obsm['spatial'] (its cells are matched and moved)")
    p.add_argument("b", help="B.h5ad: features in X, obsm['spatial'] (the target frame)")
    add_format_option(p, "a", "A")
    add_format_option(p, "b", "B")
    p.add_argument("--spatial-key", default="spatial", help="obsm key of the coordinates")
    p.add_argument("--features", default="auto", choices=["auto", "shared", "separate"],
                   help="shared: one joint PCA of the shared features; separate: one PCA per panel and learned "
                        "encoders; auto: shared when >= 2 features are shared")
    p.add_argument("--layer-a", default=None, help="layer of A with the features (None: X)")
    p.add_argument("--layer-b", default=None, help="layer of B with the features (None: X)")
    p.add_argument("--n-components", type=int, default=20, help="principal components per modality (the embedding)")
    p.add_argument("--label-key", action="append", default=None, help="b.obs column to transfer (repeatable)")
    p.add_argument("--scale", action="store_true", help="also infer an isotropic scale")
    p.add_argument("--init-angle", type=float, default=None, help="radians; skips the automatic pre-registration")
    p.add_argument("--init-translation", type=float, nargs=2, default=None, help="with --init-angle: x y")
    p.add_argument("--k", type=int, default=12, help="candidate partners per cell")
    p.add_argument("--radius", type=float, default=3.0, help="candidate radius in units of B's cell spacing")
    p.add_argument("--rho", type=float, default=0.1, help="prior probability of no partner")
    p.add_argument("--lam", type=float, default=10.0, help="strength of the soft one-to-one constraint")
    p.add_argument("--lr", type=float, default=0.02, help="learning rate")
    p.add_argument("--num-samples", type=int, default=50, help="posterior draws of the transform")
    add_skip_geometry_option(p)
    add_checkpoint_options(p)
    p.set_defaults(func=_align)


# ------------------------------------------------------------------------------------------
# pyrospatial map --cells C.h5ad --atlas A.h5ad --out DIR
# ------------------------------------------------------------------------------------------
def _map_into(args: argparse.Namespace, out: Path) -> int:
    from pyrospatial.methods.mapping import map_cells

    cells, atlas = read_input(args, "cells"), read_input(args, "atlas")
    res = map_cells(cells, atlas, label_keys=args.label_keys, layer_cells=args.layer_cells,
                    layer_atlas=args.layer_atlas, n_components=args.n_components, k=args.k, seed=args.seed,
                    device=args.device, progress=args.progress, spatial_key=args.spatial_key, lam=args.lam,
                    em_iter=args.max_epochs, num_samples=args.num_samples)
    res.write(out)
    print(json.dumps({k: res.diagnostics[k] for k in ("temperature", "mean_entropy", "mean_radius_90")}, indent=2))
    print(f"cells_mapped.h5ad, atlas_projected.h5ad, report.md and figures written to {args.out}")
    return 0


_map = _into_output_folder(_map_into)  # run into a temporary folder renamed to --out at the end


def _add_map_parser(sub: argparse._SubParsersAction) -> None:
    parent = shared_options(max_epochs=50, max_epochs_help="EM steps per round (plan, then closed-form noise)")
    p = sub.add_parser("map", parents=[parent], formatter_class=FORMATTER,
                       help="map dissociated cells (no coordinates) onto a spatial atlas, with a posterior per cell",
                       description="Map cells without coordinates onto an atlas with coordinates by expression: a "
                                   "posterior per cell over atlas locations (mean, sd, 90% radius), atlas labels "
                                   "carried to the cells, the expected single-cell profile of every location.")
    p.add_argument("--cells", required=True, help="cells .h5ad: counts in X (no coordinates needed)")
    p.add_argument("--atlas", required=True, help="atlas .h5ad: counts in X, obsm['spatial']")
    add_format_option(p, "cells", "--cells")
    add_format_option(p, "atlas", "--atlas")
    p.add_argument("--label-keys", "--label-key", dest="label_keys", nargs="+", action="extend", default=None,
                   help="atlas.obs columns carried to the cells with their probabilities")
    p.add_argument("--layer-cells", default=None, help="layer of the cells with the counts (None: X)")
    p.add_argument("--layer-atlas", default=None, help="layer of the atlas with the counts (None: X)")
    p.add_argument("--spatial-key", default="spatial", help="obsm key of the atlas coordinates")
    p.add_argument("--n-components", type=int, default=30, help="principal components of the shared genes")
    p.add_argument("--k", type=int, default=100, help="candidate atlas locations per cell")
    p.add_argument("--lam", type=float, default=0.0, help="strength of the share-of-cells constraint (0: off)")
    p.add_argument("--num-samples", type=int, default=8, help="posterior draws of the temperature")
    p.set_defaults(func=_map)


# ------------------------------------------------------------------------------------------
# pyrospatial domains --sections S1.h5ad [S2.h5ad ...] --n-domains K --out DIR
# ------------------------------------------------------------------------------------------
def _domains_into(args: argparse.Namespace, out: Path) -> int:
    from pyrospatial.io import read
    from pyrospatial.methods.domains import domains
    from pyrospatial.methods.domains_report import write_domains_report

    sections = [read(path, format=args.sections_format) for path in args.sections]
    if args.image_features:
        from pyrospatial.image import add_image_features

        for adata in sections:
            add_image_features(adata, args.morphology_key, obs_columns=tuple(args.nucleus_key or ()))
    n_obs = sum(a.n_obs for a in sections)
    steps = deconvolve_steps(args.max_epochs, n_obs, args.batch_size)
    outs = domains(
        sections, args.n_domains, modalities=args.modalities, layer=args.layer, protein_key=args.protein_key,
        morphology_key=args.morphology_key, section_key=args.section_key, n_neighbours=args.n_neighbours,
        smoothness=args.smoothness, max_steps=steps, lr=args.lr, batch_size=args.batch_size,
        num_samples=args.num_samples, restarts=args.restarts, seed=args.seed, device=args.device,
        progress=args.progress, **checkpoint_kwargs(args),
    )
    outs = outs if isinstance(outs, list) else [outs]
    summary = write_domains_report(outs, out, names=[Path(p).name for p in args.sections])
    print(json.dumps(summary, indent=2))
    print(f"domains_*.h5ad, domains.json and figures written to {args.out}")
    return 0


#: the command: ``_domains_into`` run into a temporary folder renamed to ``--out`` at the end
_domains_command = _into_output_folder(_domains_into)


def _check_sections(args: argparse.Namespace) -> int:
    """Every ``--sections`` path exists (before any heavy import), then the command."""
    for value in args.sections:
        if not Path(value).expanduser().exists():
            raise InputError(f"--sections {value!r} does not exist: pass .h5ad files or platform output folders "
                             "(one per section).")
    return _domains_command(args)


def _add_domains_parser(sub: argparse._SubParsersAction) -> None:
    parent = shared_options(
        max_epochs=750,
        max_epochs_help="most passes over the spots (minibatches of --batch-size); stops earlier on the ELBO plateau",
    )
    p = sub.add_parser("domains", parents=[parent], formatter_class=FORMATTER,
                       help="spatial domains of one or several sections, with their probabilities",
                       description="Spatial domains from counts, proteins and morphology, over one section or "
                                   "several sections fitted jointly (labels shared), with posterior probabilities.")
    p.add_argument("--sections", nargs="+", required=True,
                   help="one input per section (.h5ad with raw counts in X and obsm['spatial'], or a platform folder)")
    p.add_argument("--sections-format", default="auto", choices=INPUT_FORMATS,
                   help="format of the sections (auto: detected from each path; see pyrospatial.io.read)")
    p.add_argument("--n-domains", type=int, required=True, help="number of domains (>= 2)")
    p.add_argument("--modalities", nargs="+", default=None, choices=["counts", "proteins", "morphology"],
                   help="modalities to model (None: counts, plus proteins/morphology when their obsm keys exist)")
    p.add_argument("--layer", default=None, help="layer with the raw counts (None: X)")
    p.add_argument("--protein-key", default="protein", help="obsm key of the proteins")
    p.add_argument("--morphology-key", default="morphology", help="obsm key of the morphology features")
    p.add_argument("--image-features", action="store_true",
                   help="compute colour/texture features of each spot from the image in uns['spatial'] into "
                        "obsm[--morphology-key] first (pyrospatial.image.add_image_features)")
    p.add_argument("--nucleus-key", action="append", default=None,
                   help="with --image-features: obs column(s) appended as features (e.g. nucleus counts)")
    p.add_argument("--section-key", default=None, help="obs column splitting one input into sections")
    p.add_argument("--n-neighbours", type=int, default=6, help="degree of the spot graph")
    p.add_argument("--smoothness", type=float, default=0.1, help="strength of the spatial prior (0: off)")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate")
    p.add_argument("--batch-size", type=int, default=1024, help="spots per spatially compact minibatch")
    p.add_argument("--num-samples", type=int, default=100, help="posterior draws (split over the restarts)")
    p.add_argument("--restarts", type=int, default=3, help="independent fits pooled into one posterior (1: one fit)")
    add_checkpoint_options(p)
    p.set_defaults(func=_check_sections)


# ------------------------------------------------------------------------------------------
# pyrospatial check --results DIR  (posterior predictive checks of a demo / coral output)
# ------------------------------------------------------------------------------------------
def _write_inference_data(coral, out: Path, seed: int, *, full: bool = False) -> None:
    """``out/inference_data.nc`` under the fit's posterior draws (:meth:`CORAL.to_inference_data`):
    compressed, with what ``check`` reads, or every variable with ``full``."""
    coral.to_inference_data(path=out / "inference_data.nc", seed=seed, full_netcdf=full)


def add_full_netcdf_option(p: argparse.ArgumentParser) -> None:
    """``--full-netcdf``: keep every posterior variable in inference_data.nc."""
    p.add_argument("--full-netcdf", action="store_true",
                   help="write every posterior variable to inference_data.nc (default: only what `pyrospatial check` "
                        "reads; the per-cell draws are summarised in cells.h5ad)")


def _check(args: argparse.Namespace) -> int:
    from pyrospatial.criticism.report import check_results

    if args.out is None:
        result = check_results(args.results, out=None, n_features=args.n_features, alpha=args.alpha)
    else:
        from pyrospatial.outputs import output_folder

        with output_folder(args.out, command="check", settings=_run_settings(args), overwrite=args.overwrite,
                           argv=getattr(args, "argv", None)) as out:
            result = check_results(args.results, out=out, n_features=args.n_features, alpha=args.alpha)
    print(json.dumps(result, indent=2, default=float))
    print(f"check.md, ppc_summary.csv and figures written to {args.out or args.results}")
    return 0


def _add_check_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", formatter_class=FORMATTER,
                       help="posterior predictive checks of a demo/coral output folder (inference_data.nc)",
                       description="Posterior predictive checks of a folder written by `pyrospatial demo` or "
                                   "`pyrospatial coral`.")
    p.add_argument("--results", required=True, help="folder written by `pyrospatial demo` or `pyrospatial coral`")
    p.add_argument("--out", default=None, help="where to write check.md and figures/ (None: --results)")
    p.add_argument("--n-features", type=int, default=3, help="genes/proteins shown in the PPC plots")
    p.add_argument("--alpha", type=float, default=0.05, help="two-sided level of an extreme p-value")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    p.set_defaults(func=_check)


# ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``pyrospatial`` parser: one sub-command per method, plus ``demo`` and ``check``."""
    parser = argparse.ArgumentParser(prog="pyrospatial", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_coral_parser(sub, "coral", help="CORAL on your cells (proteins) and spots (RNA counts) h5ad files")
    _add_coral_parser(sub, "fit", help="alias of `coral`")
    _add_deconvolve_parser(sub)
    _add_align_parser(sub)
    _add_map_parser(sub)
    _add_domains_parser(sub)
    _add_demo_parser(sub)
    _add_check_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a documented error becomes a message on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    args.argv = ["pyrospatial", *(sys.argv[1:] if argv is None else argv)]  # recorded in run.json
    try:
        check_inputs(args)
        sniff_h5ad_inputs(args)
        apply_threads(args)
        return args.func(args)
    except PyrospatialError as error:  # a clear message, not a traceback (--debug shows it)
        if getattr(args, "debug", False):
            import traceback

            traceback.print_exc()
        print(f"pyrospatial {args.command}: {type(error).__name__}: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
