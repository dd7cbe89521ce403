"""The command line's surface: shared options, one command per method, the `fit` alias, the
hidden earlier spellings and defaults in every help. Arguments are parsed only (no training)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pyrospatial import cli

#: each command with the smallest argument list it accepts (its required arguments)
REQUIRED = {
    "coral": ["--cells", "c.h5ad", "--spots", "s.h5ad", "--cell-type-key", "cell_type", "--out", "o"],
    "fit": ["--cells", "c.h5ad", "--spots", "s.h5ad", "--cell-type-key", "cell_type", "--out", "o"],
    "deconvolve": ["--spots", "s.h5ad", "--reference", "r.h5ad", "--cell-type-key", "cell_type", "--out", "o"],
    "align": ["a.h5ad", "b.h5ad", "--out", "o"],
    "demo": [],
}
MAX_EPOCHS = {"coral": 300, "fit": 300, "deconvolve": 250, "align": 60, "demo": None}


def parse(*argv: str):
    return cli.build_parser().parse_args(list(argv))


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as stop:
        cli.main([*argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", list(REQUIRED))
def test_every_method_command_takes_the_shared_options(command):
    args = parse(command, *REQUIRED[command])
    assert all(hasattr(args, name) for name in cli.SHARED_OPTIONS)
    assert args.device == "auto" and args.seed == 0 and args.progress is True
    assert args.max_epochs == MAX_EPOCHS[command]
    assert args.out == ("results/demo" if command == "demo" else "o")
    args = parse(command, *REQUIRED[command], "--device", "cpu", "--seed", "7", "--max-epochs", "5",
                 "--no-progress", "--out", "elsewhere")
    assert (args.device, args.seed, args.max_epochs, args.progress, args.out) == ("cpu", 7, 5, False, "elsewhere")
    assert parse(command, *REQUIRED[command], "--progress").progress is True
    with pytest.raises(SystemExit):
        parse(command, *REQUIRED[command], "--device", "tpu")


def test_out_is_required_for_the_methods_but_not_for_the_demo(capsys):
    for command in ("coral", "deconvolve", "align"):
        argv = [a for a in REQUIRED[command] if a not in ("--out", "o")]
        with pytest.raises(SystemExit):
            parse(command, *argv)
    assert "--out" in capsys.readouterr().err


def test_fit_is_an_alias_of_coral(capsys):
    coral, fit = parse("coral", *REQUIRED["coral"]), parse("fit", *REQUIRED["fit"])
    assert fit.func is coral.func is cli._coral
    assert {k: v for k, v in vars(fit).items() if k != "command"} == {
        k: v for k, v in vars(coral).items() if k != "command"}
    assert fit.command == "fit" and coral.command == "coral"  # the error messages name what was typed
    top = help_text(capsys)
    assert "alias of `coral`" in top
    for command in ("coral", "deconvolve", "align", "demo", "check"):
        assert command in top


def test_earlier_spellings_still_work_but_are_hidden(capsys):
    assert parse("coral", *REQUIRED["coral"], "--epochs", "3").max_epochs == 3
    assert parse("fit", *REQUIRED["fit"], "--epochs", "4").max_epochs == 4
    assert parse("align", *REQUIRED["align"], "--steps", "20").max_epochs == 20
    # deconvolve's --steps keeps its meaning (SVI steps, whatever the batch size)
    args = parse("deconvolve", *REQUIRED["deconvolve"], "--steps", "30", "--batch-size", "10")
    assert args.steps == 30 and args.max_epochs == 250
    assert parse("deconvolve", *REQUIRED["deconvolve"]).steps is None
    for command, old in (("coral", "--epochs"), ("fit", "--epochs"), ("align", "--steps"), ("deconvolve", "--steps")):
        text = help_text(capsys, command)
        assert "--max-epochs" in text and old not in text, command


def test_deconvolve_epochs_count_passes_over_the_spots():
    assert cli.deconvolve_steps(250, 120, None) == 250  # full batch: one step per epoch (today's default)
    assert cli.deconvolve_steps(10, 100, 32) == 40  # 4 minibatches per pass
    assert cli.deconvolve_steps(3, 5, 100) == 3


@pytest.mark.parametrize("command", ["coral", "fit", "deconvolve", "align", "demo", "check"])
def test_every_help_shows_the_defaults(capsys, command):
    text = " ".join(help_text(capsys, command).split())  # one line: argparse wraps long help
    if command != "check":
        assert "--device {auto,cpu,cuda}" in text and "(default: auto)" in text
        assert "--progress, --no-progress" in text and "(default: True)" in text
        assert "--seed SEED" in text and "(default: 0)" in text
    if MAX_EPOCHS.get(command):
        assert f"(default: {MAX_EPOCHS[command]})" in text
    if command == "check":
        assert "(default: 3)" in text and "(default: 0.05)" in text


def test_demo_max_epochs_overrides_the_configured_budget(monkeypatch, tmp_path, capsys):
    from pyrospatial import demo

    seen = {}

    def fake_run_demo(out, **kwargs):
        seen.update(kwargs, out=out)
        return {"n_cells": kwargs["config"].n_cells}

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert cli.main(["demo", "--quick", "--max-epochs", "5", "--no-progress", "--out", str(tmp_path)]) == 0
    assert seen["config"].max_epochs == 5 and seen["config"].n_cells == demo.DemoConfig.quick().n_cells
    assert seen["progress"] is False and seen["device"] == "auto"
    assert cli.main(["demo", "--out", str(tmp_path), "--overwrite"]) == 0
    assert seen["config"] == demo.DemoConfig() and seen["progress"] is True
    capsys.readouterr()


def test_the_cli_module_imports_only_the_standard_library_and_errors_at_the_top():
    """Heavy imports (torch, anndata, the methods) live inside the command functions (also in the
    module of the checkpoint options that the CLI imports at the top)."""
    def top_imports(path: Path) -> set:
        top = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                top.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                top.add(node.module)
        return top

    light = {"__future__", "argparse", "json", "math", "sys", "pathlib", "pyrospatial.errors"}
    assert top_imports(Path(cli.__file__)) == light | {"pyrospatial.cli_checkpoints"}
    assert top_imports(Path(cli.__file__).with_name("cli_checkpoints.py")) <= light
