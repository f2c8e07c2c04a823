"""RESET's statistics pass in the traced-graph engine: every BatchNorm of the eval-mode graph normalises
with each model's own batch statistics (as a train-mode pass would) and records them, so the K states
of a chunk get their running statistics recomputed in one batched pass over the statistics data."""
from __future__ import annotations

import torch

from ._batched_rules import KV

__all__ = ["BN_OPS", "batch_norm_statistics", "running_stat_keys"]

aten = torch.ops.aten
BN_OPS = (aten._native_batch_norm_legit_no_training.default, aten.native_batch_norm.default)


def batch_norm_statistics(ctx, node, args):
    """One BatchNorm node in statistics mode: out = (x − μ_b)/√(σ²_b + eps)·w + b with the per-model
    batch mean μ_b and population variance σ²_b over every position but the channel; Σ n·μ_b and
    Σ n·σ²_b (float64) are added to `ctx.stats[node.name]` (count first)."""
    x, w, b, eps, k = args[0], args[1], args[2], args[-1], ctx.k
    t = x.t if isinstance(x, KV) else x.unsqueeze(0).expand(k, *x.shape)
    if t.dim() < 3:
        raise ValueError(f"BatchNorm node {node.name}: input of shape {list(t.shape[1:])} has no channel axis")
    var, mean = torch.var_mean(t, dim=[1, *range(3, t.dim())], correction=0)   # [K, C]
    n = t.numel() // (k * t.shape[2])
    if n < 2:   # the variance of one value is 0: it would become running_var
        raise ValueError(f"BatchNorm node {node.name} sees {n} value per channel in a batch; recomputing "
                         "statistics needs >= 2 (pass batch_size >= 2 and at least 2 samples)")
    acc = ctx.stats.setdefault(node.name, [0, 0.0, 0.0])
    acc[0] += n
    acc[1] = acc[1] + mean.double() * n
    acc[2] = acc[2] + var.double() * n
    scale = torch.rsqrt(var + eps)
    if w is not None:
        scale = scale * (w.t if isinstance(w, KV) else w)
    shift = -mean * scale
    if b is not None:
        shift = shift + (b.t if isinstance(b, KV) else b)
    shape = (k, 1, -1, *([1] * (t.dim() - 3)))
    return (KV(torch.addcmul(shift.view(shape).to(t.dtype), t, scale.view(shape).to(t.dtype))), None, None)


def running_stat_keys(nodes, names: list[str]) -> dict[str, tuple[str, str]] | None:
    """BatchNorm node name -> (running_mean key, running_var key), from the graph's placeholders (named
    `names` in order); None when a node reads statistics that are not plain inputs (or none)."""
    placeholders = [n for n in nodes if n.op == "placeholder"]
    key_of = {p: names[i] for i, p in enumerate(placeholders[:len(names)])}
    out = {}
    for node in nodes:
        if node.op == "call_function" and node.target in BN_OPS:
            mean, var = node.args[3], node.args[4]
            if mean not in key_of or var not in key_of:
                return None
            out[node.name] = (key_of[mean], key_of[var])
    return out


def reset_chunk(fix, forward, stacked: dict, fixed: dict) -> dict | None:
    """`repair.ResetCorrection.batched`: the K stacked states of a chunk with their BatchNorm statistics
    recomputed by `forward.reset_statistics` (one engine pass per statistics batch); the first chunk is
    compared with `fix` (reset_bn state by state) on its first two states, and a disagreement turns the
    batched pass off. None: reset state by state (mode off, CPUs by default, no engine, a mismatch)."""
    on_gpu = any(v.device.type != "cpu" for v in stacked.values())
    if fix.checked is False or fix.mode is False or (fix.mode is None and not on_gpu):
        return None
    stats = forward.reset_statistics(stacked, fix.inputs())
    if stats is None or len(stats) != 2 * fix.n_bn:
        fix.checked = False
        return None
    if fix.checked is None:
        for i in range(min(2, next(iter(stacked.values())).shape[0])):
            want = fix({**{n: v[i] for n, v in stacked.items()}, **fixed})
            if not all(torch.allclose(v[i], want[n], rtol=1e-4, atol=1e-6) for n, v in stats.items()):
                fix.checked = False
                return None
        fix.checked = True
    return {**stacked, **stats}
