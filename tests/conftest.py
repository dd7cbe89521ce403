"""Shared fixtures."""

from __future__ import annotations

import pyro
import pytest


@pytest.fixture
def fresh_pyro():
    """An empty Pyro parameter store and seed 0 before the test; the store emptied after."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
