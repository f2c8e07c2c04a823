"""The Cauchy–Schwarz optimality certificate of weight matching (matching/certify.py): it fires on planted
pairs (also rescaled) and on (A, A), never on noisy pairs, leaves the found permutations unchanged, and
the streamed provider agrees with the in-memory one."""
import warnings

import pytest
import torch

import pyrebasin as prb
from pyrebasin import hf, shards
from pyrebasin.matching.certify import RTOL, Certificate
from pyrebasin.matching.costs import WeightCosts
from pyrebasin.matching.streamed import StreamedCosts, streamed_weight_matching
from tests.test_matching_weight import model_state

NAMES = ["mlp", "resnet20_ln", "transformer"]


def planted(name, seed=0):
    model, state_a = model_state(name, seed)
    spec = model.permutation_spec()
    pi = prb.random_permutation(spec, state_a, generator=7)
    return spec, state_a, prb.apply_permutation(spec, pi, state_a), prb.invert_permutation(pi)


def noisy(state, scale, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * v.std() * torch.randn(v.shape, generator=g) if v.is_floating_point() and v.numel() > 1
            else v for k, v in state.items()}


@pytest.mark.parametrize("name", NAMES)
def test_fires_on_a_planted_pair_with_the_same_perms(name):
    spec, state_a, state_b, inverse = planted(name)
    plain = prb.weight_matching(spec, state_a, state_b, certify=False)
    cert = prb.weight_matching(spec, state_a, state_b)
    assert cert.certified and not plain.certified
    assert all(torch.equal(cert.perms[p], plain.perms[p]) and torch.equal(cert.perms[p], inverse[p]) for p in inverse)
    assert cert.iterations < plain.iterations  # the second phase and the refinement were skipped
    assert cert.objective[-1] == pytest.approx(cert.bound, rel=1e-6)
    assert len(cert.phase_starts) == 2 and cert.phase_starts[-1] == cert.iterations


def test_bound_is_the_sum_of_norm_products():
    spec, state_a, state_b, _ = planted("mlp")
    costs = WeightCosts(spec, state_a, state_b)
    want = sum(float(state_a[k].double().norm() * state_b[k].double().norm()) for k in costs.keys)
    assert Certificate(costs).bound == pytest.approx(want, rel=1e-12)


def test_fires_on_a_model_and_itself_before_any_sweep():
    spec, state_a, _, _ = planted("transformer")
    result = prb.weight_matching(spec, state_a, state_a)
    assert result.certified and result.iterations == 0 and result.objective == [pytest.approx(result.bound, rel=1e-12)]
    assert all(torch.equal(v, torch.arange(len(v))) for v in result.perms.values())


def test_fires_on_a_rescaled_plant():
    """Cauchy–Schwarz is tight for any positive per-tensor scale: B = 2·π(A) is certified too."""
    spec, state_a, state_b, inverse = planted("mlp")
    scaled = {k: 2 * v if v.is_floating_point() else v for k, v in state_b.items()}
    result = prb.weight_matching(spec, state_a, scaled)
    assert result.certified and all(torch.equal(result.perms[p], inverse[p]) for p in inverse)


@pytest.mark.parametrize("scale", [1e-3, 0.1])
@pytest.mark.parametrize("name", NAMES)
def test_never_fires_on_a_noisy_pair_and_changes_nothing(name, scale):
    spec, state_a, state_b, _ = planted(name)
    b = noisy(state_b, scale)
    result = prb.weight_matching(spec, state_a, b)
    plain = prb.weight_matching(spec, state_a, b, certify=False)
    assert not result.certified and result.bound > result.objective[-1] * (1 + 100 * RTOL)
    assert result.objective == plain.objective and result.iterations == plain.iterations
    assert all(torch.equal(result.perms[p], plain.perms[p]) for p in plain.perms)


def test_textbook_is_uncertified_unless_asked():
    spec, state_a, state_b, inverse = planted("transformer")
    textbook = prb.weight_matching(spec, state_a, state_b, method="textbook")
    asked = prb.weight_matching(spec, state_a, state_b, method="textbook", certify=True)
    assert not textbook.certified and asked.certified and asked.iterations < textbook.iterations
    assert all(torch.equal(asked.perms[p], textbook.perms[p]) for p in inverse)


transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    """A tiny LLaMA (A), B = A with a planted permutation of the plain (shared-perm) spec, B' = B + noise,
    B_nested = A with a planted nested perm of the traced spec, as sharded model directories. Returns the
    plain spec (`without_nesting`: the plain path's tests) and the traced nested one."""
    root = tmp_path_factory.mktemp("cert")
    transformers.utils.logging.set_verbosity_error()
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(root / "a", max_shard_size="60KB")
    nested, _ = hf.load_hf_spec(root / "a")
    state_a = {k: v for k, v in model.state_dict().items() if k in nested.axes_to_perm}
    spec = nested.without_nesting(state_a)
    pi = prb.random_permutation(spec, state_a, generator=torch.Generator().manual_seed(1))
    rho = prb.random_permutation(nested, state_a, generator=torch.Generator().manual_seed(2))
    for name, state in (("b", prb.apply_permutation(spec, pi, state_a)),
                        ("b_noisy", prb.apply_permutation(spec, pi, noisy(state_a, 0.1))),
                        ("b_nested", prb.apply_permutation(nested, rho, state_a))):
        model.load_state_dict(state, strict=False)
        model.save_pretrained(root / name, max_shard_size="60KB")
    return root, spec, prb.invert_permutation(pi), nested, prb.invert_permutation(rho)


@pytest.mark.parametrize("b", ["a", "b", "b_noisy"])
def test_streamed_and_in_memory_agree(llama_dirs, b):
    root, spec, inverse, _, _ = llama_dirs
    lazy_a, lazy_b = shards.ShardedState(root / "a"), shards.ShardedState(root / b)
    want = prb.weight_matching(spec, dict(lazy_a.read(lazy_a)), dict(lazy_b.read(lazy_b)))
    made = []

    def provider(*args, **kwargs):
        made.append(StreamedCosts(*args, block_bytes=30_000, cache_bytes=100_000, **kwargs))
        return made[-1]

    got = prb.weight_matching(spec, lazy_a, lazy_b, provider=provider)
    assert got.certified == want.certified == (b != "b_noisy")
    assert {p: v.tolist() for p, v in got.perms.items()} == {p: v.tolist() for p, v in want.perms.items()}
    assert got.bound == pytest.approx(want.bound, rel=1e-12) and got.iterations == want.iterations
    if b == "b":
        assert all(torch.equal(got.perms[p], inverse[p]) for p in inverse)
    # the norms came from the first objective pass (no extra read for the bound)
    assert set(made[0].norms) == set(made[0].keys)


@pytest.mark.parametrize("seed", range(3))
def test_streamed_refinement_matches_in_memory(llama_dirs, seed):
    """Kicks tracked from cached costs and remembered states give the in-memory result in fewer passes."""
    root, spec, _, _, _ = llama_dirs
    lazy_a, lazy_b = shards.ShardedState(root / "a"), shards.ShardedState(root / "b_noisy")
    want = prb.weight_matching(spec, dict(lazy_a.read(lazy_a)), dict(lazy_b.read(lazy_b)), seed=seed)
    got = streamed_weight_matching(spec, lazy_a, lazy_b, seed=seed, block_bytes=30_000, cache_bytes=100_000)
    assert {p: v.tolist() for p, v in got.perms.items()} == {p: v.tolist() for p, v in want.perms.items()}
    assert got.objective == pytest.approx(want.objective, rel=1e-9)


@pytest.mark.parametrize("b", ["a", "b", "b_nested", "b_noisy"])
def test_staged_nested_certificate_streamed_and_in_memory(llama_dirs, b):
    """The traced nested spec (staged solve): certified in stage 1 on (A, A) and on a shared plant, in
    stage 2 on a nested plant, never on the noisy pair; streamed equals in memory."""
    root, _, inverse, nested, inverse_nested = llama_dirs
    lazy_a, lazy_b = shards.ShardedState(root / "a"), shards.ShardedState(root / b)
    want = prb.weight_matching(nested, dict(lazy_a.read(lazy_a)), dict(lazy_b.read(lazy_b)))
    got = streamed_weight_matching(nested, lazy_a, lazy_b, block_bytes=30_000, cache_bytes=100_000)
    stage = {"a": "shared", "b": "shared", "b_nested": "families", "b_noisy": "descent"}[b]
    assert got.stage == want.stage == stage and got.certified == want.certified == (b != "b_noisy")
    assert {p: v.tolist() for p, v in got.perms.items()} == {p: v.tolist() for p, v in want.perms.items()}
    assert got.bound == pytest.approx(want.bound, rel=1e-12)
    assert got.objective == pytest.approx(want.objective, rel=1e-9)
    if got.certified:
        assert got.objective[-1] == pytest.approx(got.bound, rel=RTOL)
    if b == "b_nested":
        assert all(torch.equal(got.perms[p], inverse_nested[p]) for p in inverse_nested)
    if b == "b":
        from pyrebasin.nested import lift_shared
        assert all(torch.equal(got.perms[p], v) for p, v in lift_shared(nested.nested, inverse).items())


def _certify_worker(rank, world, port, results):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        from pyrebasin.matching import costs
        costs.SPLIT_MIN_BYTES = 0  # split by group: each rank holds its share of the bound's norms
        spec, state_a, state_b, _ = planted("resnet20_ln")
        r = prb.weight_matching(spec, state_a, state_b)
        results[rank] = (r.perms, r.certified, r.bound, r.iterations)
    finally:
        dist.destroy_process_group()


def test_two_ranks_certify_as_one_process():
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from tests.test_distributed import _free_port

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    spec, state_a, state_b, inverse = planted("resnet20_ln")
    one = prb.weight_matching(spec, state_a, state_b)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_certify_worker, args=(2, _free_port(), results), nprocs=2, join=True)
        results = dict(results)
    for rank in (0, 1):
        perms, certified, bound, iterations = results[rank]
        assert certified and one.certified and iterations == one.iterations
        assert bound == pytest.approx(one.bound, rel=1e-12)
        assert all(torch.equal(perms[p], inverse[p]) for p in inverse)
