"""The LAP solver policy of matching: which solver maximises a cost (`ops.lap_solve`'s warm-startable JV,
scipy's, or lapx's when installed) and, across sweeps, whether a group's LAP starts warm or cold.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import ops
from .._backend import use_native

__all__ = ["solve_lap", "LapState", "LapPolicy", "available_solvers", "default_solver"]

try:  # lapx installs the module `lap`
    import lap as _lap
except ImportError:  # pragma: no cover - depends on the environment
    _lap = None


@dataclass
class LapState:
    """What a `jv` solve leaves for the next one on a similar cost: the assignment and column duals,
    and how many augmenting paths (Dijkstra searches, after the row reduction) the solve needed."""

    perm: torch.Tensor
    duals: torch.Tensor
    augmentations: int = 0


def available_solvers() -> list[str]:
    """"jv" (pyrebasin.ops.lap_solve), "scipy", and "lapjv" when lapx is installed."""
    return ["jv", "scipy"] + (["lapjv"] if _lap is not None else [])


def default_solver() -> str:
    """"jv" when its native kernel runs (its warm starts across sweeps pay off, docs/alignment.md), else
    "scipy" (under the reference backend too: jv's twin is exact but slow; docs/alignment.md compares)."""
    return "jv" if use_native("lap_solve", torch.device("cpu")) else "scipy"


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


def _solve_jv(cost: torch.Tensor, warm_start, maximize: bool = False) -> tuple[torch.Tensor, LapState | None]:
    """`ops.lap_solve` on a float64 CPU cost (it minimises; `maximize`: it minimises -cost, reading the
    entries negated, which is exact: no negated copy), started from `warm_start` (a `LapState` of the
    same sense, or a bare assignment with zero duals); the kernel checks finiteness in its own pass,
    and its refusal becomes solve_lap's ValueError."""
    n = cost.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long), None
    v = col = None
    if warm_start is not None:
        if not isinstance(warm_start, LapState):
            warm_start = LapState(torch.as_tensor(warm_start, dtype=torch.long), torch.zeros(n, dtype=torch.float64))
        if warm_start.perm.shape != (n,):
            raise ValueError(f"solve_lap: warm_start has shape {list(warm_start.perm.shape)}, expected [{n}]")
        v, col = warm_start.duals.to(torch.float64), warm_start.perm.to(torch.long)
    try:
        perm, duals, aug = ops.lap_solve(cost, v, col, maximize)
    except (RuntimeError, ValueError) as e:
        if "NaN or infinite" not in str(e):
            raise
        raise ValueError("solve_lap: the cost matrix has NaN or infinite entries "
                         "(check the weights/activations for NaN)") from None
    return perm, LapState(perm, duals, int(aug))


def solve_lap(cost, *, solver: str | None = None, warm_start: LapState | torch.Tensor | None = None,
              return_state: bool = False):
    """The permutation maximising Σ_i cost[i, perm[i]] (int64 tensor on the CPU).

    `cost`: square [n, n] tensor or array (any float dtype/device; solved in float64 on the CPU).
    `solver`: "jv", "scipy", "lapjv" (lapx; `extend_cost=True`) or None for `default_solver()`.
    `warm_start`: for "jv" a `LapState` of an earlier solve (rows whose old column stays tight keep
    it; the optimum is the same); for the others a current assignment, whose columns are put on the
    diagonal first (they keep no duals, so this only reorders the problem). With `return_state`,
    returns (perm, LapState) — the state is None for solvers other than "jv".
    """
    solver = solver or default_solver()
    if solver not in available_solvers():
        raise ValueError(f"solve_lap: unknown solver {solver!r}; expected one of {available_solvers()}")
    if solver == "jv" and isinstance(cost, torch.Tensor) and cost.dim() == 2 and cost.shape[0] == cost.shape[1]:
        perm, state = _solve_jv(cost.detach().to("cpu", torch.float64), warm_start, True)
        return (perm, state) if return_state else perm
    c = _as_float64(cost)
    n = c.shape[0]
    state = None
    if n == 0:
        perm = torch.zeros(0, dtype=torch.long)
    elif solver == "jv":
        perm, state = _solve_jv(torch.from_numpy(c), warm_start, True)
    else:
        order = None
        if warm_start is not None:
            order = np.asarray(warm_start.perm if isinstance(warm_start, LapState) else warm_start, dtype=np.int64)
            if order.shape != (n,):
                raise ValueError(f"solve_lap: warm_start has shape {list(order.shape)}, expected [{n}]")
            c = np.ascontiguousarray(c[:, order])
        if solver == "scipy":
            from scipy.optimize import linear_sum_assignment

            rows, cols = linear_sum_assignment(c, maximize=True)
            p = np.empty(n, dtype=np.int64)
            p[rows] = cols
        else:  # lapjv minimises: negate (exact in float64); extend_cost accepts any shape
            _, x, _ = _lap.lapjv(-c, extend_cost=True)
            p = np.asarray(x, dtype=np.int64)
        if order is not None:
            p = order[p]
        perm = torch.from_numpy(p)
    return (perm, state) if return_state else perm


# A cold solve's row reduction costs about as much as this many augmenting paths (measured on n = 512
# weight-matching costs: cold ≈ 1.6 ms + 0.12 ms/path, warm ≈ 0.6 ms + 0.15 ms/path).
COLD_OVERHEAD = 8


class LapPolicy:
    """Solves the LAPs of a sequence of sweeps, one state per perm group: with the "jv" solver and
    `warm_start`, a group's LAP restarts from its previous duals or cold, whichever needed fewer
    augmenting paths (Dijkstra searches after the row reduction, a deterministic count) the last
    time each ran, a cold start counted `COLD_OVERHEAD` paths more for its row reduction. The other
    start is re-tried after `explore` solves, after twice as many each time that re-try lost again
    (up to `8 * explore`; a win resets the wait), and a cold start never while the warm one needs
    at most `COLD_OVERHEAD` paths (it cannot win). Trained weights tend to favour warm starts,
    random wide layers cold ones (the row reduction settles them), so the choice is measured per
    group instead of fixed; a losing cold re-try on trained weights costs ~10 warm solves."""

    def __init__(self, names, *, solver: str | None = None, warm_start: bool = True, explore: int = 8):
        self.solver = solver or default_solver()
        if self.solver not in available_solvers():
            raise ValueError(f"weight_matching: unknown solver {self.solver!r}; expected one of {available_solvers()}")
        self.warm_start, self.explore = warm_start, explore
        self.states: dict = dict.fromkeys(names)
        self.paths = {p: {True: None, False: None} for p in names}
        self.count = dict.fromkeys(names, 0)
        self.wait = dict.fromkeys(names, explore)
        self.solves = 0

    def _warm(self, p: str) -> tuple[bool, bool]:
        """(start warm?, is this a re-try of the start that lost last time?)"""
        w, c = self.paths[p][True], self.paths[p][False]
        if w is None or c is None:
            return w is None, False  # try each once (the very first solve has no state: it runs cold)
        self.count[p] += 1
        better = w <= c + COLD_OVERHEAD
        # A cold start counts at least COLD_OVERHEAD: no re-try can beat a warm start that needed fewer paths;
        # nor, likely, one that needed under half of what the last cold start did (trained weights: warm
        # solves need fewer paths as the descent settles, cold ones about as many; a losing cold re-try
        # costs ~10 warm solves). Skipped, it counts as a re-try lost: the wait doubles.
        if self.count[p] >= self.wait[p] and not (better and w <= COLD_OVERHEAD):
            self.count[p] = 0
            if better and 2 * w < c + COLD_OVERHEAD:
                self.wait[p] = min(2 * self.wait[p], 8 * self.explore)
                return True, False
            return not better, True
        return better, False

    def solve(self, p: str, cost: torch.Tensor) -> torch.Tensor:
        """The permutation maximising Σ_i cost[i, perm[i]] for group `p` (int64, CPU)."""
        self.solves += 1
        warm, retry = (self._warm(p) if self.warm_start and self.states[p] is not None else (False, False))
        start = self.states[p] if warm else None
        perm, self.states[p] = solve_lap(cost, solver=self.solver, return_state=True, warm_start=start)
        if self.states[p] is not None:
            paths = self.paths[p]
            paths[warm] = self.states[p].augmentations
            if retry:
                lost = (paths[True] <= paths[False] + COLD_OVERHEAD) != warm
                self.wait[p] = min(2 * self.wait[p], 8 * self.explore) if lost else self.explore
        return perm
