"""Counter-based RNG (Philox-4x32-10) and the coefficient distributions, in PyTorch int64/float64 ops.

The twin of csrc/include/pyrebasin/philox.h, bit for bit: λ(seed, sample, index) is a pure function,
so any sample's coefficients can be regenerated alone, by the native op or by this reference.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["DISTRIBUTIONS", "lanes", "philox4x32_10", "draw", "log_rn", "exp_rn", "normal_quantile",
           "coefficients"]

# Codes shared with philox.h (rng::Distribution) and their number of parameters.
DISTRIBUTIONS = {"constant": (0, 1), "uniform": (1, 2), "bernoulli": (2, 1), "gaussian": (3, 4), "beta": (4, 2)}
_M32 = 0xFFFFFFFF
_MAX_GAMMA_ATTEMPTS = 64


def lanes(distribution: str) -> int:
    """Coefficients served by one Philox call (consecutive indices share a block)."""
    return {"uniform": 4, "bernoulli": 4, "gaussian": 2}.get(distribution, 1)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b (a constant, b in [0, 2^32)) without int64 overflow."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_hi, p_lo = a * b_hi, a * b_lo          # each < 2^48
    mid = p_hi + (p_lo >> 16)                # < 2^49
    return mid >> 16, ((mid & 0xFFFF) << 16) | (p_lo & 0xFFFF)


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int) -> list[torch.Tensor]:
    """Philox-4x32-10 on int64 tensors holding 32-bit words (broadcast together)."""
    c0, c1, c2, c3 = torch.broadcast_tensors(*(torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3)))
    for r in range(10):
        if r:
            k0 = (k0 + 0x9E3779B9) & _M32
            k1 = (k1 + 0xBB67AE85) & _M32
        hi0, lo0 = _mulhilo(0xD2511F53, c0)
        hi1, lo1 = _mulhilo(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def draw(seed: int, sample: torch.Tensor, block: torch.Tensor, stream: int | torch.Tensor) -> list[torch.Tensor]:
    """(seed, sample, 64-bit block, stream word) -> 4 words, as philox.h's rng::draw."""
    seed &= (1 << 64) - 1
    return philox4x32_10(block & _M32, (block >> 32) & _M32, sample, stream, seed & _M32, seed >> 32)


def _u24(r):
    return ((r >> 8).double() + 0.5) * 5.960464477539063e-08


def _u32(r):
    return (r.double() + 0.5) * 2.3283064365386963e-10


def _u52(r0, r1):
    m = ((r0 >> 6) * 67108864 + (r1 >> 6)).double()
    return (m * 2.0 + 1.0) * 1.1102230246251565e-16


_LOG_TERMS = (0.09523809523809523, 0.10526315789473684, 0.11764705882352941, 0.13333333333333333,
              0.15384615384615385, 0.18181818181818182, 0.2222222222222222, 0.2857142857142857, 0.4,
              0.6666666666666666, 2.0)
_EXP_TERMS = (1.6059043836821613e-10, 2.08767569878681e-09, 2.505210838544172e-08, 2.755731922398589e-07,
              2.7557319223985893e-06, 2.48015873015873e-05, 0.0001984126984126984, 0.001388888888888889,
              0.008333333333333333, 0.041666666666666664, 0.16666666666666666, 0.5, 1.0)


def log_rn(x: torch.Tensor) -> torch.Tensor:
    """log(x) for float64 x > 0 from correctly rounded operations (philox.h rng::log_rn)."""
    m, e = torch.frexp(x)
    small = m < 0.7071067811865476
    m = torch.where(small, m * 2.0, m)
    e = (e - small.to(e.dtype)).double()
    s = (m - 1.0) / (m + 1.0)
    s2 = s * s
    p = torch.full_like(s, _LOG_TERMS[0])
    for c in _LOG_TERMS[1:]:
        p = p * s2 + c
    return e * 0.6931471805599453 + p * s


def exp_rn(x: torch.Tensor) -> torch.Tensor:
    """exp(x) for float64 x (clamped to [-700, 700]) (philox.h rng::exp_rn)."""
    x = x.clamp(-700.0, 700.0)
    k = torch.floor(x * 1.4426950408889634 + 0.5)
    r = (x - k * 0.693145751953125) - k * 1.4286068202862268e-06
    p = torch.full_like(r, 1.1470745597729725e-11)
    for c in _EXP_TERMS:
        p = p * r + c
    p = p * r + 1.0
    # 2^k from its bits (k in [-1010, 1010]): exact, where pow(2, k) need not be.
    return p * ((k.to(torch.int64) + 1023) << 52).view(torch.float64)


_A = (3.3871328727963666080e0, 1.3314166789178437745e+2, 1.9715909503065514427e+3, 1.3731693765509461125e+4,
      4.5921953931549871457e+4, 6.7265770927008700853e+4, 3.3430575583588128105e+4, 2.5090809287301226727e+3)
_B = (1.0, 4.2313330701600911252e+1, 6.8718700749205790830e+2, 5.3941960214247511077e+3,
      2.1213794301586595867e+4, 3.9307895800092710610e+4, 2.8729085735721942674e+4, 5.2264952788528545610e+3)
_C = (1.42343711074968357734e0, 4.63033784615654529590e0, 5.76949722146069140550e0, 3.64784832476320460504e0,
      1.27045825245236838258e0, 2.41780725177450611770e-1, 2.27238449892691845833e-2, 7.74545014278341407640e-4)
_D = (1.0, 2.05319162663775882187e0, 1.67638483018380384940e0, 6.89767334985100004550e-1,
      1.48103976427480074590e-1, 1.51986665636164571966e-2, 5.47593808499534494600e-4, 1.05075007164441684324e-9)
_E = (6.65790464350110377720e0, 5.46378491116411436990e0, 1.78482653991729133580e0, 2.96560571828504891230e-1,
      2.65321895265761230930e-2, 1.24266094738807843860e-3, 2.71155556874348757815e-5, 2.01033439929228813265e-7)
_F = (1.0, 5.99832206555887937690e-1, 1.36929880922735805310e-1, 1.48753612908506148525e-2,
      7.86869131145613259100e-4, 1.84631831751005468180e-5, 1.42151175831644588870e-7, 2.04426310338993978564e-15)


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    # torch.sqrt on CPU float64 is not always correctly rounded (SLEEF); numpy's is (sqrtpd), as
    # are std::sqrt and __dsqrt_rn, so the twin stays bit-exact.
    return torch.from_numpy(np.sqrt(x.detach().cpu().numpy())).to(x.device)


def _horner8(c, x):
    p = torch.full_like(x, c[7])
    for j in range(6, -1, -1):
        p = p * x + c[j]
    return p


def normal_quantile(p: torch.Tensor) -> torch.Tensor:
    """Inverse normal CDF (Wichura's AS241) of float64 p in (0, 1) (philox.h rng::normal_quantile)."""
    q = p - 0.5
    r = 0.180625 - q * q
    central = (q * _horner8(_A, r)) / _horner8(_B, r)
    t = torch.where(q < 0, p, 1.0 - p)
    t = _sqrt_rn(-log_rn(torch.where(q.abs() <= 0.425, 0.5, t)))
    rc, re = t - 1.6, t - 5.0
    tail = torch.where(t <= 5.0, _horner8(_C, rc) / _horner8(_D, rc), _horner8(_E, re) / _horner8(_F, re))
    tail = torch.where(q < 0, -tail, tail)
    return torch.where(q.abs() <= 0.425, central, tail)


def _log_gamma_variate(shape: float, seed: int, sample: torch.Tensor, index: torch.Tensor,
                       component: int) -> torch.Tensor:
    """Marsaglia-Tsang, vectorised: every element runs attempts until accepted (philox.h)."""
    a = shape + 1.0 if shape < 1.0 else shape
    d = a - 0.3333333333333333
    c = 1.0 / math.sqrt(9.0 * d)  # correctly rounded, as __dsqrt_rn
    sample, index = torch.broadcast_tensors(sample, index)
    v = torch.ones(index.shape, dtype=torch.float64)
    boost = torch.full(index.shape, 0.5, dtype=torch.float64)
    pending = torch.ones(index.shape, dtype=torch.bool)
    for j in range(_MAX_GAMMA_ATTEMPTS):
        if not bool(pending.any()):
            break
        r = draw(seed, sample, index, ((component + 1) << 24) | j)
        z = normal_quantile(_u52(r[0], r[1]))
        w = 1.0 + c * z
        ok = pending & (w > 0.0)
        vv = w * w * w
        v = torch.where(ok, vv, v)
        boost = torch.where(ok, _u32(r[3]), boost)
        rhs = 0.5 * z * z + d - d * vv + d * log_rn(torch.where(w > 0.0, vv, 1.0))
        pending = pending & ~(ok & (log_rn(_u32(r[2])) < rhs))
    lg = log_rn(d * v)
    if shape < 1.0:
        lg = lg + log_rn(boost) / shape
    return lg


def coefficients(distribution: str, params, seed: int, samples: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """λ (float64) for every pair of broadcast `samples` (int64) and coefficient `index` (int64)."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; expected one of {sorted(DISTRIBUTIONS)}")
    params = [float(p) for p in params]
    samples, index = torch.broadcast_tensors(torch.as_tensor(samples, dtype=torch.int64),
                                             torch.as_tensor(index, dtype=torch.int64))
    if distribution == "constant":
        return torch.full(index.shape, params[0], dtype=torch.float64)
    if distribution == "beta":
        lx = _log_gamma_variate(params[0], seed, samples, index, 0)
        ly = _log_gamma_variate(params[1], seed, samples, index, 1)
        return 1.0 / (1.0 + exp_rn(ly - lx))
    n = lanes(distribution)
    words = torch.stack(draw(seed, samples, index // n, 0), dim=-1)
    lane = (index % n).unsqueeze(-1)
    if distribution == "uniform":
        u = _u24(words.gather(-1, lane).squeeze(-1))
        return params[0] + (params[1] - params[0]) * u
    if distribution == "bernoulli":
        u = _u24(words.gather(-1, lane).squeeze(-1))
        return (u < params[0]).double()
    # gaussian: lane l reads words 2l and 2l+1
    z = normal_quantile(_u52(words.gather(-1, 2 * lane).squeeze(-1), words.gather(-1, 2 * lane + 1).squeeze(-1)))
    x = params[0] + params[1] * z
    x = torch.where(x < params[2], params[2], x)
    return torch.where(x > params[3], params[3], x)
