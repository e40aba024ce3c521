"""Reuse of large host buffers while training (Linux with glibc).

A training step at 100k ATAC peaks makes and frees several arrays of about 100 MB (the
decoder's logits, their exponentials, their gradient). glibc's ``malloc`` serves blocks
above its mmap threshold (at most 32 MB by its own rule) with fresh ``mmap`` pages, so
every such array is page-faulted in and zeroed by the kernel again, step after step: at
100k peaks a third of the process's time was spent in the kernel. Raising the threshold
(and the trim threshold, both to 1 GB) for the duration of training lets freed blocks be
handed out again from the heap, the way a caching allocator would. On leaving, the kept memory is
returned to the system (``malloc_trim``) and the thresholds are set to the ceiling glibc's
own dynamic rule moves them to in a process that frees large arrays (32 MB, and twice
that for trimming); they stay fixed there (``mallopt`` turns that rule off). Elsewhere
(other C libraries, macOS, Windows) nothing is changed.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Iterator

#: ``mallopt`` parameters of glibc's ``malloc.h``
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: the ceiling of glibc's dynamic mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)
_GLIBC_DYNAMIC_CEILING = 32 * 1024 * 1024
#: blocks up to this size are reused from the heap while training
REUSE_UP_TO = 1 << 30


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not all(hasattr(libc, f) for f in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None  # not glibc
    return libc


@contextlib.contextmanager
def reuse_large_host_buffers(enabled: bool = True) -> Iterator[bool]:
    """Context in which freed host blocks of up to :data:`REUSE_UP_TO` bytes are reused.

    Parameters
    ----------
    enabled
        ``False`` leaves the allocator as it is.

    Yields
    ------
    bool
        Whether the allocator's thresholds were raised (glibc accepted them).
    """
    libc = _glibc() if enabled else None
    raised = bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, REUSE_UP_TO) and libc.mallopt(_M_TRIM_THRESHOLD, REUSE_UP_TO))
    try:
        yield raised
    finally:
        if libc is not None:
            libc.malloc_trim(0)
            libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_DYNAMIC_CEILING)
            libc.mallopt(_M_TRIM_THRESHOLD, 2 * _GLIBC_DYNAMIC_CEILING)
