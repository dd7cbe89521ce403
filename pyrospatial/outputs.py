"""Output folders written all at once: a temporary folder beside ``--out``, renamed at the end.

:func:`output_folder` is a context manager. Inside the block every file is written into a
temporary folder in the same parent as the destination (so the final rename stays on one file
system); on success ``run.json`` is written last (status ``"complete"``, the command and its
settings, library versions, start/end times and duration) and the temporary folder is renamed
to the destination. On an error the temporary folder is removed and the destination is left as
it was, so an input error creates nothing and a killed run never leaves a folder at ``--out``
that looks complete (a run killed mid-way leaves at most a hidden ``.NAME.partial-*`` folder
beside it, without ``run.json``).

A destination that exists and is not empty is refused unless ``overwrite=True``; with it, the
old folder is replaced only after the new one is complete (renamed aside, the new one renamed
in, the old one removed). Should ``--out`` fill up during the run (another process), the
complete results are kept beside it as ``NAME.complete-<time>`` and the error says so. Missing
parent folders are created, and removed again when the run fails while they are still empty.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pyrospatial.errors import OutputFolderError

__all__ = ["RUN_MARKER", "check_destination", "output_folder", "read_run_marker"]

#: the completion marker, written last
RUN_MARKER = "run.json"


def check_destination(out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """The destination folder as a Path, refused when it is a file, or a non-empty folder
    without ``overwrite`` (an :class:`OutputFolderError` naming it and the fix)."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputFolderError(
            f"--out {str(path)!r} is an existing file, not a folder: pass a folder path (it is created)."
        )
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputFolderError(
            f"--out {str(path)!r} exists and is not empty: choose another folder, or pass --overwrite "
            "(overwrite=True) to replace it once the new results are complete."
        )
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputFolderError(f"--out {str(path)!r} lies under {str(ancestor)!r}, which is a file, not a folder.")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _versions() -> dict:
    try:
        from pyrospatial.engine.infer import versions
    except Exception:  # noqa: BLE001 - the marker must be written even without torch
        return {"python": sys.version.split()[0]}
    return versions()


@contextlib.contextmanager
def output_folder(
    out: str | os.PathLike,
    *,
    command: str,
    settings: dict | None = None,
    overwrite: bool = False,
    argv: list[str] | None = None,
) -> Iterator[Path]:
    """Yield a temporary folder to write into; on success write ``run.json`` and rename it to
    ``out`` (module docstring). ``settings`` (e.g. the parsed CLI arguments) go to run.json."""
    destination = check_destination(out, overwrite=overwrite)
    started_wall, started = time.time(), time.perf_counter()
    created = _make_parents(destination.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the results get the usual permissions
    try:
        yield staging
        finished_wall = time.time()
        marker = {
            "status": "complete",
            "command": command,
            "argv": list(sys.argv if argv is None else argv),
            "settings": _jsonable(settings or {}),
            "versions": _versions(),
            "started": datetime.fromtimestamp(started_wall, timezone.utc).isoformat(),
            "finished": datetime.fromtimestamp(finished_wall, timezone.utc).isoformat(),
            "duration_s": round(time.perf_counter() - started, 3),
        }
        _write_atomic(staging / RUN_MARKER, json.dumps(marker, indent=2))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # the parents this run created, deepest first, when still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    try:
        _move_into_place(staging, destination, overwrite=overwrite)
    except OutputFolderError as error:  # --out changed during the run: keep the complete results
        kept = destination.parent / f"{destination.name}.complete-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(staging, kept)
        raise OutputFolderError(f"{error} The complete results of this run are kept in {str(kept)!r}.") from error


def _make_parents(parent: Path) -> list[Path]:
    """Create ``parent`` and its missing ancestors; return those created, deepest first."""
    missing = []
    folder = parent
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    return missing


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _move_into_place(staging: Path, destination: Path, *, overwrite: bool) -> None:
    """Rename the complete ``staging`` folder to ``destination``; an existing destination (empty,
    or any with ``overwrite``) is renamed aside first and removed after."""
    check_destination(destination, overwrite=overwrite)  # it may have changed during the run
    old = None
    if destination.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
        os.replace(destination, old / "previous")
    try:
        os.replace(staging, destination)
    except BaseException:
        if old is not None:  # put the previous results back
            os.replace(old / "previous", destination)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_run_marker(folder: str | os.PathLike) -> dict | None:
    """``run.json`` of an output folder, or None when absent (an incomplete run)."""
    path = Path(folder) / RUN_MARKER
    if not path.is_file():
        return None
    return json.loads(path.read_text())
