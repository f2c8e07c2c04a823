"""Streaming first, second and cross moments of two activation streams (float64 accumulators).

Memory is O(n_x * n_y) whatever the number of samples. Feeds activation matching (correlation),
REPAIR (per-channel mean/std), least-squares stitching (XᵀX, XᵀY) and CKA.
"""
from __future__ import annotations

import torch

from . import ops

__all__ = ["CrossMoments", "features_last"]


def features_last(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """[..., C, ...] -> [samples, C]: every other position (batch, conv positions, tokens) is a sample."""
    return x.movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim])


class CrossMoments:
    """Accumulates count, Σx, Σy, Σx², Σy² and Σxyᵀ over batches.

    `update(x, y, channel_dim=...)`: x and y hold features along `channel_dim` (1 for conv maps
    [B, C, *spatial], -1 for [B, n] or [B, T, n]); all other positions count as samples. Pass
    `y=None` to accumulate a stream with itself (Σxxᵀ, e.g. for least squares or CKA).
    """

    def __init__(self, n_x: int, n_y: int | None = None, *, device: torch.device | str | None = None):
        self.self_stream = n_y is None
        n_y = n_x if n_y is None else n_y
        f64 = dict(dtype=torch.float64, device=device)
        self.count = torch.zeros((), **f64)
        self.sum_x = torch.zeros(n_x, **f64)
        self.sum_y = torch.zeros(n_y, **f64)
        self.sum_xx = torch.zeros(n_x, **f64)
        self.sum_yy = torch.zeros(n_y, **f64)
        self.sum_xy = torch.zeros(n_x, n_y, **f64)

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor | None = None, *, channel_dim: int = -1) -> "CrossMoments":
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
        same_layout = y is x or (y.dim() == x.dim() and all(
            a == b for i, (a, b) in enumerate(zip(x.shape, y.shape)) if i != channel_dim % x.dim()))
        if not same_layout:  # same sample count, different layout: pair samples in flattened order
            x, y, channel_dim = features_last(x, channel_dim), features_last(y, channel_dim), -1
        # Native streaming op: float64 accumulators, conv maps read in place, Σxyᵀ by the BLAS.
        ops.corr_accumulate(x, None if y is x else y, channel_dim, self.count, self.sum_x, self.sum_y,
                            self.sum_xx, self.sum_yy, self.sum_xy)
        return self

    # --- finalisation ---
    def _n(self) -> torch.Tensor:
        if float(self.count) < 1:
            raise ValueError("CrossMoments: no samples accumulated")
        return self.count

    @property
    def mean_x(self) -> torch.Tensor:
        return self.sum_x / self._n()

    @property
    def mean_y(self) -> torch.Tensor:
        return self.sum_y / self._n()

    @property
    def var_x(self) -> torch.Tensor:
        """Population variance (divides by the count), clipped at 0."""
        return (self.sum_xx / self._n() - self.mean_x**2).clamp_min(0)

    @property
    def var_y(self) -> torch.Tensor:
        return (self.sum_yy / self._n() - self.mean_y**2).clamp_min(0)

    def cov(self) -> torch.Tensor:
        """Population cross-covariance [n_x, n_y]."""
        return self.sum_xy / self._n() - torch.outer(self.mean_x, self.mean_y)

    def corr(self, eps: float = 1e-12) -> torch.Tensor:
        """Pearson correlation [n_x, n_y]; dead units (zero variance) give 0, never NaN."""
        sx, sy = self.var_x.sqrt(), self.var_y.sqrt()
        denom = torch.outer(sx, sy)
        c = self.cov() / denom.clamp_min(eps)
        return torch.where(denom > eps, c, torch.zeros_like(c))
