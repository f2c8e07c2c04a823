"""Activation matching of language models: token batches (ids, dicts with padding, DataLoaders), planted
permutations of a tiny HF LLaMA recovered, padding left out of the statistics, passes under a memory
budget identical to one pass, float32 shifted moments against float64."""
import warnings

import pytest
import torch

import pyrebasin as prb
from pyrebasin.matching import activation as activation_module
from pyrebasin.matching.activation_stats import find_sites, plan_passes
from pyrebasin.moments import CrossMoments

transformers = pytest.importorskip("transformers")

VOCAB, T = 64, 12


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0)).eval()


@pytest.fixture(scope="module")
def planted():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (2, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = prb.trace_spec(model, {"input_ids": ids, "use_cache": False})
    state_a = dict(model.state_dict())
    pi = prb.random_permutation(spec, state_a, generator=5)
    return model, spec, state_a, prb.apply_permutation(spec, pi, state_a), prb.invert_permutation(pi)


def tokens(n=48, seed=0):
    return torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))


def padded(ids, seed=1):
    """Right padding of random length (1..T tokens kept per sequence); pad positions hold `seed`-drawn ids."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.randint(1, T + 1, (ids.shape[0],), generator=g)
    mask = (torch.arange(T)[None, :] < keep[:, None]).long()
    garbage = torch.randint(0, VOCAB, ids.shape, generator=g)
    return {"input_ids": torch.where(mask.bool(), ids, garbage), "attention_mask": mask}


def exact(result, inverse):
    return {p: bool(torch.equal(result.perms[p], inverse[p])) for p in inverse}


def test_planted_permutation_from_token_ids_and_padded_dicts(planted):
    model, spec, _, state_b, inverse = planted
    # default state_a: the model's own tensors, the non-persistent rotary inv_freq buffer included
    assert "model.rotary_emb.inv_freq" not in model.state_dict()
    r_ids = prb.activation_matching(model, model, spec, tokens(), state_b=state_b, batch_size=16)
    assert all(exact(r_ids, inverse).values())
    batches = [padded(tokens(16, seed=s), seed=s + 10) for s in range(3)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    r_dict = prb.activation_matching(model, model, spec, loader, state_b=state_b)
    assert all(exact(r_dict, inverse).values())
    assert r_dict.objective[-1] > r_dict.objective[0]


def test_padding_is_left_out_of_the_statistics(planted):
    model, spec, state_a, state_b, _ = planted
    ids = tokens(32)
    a, b = padded(ids, seed=3), padded(ids, seed=3)
    b["input_ids"] = torch.where(b["attention_mask"].bool(), ids, (ids + 7) % VOCAB)  # other pad ids
    run = lambda data: prb.activation_matching(model, model, spec, data, state_a=state_a, state_b=state_b,  # noqa: E731
                                               batch_size=16).objective
    # causal attention: the real tokens' activations do not depend on the ids at padded positions
    torch.testing.assert_close(torch.tensor(run(a)), torch.tensor(run(b)), rtol=1e-12, atol=1e-12)
    unmasked = dict(b, attention_mask=torch.ones_like(b["attention_mask"]))
    assert abs(run(unmasked)[0] - run(a)[0]) > 1e-3


def test_max_memory_splits_into_passes_with_identical_result(planted, monkeypatch):
    model, spec, state_a, state_b, inverse = planted
    data = tokens()
    whole = prb.activation_matching(model, model, spec, data, state_a=state_a, state_b=state_b, batch_size=16)
    budget = 3 * CrossMoments.nbytes(48, 48)   # the largest site (the MLP's 48 units) and what passes keep
    sizes = spec.perm_sizes(state_a)
    assert len(plan_passes(find_sites(model, spec), sizes, set(), budget, torch.float64)) >= 3
    passes = []
    real = activation_module.gather_moments
    monkeypatch.setattr(activation_module, "gather_moments", lambda *a, **k: passes.append(1) or real(*a, **k))
    split = prb.activation_matching(model, model, spec, data, state_a=state_a, state_b=state_b, batch_size=16,
                                    max_memory=budget)
    assert len(passes) >= 3
    assert all(torch.equal(split.perms[p], whole.perms[p]) for p in whole.perms)
    assert split.objective == whole.objective and split.iterations == whole.iterations
    assert all(exact(split, inverse).values())
    with pytest.raises(ValueError, match="max_memory=1000 bytes is too small"):
        prb.activation_matching(model, model, spec, data, state_a=state_a, state_b=state_b, max_memory=1000)
    one_shot = prb.activation_matching(model, model, spec, (b for b in data.split(16)), state_a=state_a,
                                       state_b=state_b)   # one pass: a generator is read once, its head put back
    assert one_shot.objective == whole.objective
    with pytest.raises(TypeError, match="one-shot iterator"):
        prb.activation_matching(model, model, spec, iter([data[:16], data[16:]]), state_a=state_a,
                                state_b=state_b, max_memory=budget)


def test_float32_shifted_moments_match_float64(planted):
    model, spec, state_a, state_b, inverse = planted
    r32 = prb.activation_matching(model, model, spec, tokens(), state_a=state_a, state_b=state_b, batch_size=16,
                                  dtype=torch.float32)
    assert all(exact(r32, inverse).values())
    # activations far from zero (mean 50, std 1), 20 batches of 512: shifted float32 sums keep the correlation
    # to max |Δ| 1.2e-7, 1.8e-7, 1.2e-7 (seeds 0-2); plain float32 sums lose it to cancellation (1.2e-3 - 1.4e-3)
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(16, 16, generator=g)
    m64, m32 = CrossMoments(16, 16), CrossMoments(16, 16, dtype=torch.float32)
    naive = {k: torch.zeros(16, 16) for k in ("xy",)}
    sx = torch.zeros(16)
    sy = torch.zeros(16)
    for _ in range(20):
        x = 50 + torch.randn(512, 16, generator=g)
        y = 50 + x @ mix / 4 + torch.randn(512, 16, generator=g)
        m64.update(x, y)
        m32.update(x, y)
        naive["xy"] += x.T @ y
        sx += x.sum(0)
        sy += y.sum(0)
    ref = m64.corr()
    err = float((m32.corr().double() - ref).abs().max())
    assert err < 3e-7
    n = float(m64.count)
    cov = naive["xy"] / n - torch.outer(sx / n, sy / n)
    plain = cov / torch.outer(m64.var_x.sqrt(), m64.var_y.sqrt()).float()
    assert float((plain.double() - ref).abs().max()) > 30 * err
    torch.testing.assert_close(m32.corr_().double(), ref, atol=3e-7, rtol=0)   # in place, same values


def test_reshift_lets_shards_with_other_shifts_add_up():
    g = torch.Generator().manual_seed(1)
    x, y = 10 + torch.randn(300, 5, generator=g), -3 + torch.randn(300, 4, generator=g)
    parts = [CrossMoments(5, 4, dtype=torch.float32).update(x[i:i + 150], y[i:i + 150]) for i in (0, 150)]
    common_x = (parts[0].shift_x + parts[1].shift_x) / 2
    common_y = (parts[0].shift_y + parts[1].shift_y) / 2
    for p in parts:
        p.reshift_(common_x, common_y)
    total = parts[0]
    for name in ("count", "sum_x", "sum_y", "sum_xx", "sum_yy", "sum_xy"):
        setattr(total, name, getattr(parts[0], name) + getattr(parts[1], name))
    whole = CrossMoments(5, 4).update(x, y)
    torch.testing.assert_close(total.corr().double(), whole.corr(), atol=1e-6, rtol=0)
    torch.testing.assert_close(total.mean_x.double(), whole.mean_x, atol=1e-5, rtol=0)


def test_bad_token_batches_are_named(planted):
    model, spec, state_a, state_b, _ = planted
    ids = tokens(8)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        prb.activation_matching(model, model, spec, {"input_ids": ids, "attention_mask": torch.ones(8, 5)},
                                state_a=state_a, state_b=state_b)
    with pytest.raises(ValueError, match="attention_mask must hold 0"):
        prb.activation_matching(model, model, spec, {"input_ids": ids, "attention_mask": 2 * torch.ones_like(ids)},
                                state_a=state_a, state_b=state_b)
    with pytest.raises(ValueError, match="dtype must be torch.float64 or torch.float32"):
        prb.activation_matching(model, model, spec, ids, state_a=state_a, state_b=state_b, dtype=torch.float16)


def _shifted_worker(rank, world, port, results):
    import os

    import torch.distributed as dist

    from pyrebasin.distributed import shard_range
    from tests.test_matching_weight import model_state
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, state_a = model_state("mlp", seed=0)
        _, state_b = model_state("mlp", seed=1)
        x = 3 + torch.randn(203, 12, generator=torch.Generator().manual_seed(5))
        rows = shard_range(len(x), rank, world)   # other data per rank: other float32 shifts to reconcile
        r = prb.activation_matching(model, model, model.permutation_spec(), x[rows.start:rows.stop],
                                    state_a=state_a, state_b=state_b, batch_size=32, dtype=torch.float32,
                                    max_memory=3_000)   # one site per pass
        results[rank] = (r.perms, r.objective)
    finally:
        dist.destroy_process_group()


def test_float32_passes_under_torch_distributed():
    import socket

    import torch.distributed as dist
    import torch.multiprocessing as mp

    from tests.test_matching_weight import model_state
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_shifted_worker, args=(2, port, results), nprocs=2, join=True)
        results = dict(results)
    model, state_a = model_state("mlp", seed=0)
    _, state_b = model_state("mlp", seed=1)
    spec = model.permutation_spec()
    assert len(plan_passes(find_sites(model, spec), spec.perm_sizes(state_a), set(), 3_000, torch.float32)) == 3
    x = 3 + torch.randn(203, 12, generator=torch.Generator().manual_seed(5))
    whole = prb.activation_matching(model, model, model.permutation_spec(), x, state_a=state_a, state_b=state_b,
                                    batch_size=32)
    for rank in (0, 1):
        perms, objective = results[rank]
        assert all(torch.equal(perms[p], whole.perms[p]) for p in whole.perms)
        assert objective == pytest.approx(whole.objective, rel=1e-5)
