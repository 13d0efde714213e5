"""Freed memory kept in the process while a CPU trains or scores (glibc's malloc only).

glibc hands a freed block of more than ~32 MB (an LM-head gradient, a scoring pass's activations,
a KV cache grown by one token) back to the kernel, so the next one takes fresh pages and the
kernel zeroes each: page faults and system time on every training step, every scoring pass and
every decode step. Inside `freed_memory_kept` glibc keeps them for the process to reuse; after
it, glibc's defaults come back and the free pages go back to the kernel. Same maths either way.
Training (tasks/train_levers.py) and the evaluation engine (tasks/benchmarks/fast_lm.py) use it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt(3) parameters and glibc's defaults (malloc.h); setting them turns the dynamic mmap threshold off.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
TRIM_DEFAULT, MMAP_MAX_DEFAULT = 128 * 1024, 65536
TRIM_EVERY = 50  # training steps; a trim costs the next step ~4x its usual page faults

_lock = threading.Lock()
_depth = 0  # nested or concurrent users: the outermost one sets and restores glibc's settings


@functools.cache
def glibc():
    """The C library if it is glibc (it has mallopt and malloc_trim), else None (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError):
        return None


@contextmanager
def freed_memory_kept(on: bool) -> Iterator[None]:
    """Inside, glibc keeps what the process frees (no mmap for big blocks, no trim); after, its defaults again."""
    global _depth
    libc = glibc() if on else None
    if libc is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, -1)  # mallopt(3): -1 turns trimming off (2**31 - 1 still trimmed a >2 GiB top)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(M_MMAP_MAX, MMAP_MAX_DEFAULT)
                libc.mallopt(M_TRIM_THRESHOLD, TRIM_DEFAULT)
                libc.malloc_trim(0)  # what the process no longer uses goes back to the kernel
