"""The one timing rule of the ratio scripts: best of `repeat` runs after one warm-up."""
from __future__ import annotations

import time


def best_of(fn, repeat: int, *, warmup: bool = True) -> float:
    """Minimum wall time of `repeat` calls of `fn` (seconds), after one untimed call if `warmup`."""
    if warmup:
        fn()  # warm-up (allocator, vmap tracing, lazy imports)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)
