"""Import a script of benchmarks/ (not a package) by path, for tests of its scoring code."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str, module_name: str | None = None) -> ModuleType:
    """``benchmarks/{name}.py`` as a module, registered in ``sys.modules`` under ``module_name``
    (default ``name``) unless one is there already; the benchmarks folder goes on ``sys.path`` so
    the script's own imports of its neighbours work."""
    module_name = module_name or name
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(module_name, module)
    spec.loader.exec_module(module)
    return module
