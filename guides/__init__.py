"""Explicit Pyro guides (installed as ``pyrospatial.guides``)."""

from .coral import CoralGuide

__all__ = ["CoralGuide"]
