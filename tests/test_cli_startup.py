"""The command line answers fast: ``--help`` and an input error need no heavy import (issue 18, item 4).

``pyrospatial/__init__.py`` is lazy (PEP 562), and ``pyrospatial.cli`` imports the methods only
inside the command functions, after the input paths are checked. The deterministic tests look
at ``sys.modules`` in a fresh interpreter; the timing test compares ``pyrospatial --help`` with
``python -c pass`` measured in the same run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

HEAVY = ("torch", "pyro", "scanpy", "anndata", "lightning")
COMMANDS = ("coral", "fit", "deconvolve", "align", "demo", "check")


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)


def _heavy_after(argv: list[str]) -> dict:
    """Run ``pyrospatial.cli.main(argv)`` in a fresh interpreter; its exit code and the heavy modules loaded."""
    code = (
        "import json, sys\n"
        "import pyrospatial.cli as cli\n"
        "try:\n"
        f"    rc = cli.main({argv!r})\n"
        "except SystemExit as exit:\n"
        "    rc = exit.code\n"
        f"print(json.dumps({{'rc': rc, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "stderr": done.stderr}


@pytest.mark.parametrize("argv", [["--help"], *[[command, "--help"] for command in COMMANDS]])
def test_help_imports_no_heavy_module(argv):
    result = _heavy_after(argv)
    assert result["rc"] == 0
    assert result["heavy"] == []


@pytest.mark.parametrize("argv", [
    ["coral", "--cells", "missing_cells.h5ad", "--spots", "missing_spots.h5ad", "--cell-type-key", "t", "--out", "o"],
    ["deconvolve", "--spots", "missing_outs", "--reference", "ref.h5ad", "--cell-type-key", "t", "--out", "o"],
    ["align", "missing_a.h5ad", "missing_b.h5ad", "--out", "o"],
])
def test_a_missing_input_fails_before_any_heavy_import(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _heavy_after(argv)
    assert result["rc"] == 2
    assert result["heavy"] == []
    assert "does not exist" in result["stderr"] and "missing" in result["stderr"]
    assert not (tmp_path / "o").exists()  # nothing written


def test_import_pyrospatial_is_lazy_but_names_still_work():
    done = _python(
        "import sys, pyrospatial as ps\n"
        f"assert not [m for m in {HEAVY!r} if m in sys.modules], 'eager import'\n"
        "assert callable(ps.fit) and ps.CORAL.__name__ == 'CORAL' and callable(ps.io.read)\n"
        "assert set(ps.__all__) <= set(dir(ps))\n"
        "import pyro\n"
        "assert pyro.settings.get('module_local_params')\n"
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("imports", [
    "import pyrospatial.models",
    "import pyrospatial.guides",
    "import pyrospatial.engine",
    "import pyro; import pyrospatial",
    "import pyrospatial as ps; ps.SpatialDataset",
])
def test_module_local_params_is_on_before_any_model_is_built(imports):
    """A user's PyroModule built after these imports keeps its parameters local (not in the global store)."""
    done = _python(
        f"{imports}\n"
        "import pyro, torch\n"
        "from pyro.nn import PyroModule, PyroParam\n"
        "assert pyro.settings.get('module_local_params')\n"
        "class M(PyroModule):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.w = PyroParam(torch.ones(2))\n"
        "M().w\n"
        "assert len(pyro.get_param_store()) == 0\n"
    )
    assert done.returncode == 0, done.stderr


def _best_of(argv: list[str], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, timeout=120, check=True)
        best = min(best, time.perf_counter() - start)
    return best


def test_help_answers_within_a_few_bare_interpreter_starts():
    """Timed on purpose (the issue asks for it): ``pyrospatial --help`` (best of 3) takes at most
    8x ``python -c pass`` (best of 3, same run) or 2 s, whichever is larger. Unloaded it is
    about 3x (0.15 s against 0.05 s); the margin is for a loaded 2-core CI machine. Before the
    lazy imports it took about 15 s."""
    bare = _best_of([sys.executable, "-c", "pass"])
    help_ = _best_of([sys.executable, "-m", "pyrospatial.cli", "--help"])
    assert help_ < max(8 * bare, 2.0), f"--help took {help_:.2f} s against {bare:.2f} s for python -c pass"
