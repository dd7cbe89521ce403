"""The top-level models/ and guides/ folders import as pyrospatial.models / pyrospatial.guides,
from the editable install and from a built wheel installed outside the repository."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_editable_install_maps_models_and_guides():
    import pyrospatial.guides
    import pyrospatial.models

    assert Path(pyrospatial.models.__file__).parent == REPO / "models"
    assert Path(pyrospatial.guides.__file__).parent == REPO / "guides"


@pytest.mark.slow
def test_wheel_contains_and_imports_subpackages(tmp_path):
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(wheel_dir)],
        check=True, cwd=tmp_path,
    )
    (wheel,) = wheel_dir.glob("pyrospatial-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pyrospatial/models/__init__.py" in names
    assert "pyrospatial/guides/__init__.py" in names
    assert not any(name.startswith(("models/", "guides/", "tests/")) for name in names)

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True, cwd=tmp_path,
    )
    code = (
        "import pyrospatial, pyrospatial.models, pyrospatial.guides, pyrospatial.data;"
        "print(pyrospatial.models.__file__); print(pyrospatial.guides.__file__)"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env=env).stdout.split()
    # imported from the installed wheel, not from the repository
    assert all(Path(p).is_relative_to(target) for p in out), out
