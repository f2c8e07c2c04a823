"""LAP layer: every solver returns the maximising permutation, in float64, with clear errors."""
import itertools

import numpy as np
import pytest
import torch

from pyrebasin.matching import available_solvers, default_solver, solve_lap

SOLVERS = available_solvers()


def brute_force(cost: np.ndarray) -> float:
    n = cost.shape[0]
    return max(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("n", [1, 2, 5, 7])
def test_maximises(solver, n):
    rng = np.random.default_rng(n)
    for _ in range(5):
        cost = rng.normal(size=(n, n))
        perm = solve_lap(cost, solver=solver)
        assert perm.dtype == torch.int64 and sorted(perm.tolist()) == list(range(n))
        assert cost[np.arange(n), perm.numpy()].sum() == pytest.approx(brute_force(cost), abs=1e-12)


@pytest.mark.parametrize("solver", SOLVERS)
def test_float64_resolution(solver):
    # Differences far below float32 resolution must still decide the assignment.
    n = 6
    perm_true = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    cost = torch.full((n, n), 1e3, dtype=torch.float64)
    cost[torch.arange(n), perm_true] += 1e-9
    assert torch.equal(solve_lap(cost, solver=solver), perm_true)


@pytest.mark.parametrize("solver", SOLVERS)
def test_warm_start_same_optimum(solver):
    g = torch.Generator().manual_seed(1)
    cost = torch.randn(64, 64, generator=g)
    cold = solve_lap(cost, solver=solver)
    warm = solve_lap(cost, solver=solver, warm_start=torch.randperm(64, generator=g))
    rows = torch.arange(64)
    assert float(cost[rows, cold].double().sum()) == pytest.approx(float(cost[rows, warm].double().sum()), abs=1e-9)


def test_solvers_agree_and_default():
    assert default_solver() in SOLVERS
    cost = torch.randn(100, 100, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    results = {s: solve_lap(cost, solver=s) for s in SOLVERS}
    first = next(iter(results.values()))
    for r in results.values():
        assert torch.equal(r, first)


def test_errors():
    with pytest.raises(ValueError, match="square"):
        solve_lap(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        solve_lap(np.array([[0.0, np.nan], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="unknown solver"):
        solve_lap(np.eye(2), solver="hungarian-magic")
    with pytest.raises(ValueError, match="warm_start"):
        solve_lap(np.eye(3), warm_start=torch.arange(2))
    assert solve_lap(np.zeros((0, 0))).numel() == 0
