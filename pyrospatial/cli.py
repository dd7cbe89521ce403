"""Command line: ``pyrospatial demo | fit | check | deconvolve | align`` (``pyrospatial -h``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pyrospatial.errors import PyrospatialError


def _demo(args: argparse.Namespace) -> int:
    from pyrospatial.demo import run_demo

    metrics = run_demo(args.out, quick=args.quick, device=args.device, seed=args.seed, progress=not args.no_progress)
    print(json.dumps(metrics, indent=2))
    print(f"results, figures and report.md written to {args.out}")
    return 0


def _fit(args: argparse.Namespace) -> int:
    import anndata as ad

    from pyrospatial.methods.coral import CORAL
    from pyrospatial.plotting import plot_domains, plot_elbo, plot_interactions

    out = Path(args.out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    cells = ad.read_h5ad(args.cells)
    spots = ad.read_h5ad(args.spots)
    coral = CORAL(
        cells, spots, cell_type_key=args.cell_type_key, spot_diameter=args.spot_diameter,
        assignment=args.assignment, protein_layer=args.protein_layer, spot_layer=args.spot_layer,
        model_kwargs={"capture_sd": args.capture_sd} if args.capture_sd else None,
    )
    result = coral.train(max_epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device=args.device,
                         seed=args.seed, progress=not args.no_progress)
    coral.sample(args.num_samples, seed=args.seed, method=args.posterior, progress=not args.no_progress)
    cells_out, spots_out = coral.export(n_domains=args.n_domains, seed=args.seed)
    cells_out.write_h5ad(out / "cells.h5ad")
    spots_out.write_h5ad(out / "spots.h5ad")
    _write_inference_data(coral, out, args.seed)  # for `pyrospatial check --results OUT`
    plot_elbo(result.elbo_history, out / "figures" / "elbo.png")
    plot_interactions(cells_out.uns["pyrospatial"]["interactions"], out / "figures" / "interactions.png")
    if args.n_domains:
        plot_domains(cells_out.obsm["spatial"], cells_out.obs["domain"].to_numpy(),
                     cells_out.obs["domain_confidence"].to_numpy(), out / "figures" / "domains.png")
    print(f"{coral.dataset}\nresults written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyrospatial", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="CORAL on a simulated tissue with known truth")
    demo.add_argument("--out", default="results/demo", help="output folder")
    demo.add_argument("--quick", action="store_true", help="a small tissue (< 2 min on 2 CPU cores)")
    demo.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)

    fit = sub.add_parser("fit", help="CORAL on your cells (proteins) and spots (RNA counts) h5ad files")
    fit.add_argument("--cells", required=True, help="cells .h5ad: features in X, obs[cell-type-key], obsm['spatial']")
    fit.add_argument("--spots", required=True, help="spots .h5ad: raw counts in X, obsm['spatial']")
    fit.add_argument("--cell-type-key", required=True)
    fit.add_argument("--spot-diameter", type=float, default=None, help="in the coordinate unit (e.g. 55 for Visium in µm)")
    fit.add_argument("--assignment", default="radius", choices=["radius", "nearest"])
    fit.add_argument("--protein-layer", default=None)
    fit.add_argument("--spot-layer", default=None)
    fit.add_argument("--capture-sd", type=float, default=None, help="per-spot capture efficiency prior sd (real data)")
    fit.add_argument("--epochs", type=int, default=300)
    fit.add_argument("--batch-size", type=int, default=32, help="spots per minibatch")
    fit.add_argument("--lr", type=float, default=1e-2)
    fit.add_argument("--num-samples", type=int, default=100)
    fit.add_argument("--posterior", default="refine", choices=["refine", "guide"],
                     help="refine: HMC from the trained guide (calibrated, default); guide: the guide's draws (fast)")
    fit.add_argument("--n-domains", type=int, default=None)
    fit.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--no-progress", action="store_true")
    fit.add_argument("--out", required=True)
    fit.set_defaults(func=_fit)
    _add_deconvolve_parser(sub)
    _add_align_parser(sub)
    _add_check_parser(sub)
    return parser


def _deconvolve(args: argparse.Namespace) -> int:
    import anndata as ad

    from pyrospatial.methods.deconvolution import deconvolve
    from pyrospatial.methods.deconvolution_report import write_report

    spots = ad.read_h5ad(args.spots)
    reference = ad.read_h5ad(args.reference)
    result = deconvolve(
        spots, reference, args.cell_type_key, cells_per_spot=args.cells_per_spot, layer=args.spot_layer,
        reference_layer=args.reference_layer, min_cells_per_type=args.min_cells_per_type,
        smoothness=args.smoothness, max_steps=args.steps, lr=args.lr, batch_size=args.batch_size,
        num_samples=args.num_samples, return_expression=args.expression, seed=args.seed, device=args.device,
        progress=not args.no_progress,
    )
    summary = write_report(result, args.out, spots_path=args.spots, reference_path=args.reference)
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}, indent=2))
    print(f"result.h5ad, figures and report.md written to {args.out}")
    return 0


def _add_deconvolve_parser(sub) -> None:
    dec = sub.add_parser("deconvolve", help="cell-type abundances of spots from a labelled single-cell reference")
    dec.add_argument("--spots", required=True, help="spots .h5ad: raw counts in X, optional obsm['spatial']")
    dec.add_argument("--reference", required=True, help="reference .h5ad: raw counts in X, obs[cell-type-key]")
    dec.add_argument("--cell-type-key", required=True)
    dec.add_argument("--out", required=True, help="output folder")
    dec.add_argument("--cells-per-spot", type=float, default=None,
                     help="expected cells per spot (default: estimated from library sizes)")
    dec.add_argument("--spot-layer", default=None)
    dec.add_argument("--reference-layer", default=None)
    dec.add_argument("--min-cells-per-type", type=int, default=5)
    dec.add_argument("--smoothness", type=float, default=0.0, help="spatial smoothness weight (0: off)")
    dec.add_argument("--steps", type=int, default=250, help="SVI steps (default chosen by held-out-gene prediction, see deconvolve)")
    dec.add_argument("--lr", type=float, default=0.02)
    dec.add_argument("--batch-size", type=int, default=None, help="spots per minibatch (default: all)")
    dec.add_argument("--num-samples", type=int, default=300)
    dec.add_argument("--expression", action="store_true", help="also export per-spot per-type expression")
    dec.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    dec.add_argument("--seed", type=int, default=0)
    dec.add_argument("--no-progress", action="store_true")
    dec.set_defaults(func=_deconvolve)


# ------------------------------------------------------------------------------------------
# pyrospatial align A.h5ad B.h5ad --out DIR
# ------------------------------------------------------------------------------------------
def _align(args: argparse.Namespace) -> int:
    import anndata as ad

    from pyrospatial.methods.alignment import align
    from pyrospatial.methods.alignment_plots import plot_alignment

    out = Path(args.out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    a, b = ad.read_h5ad(args.a), ad.read_h5ad(args.b)
    init = None
    if args.init_angle is not None:
        init = {"angle": args.init_angle, "translation": tuple(args.init_translation or (0.0, 0.0))}
    res = align(
        a, b, spatial_key=args.spatial_key, features=args.features, layer_a=args.layer_a, layer_b=args.layer_b,
        n_components=args.n_components, label_keys=args.label_key, scale=args.scale, init=init, k=args.k,
        radius=args.radius, rho=args.rho, lam=args.lam, steps=args.steps, lr=args.lr, num_samples=args.num_samples,
        seed=args.seed, device=args.device, progress=not args.no_progress,
    )
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
    print(f"aligned_a.h5ad, alignment.json and figures written to {out}")
    return 0


def _add_align_parser(sub) -> None:
    p = sub.add_parser("align", help="align slice/modality A onto B: match probabilities, transform posterior")
    p.add_argument("a", help="A.h5ad: features in X, obsm['spatial'] (its cells are matched and moved)")
    p.add_argument("b", help="B.h5ad: features in X, obsm['spatial'] (the target frame)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--spatial-key", default="spatial")
    p.add_argument("--features", default="auto", choices=["auto", "shared", "separate"])
    p.add_argument("--layer-a", default=None)
    p.add_argument("--layer-b", default=None)
    p.add_argument("--n-components", type=int, default=20)
    p.add_argument("--label-key", action="append", default=None, help="b.obs column to transfer (repeatable)")
    p.add_argument("--scale", action="store_true", help="also infer an isotropic scale")
    p.add_argument("--init-angle", type=float, default=None, help="radians; skips the automatic pre-registration")
    p.add_argument("--init-translation", type=float, nargs=2, default=None)
    p.add_argument("--k", type=int, default=12, help="candidate partners per cell")
    p.add_argument("--radius", type=float, default=3.0, help="candidate radius in units of B's cell spacing")
    p.add_argument("--rho", type=float, default=0.1, help="prior probability of no partner")
    p.add_argument("--lam", type=float, default=10.0, help="strength of the soft one-to-one constraint")
    p.add_argument("--steps", type=int, default=60, help="SVI steps for q(transform) (the noise parameters have closed-form updates)")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--num-samples", type=int, default=50)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_align)


# ------------------------------------------------------------------------------------------
# pyrospatial check --results DIR  (posterior predictive checks of a demo / fit output)
# ------------------------------------------------------------------------------------------
def _write_inference_data(coral, out: Path, seed: int) -> None:
    """``out/inference_data.nc`` under the fit's posterior draws (see pyrospatial.criticism)."""
    from pyrospatial.criticism.arviz import to_inference_data
    from pyrospatial.engine.posterior import PosteriorSamples

    post = coral.posterior
    to_inference_data(coral, coral.dataset, post.num_samples, samples=PosteriorSamples(post.samples, plates=post.plates),
                      method=post.method, seed=seed, prior_sites=("rna_weight",), mixed_sites=("z",),
                      path=out / "inference_data.nc")


def _check(args: argparse.Namespace) -> int:
    from pyrospatial.criticism.report import check_results

    result = check_results(args.results, out=args.out, n_features=args.n_features, alpha=args.alpha)
    print(json.dumps(result, indent=2, default=float))
    print(f"check.md, ppc_summary.csv and figures written to {args.out or args.results}")
    return 0


def _add_check_parser(sub) -> None:
    p = sub.add_parser("check", help="posterior predictive checks of a demo/fit output folder (inference_data.nc)")
    p.add_argument("--results", required=True, help="folder written by `pyrospatial demo` or `pyrospatial fit`")
    p.add_argument("--out", default=None, help="where to write check.md and figures/ (default: --results)")
    p.add_argument("--n-features", type=int, default=3, help="genes/proteins shown in the PPC plots")
    p.add_argument("--alpha", type=float, default=0.05, help="two-sided level of an extreme p-value")
    p.set_defaults(func=_check)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PyrospatialError as error:  # a clear message, not a traceback
        print(f"pyrospatial {args.command}: {type(error).__name__}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
