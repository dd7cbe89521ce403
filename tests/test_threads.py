"""``--threads`` (issue 23, item 5): the shared CLI option reaches torch before any work, and
the default is the documented rule (pyrospatial.engine.device)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pyrospatial import cli
from pyrospatial.engine.device import default_num_threads, set_num_threads
from pyrospatial.errors import InputError


@pytest.fixture
def restore_threads(monkeypatch):
    """Keep torch's thread count and the thread variables of the environment as they were."""
    before = torch.get_num_threads()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(name, os.environ.get(name, "1"))
    yield
    torch.set_num_threads(before)


def test_default_rule():
    assert default_num_threads(cores=1, load=0.0) == 1
    assert default_num_threads(cores=2, load=0.0) == 1      # a 2-core machine: one thread
    assert default_num_threads(cores=8, load=0.5) == 4      # idle and large: capped at 4
    assert default_num_threads(cores=3, load=0.0) == 3
    assert default_num_threads(cores=8, load=4.0) == 1      # loaded: load >= cores / 2
    assert 1 <= default_num_threads() <= 4


def test_explicit_number_wins_over_the_environment_and_is_inherited(restore_threads, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert set_num_threads(2) == 2 and torch.get_num_threads() == 2
    assert os.environ["OMP_NUM_THREADS"] == "2" and os.environ["MKL_NUM_THREADS"] == "2"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert set_num_threads(None) == 3 and torch.get_num_threads() == 3  # honoured when not given
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert set_num_threads(None) == default_num_threads()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="threads"):
            set_num_threads(bad)


@pytest.mark.parametrize("command", [["demo"], ["coral", "--cells", "c.h5ad", "--spots", "s.h5ad",
                                                "--cell-type-key", "t", "--out", "o"]])
def test_option_is_shared_and_reaches_torch(restore_threads, command):
    args = cli.build_parser().parse_args([*command, "--threads", "2"])
    cli.apply_threads(args)
    assert args.threads == 2 and torch.get_num_threads() == 2


def test_main_sets_threads_before_the_command_runs(monkeypatch, restore_threads):
    seen = {}

    def fake_demo(args):
        seen["threads"] = torch.get_num_threads()
        seen["recorded"] = args.threads
        return 0

    parser = cli.build_parser

    def patched():
        p = parser()
        p._subparsers._group_actions[0].choices["demo"].set_defaults(func=fake_demo)
        return p

    monkeypatch.setattr(cli, "build_parser", patched)
    torch.set_num_threads(1)
    assert cli.main(["demo", "--threads", "2"]) == 0
    assert seen == {"threads": 2, "recorded": 2}


def test_fresh_process_with_omp_variable(tmp_path):
    """In a fresh process started with OMP_NUM_THREADS=1, no --threads leaves torch at 1 thread
    and --threads 2 then gives 2 (the CLI's helper, as main calls it before a command)."""
    code = ("import torch; from pyrospatial import cli; p = cli.build_parser(); out = []\n"
            "for extra in ([], ['--threads', '2']):\n"
            "    a = p.parse_args(['demo', *extra]); cli.apply_threads(a); out += [torch.get_num_threads(), a.threads]\n"
            "print(*out)")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.stdout.split() == ["1", "1", "2", "2"], proc.stderr[-2000:]
