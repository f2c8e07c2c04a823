"""pyrebasin::lap_solve and the LAP layer over it: every solver returns the maximising permutation, in
float64, with clear errors; the native kernel equals its reference twin (the same algorithm, ported)."""
import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

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


# --- the lap_solve op (solver "jv"): native kernel against its reference twin ---
from pyrebasin import ops, reference  # noqa: E402
from pyrebasin._backend import has_kernel  # noqa: E402
from pyrebasin.matching import LapState  # noqa: E402

needs_native = pytest.mark.skipif(not has_kernel("lap_solve", "cpu"), reason="native lap_solve not built")


def assignment_value(cost, col):
    return float(cost[torch.arange(cost.shape[0]), col].sum())


@needs_native
@pytest.mark.parametrize("n", [1, 2, 3, 17, 64])
def test_lap_solve_native_equals_reference(n):
    g = torch.Generator().manual_seed(n)
    cost = torch.randn(n, n, generator=g, dtype=torch.float64)
    col_n, v_n, aug_n = torch.ops.pyrebasin.lap_solve(cost, None, None)
    col_r, v_r, aug_r = reference.lap_solve(cost, None, None)
    # augmenting row reduction settles most rows before the Dijkstra phase counts any path
    assert torch.equal(col_n, col_r) and int(aug_n) == int(aug_r) <= n
    torch.testing.assert_close(v_n, v_r, rtol=0, atol=1e-12)
    assert assignment_value(cost, col_n) == pytest.approx(
        float(cost[torch.arange(n), torch.as_tensor(linear_sum_assignment(cost.numpy())[1])].sum()), abs=1e-12)
    # warm start on a perturbed cost: same optimum as a cold solve, fewer augmenting paths
    cost2 = cost + 0.05 * torch.randn(n, n, generator=g, dtype=torch.float64)
    col_w, _, aug_w = torch.ops.pyrebasin.lap_solve(cost2, v_n, col_n)
    col_wr, _, aug_wr = reference.lap_solve(cost2, v_r, col_r)
    cold = torch.ops.pyrebasin.lap_solve(cost2, None, None)[0]
    assert assignment_value(cost2, col_w) == pytest.approx(assignment_value(cost2, cold), abs=1e-12)
    assert torch.equal(col_w, col_wr) and int(aug_w) == int(aug_wr) <= n


@needs_native
@pytest.mark.parametrize("n", [5, 16, 33, 130])
def test_lap_solve_ties_native_equals_reference(n):
    # Small integer costs tie everywhere: both twins must return an optimum with a valid dual
    # certificate (the Dijkstra's tie order may differ, so the assignments need not be equal).
    g = torch.Generator().manual_seed(100 + n)
    cost = torch.randint(0, 3, (n, n), generator=g).double()
    best = float(cost.numpy()[linear_sum_assignment(cost.numpy())].sum())
    for col, v, _ in (torch.ops.pyrebasin.lap_solve(cost, None, None), reference.lap_solve(cost, None, None)):
        assert sorted(col.tolist()) == list(range(n)) and assignment_value(cost, col) == best
        u = (cost - v).min(1).values  # u_i + v_j <= c_ij everywhere, tight on the assignment
        assert torch.allclose(cost[torch.arange(n), col] - v[col], u, atol=1e-12)


@needs_native
def test_lap_solve_row_reduction_leaves_few_paths():
    cost = torch.randn(256, 256, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _, _, aug = torch.ops.pyrebasin.lap_solve(cost, None, None)
    assert int(aug) < 256 // 2


@needs_native
def test_lap_solve_warm_from_the_answer_needs_no_augmentation():
    cost = torch.randn(40, 40, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    col, v, _ = torch.ops.pyrebasin.lap_solve(cost, None, None)
    col2, _, aug = torch.ops.pyrebasin.lap_solve(cost, v, col)
    assert torch.equal(col, col2) and int(aug) == 0


@needs_native
def test_lap_solve_opcheck_and_errors():
    cost = torch.randn(6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.library.opcheck(torch.ops.pyrebasin.lap_solve, (cost, None, None))
    col, v, _ = torch.ops.pyrebasin.lap_solve(cost, None, None)
    torch.library.opcheck(torch.ops.pyrebasin.lap_solve, (cost, v, col))
    with pytest.raises(RuntimeError, match="float64"):
        torch.ops.pyrebasin.lap_solve(cost.float(), None, None)
    with pytest.raises(RuntimeError, match="square"):
        torch.ops.pyrebasin.lap_solve(cost[:5], None, None)
    with pytest.raises(RuntimeError, match="both v and col4row"):
        torch.ops.pyrebasin.lap_solve(cost, v, None)
    with pytest.raises(RuntimeError, match="NaN"):
        torch.ops.pyrebasin.lap_solve(torch.full((2, 2), float("nan"), dtype=torch.float64), None, None)
    with pytest.raises(ValueError, match="both v and col4row"):
        reference.lap_solve(cost, v, None)


@needs_native
def test_lap_solve_errors_quote_what_they_got():
    from torch._subclasses.fake_tensor import FakeTensorMode

    cost = torch.zeros(3, 3, dtype=torch.float64)
    col = torch.tensor([0, 7, 1])
    with pytest.raises(RuntimeError, match=r"col4row\[1\] = 7 is out of range \[-1, 3\)"):
        torch.ops.pyrebasin.lap_solve(cost, torch.zeros(3, dtype=torch.float64), col)
    with pytest.raises(RuntimeError, match=r"v must be a float64 CPU tensor of shape \[3\], got Float \[2\]"):
        torch.ops.pyrebasin.lap_solve(cost, torch.zeros(2), torch.arange(3))
    with pytest.raises(RuntimeError, match=r"square \[n, n\] matrix, got \[3, 2\]"):
        torch.ops.pyrebasin.lap_solve(cost[:, :2], None, None)
    with FakeTensorMode():
        with pytest.raises(RuntimeError, match="cost must be float64, got torch.float32"):
            torch.ops.pyrebasin.lap_solve(torch.empty(3, 3), None, None)
        with pytest.raises(RuntimeError, match=r"col4row must be an int64 CPU tensor of shape \[3\], got torch.int32"):
            torch.ops.pyrebasin.lap_solve(torch.empty(3, 3, dtype=torch.float64), torch.empty(3, dtype=torch.float64),
                                          torch.empty(3, dtype=torch.int32))


def test_solve_lap_jv_warm_state_round_trip():
    cost = torch.randn(30, 30, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    perm, state = solve_lap(cost, solver="jv", return_state=True)
    assert isinstance(state, LapState) and torch.equal(state.perm, perm)
    again = solve_lap(cost * 1.001, solver="jv", warm_start=state)
    assert torch.equal(again, perm)
    assert solve_lap(cost, solver="scipy", return_state=True)[1] is None
    with prb_backend("reference"):
        assert torch.equal(solve_lap(cost, solver="jv"), perm)
    assert ops.lap_solve is not None


def prb_backend(name):
    import pyrebasin as prb

    return prb.use_backend(name)


def test_lap_policy_never_retries_cold_against_a_cheap_warm_start(monkeypatch):
    # The same cost solved again: a warm start needs no augmenting path, so after trying each start
    # once the policy must never pay for a cold solve again (a cold one counts COLD_OVERHEAD paths more).
    from pyrebasin.matching import lap

    starts = []
    real = lap._solve_jv  # the policy's jv solves (the kernel maximises the cost in place)

    def recording(cost, warm_start, maximize=False):
        starts.append(warm_start is not None)
        return real(cost, warm_start, maximize)

    monkeypatch.setattr(lap, "_solve_jv", recording)
    cost = torch.randn(48, 48, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    policy = lap.LapPolicy(["p"], solver="jv")
    perms = {tuple(policy.solve("p", cost).tolist()) for _ in range(40)}
    assert len(perms) == 1
    assert starts[:2] == [False, True] and all(starts[2:]), starts


@needs_native
@pytest.mark.parametrize("n", [3, 5, 7, 130])
def test_lap_solve_lanes_and_duplicate_columns(n):
    # The Dijkstra's row scan runs in vector lanes with a scalar tail (n not a multiple of the lane
    # count) and breaks exact distance ties (duplicated columns: dead units) in scipy's order; the
    # result must be an optimum with a dual certificate, and a non-finite entry in the last
    # (tail) position is still refused with its index.
    g = torch.Generator().manual_seed(200 + n)
    cost = torch.randn(n, n, generator=g, dtype=torch.float64)
    cost[:, n // 2:] = cost[:, :1]  # half of the columns equal
    best = float(cost.numpy()[linear_sum_assignment(cost.numpy())].sum())
    col, v, _ = torch.ops.pyrebasin.lap_solve(cost, None, None)
    assert sorted(col.tolist()) == list(range(n)) and assignment_value(cost, col) == pytest.approx(best, abs=1e-12)
    u = (cost - v).min(1).values
    assert torch.allclose(cost[torch.arange(n), col] - v[col], u, atol=1e-12)
    col_w, _, _ = torch.ops.pyrebasin.lap_solve(cost + 0.01, v, col)  # warm start on a shifted cost
    assert assignment_value(cost, col_w) == pytest.approx(best, abs=1e-12)
    bad = cost.clone()
    bad[n - 1, n - 1] = float("nan")
    with pytest.raises(RuntimeError, match=rf"cost\[{n - 1}, {n - 1}\]"):
        torch.ops.pyrebasin.lap_solve(bad, None, None)


@pytest.mark.parametrize("warm_paths, retries", [(12, False), (30, True)])
def test_lap_policy_skips_cold_retries_against_a_warm_start_twice_as_cheap(monkeypatch, warm_paths, retries):
    # Cold starts needing 40 paths (48 with COLD_OVERHEAD): a warm start needing 12 (under half) is
    # never re-tried cold; one needing 30 still is, after `explore` solves.
    from pyrebasin.matching import lap

    starts = []

    def fake(cost, warm_start, maximize=False):
        starts.append(warm_start is not None)
        perm = torch.arange(cost.shape[0])
        return perm, lap.LapState(perm, torch.zeros(cost.shape[0], dtype=torch.float64),
                                  warm_paths if warm_start is not None else 40)

    monkeypatch.setattr(lap, "_solve_jv", fake)
    policy = lap.LapPolicy(["p"], solver="jv", explore=4)
    for _ in range(30):
        policy.solve("p", torch.zeros(6, 6, dtype=torch.float64))
    assert starts[:2] == [False, True]
    assert (not all(starts[2:])) == retries, starts


@needs_native
def test_lap_solve_warm_start_refuses_a_non_finite_cost_by_index():
    # A warm start checks finiteness within its row minima (one pass over the cost): same message.
    cost = torch.randn(9, 9, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    col, v, _ = torch.ops.pyrebasin.lap_solve(cost, None, None)
    for pos in [(0, 0), (4, 7), (8, 8)]:
        bad = cost.clone()
        bad[pos] = float("inf") if pos[0] % 2 else float("nan")
        with pytest.raises(RuntimeError, match=rf"cost\[{pos[0]}, {pos[1]}\]"):
            torch.ops.pyrebasin.lap_solve(bad, v, col)


@needs_native
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 9, 17, 130])
def test_lap_solve_maximize_reads_the_cost_negated(n):
    # maximize=True is bit for bit the solve of -cost (assignment, duals, path count), cold and warm,
    # on random costs, integer ties and duplicated columns (the row reduction's two cheapest columns
    # are found in vector lanes: ties must fall as in a scan in column order); the twin agrees.
    g = torch.Generator().manual_seed(300 + n)
    base = torch.randn(n, n, generator=g, dtype=torch.float64)
    dup = base.clone()
    dup[:, n // 2:] = dup[:, :1]
    for cost in (base, torch.randint(0, 3, (n, n), generator=g).double(), dup):
        cold = torch.ops.pyrebasin.lap_solve(-cost, None, None)
        got = torch.ops.pyrebasin.lap_solve(cost, None, None, True)
        assert all(torch.equal(x, y) for x, y in zip(got, cold))
        shifted = cost + 0.01 * torch.randn(n, n, generator=g, dtype=torch.float64)
        warm = torch.ops.pyrebasin.lap_solve(-shifted, cold[1], cold[0])
        assert all(torch.equal(x, y) for x, y in zip(torch.ops.pyrebasin.lap_solve(shifted, cold[1], cold[0], True), warm))
        ref = reference.lap_solve(cost, None, None, True)
        assert all(torch.equal(x, y) for x, y in zip(ref, reference.lap_solve(-cost, None, None)))
        if cost is base:
            assert torch.equal(ref[0], got[0]) and int(ref[2]) == int(got[2])
    torch.library.opcheck(torch.ops.pyrebasin.lap_solve, (base, None, None, True))
    assert torch.equal(ops.lap_solve(base, maximize=True)[0], solve_lap(base, solver="jv"))
