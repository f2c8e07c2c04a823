"""The stitching layer (a channel-wise linear map of one kind: affine, low-rank, orthogonal,
permutation, semi-match) and its closed-form inits from streamed moments; used by `pyrebasin.stitching`.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .similarity import LinearFit, PairMoments

__all__ = ["KINDS", "INITS", "StitchLayer", "initialise"]

KINDS = ("affine", "low_rank", "orthogonal", "permutation", "semi_match")
INITS = ("random", "identity", "permutation", "least_squares", "procrustes")


# --- the stitching layer ---------------------------------------------------------------------------

def _channel_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """W·x + b along `channel_dim`: a Linear for [.., C], a 1×1 Conv1d/Conv2d for [B, C, L] / [B, C, H, W]."""
    cd = channel_dim % x.dim()
    if cd == x.dim() - 1:
        return F.linear(x, w, b)
    if cd == 1 and x.dim() == 3:
        return F.conv1d(x, w[:, :, None], b)
    if cd == 1 and x.dim() == 4:
        return F.conv2d(x, w[:, :, None, None], b)
    return F.linear(x.movedim(cd, -1), w, b).movedim(-1, cd)


class StitchLayer(nn.Module):
    """A channel-wise linear map C_in -> C_out of one `kind` (see `stitch`), applied along `channel_dim`.

    affine: W, b. low_rank: W = up·down of rank r, b. orthogonal: W = scale·Q with Q (semi-)orthogonal
    (torch's orthogonal parametrization) and a scalar scale, b. permutation / semi_match: unit j reads
    source unit `source[j]` (a fixed matching), times a per-unit scale, plus b.
    """

    def __init__(self, c_in: int, c_out: int, *, kind: str = "affine", rank: int | None = None,
                 channel_dim: int = -1):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown stitching kind {kind!r}; expected one of {KINDS}")
        self.kind, self.c_in, self.c_out, self.channel_dim = kind, c_in, c_out, channel_dim
        self.bias = nn.Parameter(torch.zeros(c_out))
        if kind == "affine":
            self.weight = nn.Parameter(torch.zeros(c_out, c_in))
        elif kind == "low_rank":
            if rank is None or not 1 <= rank <= min(c_in, c_out):
                raise ValueError(f"low_rank stitching needs 1 <= rank <= {min(c_in, c_out)}, got rank={rank}")
            self.up = nn.Parameter(torch.zeros(c_out, rank))
            self.down = nn.Parameter(torch.zeros(rank, c_in))
        elif kind == "orthogonal":
            self.rotation = nn.Linear(c_in, c_out, bias=False)
            nn.utils.parametrizations.orthogonal(self.rotation)
            self.scale = nn.Parameter(torch.ones(()))
        else:
            if kind == "permutation" and c_in < c_out:
                raise ValueError(f"permutation stitching needs as many front units as end units "
                                 f"(got {c_in} -> {c_out}); use kind='semi_match'")
            self.register_buffer("source", torch.arange(c_out) % c_in)
            self.scale = nn.Parameter(torch.ones(c_out))

    def matrix(self) -> torch.Tensor:
        """The dense [C_out, C_in] matrix W of the map (for inspection and inits)."""
        if self.kind == "affine":
            return self.weight
        if self.kind == "low_rank":
            return self.up @ self.down
        if self.kind == "orthogonal":
            return self.scale * self.rotation.weight
        onehot = F.one_hot(self.source, self.c_in).to(self.scale.dtype)
        return self.scale[:, None] * onehot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[self.channel_dim] != self.c_in:
            raise ValueError(f"stitching layer expects {self.c_in} channels on dim {self.channel_dim}, "
                             f"got activation {list(x.shape)}")
        if self.kind in ("permutation", "semi_match"):
            shape = [1] * x.dim()
            shape[self.channel_dim] = self.c_out
            return x.index_select(self.channel_dim, self.source) * self.scale.view(shape) + self.bias.view(shape)
        return _channel_linear(x, self.matrix(), self.bias, self.channel_dim)


# --- closed-form inits (float64, from the moments) ----------------------------------------------------

def _match(corr: torch.Tensor, kind: str) -> torch.Tensor:
    """source[j] for every end unit j: LAP on the correlation (one-to-one) or its argmax (semi-match)."""
    if kind == "semi_match":
        return corr.argmax(0)
    if corr.shape[0] == corr.shape[1]:  # the project's LAP (lapx when installed, else scipy)
        from .matching.lap import solve_lap

        return solve_lap(corr.T).to(corr.device)
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(corr.cpu().numpy(), maximize=True)  # n_x > n_y: every column gets a row
    source = torch.empty(corr.shape[1], dtype=torch.long)
    source[torch.as_tensor(cols)] = torch.as_tensor(rows)
    return source.to(corr.device)


def _polar(w: torch.Tensor) -> torch.Tensor:
    """The (semi-)orthogonal matrix nearest to w (Frobenius): U Vᵀ of its SVD."""
    u, _, vh = torch.linalg.svd(w, full_matrices=False)
    return u @ vh


def _init_dense(init: str, c_in: int, c_out: int, m: PairMoments | None, fit: LinearFit | None,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [c_out, c_in], b) in float64 for `init`."""
    f64 = torch.float64
    if init == "random":  # nn.Linear's default scale, from the seeded generator
        bound = 1 / math.sqrt(c_in)
        w = (torch.rand(c_out, c_in, generator=gen, dtype=f64) * 2 - 1) * bound
        return w, (torch.rand(c_out, generator=gen, dtype=f64) * 2 - 1) * bound
    if init == "identity":
        return torch.eye(c_out, c_in, dtype=f64), torch.zeros(c_out, dtype=f64)
    if init == "permutation":
        if c_in < c_out:
            raise ValueError(f"init='permutation' needs as many front units as end units (got {c_in} -> {c_out})")
        w = F.one_hot(_match(m.xy.corr(), "permutation").cpu(), c_in).to(f64)
        return w, torch.zeros(c_out, dtype=f64)
    if init == "least_squares":
        return fit.weight.cpu(), fit.bias.cpu()
    # Procrustes: Q = U Vᵀ from the SVD of the centred cross-covariance cov(Y, X), then the
    # least-squares global scale and bias given Q.
    cyx, cxx = m.cov_xy().T, m.cov_xx()
    q = _polar(cyx)
    s = float((q * cyx).sum() / ((q @ cxx) * q).sum().clamp_min(1e-300))
    return (s * q).cpu(), (m.xy.mean_y - s * q @ m.xy.mean_x).cpu()


def initialise(layer: StitchLayer, init: str, m: PairMoments | None, fit: LinearFit | None, seed: int) -> None:
    """Set `layer`'s parameters (in place, under no_grad) for `init` from the moments and the LS fit."""
    gen = torch.Generator().manual_seed(seed)
    c_in, c_out, kind = layer.c_in, layer.c_out, layer.kind
    if kind in ("permutation", "semi_match"):
        if init not in ("permutation", "least_squares"):
            raise ValueError(f"kind={kind!r} takes init 'permutation' (unit scale, zero bias) or "
                             f"'least_squares' (per-unit scale and bias), got {init!r}")
        source = _match(m.xy.corr(), kind)
        scale, bias = torch.ones(c_out, dtype=torch.float64), torch.zeros(c_out, dtype=torch.float64)
        if init == "least_squares":  # per-unit fit y_j ≈ s_j x_source[j] + b_j
            var = m.xy.var_x[source]
            scale = torch.where(var > 0, m.cov_xy()[source, torch.arange(c_out, device=source.device)] / var.clamp_min(1e-300), 0.0)
            bias = m.xy.mean_y - scale * m.xy.mean_x[source]
        layer.source.copy_(source)
        layer.scale.copy_(scale)
        layer.bias.copy_(bias)
        return
    w, b = _init_dense(init, c_in, c_out, m, fit, gen)
    if kind == "affine":
        layer.weight.copy_(w)
    elif kind == "low_rank":
        r = layer.up.shape[1]
        if init == "least_squares":
            # Reduced-rank regression: project the LS map on the top-r principal directions of its
            # fitted values (the best rank-r least-squares map), not a plain truncated SVD of W.
            cxx = m.cov_xx().cpu()
            _, evecs = torch.linalg.eigh(w @ cxx @ w.T)
            v = evecs[:, -r:]
            w = v @ (v.T @ w)
            b = (m.xy.mean_y.cpu() - w @ m.xy.mean_x.cpu())
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        layer.up.copy_(u[:, :r] * s[:r].sqrt())
        layer.down.copy_(s[:r].sqrt()[:, None] * vh[:r])
    else:  # orthogonal: nearest (semi-)orthogonal Q; data inits also fit the global scale and bias
        q = _polar(w)
        s, b = 1.0, torch.zeros(c_out, dtype=torch.float64)
        if init in ("least_squares", "procrustes"):
            cxx, cyx = m.cov_xx().cpu(), m.cov_xy().T.cpu()
            s = float((q * cyx).sum() / ((q @ cxx) * q).sum().clamp_min(1e-300))
            b = m.xy.mean_y.cpu() - s * q @ m.xy.mean_x.cpu()
        layer.rotation.weight = q.to(layer.scale.dtype)  # goes through the parametrization's right_inverse
        layer.scale.fill_(s)
    layer.bias.copy_(b)
