"""Functional (disagreement, KL/JS of softmax outputs), weight (L2, cosine) and representation
(linear CKA, CCA, least-squares R²) similarity; the representation indices are computed from streamed
float64 moments (`PairMoments`), never from N×N Gram or N×C activation matrices.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .moments import CrossMoments

__all__ = ["disagreement", "kl_divergence", "js_divergence", "weight_l2", "weight_cosine",
           "PairMoments", "LinearFit", "linear_cka", "canonical_correlations", "cca_similarity",
           "linear_fit", "linear_r2"]


def _check_logits(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"logits shapes differ: {list(a.shape)} vs {list(b.shape)}")
    if a.numel() == 0:  # a mean over no examples would be a silent NaN
        raise ValueError(f"logits are empty (shape {list(a.shape)}): no examples to compare")


def disagreement(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Fraction of examples whose top-1 predictions differ (over the last dim)."""
    _check_logits(logits_a, logits_b)
    return (logits_a.argmax(-1) != logits_b.argmax(-1)).float().mean(-1)


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Mean over examples of KL(softmax p || softmax q), in nats."""
    _check_logits(logits_p, logits_q)
    lp, lq = logits_p.double().log_softmax(-1), logits_q.double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean(-1)


def js_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Mean over examples of the Jensen-Shannon divergence of the two softmaxes (nats, <= ln 2)."""
    _check_logits(logits_p, logits_q)
    lp, lq = logits_p.double().log_softmax(-1), logits_q.double().log_softmax(-1)
    lm = torch.logaddexp(lp, lq) - torch.log(torch.tensor(2.0, dtype=torch.float64))
    kl = lambda la: (la.exp() * (la - lm)).sum(-1)  # noqa: E731
    return (0.5 * (kl(lp) + kl(lq))).mean(-1)


def _common_float_keys(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> list[str]:
    if set(a) != set(b):
        raise ValueError(f"state dicts have different keys: {sorted(set(a) ^ set(b))[:8]}")
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(f"{k!r}: shapes differ, {list(a[k].shape)} vs {list(b[k].shape)}")
    return [k for k in a if a[k].is_floating_point()]


def weight_l2(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor]) -> float:
    """‖θ_A − θ_B‖₂ over all floating-point tensors."""
    keys = _common_float_keys(state_a, state_b)
    return float(sum((state_a[k].double() - state_b[k].double()).pow(2).sum() for k in keys) ** 0.5)


def weight_cosine(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor]) -> float:
    """cos(θ_A, θ_B) of the flattened floating-point parameters."""
    keys = _common_float_keys(state_a, state_b)
    dot = sum((state_a[k].double() * state_b[k].double()).sum() for k in keys)
    na = sum(state_a[k].double().pow(2).sum() for k in keys) ** 0.5
    nb = sum(state_b[k].double().pow(2).sum() for k in keys) ** 0.5
    return float(dot / (na * nb))


# --- representation similarity, from streamed moments -------------------------------------------
# Every index below is a function of the centred covariances cov(X,X), cov(X,Y), cov(Y,Y) and the
# means, which `PairMoments` accumulates batch by batch in float64 (memory O((n_x + n_y)²), whatever
# the number of samples). Conv maps use channel_dim=1: every position counts as a sample, so the
# indices compare channels (the units a 1×1 stitching conv or a channel permutation acts on).

class PairMoments:
    """Streamed statistics of two representations X and Y of the same samples: `xy` (Σxyᵀ), `xx`
    (Σxxᵀ) and, unless `with_yy=False`, `yy` (Σyyᵀ), each a `pyrebasin.moments.CrossMoments`."""

    def __init__(self, n_x: int, n_y: int, *, with_yy: bool = True, device: torch.device | str | None = None):
        self.xy = CrossMoments(n_x, n_y, device=device)
        self.xx = CrossMoments(n_x, device=device)
        self.yy = CrossMoments(n_y, device=device) if with_yy else None

    @classmethod
    def of(cls, x: torch.Tensor, y: torch.Tensor, *, channel_dim: int = -1, with_yy: bool = True,
           batch_size: int = 4096) -> "PairMoments":
        """Moments of two whole activation tensors, accumulated `batch_size` rows at a time."""
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must hold the same samples: x {list(x.shape)}, y {list(y.shape)}")
        if not (-min(x.dim(), y.dim()) <= channel_dim < min(x.dim(), y.dim())):
            raise ValueError(f"channel_dim={channel_dim} is out of range for x {list(x.shape)} and y {list(y.shape)}")
        m = cls(x.shape[channel_dim], y.shape[channel_dim], with_yy=with_yy, device=x.device)
        for i in range(0, x.shape[0], batch_size):
            m.update(x[i:i + batch_size], y[i:i + batch_size], channel_dim=channel_dim)
        return m

    def update(self, x: torch.Tensor, y: torch.Tensor, *, channel_dim: int = -1) -> "PairMoments":
        self.xy.update(x, y, channel_dim=channel_dim)
        self.xx.update(x, channel_dim=channel_dim)
        if self.yy is not None:
            self.yy.update(y, channel_dim=channel_dim)
        return self

    @property
    def count(self) -> int:
        return int(self.xy.count)

    def cov_xx(self) -> torch.Tensor:
        return _sym(self.xx.cov())

    def cov_xy(self) -> torch.Tensor:
        return self.xy.cov()

    def cov_yy(self) -> torch.Tensor:
        if self.yy is None:
            raise ValueError("these PairMoments were built with with_yy=False; cov(Y, Y) is needed here")
        return _sym(self.yy.cov())


def _sym(c: torch.Tensor) -> torch.Tensor:
    return 0.5 * (c + c.T)


def _moments(x, y, channel_dim: int, with_yy: bool = True) -> PairMoments:
    if isinstance(x, PairMoments):
        if y is not None:
            raise TypeError("pass either PairMoments alone or two activation tensors x, y")
        return x
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"expected PairMoments or two tensors, got {type(x).__name__} and {type(y).__name__}")
    return PairMoments.of(x, y, channel_dim=channel_dim, with_yy=with_yy)


def linear_cka(x, y: torch.Tensor | None = None, *, channel_dim: int = -1) -> float:
    """Linear CKA (Kornblith et al. 2019) = ‖cov(X,Y)‖²_F / (‖cov(X,X)‖_F ‖cov(Y,Y)‖_F).

    Equal to HSIC(K,L)/√(HSIC(K,K) HSIC(L,L)) with centred linear Gram matrices K = XXᵀ, L = YYᵀ,
    computed from the feature-side covariances. `x` is `PairMoments` (y=None) or a tensor paired with `y`.
    """
    m = _moments(x, y, channel_dim)
    cxy, cxx, cyy = m.cov_xy(), m.cov_xx(), m.cov_yy()
    den = torch.linalg.matrix_norm(cxx) * torch.linalg.matrix_norm(cyy)
    if float(den) <= 0:
        raise ValueError("linear_cka: a representation has zero variance (constant features)")
    return float(cxy.pow(2).sum() / den)


def _inv_sqrt(c: torch.Tensor, ridge: float) -> torch.Tensor:
    """(C + ridge·mean eigenvalue·I)^{-1/2}; the relative ridge keeps dead units from blowing up."""
    evals, evecs = torch.linalg.eigh(c)
    evals = evals.clamp_min(0)
    lam = ridge * float(evals.mean()) + torch.finfo(c.dtype).tiny
    return (evecs * (evals + lam).rsqrt()) @ evecs.T


def _pca_basis(c: torch.Tensor, variance_kept: float) -> torch.Tensor:
    """Top principal directions of covariance `c` that explain `variance_kept` of its variance."""
    evals, evecs = torch.linalg.eigh(c)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    frac = evals.cumsum(0) / evals.sum().clamp_min(torch.finfo(c.dtype).tiny)
    k = int((frac < variance_kept).sum()) + 1
    return evecs[:, :min(k, c.shape[0])]


def _cca(m: PairMoments, ridge: float, variance_kept: float | None):
    cxx, cyy, cxy = m.cov_xx(), m.cov_yy(), m.cov_xy()
    if variance_kept is not None:  # SVCCA: CCA between the top principal subspaces
        if not 0 < variance_kept <= 1:
            raise ValueError(f"variance_kept={variance_kept}; expected a fraction in (0, 1]")
        ux, uy = _pca_basis(cxx, variance_kept), _pca_basis(cyy, variance_kept)
        cxx, cyy, cxy, basis_x = ux.T @ cxx @ ux, uy.T @ cyy @ uy, ux.T @ cxy @ uy, ux
    else:
        basis_x = None
    wx, wy = _inv_sqrt(cxx, ridge), _inv_sqrt(cyy, ridge)
    u, rho, _ = torch.linalg.svd(wx @ cxy @ wy, full_matrices=False)
    return rho.clamp(0, 1), wx @ u, cxx, basis_x


def canonical_correlations(x, y: torch.Tensor | None = None, *, channel_dim: int = -1, ridge: float = 1e-6,
                           variance_kept: float | None = None) -> torch.Tensor:
    """Canonical correlations ρ₁ ≥ ρ₂ ≥ … (min(n_x, n_y) of them, float64) from the streamed
    covariances: singular values of Cxx^{-1/2} Cxy Cyy^{-1/2}, with a relative ridge on Cxx and Cyy.
    `variance_kept` first projects each side on its top principal components (SVCCA)."""
    return _cca(_moments(x, y, channel_dim), ridge, variance_kept)[0]


def cca_similarity(x, y: torch.Tensor | None = None, *, kind: str = "mean", channel_dim: int = -1,
                   ridge: float = 1e-6, variance_kept: float = 0.99) -> float:
    """CCA-style similarity in [0, 1]: "mean" (mean canonical correlation), "svcca" (mean after
    keeping `variance_kept` of each side's variance, Raghu et al. 2017) or "pwcca" (correlations
    weighted by how much of X each canonical variate accounts for, Morcos et al. 2018; asymmetric)."""
    if kind not in ("mean", "svcca", "pwcca"):
        raise ValueError(f"cca_similarity kind={kind!r}; expected 'mean', 'svcca' or 'pwcca'")
    m = _moments(x, y, channel_dim)
    rho, a, cxx, _ = _cca(m, ridge, variance_kept if kind == "svcca" else None)
    if kind != "pwcca":
        return float(rho.mean())
    # Canonical variate h_i = X a_i; Σ_j |<h_i, x_j>| ∝ Σ_j |(Cxx a_i)_j| over the neurons x_j of X.
    alpha = (cxx @ a).abs().sum(0)
    return float((alpha * rho).sum() / alpha.sum().clamp_min(torch.finfo(alpha.dtype).tiny))


@dataclass
class LinearFit:
    """Least-squares map ŷ = weight·x + bias (weight [n_y, n_x], float64) and its R² (variance
    weighted over the outputs); `ridge` is the absolute ridge λ added to cov(X,X)."""
    weight: torch.Tensor
    bias: torch.Tensor
    r2: float
    ridge: float


def _auto_ridge(cxx: torch.Tensor, max_condition: float) -> float:
    """Smallest λ ≥ 0 with cond(Cxx + λI) ≤ max_condition (dead units make Cxx singular)."""
    evals = torch.linalg.eigvalsh(cxx)
    lo, hi = float(evals[0].clamp_min(0)), float(evals[-1])
    if hi <= 0:
        return 1.0
    return max(0.0, (hi - max_condition * lo) / (max_condition - 1))


def linear_fit(x, y: torch.Tensor | None = None, *, channel_dim: int = -1, ridge: float | None = None,
               max_condition: float = 1e8) -> LinearFit:
    """Least-squares (ridge) regression of Y on X from streamed XᵀX, XᵀY and means: float64 normal
    equations on the centred covariances, W = Cyx (Cxx + λI)⁻¹, b = μy − W μx.

    ridge=None picks λ automatically: 0 when Cxx is well conditioned (cond ≤ max_condition), else
    just enough to reach it. A float is a relative ridge: λ = ridge · mean eigenvalue of Cxx.
    """
    m = x if isinstance(x, PairMoments) else _moments(x, y, channel_dim, with_yy=False)
    cxx, cxy = m.cov_xx(), m.cov_xy()
    if ridge is None:
        lam = _auto_ridge(cxx, max_condition)
    else:
        if ridge < 0:
            raise ValueError(f"ridge={ridge}; expected >= 0 or None")
        lam = ridge * float(cxx.diagonal().mean())
    eye = torch.eye(cxx.shape[0], dtype=cxx.dtype, device=cxx.device)
    chol, info = torch.linalg.cholesky_ex(cxx + lam * eye)
    if int(info) != 0:  # numerically singular despite λ: fall back to the eigen-pseudo-inverse
        w = (torch.linalg.pinv(cxx + lam * eye, hermitian=True) @ cxy).T
    else:
        w = torch.cholesky_solve(cxy, chol).T
    b = m.xy.mean_y - w @ m.xy.mean_x
    total = float(m.xy.var_y.sum())
    if total <= 0:
        raise ValueError("linear_fit: the target Y has zero variance; R² is undefined")
    # Residual variance tr(Cyy) − 2 tr(W Cxy) + tr(W Cxx Wᵀ), from the moments alone.
    resid = total - 2 * float((w * cxy.T).sum()) + float(((w @ cxx) * w).sum())
    return LinearFit(w, b, 1.0 - max(resid, 0.0) / total, lam)


def linear_r2(x, y: torch.Tensor | None = None, *, channel_dim: int = -1, ridge: float | None = None) -> float:
    """R² of the least-squares fit of Y from X (`linear_fit(...).r2`); 1 when Y is a linear map of X."""
    return linear_fit(x, y, channel_dim=channel_dim, ridge=ridge).r2
