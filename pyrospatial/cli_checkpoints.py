"""The command line's checkpoint options: ``--checkpoint-dir DIR`` and ``--resume``.

Training writes ``DIR/last.ckpt`` (:mod:`pyrospatial.engine.checkpoint`); CORAL's default
posterior writes ``DIR/posterior.pt`` (:mod:`pyrospatial.engine.local_checkpoint`). After a
crash, the same command with ``--resume`` continues whichever stage was running.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pyrospatial.errors import InputError

__all__ = ["add_checkpoint_options", "checkpoint_kwargs", "posterior_checkpoint_kwargs"]


def add_checkpoint_options(p: argparse.ArgumentParser) -> None:
    """``--checkpoint-dir DIR`` and ``--resume`` (see :mod:`pyrospatial.engine.checkpoint`)."""
    group = p.add_argument_group("checkpoints")
    group.add_argument("--checkpoint-dir", default=None,
                       help="folder where last.ckpt is written during training (every epoch and at least every "
                            "2 minutes, atomically) and, for coral's default posterior, posterior.pt (every 5 "
                            "minutes); None: no checkpoints")
    group.add_argument("--resume", action="store_true",
                       help="continue a killed run from --checkpoint-dir (same inputs, settings and seed)")


def checkpoint_kwargs(args: argparse.Namespace) -> dict:
    """The ``checkpoint_dir``/``resume`` arguments of ``train``/``fit`` from the parsed options."""
    if getattr(args, "resume", False) and getattr(args, "checkpoint_dir", None) is None:
        raise InputError("--resume needs --checkpoint-dir DIR (the folder holding last.ckpt of the killed run).")
    return {"checkpoint_dir": getattr(args, "checkpoint_dir", None),
            "resume": "last" if getattr(args, "resume", False) else None}


def posterior_checkpoint_kwargs(args: argparse.Namespace) -> dict:
    """The ``checkpoint``/``resume`` arguments of ``CORAL.sample`` with the default posterior
    (``method="local"``): ``DIR/posterior.pt``; none for the other posteriors or without a folder."""
    from pyrospatial.engine.local_checkpoint import POSTERIOR_CHECKPOINT_NAME

    folder = checkpoint_kwargs(args)["checkpoint_dir"]
    if folder is None or getattr(args, "posterior", "local") != "local":
        return {}
    return {"checkpoint": str(Path(folder) / POSTERIOR_CHECKPOINT_NAME), "resume": bool(getattr(args, "resume", False))}
