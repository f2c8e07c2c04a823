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


def best_of_clocks(fn, repeat: int, *, warmup: bool = True) -> tuple[float, float]:
    """(minimum wall time, minimum CPU time of this process) over the same `repeat` calls of `fn`.

    On a shared machine the wall time of a long call also counts the time other processes held the
    cores; the process CPU time does not (it still pays for their cache and memory traffic). Ratios
    of CPU times compare the work of two measurements, ratios of wall times what a user waits."""
    if warmup:
        fn()
    walls, cpus = [], []
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        fn()
        cpus.append(time.process_time() - c)
        walls.append(time.perf_counter() - t)
    return min(walls), min(cpus)
