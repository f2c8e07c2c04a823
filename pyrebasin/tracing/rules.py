"""Op rules of `trace_spec`: for each aten-named op, which axes of its inputs, parameters and outputs
must share a permutation (tie), and which no permutation may touch (freeze, with a reason).

Soundness: each rule makes its op equivariant under any permutation of each atom class, so the
whole model is invariant once inputs and outputs are frozen. When unsure, a rule freezes.
"""
from __future__ import annotations

from .engine import Call, Engine, Multi
from .registry import RULES, rule


def _dims(d, ndim: int) -> list[int]:
    if d is None:
        return list(range(ndim))
    d = [d] if isinstance(d, int) else list(d)
    return sorted(x % ndim for x in d) if d else list(range(ndim))


# --- trivial ops ---------------------------------------------------------------------------------
NO_TENSOR_OUT = ("_assert_tensor_metadata", "_assert_scalar", "_assert_async", "sym_size",
                 "sym_numel", "sym_stride", "sym_storage_offset", "sym_constrain_range",
                 "sym_constrain_range_for_size", "_functional_assert_async", "size", "dim", "numel",
                 "stride", "is_contiguous", "data_ptr", "item", "_local_scalar_dense", "ndimension",
                 "get_device", "is_floating_point", "tolist")
for _n in NO_TENSOR_OUT:  # shape/metadata queries and assertions: nothing to permute
    RULES[_n] = lambda E, c: None

CONSTANT_MAKERS = ("arange", "empty", "tensor", "randn", "rand", "randint", "eye", "linspace",
                   "new_empty", "new_tensor", "empty_strided", "lift_fresh_copy")
for _n in CONSTANT_MAKERS:
    RULES[_n] = lambda E, c: E.fresh_out(c, "constant tensor")
UNIFORM_MAKERS = ("zeros", "ones", "full", "new_zeros", "new_ones", "new_full", "scalar_tensor")
for _n in UNIFORM_MAKERS:  # every entry equal: invariant to any permutation of any axis
    RULES[_n] = lambda E, c: E.fresh_out(c, None)


# --- elementwise ---------------------------------------------------------------------------------
UNARY = ("relu", "relu_", "gelu", "gelu_", "silu", "silu_", "sigmoid", "sigmoid_", "tanh", "tanh_",
         "neg", "exp", "log", "log1p", "abs", "sqrt", "rsqrt", "sin", "cos", "erf", "square",
         "reciprocal", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "elu", "elu_", "softplus",
         "mish", "hardswish", "hardsigmoid", "relu6", "logsigmoid", "sign", "celu", "selu", "glu_",
         "dropout", "dropout_", "feature_dropout", "alpha_dropout", "feature_alpha_dropout",
         "clone", "contiguous", "to", "_to_copy", "type_as", "detach", "detach_", "alias", "float",
         "half", "double", "bfloat16", "type", "clamp", "clamp_", "clip", "softmax", "_softmax",
         "log_softmax", "_log_softmax", "identity", "nan_to_num", "positive", "zeros_like",
         "ones_like", "full_like", "empty_like", "rand_like", "randn_like", "requires_grad_", "cpu",
         "cuda", "_assert_tensor_metadata_passthrough", "dropout1d", "dropout2d", "dropout3d")


@rule(*UNARY)
def unary(E: Engine, c: Call) -> None:
    """Pointwise (or equivariant along every axis: softmax) in its first tensor argument."""
    x = E.ax(c.arg(0, "self"))
    if x is None or [E.size(a) for a in x] != list(E.out_shape(c)):
        return elementwise(E, c)
    if c.name in ("softmax", "_softmax", "log_softmax", "_log_softmax"):
        dim = c.arg(1, "dim")
        E.mixing(c, [x[dim % len(x)]] if isinstance(dim, int) and x else x)
    E.set_out(c, x)


@rule("native_dropout")
def native_dropout(E: Engine, c: Call) -> None:
    x = E.ax(c.arg(0, "input"))
    E.set_out(c, Multi([x, x]))


ELEMENTWISE = ("add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "where",
               "maximum", "minimum", "masked_fill", "masked_fill_", "eq", "ne", "lt", "le", "gt",
               "ge", "logical_and", "logical_or", "logical_not", "logical_xor", "bitwise_and",
               "bitwise_or", "bitwise_not", "bitwise_xor", "__and__", "__or__", "__xor__", "and_",
               "or_", "invert", "pow", "pow_", "addcmul", "addcdiv", "lerp", "floor_divide",
               "fmod", "remainder", "copy_", "atan2", "truediv", "floordiv", "mod", "xlogy",
               "fill_", "hypot", "true_divide", "isnan", "isinf", "isfinite", "floor", "ceil",
               "round", "trunc", "frac", "bitwise_left_shift", "bitwise_right_shift",
               "_weight_norm")  # weight norm: g * v / |v| over the axes g broadcasts along


@rule(*ELEMENTWISE)
def elementwise(E: Engine, c: Call) -> None:
    """Broadcasting pointwise op: axes aligned from the right share atoms (size-1 ones broadcast)."""
    shape = E.out_shape(c)
    if not isinstance(shape, tuple):
        return None if not E.tensor_args(c) else E.unmodelled(c)
    out: list = [None] * len(shape)
    for axes in E.tensor_args(c):
        off = len(shape) - len(axes)
        for i, atoms in enumerate(axes):
            j = off + i
            if E.size(atoms) != shape[j]:
                continue  # broadcast size-1 axis
            if out[j] is None:
                out[j] = atoms
            else:
                E.tie(out[j], atoms, f"pointwise {c.where()}")
    E.set_out(c, [o if o is not None else [E.A.new(s, None if s == 1 else "broadcast")]
                  for o, s in zip(out, shape)])


# --- reductions ----------------------------------------------------------------------------------
REDUCE = ("mean", "sum", "amax", "amin", "var", "std", "prod", "logsumexp", "norm", "any", "all",
          "linalg_vector_norm", "nansum", "nanmean", "count_nonzero")
ORDERED = ("argmax", "argmin", "cumsum", "cumprod", "cummax", "cummin", "sort", "argsort", "topk",
           "max", "min", "median", "mode", "kthvalue", "logcumsumexp", "diff")


@rule("topk")
def topk(E: Engine, c: Call) -> None:
    """Top-k along an axis (a mixture-of-experts router): the k values do not depend on the order of
    the axis, and the indices name its units, so a permutation of that axis maps them along; they
    become an index tensor (`Engine.pointers`) that gathers weights by unit (the experts' weights).
    Generic values assumed: among exactly tied values the lowest index wins, which a permutation
    changes. Unsorted top-k (order unspecified) is an ordered reduction: the axis is frozen."""
    x = E.ax(c.arg(0, "self"))
    if x is None or not c.arg(4, "sorted", True):
        return reduce(E, c)
    dim = c.arg(2, "dim", -1) % len(x)
    ranks = [E.A.new(E.out_shape(c)[0][dim], f"ranks of {c.where()}")]
    out = x[:dim] + [ranks] + x[dim + 1:]
    E.set_out(c, Multi([out, out]))
    E.pointers[(c.out, 1)] = x[dim]


@rule(*REDUCE, *(n for n in ORDERED if n != "topk"))
def reduce(E: Engine, c: Call) -> None:
    """Reducing over an axis is invariant to its permutation; order-dependent ops (argmax, cumsum,
    sort, diff) freeze the axes they run along."""
    x = E.ax(c.arg(0, "self"))
    if x is None:
        return E.unmodelled(c)
    nd = len(x)
    dim = c.arg(2, "dim") if c.name == "linalg_vector_norm" else c.arg(1, "dim")
    if c.name in ("max", "min") and (len(c.args) < 2 and "dim" not in c.kwargs):
        dim = None
    if c.name in ("max", "min") and len(c.args) > 1 and E.ax(c.args[1]) is not None:
        return elementwise(E, c)  # max(a, b)
    if c.name == "topk":
        dim = c.arg(2, "dim", -1)
    if c.name in ("sort", "argsort") and dim is None:
        dim = -1
    if not isinstance(dim, (int, list, tuple, type(None))):
        dim = None
    dims = _dims(dim, nd) if nd else []
    if c.name in ORDERED:
        E.freeze([x[d] for d in dims], f"order along the axis matters for {c.where()}")
    shapes = E.out_shape(c)
    for_shapes = shapes if isinstance(shapes, list) else [shapes]
    outs = []
    for s in for_shapes:
        if s is None:
            outs.append(None)
        elif len(s) == nd and all(s[i] == E.size(x[i]) or i in dims for i in range(nd)):
            outs.append([x[i] if s[i] == E.size(x[i]) else [E.A.new(s[i])] for i in range(nd)])
        elif len(s) == nd - len(dims):
            outs.append([x[i] for i in range(nd) if i not in dims])
        else:
            E.freeze(x, f"unexpected output shape of {c.where()}")
            outs.append(E.fresh(s, f"output of {c.where()}"))
    E.set_out(c, Multi(outs) if isinstance(shapes, list) else outs[0])

