"""A direct batched forward for models that are plain chains of Linear layers and activations (MLPs,
nn.Sequential): K parameter sets through addmm/baddbmm, the general vmap(functional_call) path's fast twin.

`linear_chain(model)` reads the model's forward with torch.fx and returns the chain of steps, or None
when the forward is anything else (then callers keep `torch.func.functional_call` under vmap).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .module_state import mode_view

__all__ = ["LinearChain", "linear_chain", "forget", "fingerprint"]

# Activations applied in place on the chain's own activation buffers (never on the caller's input).
_ACTIVATIONS = {"relu": torch.relu_, "tanh": torch.tanh_, "sigmoid": torch.sigmoid_}
_MODULE_ACTIVATIONS = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
_FUNCTION_ACTIVATIONS = {torch.relu: "relu", F.relu: "relu", torch.tanh: "tanh", torch.sigmoid: "sigmoid",
                         F.tanh: "tanh", F.sigmoid: "sigmoid"}
_IDENTITY_MODULES = (nn.Identity, nn.Dropout)  # Dropout: the chain only runs in eval mode
# CPU: models per GEMM call chosen so that one layer's activations of the group stay under this many
# bytes (cache-sized; bounds the activation memory too). Measured on a 1 MiB L2 / 32 MiB L3 CPU: the
# 3x512 MLP over 1000 examples is within ~3% for 1-64 MiB; the width-64 MLP over 256 examples (where
# the transposed layout and the shared first-layer GEMM made it 1.6x faster) is best at 1-4 MiB.
_GROUP_BYTES = 2 << 20


@dataclass(frozen=True)
class LinearChain:
    """Steps of a Linear/activation chain: ("flatten",), ("linear", weight_key, bias_key | None),
    (activation_name,). `keys`: every state key the chain reads."""

    steps: tuple[tuple, ...]
    keys: frozenset[str]

    def forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits [K, B, out] of the K parameter sets params[key] [K, *shape] on inputs x [B, ...]
        (a transposed view of contiguous [K, out, B] memory)."""
        if not self.accepts(x):
            raise ValueError(f"LinearChain.forward: inputs of shape {list(x.shape)} are not [B, features]"
                             " (and the chain does not start with flatten)")
        linear = [i for i, s in enumerate(self.steps) if s[0] == "linear"]
        widths = [params[self.steps[i][1]].shape[1] for i in linear]
        k, batch = next(iter(params.values())).shape[0], x.shape[0]
        per_model = batch * max(widths) * x.element_size()
        # Groups exist for CPU caches; a GPU wants the whole chunk in one batched GEMM per layer.
        group = max(1, min(k, _GROUP_BYTES // max(1, per_model))) if x.device.type == "cpu" else k
        # Hidden activations ping-pong between two buffers reused by every group (fresh multi-MB
        # tensors per layer would page-fault each time); the last layer writes into the result.
        hidden = widths[:-1]
        bufs = [x.new_empty(min(k, group) * max(hidden) * batch) for _ in range(min(2, len(hidden)))]
        logits = x.new_empty((k, widths[-1], batch))
        for k0 in range(0, k, group):
            self._run(params, x, k0, min(k, k0 + group), linear[-1], logits[k0:k0 + group], bufs)
        # [K, classes, B] memory seen as [K, B, classes]: losses read it without a transposing copy
        return logits.transpose(1, 2)

    def accepts(self, x: torch.Tensor) -> bool:
        """Whether x reaches the first Linear as [B, features] (as the model itself would take it)."""
        return x.dim() == 2 or (x.dim() > 2 and self.steps[0][0] == "flatten")

    def _run(self, params, x, k0: int, k1: int, last: int, out: torch.Tensor, bufs) -> torch.Tensor:
        """Models k0..k1 in the transposed layout hᵀ [G, features, B]: every weight is used as stored
        ([out, in], no transposed copies), and the first Linear, whose input all models share, is one
        big GEMM W_stack [G·out, in] @ xᵀ instead of G small ones. `out`: where the last Linear (step
        `last`) writes (contiguous [G, out, B]); the others alternate between the flat `bufs`."""
        g = k1 - k0
        h, shared, owned = x, True, False   # shared: one input for every model (before the first Linear)
        n_linear = 0
        for i, step in enumerate(self.steps):
            kind = step[0]
            if kind == "flatten":
                h = h.flatten(1)   # only ever the first step: h is still the shared input [B, in]
            elif kind == "linear":
                w = params[step[1]][k0:k1]                      # [G, out, in]
                bias = params[step[2]][k0:k1] if step[2] is not None else None
                if i == last:
                    dst = out
                else:
                    dst = bufs[n_linear % 2][:g * w.shape[1] * x.shape[0]].view(g, w.shape[1], x.shape[0])
                n_linear += 1
                if shared:
                    wf = w.reshape(-1, w.shape[-1])             # [G·out, in]
                    flat = dst.view(-1, dst.shape[-1])
                    ht = torch.addmm(bias.reshape(-1, 1), wf, h.t(), out=flat) if bias is not None \
                        else torch.mm(wf, h.t(), out=flat)
                    h = ht.view(g, w.shape[1], -1)              # [G, out, B]
                elif bias is not None:
                    h = torch.baddbmm(bias.unsqueeze(2), w, h, out=dst)
                else:
                    h = torch.bmm(w, h, out=dst)
                shared, owned = False, True
            else:
                if not owned:   # an activation before any Linear: never write into the caller's x
                    h, owned = h.clone(), True
                _ACTIVATIONS[kind](h)
        return h   # [G, out, B]; linear_chain guarantees a Linear, so h is per-model


def _chain_input(node, prev) -> bool:
    """The node reads exactly the previous chain value (and nothing else that is a graph node)."""
    tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
    tensors += [v for v in node.kwargs.values() if isinstance(v, torch.fx.Node)]
    return len(tensors) == 1 and tensors[0] is prev and node.args and node.args[0] is prev


def _flatten_args(node) -> bool:
    args = list(node.args[1:])
    start = node.kwargs.get("start_dim", args[0] if args else 0)
    end = node.kwargs.get("end_dim", args[1] if len(args) > 1 else -1)
    return start == 1 and end == -1


_TRACES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
# Module attributes that hold structure (compared through the module tree) or no forward logic.
_SKIP = frozenset(("_parameters", "_buffers", "_modules", "training", "_non_persistent_buffers_set",
                   "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                   "_load_state_dict_post_hooks", "_backward_hooks", "_backward_pre_hooks",
                   "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                   "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs", "_is_full_backward_hook"))
_PLAIN = (str, int, float, bool, complex, type(None), torch.dtype, torch.device, torch.Size)


def _freeze(value, depth: int = 0):
    """A comparable snapshot of an attribute: plain values by value, containers item by item, anything
    else by identity (a forward-steering attribute replaced by another object changes the key)."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (tuple, list)) and depth < 3:
        return (type(value), tuple(_freeze(v, depth + 1) for v in value))
    if isinstance(value, dict) and depth < 3:
        return (dict, tuple((repr(k), _freeze(v, depth + 1)) for k, v in value.items()))
    return ("id", type(value), id(value))


def fingerprint(model: nn.Module) -> tuple:
    """What the trace depends on: the module tree (names, objects, types), the forward functions
    (class or instance), every other attribute of every module (e.g. `self.act = "relu"`), the Linear
    biases present and the state's float keys. Training flags are not in it: traces are always of the
    eval-mode view."""
    mods = tuple((n, id(m), type(m), getattr(type(m), "forward", None),
                  tuple((k, _freeze(v)) for k, v in m.__dict__.items() if k not in _SKIP))
                 for n, m in model.named_modules())
    linears = tuple(m.bias is None for m in model.modules() if isinstance(m, nn.Linear))
    return mods, linears, tuple(k for k, v in model.state_dict().items() if v.is_floating_point())


def linear_chain(model: nn.Module) -> LinearChain | None:
    """The model's eval-mode forward as a Linear/activation chain, or None if it is anything else (the
    fx trace of a private eval-mode view is cached per model and redone when its module tree, forwards
    or any module attribute change; callers also compare it with the model on a probe batch).

    Recognised (fx-traced): one tensor input; nn.Linear; ReLU/Tanh/Sigmoid as modules, torch
    functions or tensor methods (not in place); nn.Identity, nn.Dropout (eval); flatten(1) as a
    module, function or method; one output. Every float parameter and buffer of the model must
    belong to a chain Linear (so nothing the chain ignores could change the result), and no module may
    carry forward hooks.
    """
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()):
        return None   # fx does not see hooks; functional_call runs them
    key = fingerprint(model)
    hit = _TRACES.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    chain = _trace(mode_view(model))   # `if self.training:` branches resolve as in evaluation
    _TRACES[model] = (key, chain)
    return chain


def forget(model: nn.Module) -> None:
    """Drop the cached trace of `model` (a caller found it disagreeing with the model)."""
    _TRACES.pop(model, None)


def _trace(model: nn.Module) -> LinearChain | None:
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any untraceable forward simply takes the general path
        return None
    steps, keys, prev = [], set(), None
    modules = dict(model.named_modules())
    for node in graph.nodes:
        if node.op == "placeholder":
            if prev is not None:
                return None
            prev = node
            continue
        if node.op == "output":
            if node.args[0] is not prev or prev is None:
                return None
            break
        if prev is None or not _chain_input(node, prev):
            return None
        step = _step(node, modules)
        if step is None:
            return None
        if step[0] == "linear":
            keys.update(k for k in step[1:] if k is not None)
        if step[0] != "identity":
            steps.append(step)
        prev = node
    if not any(s[0] == "linear" for s in steps) or any(s[0] == "flatten" for s in steps[1:]):
        return None   # flatten anywhere but first would reshape per-model activations
    float_keys = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    if float_keys != keys:
        return None
    return LinearChain(tuple(steps), frozenset(keys))


def _step(node, modules) -> tuple | None:
    if node.op == "call_module":
        mod = modules.get(node.target)
        if len(node.args) != 1 or node.kwargs:
            return None
        if type(mod) is nn.Linear:
            return ("linear", f"{node.target}.weight", f"{node.target}.bias" if mod.bias is not None else None)
        if type(mod) in _MODULE_ACTIVATIONS:  # inplace=True alike: the chain owns its buffers
            return (_MODULE_ACTIVATIONS[type(mod)],)
        if type(mod) in _IDENTITY_MODULES:
            return ("identity",)
        if type(mod) is nn.Flatten and mod.start_dim == 1 and mod.end_dim == -1:
            return ("flatten",)
        return None
    if node.op == "call_function":
        if node.target in _FUNCTION_ACTIVATIONS and len(node.args) == 1 and not node.kwargs.get("inplace"):
            return (_FUNCTION_ACTIVATIONS[node.target],)
        if node.target is torch.flatten and _flatten_args(node):
            return ("flatten",)
        return None
    if node.op == "call_method":
        if node.target in _ACTIVATIONS and len(node.args) == 1 and not node.kwargs:
            return (node.target,)
        if node.target == "flatten" and _flatten_args(node):
            return ("flatten",)
        return None
    return None

