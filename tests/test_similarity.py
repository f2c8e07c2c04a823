"""prb.similarity: functional/weight metrics, and the streamed representation indices (CKA, CCA, R²)
against direct N×N / N×C references; invariances (real-data checks: tests/claims/test_similarity.py)."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pyrebasin as prb
from pyrebasin import similarity as S


# --- references: the textbook formulas on whole activation matrices --------------------------------

def cka_gram_reference(x, y):
    """Kornblith et al.: HSIC with centred linear Gram matrices (N×N)."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float((k * l).sum() / ((k * k).sum().sqrt() * (l * l).sum().sqrt()))


def cca_qr_reference(x, y):
    """Canonical correlations as singular values of Qxᵀ Qy (QR of the centred data)."""
    qx, _ = torch.linalg.qr(x.double() - x.double().mean(0))
    qy, _ = torch.linalg.qr(y.double() - y.double().mean(0))
    return torch.linalg.svdvals(qx.T @ qy)


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def random_orthogonal(n, seed):
    q, r = torch.linalg.qr(rand(n, n, seed=seed))
    return q * torch.sign(torch.diagonal(r))


# --- functional metrics ------------------------------------------------------------------------------

def test_disagreement_counts_top1_differences():
    a = torch.tensor([[2.0, 1.0], [0.0, 1.0], [5.0, 0.0], [1.0, 3.0]])
    b = torch.tensor([[3.0, 1.0], [1.0, 0.0], [5.0, 1.0], [0.0, 3.0]])
    assert float(S.disagreement(a, b)) == pytest.approx(0.25)
    assert float(S.disagreement(a, a)) == 0.0
    with pytest.raises(ValueError, match=r"\[4, 2\] vs \[4, 3\]"):
        S.disagreement(a, torch.zeros(4, 3))


def test_kl_matches_torch_and_is_asymmetric():
    p, q = rand(64, 10, seed=1), rand(64, 10, seed=2) * 3
    ref = torch.nn.functional.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True, reduction="batchmean")
    assert float(S.kl_divergence(p, q)) == pytest.approx(float(ref), rel=1e-10)
    assert float(S.kl_divergence(p, p)) == pytest.approx(0.0, abs=1e-12)
    assert abs(float(S.kl_divergence(p, q)) - float(S.kl_divergence(q, p))) > 1e-3


def test_js_is_symmetric_and_bounded():
    p, q = rand(64, 10, seed=3), rand(64, 10, seed=4)
    js = float(S.js_divergence(p, q))
    assert js == pytest.approx(float(S.js_divergence(q, p)), rel=1e-12)
    assert 0 < js < math.log(2)
    assert float(S.js_divergence(p, p)) == pytest.approx(0.0, abs=1e-12)
    # Disjoint one-hot predictions reach the bound ln 2.
    big = 100 * torch.eye(4)
    assert float(S.js_divergence(big, big.roll(1, 0))) == pytest.approx(math.log(2), rel=1e-6)


def test_weight_metrics_match_flattened_vectors_and_skip_integer_buffers():
    a = {"w": rand(3, 4, seed=5), "b": rand(3, seed=6), "n": torch.tensor(7)}
    b = {"w": rand(3, 4, seed=7), "b": rand(3, seed=8), "n": torch.tensor(9)}
    va, vb = torch.cat([a["w"].flatten(), a["b"]]), torch.cat([b["w"].flatten(), b["b"]])
    assert S.weight_l2(a, b) == pytest.approx(float((va - vb).norm()), rel=1e-12)
    assert S.weight_cosine(a, b) == pytest.approx(float(va @ vb / (va.norm() * vb.norm())), rel=1e-12)
    assert S.weight_l2(a, a) == 0.0 and S.weight_cosine(a, a) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="different keys"):
        S.weight_l2(a, {"w": b["w"], "b": b["b"]})
    with pytest.raises(ValueError, match="'w'"):
        S.weight_cosine(a, {**b, "w": rand(4, 3)})


# --- linear CKA ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cka_matches_gram_reference(dtype):
    x = rand(200, 13, seed=1, dtype=dtype)
    y = (x[:, :7] @ rand(7, 9, seed=2, dtype=dtype)).tanh() + 0.3 * rand(200, 9, seed=3, dtype=dtype)
    assert S.linear_cka(x, y) == pytest.approx(cka_gram_reference(x, y), rel=1e-6)
    assert S.linear_cka(x, x) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_indices_agree_under_both_backends(backend):
    # PairMoments streams through CrossMoments, whose update may run natively: native = reference.
    if backend == "native" and not prb.native_available():
        pytest.skip("native extension not built")
    x = rand(257, 9, seed=30, dtype=torch.float32)
    y = x[:, :5] * 2 + rand(257, 5, seed=31, dtype=torch.float32)
    with prb.use_backend(backend):
        m = S.PairMoments.of(x, y, batch_size=64)
    assert S.linear_cka(m) == pytest.approx(cka_gram_reference(x, y), rel=1e-9)
    torch.testing.assert_close(S.canonical_correlations(m, ridge=0.0), cca_qr_reference(x, y), rtol=1e-7, atol=1e-7)


def test_cka_accepts_bfloat16_and_non_contiguous_inputs():
    x = rand(300, 10, seed=32, dtype=torch.float32)
    y = rand(300, 8, seed=33, dtype=torch.float32) + x[:, :8]
    ref = S.linear_cka(x, y)
    assert S.linear_cka(x.bfloat16(), y.bfloat16()) == pytest.approx(ref, abs=1e-2)
    xt = x.T.contiguous().T  # same values, transposed strides
    assert not xt.is_contiguous() and S.linear_cka(xt, y) == pytest.approx(ref, rel=1e-10)
    conv = rand(12, 6, 30, seed=34, dtype=torch.float32)[:, :, ::3]  # strided conv maps
    flat = conv.movedim(1, -1).reshape(-1, 6)
    assert S.linear_cka(conv, conv * 2 + 1, channel_dim=1) == pytest.approx(1.0, rel=1e-9)
    assert S.linear_cka(conv, conv.pow(2), channel_dim=1) == pytest.approx(
        cka_gram_reference(flat, flat.pow(2)), rel=1e-8)


def test_cka_streamed_in_uneven_batches_equals_one_shot():
    x, y = rand(301, 11, seed=4), rand(301, 5, seed=5) + rand(301, 11, seed=4)[:, :5]
    m = S.PairMoments(11, 5)
    for i, j in [(0, 7), (7, 150), (150, 151), (151, 301)]:
        m.update(x[i:j], y[i:j])
    assert m.count == 301
    assert S.linear_cka(m) == pytest.approx(S.linear_cka(x, y), rel=1e-12)
    assert S.linear_cka(m) == pytest.approx(cka_gram_reference(x, y), rel=1e-10)


def test_cka_conv_layout_counts_positions_as_samples():
    x, y = rand(6, 4, 9, seed=6), rand(6, 3, 9, seed=7)
    flat = lambda t: t.movedim(1, -1).reshape(-1, t.shape[1])  # noqa: E731
    assert S.linear_cka(x, y, channel_dim=1) == pytest.approx(cka_gram_reference(flat(x), flat(y)), rel=1e-10)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(20, 80), c=st.integers(2, 12), seed=st.integers(0, 10_000),
       scale=st.floats(0.01, 100.0), shift=st.floats(-10.0, 10.0))
def test_cka_invariant_to_permutation_orthogonal_isotropic_scale_and_shift(n, c, seed, scale, shift):
    x, y = rand(n, c, seed=seed), rand(n, 5, seed=seed + 1) + rand(n, c, seed=seed)[:, :1]
    base = S.linear_cka(x, y)
    perm = torch.randperm(c, generator=torch.Generator().manual_seed(seed))
    assert S.linear_cka(x[:, perm], y) == pytest.approx(base, rel=1e-9, abs=1e-12)
    assert S.linear_cka(x @ random_orthogonal(c, seed) * scale + shift, y) == pytest.approx(base, rel=1e-7, abs=1e-12)


def test_cka_is_not_invariant_to_anisotropic_scaling():
    # The invariance test above must be able to fail: an invertible non-orthogonal map changes CKA.
    x = rand(100, 6, seed=8)
    y = x[:, :3] + 0.1 * rand(100, 3, seed=9)
    d = torch.tensor([1.0, 1.0, 1.0, 20.0, 20.0, 20.0], dtype=torch.float64)
    assert abs(S.linear_cka(x * d, y) - S.linear_cka(x, y)) > 0.1


def test_cka_errors():
    with pytest.raises(ValueError, match="zero variance"):
        S.linear_cka(torch.ones(10, 3), rand(10, 2))
    with pytest.raises(ValueError, match="same samples"):
        S.linear_cka(rand(10, 3), rand(11, 3))
    with pytest.raises(TypeError, match="PairMoments"):
        S.linear_cka(rand(10, 3).numpy(), rand(10, 3).numpy())
    m = S.PairMoments(3, 2, with_yy=False).update(rand(10, 3), rand(10, 2))
    with pytest.raises(ValueError, match="with_yy=False"):
        S.linear_cka(m)


# --- CCA -----------------------------------------------------------------------------------------

def test_canonical_correlations_match_qr_reference():
    x = rand(400, 8, seed=10)
    y = torch.cat([x[:, :3] @ rand(3, 3, seed=11), rand(400, 4, seed=12)], 1) + 0.2 * rand(400, 7, seed=13)
    rho = S.canonical_correlations(x, y, ridge=0.0)
    torch.testing.assert_close(rho, cca_qr_reference(x, y), rtol=1e-8, atol=1e-8)
    assert rho.shape == (7,) and bool((rho[:-1] >= rho[1:]).all())


def test_cca_is_invariant_to_invertible_linear_maps_unlike_cka():
    x, y = rand(300, 6, seed=14), rand(300, 6, seed=15) + rand(300, 6, seed=14)
    a = rand(6, 6, seed=16) + 3 * torch.eye(6, dtype=torch.float64)
    assert S.cca_similarity(x @ a, y, ridge=0.0) == pytest.approx(S.cca_similarity(x, y, ridge=0.0), rel=1e-8)
    assert S.cca_similarity(x, x, ridge=0.0) == pytest.approx(1.0, rel=1e-10)


def test_cca_kinds():
    x = rand(500, 10, seed=17)
    y = x[:, :4] @ rand(4, 6, seed=18) + 0.5 * rand(500, 6, seed=19)
    mean, sv, pw = (S.cca_similarity(x, y, kind=k) for k in ("mean", "svcca", "pwcca"))
    assert all(0 <= v <= 1 for v in (mean, sv, pw))
    assert S.cca_similarity(x, y, kind="svcca", variance_kept=1.0) == pytest.approx(mean, rel=1e-6)
    # PWCCA weights the correlated directions (which carry X's variance here) above the noise ones.
    assert pw != pytest.approx(mean, rel=1e-3)
    with pytest.raises(ValueError, match="'max'"):
        S.cca_similarity(x, y, kind="max")
    with pytest.raises(ValueError, match="variance_kept"):
        S.canonical_correlations(x, y, variance_kept=1.5)


# --- least squares and R² -------------------------------------------------------------------------

def test_linear_fit_matches_lstsq_and_sklearn_r2():
    from sklearn.metrics import r2_score

    x = rand(300, 7, seed=20) * torch.arange(1, 8, dtype=torch.float64) + 2
    y = x @ rand(7, 4, seed=21) + 1.5 + rand(300, 4, seed=22)
    fit = S.linear_fit(x, y, ridge=0.0)
    coef = np.linalg.lstsq(np.c_[x.numpy(), np.ones(300)], y.numpy(), rcond=None)[0]
    np.testing.assert_allclose(fit.weight.numpy(), coef[:-1].T, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(fit.bias.numpy(), coef[-1], rtol=1e-8, atol=1e-10)
    pred = x @ fit.weight.T + fit.bias
    assert fit.r2 == pytest.approx(r2_score(y.numpy(), pred.numpy(), multioutput="variance_weighted"), rel=1e-10)
    assert fit.ridge == 0.0 and S.linear_fit(x, y).ridge == 0.0  # well conditioned: no automatic ridge


def test_r2_extremes():
    x = rand(500, 5, seed=23)
    assert S.linear_r2(x, x @ rand(5, 3, seed=24) - 4) == pytest.approx(1.0, abs=1e-10)
    assert S.linear_r2(x, rand(500, 3, seed=25)) < 0.05


def test_linear_fit_ridge_fallback_on_dead_and_duplicate_units():
    x = rand(200, 6, seed=26)
    x = torch.cat([x, x[:, :2], torch.zeros(200, 3)], 1)  # duplicated and dead (ReLU-like) units: singular XᵀX
    y = x[:, :6] @ rand(6, 4, seed=27)
    fit = S.linear_fit(x, y)
    assert fit.ridge > 0 and bool(torch.isfinite(fit.weight).all())
    assert fit.r2 == pytest.approx(1.0, abs=1e-6)
    assert float(fit.weight[:, -3:].abs().max()) == 0.0  # dead units get no weight
    with pytest.raises(ValueError, match="ridge=-1"):
        S.linear_fit(x, y, ridge=-1)
    with pytest.raises(ValueError, match="zero variance"):
        S.linear_fit(x, torch.ones(200, 2))
