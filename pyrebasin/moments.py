"""Streaming first, second and cross moments of two activation streams (float64 accumulators, or float32
shifted sums at half the memory).

Memory is O(n_x * n_y) whatever the number of samples. Feeds activation matching (correlation),
REPAIR (per-channel mean/std), least-squares stitching (XᵀX, XᵀY) and CKA.
"""
from __future__ import annotations

import torch

from . import ops

__all__ = ["CrossMoments", "features_last", "ACCUMULATOR_DTYPES"]

ACCUMULATOR_DTYPES = (torch.float64, torch.float32)


def features_last(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """[..., C, ...] -> [samples, C]: every other position (batch, conv positions, tokens) is a sample."""
    return x.movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim])


class CrossMoments:
    """Accumulates count, Σx, Σy, Σx², Σy² and Σxyᵀ over batches.

    `update(x, y, channel_dim=...)`: x and y hold features along `channel_dim` (1 for conv maps
    [B, C, *spatial], -1 for [B, n] or [B, T, n]); all other positions count as samples. Pass
    `y=None` to accumulate a stream with itself (Σxxᵀ, e.g. for least squares or CKA).

    `dtype=torch.float64` (default): plain sums, accumulated by the native op. `dtype=torch.float32`:
    *shifted* sums Σ(x−s), Σ(x−s)², Σ(x−s)(y−t)ᵀ around the first batch's means `shift_x`, `shift_y`
    (so the sums stay small and the cancellation in cov = E[xyᵀ] − E[x]E[y]ᵀ loses no digits), at
    half the memory; the `sum_*` attributes then hold the shifted sums, and `mean_*`, `var_*`, `cov`
    and `corr` undo the shift. `corr_()` turns Σxyᵀ into the correlation in place (no n_x×n_y copy).
    """

    def __init__(self, n_x: int, n_y: int | None = None, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float64):
        if dtype not in ACCUMULATOR_DTYPES:
            raise ValueError(f"CrossMoments: dtype must be torch.float64 or torch.float32, got {dtype}")
        self.self_stream = n_y is None
        n_y = n_x if n_y is None else n_y
        self.dtype = dtype
        acc = dict(dtype=dtype, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)  # exact to 2**53 samples
        self.sum_x = torch.zeros(n_x, **acc)
        self.sum_y = torch.zeros(n_y, **acc)
        self.sum_xx = torch.zeros(n_x, **acc)
        self.sum_yy = torch.zeros(n_y, **acc)
        self.sum_xy = torch.zeros(n_x, n_y, **acc)
        self.shift_x: torch.Tensor | None = None
        self.shift_y: torch.Tensor | None = None
        self.finalised = False

    @classmethod
    def nbytes(cls, n_x: int, n_y: int | None = None, *, dtype: torch.dtype = torch.float64) -> int:
        """Bytes of the accumulators of `CrossMoments(n_x, n_y, dtype=dtype)` (shifts included)."""
        n_y = n_x if n_y is None else n_y
        size = torch.empty((), dtype=dtype).element_size()
        shifts = (n_x + n_y) if dtype != torch.float64 else 0
        return size * (n_x * n_y + 2 * (n_x + n_y) + shifts) + 8

    @property
    def shifted(self) -> bool:
        return self.dtype != torch.float64

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor | None = None, *, channel_dim: int = -1) -> "CrossMoments":
        if self.finalised:
            raise ValueError("CrossMoments.update: corr_() already turned Σxyᵀ into a correlation")
        if y is None:
            y = x
        # Shapes only: features_last here would materialise the NHWC copy the native op avoids.
        cx, cy = x.shape[channel_dim], y.shape[channel_dim]
        nx, ny = x.numel() // max(cx, 1), y.numel() // max(cy, 1)
        if cx != self.sum_x.numel() or cy != self.sum_y.numel():
            raise ValueError(f"CrossMoments.update: expected {self.sum_x.numel()} and {self.sum_y.numel()} "
                             f"features on dim {channel_dim}, got x {list(x.shape)} and y {list(y.shape)}")
        if nx != ny:
            raise ValueError(f"CrossMoments.update: x has {nx} samples but y has {ny} "
                             f"(shapes {list(x.shape)} and {list(y.shape)})")
        if self.shifted:
            return self._update_shifted(x, y, channel_dim)
        same_layout = y is x or (y.dim() == x.dim() and all(
            a == b for i, (a, b) in enumerate(zip(x.shape, y.shape)) if i != channel_dim % x.dim()))
        if not same_layout:  # same sample count, different layout: pair samples in flattened order
            x, y, channel_dim = features_last(x, channel_dim), features_last(y, channel_dim), -1
        # Native streaming op: float64 accumulators, conv maps read in place, Σxyᵀ by the BLAS.
        ops.corr_accumulate(x, None if y is x else y, channel_dim, self.count, self.sum_x, self.sum_y,
                            self.sum_xx, self.sum_yy, self.sum_xy)
        return self

    def _update_shifted(self, x: torch.Tensor, y: torch.Tensor, channel_dim: int) -> "CrossMoments":
        fx = features_last(x, channel_dim)
        fy = fx if y is x else features_last(y, channel_dim)
        if not (fx.is_floating_point() and fy.is_floating_point()):
            raise TypeError(f"CrossMoments.update: x and y must be floating point, got {x.dtype} and {y.dtype}")
        if self.shift_x is None:  # the first batch's means: later sums are of small deviations
            self.shift_x = fx.mean(0, dtype=torch.float64).to(self.dtype)
            self.shift_y = self.shift_x if fy is fx else fy.mean(0, dtype=torch.float64).to(self.dtype)
        xs = fx.to(self.dtype) - self.shift_x          # one [samples, C] copy per stream, never C×C
        ys = xs if fy is fx else fy.to(self.dtype) - self.shift_y
        self.count += fx.shape[0]
        sx, sxx = xs.sum(0), (xs * xs).sum(0)
        self.sum_x += sx
        self.sum_xx += sxx
        if ys is xs:
            self.sum_y += sx
            self.sum_yy += sxx
        else:
            self.sum_y += ys.sum(0)
            self.sum_yy += (ys * ys).sum(0)
        self.sum_xy.addmm_(xs.T, ys)                   # in place: the BLAS accumulates into Σxyᵀ
        return self

    def reshift_(self, shift_x: torch.Tensor, shift_y: torch.Tensor) -> "CrossMoments":
        """Re-express the shifted sums around new shifts, in place (exact algebra, rank-1 updates):
        ranks of a distributed run agree on one shift before their sums are added."""
        if not self.shifted:
            raise ValueError("CrossMoments.reshift_: float64 moments are not shifted")
        n = float(self.count)
        old_x = self.shift_x if self.shift_x is not None else shift_x.to(self.dtype)
        old_y = self.shift_y if self.shift_y is not None else shift_y.to(self.dtype)
        dx, dy = old_x - shift_x.to(self.dtype), old_y - shift_y.to(self.dtype)   # x−s' = (x−s) + dx
        self.sum_xy.addr_(dx, self.sum_y).addr_(self.sum_x, dy).addr_(dx, dy, alpha=n)
        self.sum_xx += 2 * dx * self.sum_x + n * dx * dx
        self.sum_yy += 2 * dy * self.sum_y + n * dy * dy
        self.sum_x += n * dx
        self.sum_y += n * dy
        self.shift_x, self.shift_y = shift_x.to(self.dtype).clone(), shift_y.to(self.dtype).clone()
        return self

    # --- finalisation ---
    def _n(self) -> torch.Tensor:
        if float(self.count) < 1:
            raise ValueError("CrossMoments: no samples accumulated")
        return self.count

    def _centre(self, s: torch.Tensor) -> torch.Tensor:
        return (s / self._n()).to(self.dtype)   # the (shifted) mean in the accumulators' dtype

    @property
    def mean_x(self) -> torch.Tensor:
        m = self._centre(self.sum_x)
        return m + self.shift_x if self.shift_x is not None else m

    @property
    def mean_y(self) -> torch.Tensor:
        m = self._centre(self.sum_y)
        return m + self.shift_y if self.shift_y is not None else m

    @property
    def var_x(self) -> torch.Tensor:
        """Population variance (divides by the count), clipped at 0."""
        return (self._centre(self.sum_xx) - self._centre(self.sum_x) ** 2).clamp_min(0)

    @property
    def var_y(self) -> torch.Tensor:
        return (self._centre(self.sum_yy) - self._centre(self.sum_y) ** 2).clamp_min(0)

    @property
    def mean_sq_x(self) -> torch.Tensor:
        """E[x²] per feature (the raw second moment, shift undone)."""
        return self.var_x + self.mean_x ** 2

    @property
    def mean_sq_y(self) -> torch.Tensor:
        return self.var_y + self.mean_y ** 2

    def cov(self) -> torch.Tensor:
        """Population cross-covariance [n_x, n_y] (a new tensor)."""
        self._check_open("cov")
        return self.sum_xy / self._n() - torch.outer(self._centre(self.sum_x), self._centre(self.sum_y))

    def corr(self, eps: float = 1e-12) -> torch.Tensor:
        """Pearson correlation [n_x, n_y] (a new tensor); dead units (zero variance) give 0, never NaN."""
        sx, sy = self.var_x.sqrt(), self.var_y.sqrt()
        denom = torch.outer(sx, sy)
        c = self.cov() / denom.clamp_min(eps)
        return torch.where(denom > eps, c, torch.zeros_like(c))

    def corr_(self) -> torch.Tensor:
        """The Pearson correlation computed in the storage of Σxyᵀ, which it replaces (returned; no
        n_x×n_y temporary). Units of zero variance give 0. Later updates are refused."""
        self._check_open("corr_")
        sx, sy = self.var_x.sqrt(), self.var_y.sqrt()
        inv_x = torch.where(sx > 0, 1 / sx, 0.0)
        inv_y = torch.where(sy > 0, 1 / sy, 0.0)
        c = self.sum_xy
        c.div_(self._n().to(self.dtype)).addr_(self._centre(self.sum_x), self._centre(self.sum_y), alpha=-1)
        c.mul_(inv_x[:, None]).mul_(inv_y[None, :])
        self.finalised = True
        return c

    def _check_open(self, what: str) -> None:
        if self.finalised:
            raise ValueError(f"CrossMoments.{what}: corr_() already turned Σxyᵀ into a correlation")
