"""Giving freed memory back to the operating system before a memory-heavy step.

glibc's allocator keeps memory freed by a program in its heap for later reuse instead of
returning it to the operating system, and arrays larger than a few megabytes are mapped anew
rather than placed in that free space. After the default posterior of CORAL on 100k cells
(per-spot HMC: many mid-sized tensors made and freed), 1.1 GB of the process's 2.9 GB
resident memory was such free heap, and the export's summaries (about 1.3 GB) came on top
of it. :func:`release_free_memory` returns it first. A heap so fragmented also fills up
again as the export's own temporaries come and go through its free chunks (its peak: 3.99 GB
untrimmed, 3.63 GB trimmed at its start only, 3.31 GB trimmed after each chunk of draws too;
short chains, same draw shapes), so the export trims it after each chunk as well (about 2 ms
a call).
"""

from __future__ import annotations

import ctypes
import gc
import sys

__all__ = ["release_free_memory"]


def release_free_memory(*, collect: bool = True) -> bool:
    """Return the C heap's free pages to the operating system (glibc's ``malloc_trim(0)``),
    after collecting unreachable Python objects with ``collect`` (their memory is then
    returned too; skip it where it is called often: a collection takes a while).

    Returns True where the heap was trimmed (Linux with glibc), False elsewhere (then only the
    collection runs). Nothing in use is touched: only resident memory goes down.
    """
    if collect:
        gc.collect()
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim this way
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True
