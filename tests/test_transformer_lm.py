"""The GPT of the zoo and the transformer alignments: every alignment preserves the function exactly
(permutations of both spec forms, norm folding, orthogonal residual maps for RMSNorm and, fixing the
all-ones direction, LayerNorm); two-level head matching and Procrustes recover planted maps; the text
corpus split and windows; the "head" coefficient granularity; the LM loss through the evaluator."""
import pytest
import torch
from torch.func import functional_call

import pyrebasin as prb
from pyrebasin import data
from pyrebasin.coefficients import coefficient_layout
from pyrebasin.matching.heads import two_level_matching
from pyrebasin.matching.orthogonal import apply_orthogonal, fold_norms, procrustes, residual_procrustes

VARIANTS = [(p, n) for p in ("rope", "learned") for n in ("ln", "rms")]


def _gpt(positions="rope", norm="ln", seed=0):
    torch.manual_seed(seed)
    m = prb.zoo.GPT(seq_len=24, d_model=32, heads=4, layers=2, mlp_ratio=2, norm=norm, positions=positions).double()
    # non-trivial norm scales and shifts, so folding has something to fold
    state = {k: (v + 0.2 * torch.randn_like(v)) if k.endswith((".weight", ".bias")) and "ln" in k else v.clone()
             for k, v in m.state_dict().items()}
    return m.eval(), state


def _ids(n=12, t=24, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _out(m, state, x):
    return functional_call(m, state, (x,))


def _block_perms(m, g):
    """Per-head-form perms moving whole heads, each head its own within-head perms (identity on q/k
    dims under RoPE)."""
    out = {}
    for lay in m.head_layout():
        h, hd = torch.randperm(lay.heads, generator=g), lay.head_dim
        inner = lambda: torch.arange(hd) if lay.rotary else torch.randperm(hd, generator=g)  # noqa: E731
        out[lay.qk_flat] = torch.cat([h[i] * hd + inner() for i in range(lay.heads)])
        out[lay.vo_flat] = torch.cat([h[i] * hd + torch.randperm(hd, generator=g) for i in range(lay.heads)])
    return out


@pytest.mark.parametrize("positions,norm", VARIANTS)
def test_both_spec_forms_preserve_the_function(positions, norm):
    m, s = _gpt(positions, norm)
    x = _ids()
    want = _out(m, s, x)
    g = torch.Generator().manual_seed(1)
    shared = m.permutation_spec()
    p = prb.apply_permutation(shared, prb.random_permutation(shared, s, generator=g), s)
    torch.testing.assert_close(_out(m, p, x), want, rtol=0, atol=1e-10)
    per_head = m.permutation_spec("per_head")
    perms = prb.random_permutation(per_head, s, generator=g) | _block_perms(m, g)
    torch.testing.assert_close(_out(m, prb.apply_permutation(per_head, perms, s), x), want, rtol=0, atol=1e-10)
    assert ("P_blocks.0.qk" in shared.perm_names) == (positions == "learned")   # RoPE: q/k dims not permutable


def test_rope_forbids_within_head_qk_permutations():
    m, s = _gpt("rope")
    x = _ids()
    per_head = m.permutation_spec("per_head")
    perms = prb.identity_permutation(per_head, s)
    perms["P_blocks.0.qk_flat"] = torch.cat([torch.arange(8).flip(0), torch.arange(8, 32)])
    moved = _out(m, prb.apply_permutation(per_head, perms, s), x)
    assert (moved - _out(m, s, x)).abs().max() > 1e-3


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_two_level_matching_recovers_planted_heads(positions):
    m, s = _gpt(positions)
    x = _ids(16)
    shared, per_head = m.permutation_spec(), m.permutation_spec("per_head")
    g = torch.Generator().manual_seed(3)
    planted = {p: v for p, v in prb.random_permutation(shared, s, generator=g).items()
               if not p.endswith((".heads", ".qk", ".vo"))} | _block_perms(m, g)
    b = prb.apply_permutation(per_head, planted, s)
    r = two_level_matching(m, m, shared, m.head_layout(), x, state_a=s, state_b=b)
    back = prb.apply_permutation(per_head, r.perms, b)
    assert all(torch.equal(back[k], s[k]) for k in s)
    torch.testing.assert_close(_out(m, back, x), _out(m, s, x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("positions,norm", VARIANTS)
def test_fold_then_orthogonal_map_preserves_the_function(positions, norm):
    m, s = _gpt(positions, norm)
    x = _ids()
    want = _out(m, s, x)
    norms = m.norm_names()
    f = fold_norms(m, s, x[:2], norms)
    torch.testing.assert_close(_out(m, f, x), want, rtol=0, atol=1e-10)
    assert all(bool((f[f"{n}.weight"] == 1).all()) for n in norms)
    q = procrustes(torch.randn(32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64),
                   fix_ones=norm == "ln")
    spec = m.permutation_spec()
    maps = prb.random_permutation(spec, s, generator=5) | {"P_res": q}
    r = apply_orthogonal(spec, maps, f, scales=[f"{n}.weight" for n in norms])
    torch.testing.assert_close(_out(m, r, x), want, rtol=0, atol=1e-9)
    # a matrix on a Blocked factor: every head's v/o dims rotated alike (v rows R v, o columns W Rᵀ)
    rot = procrustes(torch.randn(8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    r2 = apply_orthogonal(spec, maps | {"P_blocks.1.vo": rot}, f, scales=[f"{n}.weight" for n in norms])
    torch.testing.assert_close(_out(m, r2, x), want, rtol=0, atol=1e-9)
    assert not torch.allclose(r2["blocks.1.attn.v_proj.weight"], r["blocks.1.attn.v_proj.weight"])
    # Procrustes on the residual stream finds the planted map back (B = A rotated by q: Q_B→A = qᵀ)
    found = residual_procrustes(m, m, norms, x, state_a=f, state_b=r).double()
    torch.testing.assert_close(found, q.T, rtol=0, atol=1e-5)


def test_layernorm_needs_maps_fixing_the_ones_direction():
    m, s = _gpt("rope", "ln")
    x = _ids()
    f = fold_norms(m, s, x[:2], m.norm_names())
    q = procrustes(torch.randn(32, 32, generator=torch.Generator().manual_seed(6), dtype=torch.float64))
    assert (q @ torch.ones(32, dtype=q.dtype) - 1).abs().max() > 0.1
    spec = m.permutation_spec()
    r = apply_orthogonal(spec, prb.identity_permutation(spec, s) | {"P_res": q}, f,
                         scales=[f"{n}.weight" for n in m.norm_names()])
    assert (_out(m, r, x) - _out(m, s, x)).abs().max() > 1e-2   # mean-centring does not commute with q


def test_orthogonal_refuses_unfolded_scales_and_non_orthogonal_maps():
    m, s = _gpt("rope", "rms")
    spec = m.permutation_spec()
    ident = prb.identity_permutation(spec, s)
    q = procrustes(torch.randn(32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="blocks.0.ln1.weight.*not constant"):
        apply_orthogonal(spec, ident | {"P_res": q}, s, scales=["blocks.0.ln1.weight"])
    with pytest.raises(ValueError, match="'P_res' is not orthogonal"):
        apply_orthogonal(spec, ident | {"P_res": 2 * q}, s)
    with pytest.raises(ValueError, match="has shape \\[3, 3\\]"):
        apply_orthogonal(spec, ident | {"P_res": torch.eye(3)}, s)
    with pytest.raises(ValueError, match="not a LayerNorm or RMSNorm"):
        fold_norms(m, s, _ids(2), ["blocks.0.fc1"])


def test_corpus_split_and_windows():
    train, test = data.stdlib_files()
    assert train and test and not set(train) & set(test)
    assert [f.name for f in train] == sorted(f.name for f in train)
    a, b = data.pystdlib()
    assert a.dtype == torch.uint8 and a.numel() > 10 * b.numel() > 0
    assert a.numel() == sum(f.stat().st_size + 1 for f in train)
    w = data.lm_windows(b, 16)
    assert w.shape == (b.numel() // 17, 17) and w.dtype == torch.int64
    assert torch.equal(w[1], b[17:34].long())
    few = data.lm_windows(b, 16, 4)        # spread evenly over the stream, not its first file only
    assert torch.equal(few, w[[0, len(w) // 4, len(w) // 2, 3 * len(w) // 4]])
    r1, r2 = data.lm_windows(a, 16, 5, seed=3), data.lm_windows(a, 16, 5, seed=3)
    assert torch.equal(r1, r2) and r1.shape == (5, 17)
    with pytest.raises(ValueError, match="seq_len"):
        data.lm_windows(b, 0)
    with pytest.raises(ValueError, match="test_fraction"):
        data.stdlib_files(1.5)


def test_head_granularity_gives_one_coefficient_per_head():
    m, s = _gpt()
    lay = coefficient_layout(s, "head", m.permutation_spec())
    idx = {k: lay.index(i) for i, k in enumerate(lay.keys)}
    q = idx["blocks.0.attn.q_proj.weight"]          # [d_out = heads x head_dim, d_in]
    assert q.unique().numel() == 4 and bool((q == q[:, :1]).all())
    assert torch.equal(q[::8, 0], q[::8, 0].unique())
    o = idx["blocks.0.attn.o_proj.weight"]          # heads along the input columns
    assert torch.equal(o[0], q[:, 0]) and bool((o == o[:1]).all())
    assert idx["blocks.0.fc1.weight"].unique().numel() == 1
    assert lay.num_coefficients == 2 * 4 + len({k.rpartition(".")[0] for k in s if "attn" not in k}) + 2
    with pytest.raises(ValueError, match="'head' needs a PermutationSpec"):
        coefficient_layout(s, "head")


def test_lm_loss_through_the_evaluator_is_the_next_token_loss():
    m, s = _gpt()
    x = _ids(6)
    c = prb.interpolate(m, s, s, {"test": x}, ts=2)
    logits = _out(m, s, x)
    want = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    assert c.loss["test"][0] == pytest.approx(float(want), rel=1e-6)
    assert c.perplexity("test")[0] == pytest.approx(float(want.exp()), rel=1e-6)


def test_train_lm_is_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PYREBASIN_CACHE", str(tmp_path))
    cfg = prb.train.LMConfig(steps=12, batch_size=4, seq_len=16)
    kw = dict(d_model=16, heads=2, layers=1, mlp_ratio=2)
    _, a = prb.train.train_lm(seed=0, config=cfg, progress=False, **kw)
    assert len(list((tmp_path / "models").glob("gpt-*.safetensors"))) == 1
    _, again = prb.train.train_lm(seed=0, config=cfg, progress=False, cache=False, **kw)
    _, other = prb.train.train_lm(seed=1, config=cfg, progress=False, **kw)
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert not torch.equal(a["head.weight"], other["head.weight"])
    with pytest.raises(ValueError, match="seq_len=8 differs"):
        prb.train.train_lm(seed=0, config=cfg, seq_len=8, **kw)
