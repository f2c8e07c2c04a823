"""Graph front ends of `trace_spec`: torch.fx symbolic tracing (module-level nodes) and torch.export
(aten-level nodes), both turned into `Graph`s of aten-named `Call`s. Neither mutates the model."""
from __future__ import annotations

import inspect
import operator

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .engine import Call, Graph, Ref


class FxUnsupported(ValueError):
    """fx could not trace the model, or produced a leaf module the fx front end does not model."""


def _shape_of_val(val):
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    if isinstance(val, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in val):
        return [_shape_of_val(v) if isinstance(v, torch.Tensor) else None for v in val]
    return None


def _path(node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else ""


# --- torch.export -------------------------------------------------------------------------------
def export_graph(model: nn.Module, args: tuple, kwargs: dict, state_keys) -> Graph:
    from torch.export.graph_signature import InputKind, OutputKind, TensorArgument
    ep = torch.export.export(model, args, kwargs, strict=False)
    sig = ep.graph_signature
    by_name = {n.name: n for n in ep.graph.nodes}
    refs, consts, inputs = {}, set(), []
    for spec in sig.input_specs:
        node = by_name.get(getattr(spec.arg, "name", None))
        if node is None:
            continue
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.target in state_keys:
            refs[node] = spec.target
        elif spec.kind == InputKind.USER_INPUT:
            inputs.append(node)
        else:
            consts.add(node)
    calls: list[Call] = []
    _emit(ep.graph_module, ep.graph, {}, calls)
    outputs = [by_name[s.arg.name] for s in sig.output_specs
               if s.kind == OutputKind.USER_OUTPUT and isinstance(s.arg, TensorArgument)]
    return Graph(calls, inputs, outputs, refs, consts,
                 lambda v: _shape_of_val(v.meta.get("val")) if isinstance(v, torch.fx.Node) else None,
                 "export")


_WRAPPERS = ("wrap_with_set_grad_enabled", "wrap_with_autocast")


def _emit(gm, graph, subst: dict, calls: list) -> None:
    """Calls of an export graph; no_grad / autocast regions (higher-order ops over a submodule)
    are inlined, their placeholders standing for the operands passed in."""
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        t = n.target
        name = t.overloadpacket.__name__ if isinstance(t, torch._ops.OpOverload) else \
            getattr(t, "__name__", str(t))
        args = torch.fx.node.map_arg(n.args, lambda a: subst.get(a, a))
        kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: subst.get(a, a))
        sub_at = next((i for i, a in enumerate(n.args) if isinstance(a, torch.fx.Node)
                       and a.op == "get_attr"), None)
        if name in _WRAPPERS and sub_at is not None:
            sub = getattr(gm, n.args[sub_at].target)
            inner = [p for p in sub.graph.nodes if p.op == "placeholder"]
            sub_subst = dict(zip(inner, args[sub_at + 1:]))
            _emit(sub, sub.graph, sub_subst, calls)
            out = next(p for p in sub.graph.nodes if p.op == "output").args[0]
            items = tuple(sub_subst.get(x, x) for x in (out if isinstance(out, (tuple, list)) else (out,)))
            calls.append(Call("tuple", (items,), {}, n, n.name, _path(n), str(t)))
        else:
            calls.append(Call(name, tuple(args), dict(kwargs), n, n.name, _path(n), str(t)))


# --- torch.fx -----------------------------------------------------------------------------------
_OPERATORS = {operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.mul: "mul",
              operator.imul: "mul", operator.truediv: "div", operator.floordiv: "floor_divide",
              operator.matmul: "matmul", operator.neg: "neg", operator.getitem: "getitem",
              operator.pow: "pow", operator.and_: "__and__", operator.or_: "__or__",
              operator.eq: "eq", operator.ne: "ne", operator.lt: "lt", operator.gt: "gt",
              operator.le: "le", operator.ge: "ge", operator.mod: "remainder"}
_VARARG_SIZE = ("view", "reshape", "permute", "expand", "repeat", "tile")
_ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Hardswish,
                nn.Softplus, nn.Mish, nn.Identity, nn.ReLU6, nn.Hardtanh, nn.Hardsigmoid, nn.SELU,
                nn.CELU, nn.LogSigmoid, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                nn.AlphaDropout, nn.Softmax, nn.LogSoftmax)
_POOLS = {getattr(nn, f"{kind}Pool{k}d"): f"{op}_pool{k}d" for k in (1, 2, 3) for kind, op in
          (("Max", "max"), ("Avg", "avg"), ("AdaptiveAvg", "adaptive_avg"),
           ("AdaptiveMax", "adaptive_max"))}


def _module_call(node, mod: nn.Module, state_keys) -> tuple[str, tuple, dict]:
    """A leaf module call as the aten op it amounts to, with parameters as `Ref`s."""
    p = node.target

    def ref(name):
        if getattr(mod, name, None) is None:
            return None
        if f"{p}.{name}" not in state_keys:  # computed (parametrizations): export traces it
            raise FxUnsupported(f"{name!r} of leaf module {p!r} is not a state-dict tensor")
        return Ref(f"{p}.{name}")
    x = node.args[0] if node.args else next(iter(node.kwargs.values()))
    if isinstance(mod, nn.Linear):
        return "linear", (x, ref("weight"), ref("bias")), {}
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "convolution", (x, ref("weight"), ref("bias"), None, None, None, False, None,
                               mod.groups), {}
    if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return "convolution", (x, ref("weight"), ref("bias"), None, None, None, True, None,
                               mod.groups), {}
    if isinstance(mod, nn.modules.batchnorm._NormBase):  # BatchNorm*, InstanceNorm*
        return "batch_norm", (x, ref("weight"), ref("bias"), ref("running_mean"),
                              ref("running_var")), {"_counter": ref("num_batches_tracked")}
    if isinstance(mod, nn.LayerNorm):
        return "layer_norm", (x, tuple(mod.normalized_shape), ref("weight"), ref("bias")), {}
    if isinstance(mod, nn.GroupNorm):
        return "group_norm", (x, mod.num_groups, ref("weight"), ref("bias")), {}
    if hasattr(nn, "RMSNorm") and isinstance(mod, nn.RMSNorm):
        return "rms_norm", (x, tuple(mod.normalized_shape), ref("weight")), {}
    if isinstance(mod, nn.Embedding):
        return "embedding", (ref("weight"), x), {}
    if isinstance(mod, nn.Flatten):
        return "flatten", (x,), {}
    if isinstance(mod, nn.Unflatten):
        return "unflatten", (x,), {}
    if isinstance(mod, _ACTIVATIONS):
        return "dropout" if isinstance(mod, nn.modules.dropout._DropoutNd) else "relu", (x,), {}
    if type(mod) in _POOLS:
        return _POOLS[type(mod)], (x,), {}
    raise FxUnsupported(f"leaf module {p!r} of type {type(mod).__name__} (node {node.name!r}) has "
                        f"no fx rule")


def _function_call(node) -> tuple[str, tuple, dict]:
    t, args, kwargs = node.target, tuple(node.args), dict(node.kwargs)
    if node.op == "call_method":
        name = t
        if name in _VARARG_SIZE and len(args) >= 2 and not isinstance(args[1], (list, tuple)):
            args = (args[0], tuple(args[1:]))
        return name, args, kwargs
    if t in _OPERATORS:
        return _OPERATORS[t], args, kwargs
    name = getattr(t, "__name__", str(t))
    if name in ("batch_norm", "embedding", "einsum") and not isinstance(t, torch._ops.OpOverload):
        try:
            bound = inspect.signature(t).bind(*args, **kwargs).arguments
        except (TypeError, ValueError):
            bound = None
        if name == "batch_norm" and bound is not None:
            return name, tuple(bound.get(k) for k in ("input", "weight", "bias", "running_mean",
                                                        "running_var")), {}
        if name == "embedding" and bound is not None:
            return name, (bound["weight"], bound["input"]), {}
        if name == "einsum":
            ops = args[1:]
            ops = list(ops[0]) if len(ops) == 1 and isinstance(ops[0], (list, tuple)) else list(ops)
            return name, (args[0], ops), {}
    return name, args, kwargs


def fx_graph(model: nn.Module, args: tuple, kwargs: dict, state_keys) -> Graph:
    if kwargs:
        raise FxUnsupported("keyword example inputs")
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # fx raises many kinds (TraceError, TypeError, ...)
        raise FxUnsupported(f"torch.fx.symbolic_trace failed: {type(e).__name__}: {e}") from e
    refs, consts, inputs, calls = {}, set(), [], []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            inputs.append(n)
        elif n.op == "get_attr":
            if n.target in state_keys:
                refs[n] = n.target
            else:
                consts.add(n)
        elif n.op == "call_module":
            mod = gm.get_submodule(n.target)
            name, a, k = _module_call(n, mod, state_keys)
            calls.append(Call(name, a, k, n, n.name, n.target, f"{type(mod).__name__} {n.target}"))
        elif n.op in ("call_function", "call_method"):
            name, a, k = _function_call(n)
            calls.append(Call(name, a, k, n, n.name, _path(n), str(getattr(n.target, "__name__", n.target))))
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = []
    torch.fx.node.map_arg(out_node.args, outputs.append)
    _propagate_shapes(gm, args, len(placeholders))
    return Graph(calls, inputs, outputs, refs, consts, _fx_shape, "fx")


def _fx_shape(v):
    if not isinstance(v, torch.fx.Node):
        return None
    meta = v.meta.get("tensor_meta")
    if meta is None:
        return None
    if isinstance(meta, (list, tuple)) and not hasattr(meta, "shape"):
        return [tuple(int(s) for s in m.shape) if hasattr(m, "shape") else None for m in meta]
    return tuple(int(s) for s in meta.shape)


class _Prop(nn.Module):
    def __init__(self, gm):
        super().__init__()
        self.gm = gm

    def forward(self, *args):
        return ShapeProp(self.gm).propagate(*args)


def _propagate_shapes(gm, args, n_placeholders) -> None:
    """Run the traced graph once on copies of the state (train-mode BatchNorm would otherwise
    update the caller's running statistics) to record every node's shape."""
    if len(args) != n_placeholders:
        raise FxUnsupported(f"fx graph takes {n_placeholders} inputs, example gives {len(args)}")
    copies: dict[int, torch.Tensor] = {}
    state = {f"gm.{k}": copies.setdefault(id(v), v.detach().clone())
             for k, v in gm.state_dict(keep_vars=True).items()}
    try:
        with torch.no_grad():
            torch.func.functional_call(_Prop(gm), state, args)
    except Exception as e:  # the fx graph does not run as traced (e.g. data-dependent branches)
        raise FxUnsupported(f"running the fx graph for shapes failed: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from e
