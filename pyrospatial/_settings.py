"""The one Pyro setting pyrospatial needs, switched on in one place.

Parameters live in their PyroModules (not Pyro's global param store), so that the Lightning
engine optimises them and several models coexist in one process. Pyro reads this setting
when a ``PyroModule`` is *built*, so it must be on before any model or guide is created.

Rule: importing :mod:`pyrospatial.engine`, :mod:`pyrospatial.models`,
:mod:`pyrospatial.guides`, any name of ``pyrospatial`` (``ps.fit``, ``ps.CORAL``, ...), or
``import pyrospatial`` after ``import pyro`` switches it on. A custom ``PyroModule`` built
without any of those must call :func:`use_module_local_params` first (or
``import pyrospatial.engine``). ``import pyrospatial`` alone stays light (no torch, no pyro),
so that the command line answers fast.
"""

from __future__ import annotations

__all__ = ["use_module_local_params"]


def use_module_local_params() -> None:
    """Switch on Pyro's ``module_local_params`` (idempotent; imports pyro)."""
    import pyro

    if not pyro.settings.get("module_local_params"):
        pyro.settings.set(module_local_params=True)
