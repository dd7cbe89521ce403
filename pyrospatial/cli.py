"""Command line: ``pyrospatial demo`` and ``pyrospatial fit``."""

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

    from pyrospatial.coral import CORAL
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
    coral.sample(args.num_samples, seed=args.seed)
    cells_out, spots_out = coral.export(n_domains=args.n_domains, seed=args.seed)
    cells_out.write_h5ad(out / "cells.h5ad")
    spots_out.write_h5ad(out / "spots.h5ad")
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
    fit.add_argument("--n-domains", type=int, default=None)
    fit.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--no-progress", action="store_true")
    fit.add_argument("--out", required=True)
    fit.set_defaults(func=_fit)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PyrospatialError as error:  # a clear message, not a traceback
        print(f"pyrospatial {args.command}: {type(error).__name__}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
