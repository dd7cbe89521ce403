"""release_free_memory (issue 23): heap memory a program freed goes back to the operating
system, so that a memory-heavy step (CORAL.export) does not start on top of it."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from pyrospatial.engine.memory import release_free_memory


def _resident_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim and /proc are Linux's")
@pytest.mark.parametrize("collect", [True, False])
def test_freed_heap_goes_back_to_the_operating_system(collect):
    # 64 kB blocks come from the heap (below glibc's mmap threshold); one kept in ten pins the
    # heap so that freeing the others cannot shrink it from the top
    blocks = [np.ones(8192) for _ in range(3000)]  # about 190 MB
    kept = blocks[::10]
    del blocks
    before = _resident_mb()
    assert release_free_memory(collect=collect)
    after = _resident_mb()
    assert before - after > 100.0, (before, after)
    assert all(float(block.sum()) == 8192.0 for block in kept)  # what is in use is untouched
