"""Handing freed heap back to the system, for the flows that stream tensors through memory."""
from __future__ import annotations

import ctypes
import ctypes.util

try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
except OSError:  # not glibc (macOS, Windows): nothing to hand back
    _LIBC = None


def release_heap() -> None:
    """`malloc_trim(0)`: glibc keeps freed blocks under its mmap threshold (up to 32 MiB each), which a
    stream of same-sized tensors read and dropped inflates into the resident set; a no-op elsewhere."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)
