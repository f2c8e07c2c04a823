"""Small builders for hand-written specs (Git Re-Basin style): one call per layer kind."""
from __future__ import annotations

from ..spec import AxisEntry

Axes = dict[str, tuple[AxisEntry, ...]]


def dense(name: str, p_in: AxisEntry, p_out: AxisEntry, bias: bool = True) -> Axes:
    out: Axes = {f"{name}.weight": (p_out, p_in)}
    if bias:
        out[f"{name}.bias"] = (p_out,)
    return out


def conv(name: str, p_in: AxisEntry, p_out: AxisEntry, dim: int, bias: bool = False) -> Axes:
    out: Axes = {f"{name}.weight": (p_out, p_in) + (None,) * dim}
    if bias:
        out[f"{name}.bias"] = (p_out,)
    return out


def norm(name: str, p: AxisEntry, kind: str | None) -> Axes:
    """Per-channel affine norms; BatchNorm also carries running stats (permuted) and a counter (fixed)."""
    if kind is None:
        return {}
    out: Axes = {f"{name}.weight": (p,), f"{name}.bias": (p,)}
    if kind == "bn":
        out[f"{name}.running_mean"] = (p,)
        out[f"{name}.running_var"] = (p,)
        out[f"{name}.num_batches_tracked"] = ()
    return out
