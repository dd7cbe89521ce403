"""Where a model/guide pair lives: the one device helper of the package."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["module_device"]


def module_device(*modules: Any) -> torch.device:
    """The device of the first parameter of ``modules`` (``nn.Module`` objects; others are
    skipped), else of their first buffer (e.g. a model holding only buffers), else the CPU."""
    torch_modules = [m for m in modules if isinstance(m, torch.nn.Module)]
    for m in torch_modules:
        for p in m.parameters():
            return p.device
    for m in torch_modules:
        for b in m.buffers():
            return b.device
    return torch.device("cpu")
