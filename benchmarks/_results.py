"""What every benchmark script does last: name the command that reproduces it, and write its
results as ``OUT/STEM.json`` (the full record) and ``OUT/STEM.md`` (the table a reader reads)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def command_line(script: str, argv: list[str] | None, env: str = "OMP_NUM_THREADS=1") -> str:
    """``ENV python benchmarks/SCRIPT ARGS``: the command as run (``argv`` None: this process's)."""
    args = argv if argv is not None else sys.argv[1:]
    return " ".join(([env] if env else []) + ["python", f"benchmarks/{script}"] + list(args))


def write_results(out: str | Path, stem: str, result: dict[str, Any], markdown: str) -> None:
    """Write ``result`` to ``OUT/STEM.json`` and ``markdown`` to ``OUT/STEM.md``; print the markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)
