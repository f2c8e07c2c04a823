"""Weight matching: planted permutations of every zoo model are recovered exactly; the fast path
(cached constant terms, skipped groups, fused gathers) equals a textbook Git Re-Basin loop."""
import pytest
import torch
from scipy.optimize import linear_sum_assignment

import pyrebasin as prb
from pyrebasin.spec import axis_index
from pyrebasin.zoo import MLP, VGG, ResNet20, Transformer

MODELS = {
    "mlp": lambda: MLP(in_features=12, width=[16, 24, 20], classes=5),
    "mlp_ln": lambda: MLP(in_features=12, width=24, depth=2, classes=5, norm="ln"),
    "mlp_bn": lambda: MLP(in_features=12, width=24, depth=2, classes=5, norm="bn"),
    "vgg1d": lambda: VGG(conv_dim=1, input_size=16, cfg=(8, "M", 12, "M"), hidden=16, norm="bn"),
    "vgg2d_ln": lambda: VGG(conv_dim=2, input_size=8, cfg=(8, "M", 12), hidden=16, norm="ln"),
    "resnet20": lambda: ResNet20(norm="bn"),
    "resnet20_ln": lambda: ResNet20(norm="ln", blocks_per_stage=1, conv_dim=2),
    "transformer": lambda: Transformer(seq_len=8, patch=2, d_model=16, heads=4, layers=2),
}


def model_state(name, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = MODELS[name]()
    g = torch.Generator().manual_seed(seed + 100)
    # Random norm affines/statistics so that no two units are alike anywhere.
    state = {k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v).to(
        dtype if v.is_floating_point() else v.dtype) for k, v in model.state_dict().items()}
    return model, state


def assert_states_equal(x, y):
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("method", ["default", "textbook"])
@pytest.mark.parametrize("name", list(MODELS))
def test_planted_permutation_recovered(name, method):
    model, state_a = model_state(name)
    spec = model.permutation_spec()
    pi = prb.random_permutation(spec, state_a, generator=7)
    state_b = prb.apply_permutation(spec, pi, state_a)
    before = {k: v.clone() for k, v in state_b.items()}
    result = prb.weight_matching(spec, state_a, state_b, method=method)
    assert isinstance(result, prb.MatchResult)
    inverse = prb.invert_permutation(pi)
    for p in pi:
        assert torch.equal(result.perms[p], inverse[p]), p
    assert_states_equal(prb.apply_permutation(spec, result.perms, state_b), state_a)
    assert_states_equal(state_b, before)  # inputs untouched
    assert result.iterations >= len(result.objective) - 1 >= 1
    if method == "textbook":
        assert result.iterations == len(result.objective) - 1
    final = result.objective[result.phase_starts[-1]:]  # the true objective's descent (and kept refinements)
    assert all(y >= x - 1e-3 * abs(x) for x, y in zip(final, final[1:]))


def textbook_weight_matching(spec, a, b, max_iter=100, seed=0):
    """Git Re-Basin's loop: every group's full cost rebuilt from index_select'ed copies each time."""
    sizes = spec.perm_sizes(a)
    a = {k: v.double() for k, v in a.items() if k not in spec.fixed}
    b = {k: v.double() for k, v in b.items() if k not in spec.fixed}
    perms = {p: torch.arange(n) for p, n in sizes.items()}
    names = list(sizes)
    g = torch.Generator().manual_seed(seed)

    def permuted(perms, key):
        w = b[key]
        for axis, entry in enumerate(spec.axes_to_perm[key]):
            idx = axis_index(entry, perms, w.shape[axis])
            if idx is not None:
                w = w.index_select(axis, idx)
        return w

    def objective():
        return sum(float((a[k] * permuted(perms, k)).sum()) for k in a)

    history = [objective()]
    for _ in range(max_iter):
        improved = False
        for i in torch.randperm(len(names), generator=g).tolist():
            p = names[i]
            cost = torch.zeros(sizes[p], sizes[p], dtype=torch.float64)
            for key, axis in spec.perm_to_axes[p]:
                wb = permuted({**perms, p: torch.arange(sizes[p])}, key)
                cost += spec.unit_matrix(a[key], key, axis, p) @ spec.unit_matrix(wb, key, axis, p).T
            rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(cols)
            r = torch.arange(sizes[p])
            if float(cost[r, new].sum() - cost[r, perms[p]].sum()) > 1e-12:
                perms[p], improved = new, True
        history.append(objective())
        if not improved:
            break
    return perms, history


@pytest.mark.parametrize("name", ["mlp", "vgg1d", "resnet20", "transformer"])
def test_equals_textbook_on_unrelated_models(name):
    model, state_a = model_state(name, seed=0, dtype=torch.float64)
    _, state_b = model_state(name, seed=1, dtype=torch.float64)
    spec = model.permutation_spec()
    ref_perms, ref_hist = textbook_weight_matching(spec, state_a, state_b, max_iter=20, seed=3)
    result = prb.weight_matching(spec, state_a, state_b, max_iter=20, seed=3, solver="scipy", method="textbook")
    assert result.phase_starts == [0]
    for p in ref_perms:
        assert torch.equal(result.perms[p], ref_perms[p]), p
    assert result.objective == pytest.approx(ref_hist, rel=1e-12)
    # monotone objective
    assert all(y >= x - 1e-9 for x, y in zip(result.objective, result.objective[1:]))
    assert result.objective[-1] > result.objective[0]


@pytest.mark.parametrize("seed", [0, 1])
def test_coupling_schedule_beats_plain_descent_on_unrelated_mlps(seed):
    # Random-init MLPs: the textbook loop (the default) stops at a poor local optimum; down-weighting
    # the coupling terms first (COUPLING_SCHEDULE) ends higher, and its last phase is monotone.
    torch.manual_seed(seed)
    model = prb.zoo.MLP(96, 128, 2, 10)
    state_a = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(seed + 10)
    state_b = {k: v.clone() for k, v in prb.zoo.MLP(96, 128, 2, 10).state_dict().items()}
    spec = model.permutation_spec()
    plain = prb.weight_matching(spec, state_a, state_b, method="textbook")
    assert plain.phase_starts == [0]
    annealed = prb.weight_matching(spec, state_a, state_b, schedule=prb.matching.weight.COUPLING_SCHEDULE, refine=0)
    assert len(annealed.phase_starts) == len(prb.matching.weight.COUPLING_SCHEDULE)
    assert annealed.objective[-1] > plain.objective[-1]
    final = annealed.objective[annealed.phase_starts[-1]:]
    assert all(y >= x - 1e-9 for x, y in zip(final, final[1:]))
    assert len(annealed.objective) == annealed.iterations + 1
    with pytest.raises(ValueError, match="schedule"):
        prb.weight_matching(spec, state_a, state_b, schedule=(0.5,))
    with pytest.raises(ValueError, match="schedule"):
        prb.weight_matching(spec, state_a, state_b, schedule=(-1.0, 1.0))


@pytest.mark.parametrize("name", ["transformer", "mlp", "vgg1d", "resnet20"])
def test_cost_cache_updates_equal_fresh_builds(name):
    # The rank-|S| updates of the cached coupling costs (incl. terms with several permuted dims, of
    # which one changed) must equal a rebuild from scratch after every change of a few units.
    from pyrebasin.matching.costs import WeightCosts

    model, a = model_state(name, seed=0, dtype=torch.float64)
    _, b = model_state(name, seed=1, dtype=torch.float64)
    spec = model.permutation_spec()
    cached = WeightCosts(spec, a, b)
    sizes = cached.sizes
    perms = {p: torch.arange(n) for p, n in sizes.items()}
    g = torch.Generator().manual_seed(0)
    names = [p for p, n in sizes.items() if n >= 2]
    for step in range(3 * len(names)):
        p = names[step % len(names)]
        q = perms[p].clone()
        k = max(2, sizes[p] // 8)
        idx = torch.randperm(sizes[p], generator=g)[:k]
        q[idx] = q[idx.roll(1)]  # a k-cycle: exactly k units move
        perms[p] = q
        cached.set_perm(p, q)
        fresh_costs = WeightCosts(spec, a, b, cache_bytes=0)
        for r, v in perms.items():
            fresh_costs.set_perm(r, v)
        w = (0.2, 1.0, 0.5)[step % 3]  # phases of a coupling schedule rescale the cached costs in place
        for r in sizes:
            fresh = fresh_costs.cost(r, w)
            torch.testing.assert_close(cached.cost(r, w), fresh, rtol=0, atol=1e-12 * float(fresh.abs().max() + 1))
    assert cached.cache  # the cache was used


def test_backends_and_solvers_agree():
    model, state_a = model_state("transformer", seed=0, dtype=torch.float64)
    _, state_b = model_state("transformer", seed=1, dtype=torch.float64)
    spec = model.permutation_spec()
    base = prb.weight_matching(spec, state_a, state_b, seed=1)
    with prb.use_backend("reference"):
        ref = prb.weight_matching(spec, state_a, state_b, seed=1)
    others = [prb.weight_matching(spec, state_a, state_b, seed=1, solver=s)
              for s in prb.matching.available_solvers()]
    for r in [ref] + others:
        assert r.objective == pytest.approx(base.objective, rel=1e-12)
        for p in base.perms:
            assert torch.equal(r.perms[p], base.perms[p])


def test_bfloat16_weights_and_init():
    model, state_a = model_state("mlp", dtype=torch.bfloat16)
    spec = model.permutation_spec()
    pi = prb.random_permutation(spec, state_a, generator=3)
    state_b = prb.apply_permutation(spec, pi, state_a)
    result = prb.weight_matching(spec, state_a, state_b)
    assert_states_equal(prb.apply_permutation(spec, result.perms, state_b), state_a)
    # starting at the answer: the textbook loop stops after one sweep; no method moves a unit
    again = prb.weight_matching(spec, state_a, state_b, init=result.perms, method="textbook")
    assert again.iterations == 1 and all(torch.equal(again.perms[p], result.perms[p]) for p in pi)
    again = prb.weight_matching(spec, state_a, state_b, init=result.perms)
    assert all(torch.equal(again.perms[p], result.perms[p]) for p in pi)
    assert prb.weight_matching(spec, state_a, state_b, max_iter=0).iterations == 0


def test_seed_reproducible():
    model, a = model_state("resnet20_ln", seed=0)
    _, b = model_state("resnet20_ln", seed=1)
    spec = model.permutation_spec()
    r1 = prb.weight_matching(spec, a, b, seed=5)
    r2 = prb.weight_matching(spec, a, b, seed=5)
    assert r1.objective == r2.objective
    assert all(torch.equal(r1.perms[p], r2.perms[p]) for p in r1.perms)


def unrelated_mlps(seed, width=128):
    torch.manual_seed(seed)
    model = prb.zoo.MLP(96, width, 2, 10)
    state_a = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(seed + 10)
    state_b = {k: v.clone() for k, v in prb.zoo.MLP(96, width, 2, 10).state_dict().items()}
    return model.permutation_spec(), state_a, state_b


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_reaches_at_least_the_textbook_objective(seed):
    # Deterministic random-weight pairs: the default (its schedule, then refinement rounds that only
    # keep improvements) ends at least as high as its schedule alone (refine=0, same group orders),
    # and here above the textbook loop (measured: +7.9%, +5.0%, +8.3% over it for seeds 0, 1, 2 with
    # the two group orders of a small problem, +6.0%, +2.7%, +8.3% with one; its schedule alone
    # +4.8%, +4.7%, +7.6%, with one order +4.8%, +2.7%, +7.6%).
    spec, a, b = unrelated_mlps(seed)
    textbook = prb.weight_matching(spec, a, b, method="textbook")
    schedule = prb.weight_matching(spec, a, b, refine=0)
    default = prb.weight_matching(spec, a, b)
    assert default.objective[-1] >= schedule.objective[-1]
    assert default.objective[-1] > textbook.objective[-1]
    final = default.objective[default.phase_starts[-1]:]
    assert all(y >= x - 1e-9 for x, y in zip(final, final[1:]))
    # the objective reported is that of the perms returned
    aligned = prb.apply_permutation(spec, default.perms, b)
    direct = sum(float((a[k].double() * aligned[k].double()).sum()) for k in a if k not in spec.fixed)
    assert direct == pytest.approx(default.objective[-1], rel=1e-9)


def test_restarts_keep_the_best_seed():
    spec, a, b = unrelated_mlps(3, width=64)
    runs = [prb.weight_matching(spec, a, b, method="textbook", seed=s) for s in range(5, 9)]
    best = prb.weight_matching(spec, a, b, method="textbook", seed=5, restarts=4)
    top = max(range(4), key=lambda i: (runs[i].objective[-1], -i))
    assert best.seed == 5 + top and best.objective == runs[top].objective
    assert all(torch.equal(best.perms[p], runs[top].perms[p]) for p in best.perms)


def test_max_iter_warns_while_still_improving():
    spec, a, b = unrelated_mlps(0)
    with pytest.warns(RuntimeWarning, match=r"max_iter=1 .*last sweep changed the objective by \+"):
        short = prb.weight_matching(spec, a, b, method="textbook", max_iter=1)
    assert short.iterations == 1
    with pytest.warns(RuntimeWarning, match="first: coupling 0.2") as record:
        prb.weight_matching(spec, a, b, max_iter=1)
    assert len(record) == 1 and record[0].filename == __file__  # one warning, at the caller's line
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # converged runs stay quiet
        prb.weight_matching(spec, a, b, method="textbook")
        prb.weight_matching(spec, a, b, max_iter=0)


def test_errors():
    model, a = model_state("mlp")
    spec = model.permutation_spec()
    b = dict(a)
    b["layers.0.weight"] = torch.zeros(16, 13)
    with pytest.raises(ValueError, match="layers.0.weight"):
        prb.weight_matching(spec, a, b)
    bad = prb.identity_permutation(spec, a)
    bad["P_layers.0"] = torch.zeros(16, dtype=torch.long)
    with pytest.raises(ValueError, match="P_layers.0"):
        prb.weight_matching(spec, a, a, init=bad)
    with pytest.raises(ValueError, match="max_iter"):
        prb.weight_matching(spec, a, a, max_iter=-1)
    ints = {k: v.long() if k == "layers.1.weight" else v for k, v in a.items()}
    with pytest.raises(TypeError, match="layers.1.weight"):
        prb.weight_matching(spec, ints, a)
    missing = {k: v for k, v in a.items() if k != "layers.2.bias"}
    with pytest.raises(ValueError, match="layers.2.bias"):
        prb.weight_matching(spec, a, missing)
    for kwargs, word in [(dict(method="best"), "'best'"), (dict(restarts=0), "restarts=0"),
                         (dict(restarts=2.0), "restarts=2.0"), (dict(refine=-1), "refine=-1"),
                         (dict(seed=1.5), "seed=1.5"), (dict(max_iter=2.5), "max_iter=2.5"),
                         (dict(schedule=(float("nan"), 1.0)), "schedule"), (dict(schedule=()), "schedule"),
                         (dict(schedule="fast"), "fast"), (dict(solver="magic"), "magic")]:
        with pytest.raises(ValueError, match=word):
            prb.weight_matching(spec, a, a, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model, a = model_state("vgg1d")
    _, b = model_state("vgg1d", seed=1)
    spec = model.permutation_spec()
    cpu = prb.weight_matching(spec, a, b)
    gpu = prb.weight_matching(spec, {k: v.cuda() for k, v in a.items()}, {k: v.cuda() for k, v in b.items()})
    assert gpu.objective == pytest.approx(cpu.objective, rel=1e-5)


def test_default_first_phase_stops_once_settled():
    # The default's down-weighted phase ends at the first sweep that moves the true objective by at most
    # 0.1% (or gains nothing); the schedule alone runs it until no LAP gains. Same group orders.
    # Measured on this pair: phase 1 of 2 sweeps against the schedule's 4.
    spec, a, b = unrelated_mlps(0)
    default = prb.weight_matching(spec, a, b, refine=0)
    schedule = prb.weight_matching(spec, a, b, method="schedule")
    first = default.objective[:default.phase_starts[1] + 1]
    assert abs(first[-1] - first[-2]) <= 1e-3 * abs(first[-1])
    assert all(abs(y - x) > 1e-3 * abs(y) for x, y in zip(first[:-2], first[1:-1]))
    assert default.phase_starts[1] < schedule.phase_starts[1]
    assert default.objective[:default.phase_starts[1] + 1] == schedule.objective[:default.phase_starts[1] + 1]
    assert prb.matching.METHODS["textbook"]["settle"] == 0.0  # the paper's loop is untouched
