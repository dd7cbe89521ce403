"""Every tutorial runs end to end in its quick mode and writes its figures and summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("[0-9][0-9]_*.py"))


@pytest.mark.parametrize("script", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs_in_quick_mode(script, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path)], check=True, env=env,
                   cwd=tmp_path, timeout=600)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["quick"] is True
    failed = [claim for claim, holds in summary["checks"].items() if not holds]
    assert not failed, f"claims of {script.name} that do not hold: {failed}"
    assert list(tmp_path.glob("*.png")), "the tutorial wrote no figure"
