"""K-batched versions of aten ops, for the traced-graph interpreter of `batched_forward`: each value of
the graph is shared by the K models (a plain tensor, computed once) or per model (`KV`: [K, *shape])."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["KV", "Context", "RULES", "apply", "leaves"]

aten = torch.ops.aten


class KV:
    """A per-model value: `t` is [K, *shape] (any strides: the layout a rule chose, e.g. a transposed
    view of grouped-convolution output [B, K·C, ...])."""

    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor):
        self.t = t


class Context:
    """What rules need besides their arguments: K, the convolution strategy and the ops that fell back."""

    def __init__(self, k: int, device_type: str = "cpu", conv: str = "auto"):
        self.k, self.device_type, self.conv, self.fallbacks = k, device_type, conv, set()
        self.node = None   # the graph node being run (rules may ask which of its outputs are used)

    def used(self, i: int) -> bool:
        """Whether output i of the current (tuple-returning) node is read by the graph."""
        return self.node is None or any(u.args[1] == i and u.users for u in self.node.users)


Rule = Callable[..., object]
RULES: dict[object, Rule] = {}


def _rule(*ops):
    def deco(fn):
        for op in ops:
            RULES[op] = fn
        return fn
    return deco


def leaves(x) -> list:
    return [v for v in tree_flatten(x, is_leaf=lambda v: isinstance(v, KV))[0]]


def _rank(v) -> int:
    return v.t.dim() - 1 if isinstance(v, KV) else v.dim()


def _dim(d: int, rank: int) -> int:
    return (d % max(rank, 1)) + 1


def _kexpand(v, k: int) -> torch.Tensor:
    """A value as [K, *shape] (a shared tensor broadcast without copying)."""
    return v.t if isinstance(v, KV) else v.unsqueeze(0).expand(k, *v.shape)


def fallback(ctx: Context, op, args, kwargs):
    """vmap of the single op over the per-model arguments: correct for any op with a batching rule."""
    ctx.fallbacks.add(str(op))
    flat, spec = tree_flatten((args, kwargs), is_leaf=lambda v: isinstance(v, KV))
    where = [i for i, v in enumerate(flat) if isinstance(v, KV)]

    def one(*ts):
        vals = list(flat)
        for i, t in zip(where, ts):
            vals[i] = t
        a, kw = tree_unflatten(vals, spec)
        return op(*a, **kw)

    out = torch.vmap(one)(*[flat[i].t for i in where])
    return tree_unflatten([KV(t) if isinstance(t, torch.Tensor) else t for t in tree_flatten(out)[0]],
                          tree_flatten(out)[1])


def apply(ctx: Context, op, args, kwargs):
    """One node: shared inputs only → the op itself (computed once for all K); else its rule."""
    if not any(isinstance(v, KV) for v in leaves((args, kwargs))):
        return op(*args, **kwargs)
    rule = RULES.get(op)
    if rule is None and isinstance(op, torch._ops.OpOverload) and torch.Tag.pointwise in op.tags:
        rule = _pointwise
    if rule is None:
        return fallback(ctx, op, args, kwargs)
    out = rule(ctx, op, *args, **kwargs)
    return fallback(ctx, op, args, kwargs) if out is NotImplemented else out


# ---------------------------------------------------------------- elementwise and layout
def _pointwise(ctx, op, *args, **kwargs):
    rank = max(_rank(v) for v in leaves((args, kwargs)) if isinstance(v, (KV, torch.Tensor)))

    def lift(v):   # [K, *s] -> [K, 1.., *s]: per-model values broadcast like the model's own
        if not isinstance(v, KV):
            return v
        t = v.t
        return t.view(t.shape[0], *([1] * (rank - t.dim() + 1)), *t.shape[1:]) if t.dim() - 1 < rank else t
    a = [lift(v) for v in args]
    kw = {n: lift(v) for n, v in kwargs.items()}
    return KV(op(*a, **kw))


@_rule(aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default,
       aten._to_copy.default)
def _same(ctx, op, x, *args, **kwargs):
    kwargs.pop("memory_format", None)
    return KV(op(x.t, *args, **kwargs))


@_rule(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(ctx, op, x, size):
    return KV(x.t.reshape(x.t.shape[0], *size))


@_rule(aten.expand.default)
def _expand(ctx, op, x, size, implicit=False):
    return KV(x.t.expand(x.t.shape[0], *size))


@_rule(aten.permute.default)
def _permute(ctx, op, x, dims):
    r = _rank(x)
    return KV(x.t.permute(0, *[_dim(d, r) for d in dims]))


@_rule(aten.t.default)
def _t(ctx, op, x):
    return KV(x.t.transpose(1, 2)) if _rank(x) == 2 else x


@_rule(aten.transpose.int)
def _transpose(ctx, op, x, d0, d1):
    r = _rank(x)
    return KV(x.t.transpose(_dim(d0, r), _dim(d1, r)))


@_rule(aten.unsqueeze.default)
def _unsqueeze(ctx, op, x, d):
    return KV(x.t.unsqueeze(_dim(d, _rank(x) + 1)))


@_rule(aten.squeeze.dim, aten.squeeze.dims)
def _squeeze(ctx, op, x, dims):
    r = _rank(x)
    dims = [dims] if isinstance(dims, int) else dims
    return KV(x.t.squeeze(tuple(_dim(d, r) for d in dims)))


@_rule(aten.select.int, aten.slice.Tensor, aten.narrow.default, aten.split.Tensor, aten.split_with_sizes.default,
       aten.chunk.default, aten.unbind.int, aten.index_select.default)
def _dim_arg(ctx, op, x, *args, **kwargs):
    """Ops whose first argument after the tensor (or `dim=`) is a dimension: shifted past K."""
    r = _rank(x)
    name = op._schema.arguments[1].name if len(op._schema.arguments) > 1 else None
    if op in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
        args = list(args)
        if len(args) > 1:
            args[1] = _dim(args[1], r)
        else:
            kwargs["dim"] = _dim(kwargs.get("dim", 0), r)
        return [KV(t) for t in op(x.t, *args, **kwargs)]
    if args:
        args = (_dim(args[0], r), *args[1:])
    elif name in kwargs:
        kwargs[name] = _dim(kwargs[name], r)
    out = op(x.t, *args, **kwargs)
    return [KV(t) for t in out] if isinstance(out, (list, tuple)) else KV(out)


@_rule(aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.argmax.default,
       aten.argmin.default, aten._softmax.default, aten._log_softmax.default, aten.cumsum.default,
       aten.var.correction, aten.std.correction)
def _reduce(ctx, op, x, dims=None, *args, **kwargs):
    r = _rank(x)
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        if op in (aten.argmax.default, aten.argmin.default):
            return NotImplemented
        dims = list(range(r))
    dims = _dim(dims, r) if isinstance(dims, int) else [_dim(d, r) for d in dims]
    return KV(op(x.t, dims, *args, **kwargs))


@_rule(aten.cat.default, aten.stack.default)
def _cat(ctx, op, tensors, dim=0):
    r = max(_rank(v) for v in tensors) + (1 if op is aten.stack.default else 0)
    return KV(op([_kexpand(v, ctx.k) for v in tensors], _dim(dim, r)))


# ---------------------------------------------------------------- GEMMs
def _matmul(ctx, a, b, bias=None):
    """Per-model a [M, N] @ b [N, P] (+ bias [P]): one GEMM over all K where the input is shared."""
    k = ctx.k
    if isinstance(a, KV) and isinstance(b, KV):
        if bias is None:
            return KV(torch.bmm(a.t, b.t))
        bt = bias.t.unsqueeze(1) if isinstance(bias, KV) else bias
        return KV(torch.baddbmm(bt, a.t, b.t))
    if isinstance(b, KV):   # shared input: [M, N] @ [N, K·P], seen as [K, M, P]
        n, p = b.t.shape[1], b.t.shape[2]
        wide = b.t.transpose(0, 1).reshape(n, k * p)
        if bias is None:
            out = torch.mm(a, wide)
        else:
            out = torch.addmm(bias.t.reshape(k * p) if isinstance(bias, KV) else bias.repeat(k), a, wide)
        return KV(out.view(a.shape[0], k, p).transpose(0, 1))
    m = a.t.shape[1]
    out = torch.mm(a.t.reshape(k * m, -1), b).view(k, m, -1)
    return KV(out if bias is None else out + (bias.t.unsqueeze(1) if isinstance(bias, KV) else bias))


@_rule(aten.mm.default)
def _mm(ctx, op, a, b):
    return _matmul(ctx, a, b)


@_rule(aten.addmm.default)
def _addmm(ctx, op, bias, a, b, *, beta=1, alpha=1):
    if beta != 1 or alpha != 1 or _rank(bias) != 1:
        return NotImplemented
    return _matmul(ctx, a, b, bias)


@_rule(aten.embedding.default)
def _embedding(ctx, op, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    if isinstance(indices, KV) or not isinstance(weight, KV):
        return NotImplemented
    return KV(weight.t[:, indices])


# ---------------------------------------------------------------- convolution, norms, pooling
def to_channels(x: torch.Tensor) -> torch.Tensor:
    """[K, B, C, *S] -> [B, K·C, *S]: free when the memory already is [B, K, C, *S] (grouped output)."""
    k, b, c = x.shape[:3]
    return x.transpose(0, 1).reshape(b, k * c, *x.shape[3:])


def from_channels(y: torch.Tensor, k: int) -> torch.Tensor:
    """[B, K·C, *S] -> [K, B, C, *S] as a view."""
    return y.view(y.shape[0], k, y.shape[1] // k, *y.shape[2:]).transpose(0, 1)


def _channel_fold(x: torch.Tensor):
    """A free view of [K, B, C, *S] as a batch of per-channel planes, and how to undo it."""
    k, b = x.shape[:2]
    try:
        return x.transpose(0, 1).view(b, -1, *x.shape[3:]), lambda y: from_channels(y, k)
    except RuntimeError:
        return x.reshape(k * b, *x.shape[2:]), lambda y: y.view(k, b, *y.shape[1:])


@_rule(aten.convolution.default)
def _convolution(ctx, op, x, w, bias, stride, padding, dilation, transposed, output_padding, groups):
    k = ctx.k
    if transposed or not isinstance(w, KV):
        return NotImplemented
    spatial = len(stride)
    kb = bias.t.reshape(-1) if isinstance(bias, KV) else (bias.repeat(k) if bias is not None else None)
    wf = w.t.reshape(-1, *w.t.shape[2:])      # [K·O, C/g, *kernel]
    if not isinstance(x, KV) and groups == 1:  # shared input: one convolution with K·O output channels
        return KV(from_channels(op(x, wf, kb, stride, padding, dilation, False, output_padding, 1), k))
    xt = _kexpand(x, k)
    if _conv_strategy(ctx, spatial) == "loop" or k == 1:
        b = [bias.t[i] if isinstance(bias, KV) else bias for i in range(k)] if bias is not None else [None] * k
        outs = [op(xt[i], w.t[i], b[i], stride, padding, dilation, False, output_padding, groups) for i in range(k)]
        return KV(outs[0].unsqueeze(0) if k == 1 else torch.stack(outs))
    xc = to_channels(xt)
    if spatial == 2 and xc.shape[2] > 1:   # a true 2-D convolution (1-D ones arrive as H = 1)
        xc = xc.contiguous(memory_format=torch.channels_last)
    return KV(from_channels(op(xc, wf, kb, stride, padding, dilation, False, output_padding, groups * k), k))


def _conv_strategy(ctx, spatial: int) -> str:
    """`auto`: one grouped convolution (channels-last in 2-D) over the group of models; `loop`: one
    convolution per model (the layout of K single forwards)."""
    return "loop" if ctx.conv == "loop" else "grouped"


def _per_channel(v, k: int, like: torch.Tensor, rank: int) -> torch.Tensor | None:
    """A per-channel [C] (shared) or [K, C] (per-model) vector as [K, 1, C, 1..] for x [K, B, C, *S]."""
    if v is None:
        return None
    t = _kexpand(v, k)
    return t.view(k, 1, -1, *([1] * (rank - 2))).to(like.dtype)


@_rule(aten._native_batch_norm_legit_no_training.default, aten.native_batch_norm.default)
def _batch_norm(ctx, op, x, w, b, mean, var, *args):
    training = args[0] if op is aten.native_batch_norm.default else False
    eps = args[-1]
    if training or mean is None or not isinstance(x, KV):
        return NotImplemented
    r, k = _rank(x), ctx.k
    try:   # (batch, K·C) fold of grouped-convolution output: the native kernel with stacked statistics
        xc = x.t.transpose(0, 1).view(x.t.shape[1], -1, *x.t.shape[3:])
    except RuntimeError:
        xc = None
    if xc is not None and r >= 2:
        flat = lambda v: None if v is None else _kexpand(v, k).reshape(-1)  # noqa: E731
        out = F.batch_norm(xc, flat(mean), flat(var), flat(w), flat(b), False, 0.0, eps)
        return (KV(from_channels(out, k)), None, None)
    inv = torch.rsqrt(_kexpand(var, k).to(torch.promote_types(x.t.dtype, torch.float32)) + eps)
    scale = inv if w is None else inv * _kexpand(w, k)
    shift = -_kexpand(mean, k) * scale if b is None else _kexpand(b, k) - _kexpand(mean, k) * scale
    shape = (k, 1, -1, *([1] * (r - 2)))
    out = torch.addcmul(shift.view(shape).to(x.t.dtype), x.t, scale.view(shape).to(x.t.dtype))
    return (KV(out), None, None)


@_rule(aten.native_group_norm.default)
def _group_norm(ctx, op, x, w, b, n, c, hw, group, eps):
    if not isinstance(x, KV):
        return NotImplemented
    k, r = ctx.k, _rank(x)
    xc, back = _channel_fold(x.t)
    if xc.shape[0] == n:   # (batch, K·C) fold: one group norm with K·groups and the stacked affine
        flat = lambda v: None if v is None else _kexpand(v, k).reshape(-1)  # noqa: E731
        return (KV(back(F.group_norm(xc, group * k, flat(w), flat(b), eps))), None, None)
    y = back(F.group_norm(xc, group, None, None, eps))   # (K·batch) fold: the per-model affine after
    if w is not None and b is not None:
        y = torch.addcmul(_per_channel(b, k, y, r), y, _per_channel(w, k, y, r))
    elif w is not None:
        y = y * _per_channel(w, k, y, r)
    elif b is not None:
        y = y + _per_channel(b, k, y, r)
    return (KV(y), None, None)


@_rule(aten.native_layer_norm.default)
def _layer_norm(ctx, op, x, shape, w, b, eps):
    k = ctx.k
    y = F.layer_norm(x.t if isinstance(x, KV) else x, shape, None, None, eps)
    lift = lambda v: _kexpand(v, k).view(k, *([1] * (_rank(x) - len(shape))), *shape)  # noqa: E731
    if not isinstance(x, KV):
        y = y.unsqueeze(0)
    if w is not None and b is not None:
        y = torch.addcmul(lift(b), y, lift(w))
    elif w is not None:
        y = y * lift(w)
    elif b is not None:
        y = y + lift(b)
    return (KV(y.expand(k, *y.shape[1:]) if y.shape[0] != k else y), None, None)


@_rule(aten.max_pool3d_with_indices.default, aten.avg_pool2d.default, aten.avg_pool3d.default,
       aten._adaptive_avg_pool2d.default, aten.adaptive_max_pool2d.default, aten.max_pool1d.default,
       aten.avg_pool1d.default)
def _pool(ctx, op, x, *args, **kwargs):
    """Per-channel window ops: on a free (batch, channel) fold of the per-model values."""
    xc, back = _channel_fold(x.t)
    out = op(xc, *args, **kwargs)
    return tuple(KV(back(t)) for t in out) if isinstance(out, (tuple, list)) else KV(back(out))


@_rule(aten.max_pool2d_with_indices.default)
def _max_pool2d(ctx, op, x, kernel, stride=(), padding=0, dilation=1, ceil_mode=False):
    """Eval graphs never read the indices: the kernel without them (1-D pools, traced as 2-D with H = 1,
    on the 1-D kernel), measured several times faster on CPUs."""
    if ctx.used(1):
        return _pool(ctx, op, x, kernel, stride, padding, dilation, ceil_mode)
    xc, back = _channel_fold(x.t)
    two = lambda v: list(v) * 2 if len(v) == 1 else list(v)  # noqa: E731
    kernel, stride = two(kernel), two(stride or kernel)
    padding = two([padding] if isinstance(padding, int) else padding)
    dilation = two([dilation] if isinstance(dilation, int) else dilation)
    if xc.shape[2] == 1 and (kernel[0], stride[0], padding[0], dilation[0]) == (1, 1, 0, 1):
        out = F.max_pool1d(xc.squeeze(2), kernel[1], stride[1], padding[1], dilation[1], ceil_mode).unsqueeze(2)
    else:
        out = F.max_pool2d(xc, kernel, stride, padding, dilation, ceil_mode)
    return (KV(back(out)), None)


@_rule(aten._scaled_dot_product_flash_attention_for_cpu.default, aten._scaled_dot_product_flash_attention.default,
       aten._scaled_dot_product_efficient_attention.default, aten.scaled_dot_product_attention.default)
def _attention(ctx, op, q, key, v, *args, **kwargs):
    """Attention over [K·B, ...] batches: per-model q, k, v folded into the batch dimension."""
    k = ctx.k
    mask = kwargs.get("attn_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        kwargs["attn_mask"] = mask.unsqueeze(0).expand(k, *mask.shape).reshape(-1, *mask.shape[1:])
    elif isinstance(mask, KV):
        kwargs["attn_mask"] = mask.t.reshape(-1, *mask.t.shape[2:])
    if any(isinstance(a, (KV, torch.Tensor)) for a in args):
        return NotImplemented
    qs, ks, vs = (_kexpand(t, k) for t in (q, key, v))
    out = op(qs.reshape(-1, *qs.shape[2:]), ks.reshape(-1, *ks.shape[2:]), vs.reshape(-1, *vs.shape[2:]),
             *args, **kwargs)
    unfold = lambda t: KV(t.view(k, -1, *t.shape[1:])) if isinstance(t, torch.Tensor) and t.dim() else t  # noqa
    return tuple(unfold(t) for t in out) if isinstance(out, (tuple, list)) else unfold(out)
