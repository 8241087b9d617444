"""Freed heap memory back to the operating system."""
from __future__ import annotations

import ctypes

_libc = ctypes.CDLL(None)
_trim = getattr(_libc, "malloc_trim", None)  # glibc; absent from musl
_mallopt = getattr(_libc, "mallopt", None)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 18


def keep_big_blocks_mapped() -> None:
    """Blocks from 256 kB up (a config's text, libyaml's copy of it, a route
    set's arrays: 400-800 kB at 100k routes) get their own mapping, returned
    when freed (on the heap, each reload's new arrays left holes that kept
    ~1 MB more resident). glibc raises its threshold to the size of each
    mapped block freed, so that the next such blocks come from the heap,
    where they stay resident after a reload; a set threshold does not move."""
    if _mallopt is not None:
        _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def trim() -> None:
    """glibc keeps the heap's freed blocks for reuse, resident. The
    transients of a parse or a dump are ~11 MB at 100k routes, and would
    stay: malloc_trim(0) hands back every free page. A few milliseconds."""
    if _trim is not None:
        _trim(0)
