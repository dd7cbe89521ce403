"""How small a budget the default per-spot HMC needs: chains, thinning and warm-up.

    OMP_NUM_THREADS=1 python benchmarks/sampler_budget.py --seeds 11 12 [--cells 3000]
        [--out benchmarks/results]

The default posterior (:func:`pyrospatial.engine.local.local_posterior`: 4 chains, 40 warm-up
iterations, thin 1, 100 draws since 2026-12-07; 10 chains with thin 3 before, chosen by this
script) costs several times the SVI fit at scale (issue 23 asks for 2x). Its cost is about
chains x (warm-up + kept states x thin) gradient evaluations of the tissue, so fewer chains and
less thinning are the direct savings, if the intervals stay calibrated. This script
fits one simulated tissue per seed (the simulator and fit of ``benchmarks/scaling.py``; seeds 11
and 12 are the tuning tissues, scored by no calibration or scaling benchmark) and samples it
with each budget below, every budget from the trained weights with its own Monte Carlo EM (as a
fresh run). Reported as ``benchmarks/block_step_sizes.py`` reports (its columns): 90% coverage
of expected RNA, its total and profile, and ``v``; split-R-hat; acceptance; CPU seconds. R-hat
over 4 chains detects less than over 10: compare the coverage first. Writes
``OUT/sampler_budget.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import command_line, write_results  # noqa: E402
from block_step_sizes import markdown as block_markdown  # noqa: E402
from block_step_sizes import run_seed  # noqa: E402

BUDGETS = {  # CORAL.sample options, every budget explicit (the default changes); 100 draws each (chains x kept states)
    "former_default": {"num_chains": 10, "thin": 3, "block_steps": False, "step_window": 4},  # before 2026-12-06's fifth session
    "chains10_thin3": {"num_chains": 10, "thin": 3},  # 10 x (40 + 10 x 3) = 700 chain iterations (default until 2026-12-07)
    "chains10_thin1": {"num_chains": 10, "thin": 1},  # 10 x 50 = 500
    "chains6_thin1": {"num_chains": 6, "thin": 1},  # 6 x (40 + 17) = 342
    "chains4_thin1": {"num_chains": 4, "thin": 1},  # 4 x (40 + 25) = 260
    "chains4_thin1_warmup20": {"num_chains": 4, "thin": 1, "num_warmup": 20},  # 4 x 45 = 180
    "chains2_thin1": {"num_chains": 2, "thin": 1},  # 2 x (40 + 50) = 180
    "chains4_thin1_steps4": {"num_chains": 4, "thin": 1, "num_steps": 4},  # 260, two thirds of the evaluations each
}


def markdown(payload: dict) -> str:
    text = block_markdown(payload)
    head, _, rest = text.partition("## Coverage")
    intro = ["# Budget of the default per-spot HMC (issue 23)", "",
             f"`{payload['command']}`. Simulated tissues of {payload['n_cells']} cells (the simulator and fit of "
             "`benchmarks/scaling.py`, tuning seeds), each fitted once and sampled with every budget from the "
             "trained weights (Monte Carlo EM in each): 100 draws, the default sampler (a step size per block, "
             "last mass update a quarter of the warm-up before its end). Budgets (chain iterations = chains x "
             "(warm-up + kept states x thin)): " + "; ".join(f"`{k}` = {v or 'the default'}"
                                                             for k, v in BUDGETS.items()) + ".", ""]
    intro += [f"Note: {note}" for note in payload.get("notes", [])] + (["", ""] if payload.get("notes") else [])
    return "\n".join(intro) + "## Coverage" + rest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[11, 12])
    parser.add_argument("--cells", type=int, default=3000)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--budgets", default=",".join(BUDGETS), help=f"comma-separated subset of {list(BUDGETS)}")
    parser.add_argument("--merge", nargs="*", default=None, metavar="JSON",
                        help="pool the budgets of earlier runs' sampler_budget.json, seed by seed (no sampling); a "
                             "budget run twice keeps its first record")
    parser.add_argument("--note", action="append", default=[], help="a sentence for the results (repeatable)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.merge:
        parts = [json.loads(Path(path).read_text()) for path in args.merge]
        by_seed: dict[int, dict] = {}
        for part in parts:
            for res in part["seeds"]:
                kept = by_seed.setdefault(res["seed"], {**res, "variants": {}})
                for name, row in res["variants"].items():
                    kept["variants"].setdefault(name, row)
        for res in by_seed.values():  # in the order of BUDGETS
            res["variants"] = {name: res["variants"][name] for name in BUDGETS if name in res["variants"]}
        payload = {**parts[0], "command": " ; ".join(part["command"] for part in parts) + " (pooled by --merge)",
                   "seeds": [by_seed[k] for k in sorted(by_seed)],
                   "notes": [n for part in parts for n in part.get("notes", [])] + args.note}
    else:
        chosen = args.budgets.split(",")
        if set(chosen) - set(BUDGETS):
            parser.error(f"--budgets: unknown {sorted(set(chosen) - set(BUDGETS))}; choose from {list(BUDGETS)}")
        seeds = [run_seed(seed, args.cells, variants={k: BUDGETS[k] for k in chosen}, restore_fit=True)
                 for seed in args.seeds]
        payload = {"command": command_line("sampler_budget.py", argv), "n_cells": args.cells,
                   "platform": platform.platform(), "python": platform.python_version(), "budgets": BUDGETS,
                   "seeds": seeds, "notes": args.note}
    write_results(args.out, "sampler_budget", payload, markdown(payload))


if __name__ == "__main__":
    main()
