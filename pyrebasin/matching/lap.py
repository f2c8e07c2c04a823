"""Linear assignment (LAP) solvers for matching: scipy's by default, lapx's Jonker-Volgenant when installed.

Costs always reach the solver as contiguous float64 on the CPU; every solver maximises.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["solve_lap", "available_solvers", "default_solver"]

try:  # lapx installs the module `lap`
    import lap as _lap
except ImportError:  # pragma: no cover - depends on the environment
    _lap = None


def available_solvers() -> list[str]:
    """Solver names usable here: "scipy" always, "lapjv" when lapx is installed."""
    return ["scipy"] + (["lapjv"] if _lap is not None else [])


def default_solver() -> str:
    """"lapjv" when lapx is installed (measured faster, see docs/alignment.md), else "scipy"."""
    return "lapjv" if _lap is not None else "scipy"


def _as_float64(cost) -> np.ndarray:
    if isinstance(cost, torch.Tensor):
        cost = cost.detach().to(device="cpu", dtype=torch.float64).numpy()
    cost = np.ascontiguousarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"solve_lap: expected a square 2-D cost matrix, got shape {list(cost.shape)}")
    if not np.isfinite(cost).all():
        raise ValueError("solve_lap: the cost matrix has NaN or infinite entries "
                         "(check the weights/activations for NaN)")
    return cost


def solve_lap(cost, *, solver: str | None = None, warm_start: torch.Tensor | None = None) -> torch.Tensor:
    """The permutation maximising Σ_i cost[i, perm[i]] (int64 tensor on the CPU).

    `cost`: square [n, n] tensor or array (any float dtype/device; solved in float64 on the CPU).
    `solver`: "scipy" (`linear_sum_assignment`), "lapjv" (lapx; float64 buffer, `extend_cost=True`)
    or None for `default_solver()`. `warm_start`: a current assignment; its columns are put on the
    diagonal first, which only reorders the problem (solvers keep no duals across calls), so the
    answer is the same optimum — see docs/alignment.md for whether it helps.
    """
    c = _as_float64(cost)
    n = c.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    solver = solver or default_solver()
    order = None
    if warm_start is not None:
        order = np.asarray(warm_start, dtype=np.int64)
        if order.shape != (n,):
            raise ValueError(f"solve_lap: warm_start has shape {list(order.shape)}, expected [{n}]")
        c = np.ascontiguousarray(c[:, order])
    if solver == "scipy":
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(c, maximize=True)
        perm = np.empty(n, dtype=np.int64)
        perm[rows] = cols
    elif solver == "lapjv":
        if _lap is None:
            raise ValueError("solve_lap(solver='lapjv') needs lapx: pip install lapx")
        # lapjv minimises; negate (exact in float64). extend_cost keeps it from rejecting odd shapes.
        _, x, _ = _lap.lapjv(-c, extend_cost=True)
        perm = np.asarray(x, dtype=np.int64)
    else:
        raise ValueError(f"solve_lap: unknown solver {solver!r}; expected one of {available_solvers()}")
    if order is not None:
        perm = order[perm]
    return torch.from_numpy(perm)
