"""Automatic PermutationSpec for any nn.Module: trace the forward (torch.fx, else torch.export), tie
tensor axes with a union-find, and read the permutation groups off the state dict's axes.

    spec = prb.trace_spec(model, example_inputs)     # every state-dict key, named groups, reasons
    prb.check_spec(model, spec, example_inputs)      # random-permutation invariance, eval + train
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .lm import model_kwargs
from .spec import Blocked, PermutationSpec
from .tracing.engine import Engine, Ref, UnsupportedOpError
from .tracing.frontends import FxUnsupported, export_graph, fx_graph
from .tracing.nesting import nested_groups
from .tracing.rules_nn import HEAD_HINT, OUT_HINT

__all__ = ["trace_spec", "describe_spec", "spec_equivalent", "spec_difference", "UnsupportedOpError",
           "model_inputs", "traceable_experts", "symmetry_bits"]


def split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """A tensor, a tuple/list of positional inputs, or a dict of keyword inputs -> (args, kwargs)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(f"example_inputs must be a Tensor, a tuple of inputs or a dict of keyword inputs, "
                    f"got {type(example_inputs).__name__}")


def model_inputs(model: nn.Module, example_inputs: Any) -> tuple[tuple, dict]:
    """`split_inputs`, made ready for `model`'s forward: caches off (`use_cache=False`) when the
    forward takes `use_cache` and the caller did not say (a Hugging Face causal LM returns its
    DynamicCache otherwise), tensors moved to the meta device when the model lives there."""
    args, kwargs = split_inputs(example_inputs)
    kwargs = {**model_kwargs(model), **kwargs}   # the caller's own use_cache wins
    if any(t.is_meta for t in model.state_dict(keep_vars=True).values()):
        def meta(x):
            return x.to("meta") if isinstance(x, torch.Tensor) else x
        args, kwargs = tuple(meta(a) for a in args), {k: meta(v) for k, v in kwargs.items()}
    return args, kwargs


@contextlib.contextmanager
def traceable_experts(model: nn.Module):
    """Hugging Face mixture-of-experts blocks run their experts through `config._experts_implementation`;
    the eager loop (data-dependent trip count) and grouped_mm (sort + offsets) cannot be traced, while
    "batched_mm" (each token's experts gathered by index) can and computes the same function. The
    configs are switched for the trace and restored after, whatever happens."""
    configs = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if hasattr(m, "_is_expert_parallel") and cfg is not None and hasattr(cfg, "_experts_implementation"):
            configs.setdefault(id(cfg), (cfg, cfg._experts_implementation))
    try:
        for cfg, impl in configs.values():
            if impl != "batched_mm":
                cfg._experts_implementation = "batched_mm"
        yield
    finally:
        for cfg, impl in configs.values():
            if cfg._experts_implementation != impl:
                cfg._experts_implementation = impl


def _aliases(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Tied tensors (one Parameter under several keys) -> the first key holding it."""
    first: dict[int, str] = {}
    return {k: first.setdefault(id(v), k) for k, v in state.items()}


def trace_spec(model: nn.Module, example_inputs: Any, *, frontend: str = "auto",
               unknown: str = "error", nested: bool = True) -> PermutationSpec:
    """The permutation symmetries of `model`, found by tracing it on `example_inputs`.

    Every state-dict key (parameters and buffers) appears in the result. A group is a set of
    (key, axis[, factor]) slots that must be permuted together for the outputs to stay the same;
    groups are named after the layer producing them ("P_fc1.out"), the attention role
    ("P_blocks.0.attn.heads", ".qk", ".vo") or "P_residual_<k>" for streams written by several
    layers. Keys no group touches are fixed, with the reason in `fixed_reasons`.

    frontend: "auto" (torch.fx symbolic trace, falling back to torch.export when fx cannot trace
    the model or meets a leaf module it does not model), "fx" or "export".
    unknown: "error" raises UnsupportedOpError (naming op, node and module path) when an op without
    a rule receives permutable axes; "freeze" freezes every axis it touches instead (recorded).
    nested: state the per-unit symmetries (`PermutationSpec.nested`, rules in tracing/nesting.py):
    GQA query heads and value dims per KV head, within-head dims per head, each stacked expert's
    hidden units. False: one perm shared by all units instead (a subgroup; the specs before nesting).
    Hugging Face models: token ids (a LongTensor or a dict with `input_ids`) are passed as they are,
    caches are turned off (`use_cache=False`) unless the inputs say otherwise, a model built on the
    meta device traces without weights (inputs are moved to meta), and mixture-of-experts blocks
    are traced through their "batched_mm" experts implementation (`traceable_experts`).
    The model is not modified (no mode change, no buffer update; an experts switch is undone).
    """
    if frontend not in ("auto", "fx", "export"):
        raise ValueError(f"frontend={frontend!r}; expected 'auto', 'fx' or 'export'")
    if unknown not in ("error", "freeze"):
        raise ValueError(f"unknown={unknown!r}; expected 'error' or 'freeze'")
    if not isinstance(nested, bool):
        raise TypeError(f"nested must be True or False, got {nested!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace_spec needs an nn.Module, got {type(model).__name__}")
    args, kwargs = model_inputs(model, example_inputs)
    state = model.state_dict(keep_vars=True)
    with traceable_experts(model):
        return _trace(model, args, kwargs, state, frontend, unknown, nested)


def _trace(model, args, kwargs, state, frontend, unknown, nested=True) -> PermutationSpec:
    alias = _aliases(state)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    fx_error = None
    if frontend in ("auto", "fx"):
        try:
            return _build(model, fx_graph(model, args, kwargs, set(state)), shapes, alias, unknown, nested)
        except (FxUnsupported, UnsupportedOpError) as e:
            if frontend == "fx":
                raise
            fx_error = e
    try:
        graph = export_graph(model, args, kwargs, set(state))
    except Exception as e:
        raise ValueError(f"trace_spec could not trace {type(model).__name__}: torch.export failed "
                         f"({type(e).__name__}: {e})"
                         + (f"; torch.fx failed too ({fx_error})" if fx_error else "")) from e
    return _build(model, graph, shapes, alias, unknown, nested)


def _build(model, graph, shapes, alias, unknown, nested=True) -> PermutationSpec:
    graph.refs = {v: alias[k] for v, k in graph.refs.items()}
    for call in graph.calls:  # fx call_module parameters may name a tied key: use the canonical one
        call.args = tuple(Ref(alias[a]) if isinstance(a, Ref) else a for a in call.args)
        call.kwargs = {k: (Ref(alias[a]) if isinstance(a, Ref) else a) for k, a in call.kwargs.items()}
    E = Engine(graph, shapes, unknown)
    E.run()
    A = E.A
    for axes in E.params.values():  # Blocked cannot say "the same perm on two factors": freeze
        for atoms in axes:
            leaves = [A.find(lf) for a in atoms for lf in A.leaves(a) if A.size[lf] > 1]
            for r in {r for r in leaves if leaves.count(r) > 1}:
                A.freeze(r, "one permutation would act on two factors of one axis")
    names = _name_groups(E, alias)
    axes_to_perm, reasons = {}, {}
    for key, canon in alias.items():
        if canon in E.params:
            entries, why = [], None
            for atoms in E.params[canon]:
                factors = []
                for leaf in (lf for a in atoms for lf in A.leaves(a)):
                    if A.size[leaf] == 1:
                        continue
                    name = names.get(A.find(leaf))
                    why = why or (A.why_frozen(leaf) if name is None else None)
                    factors.append((A.size[leaf], name))
                entries.append(_entry(factors))
            axes_to_perm[key] = tuple(entries)
            if all(e is None for e in entries):
                reasons[key] = ("scalar (no axes to permute)" if not entries else
                                why or "only size-1 axes")
        else:
            axes_to_perm[key] = (None,) * len(shapes[key])
            reasons[key] = "not used by the traced forward"
        if canon != key and canon in reasons:
            reasons[key] = reasons[canon]
    return PermutationSpec(axes_to_perm, reasons, nested_groups(E, names) if nested else {})


def _entry(factors: list[tuple[int, str | None]]):
    merged: list[tuple[int, str | None]] = []
    for size, name in factors:  # adjacent unpermuted factors merge: (C, H, W) -> (C, H*W)
        if merged and name is None and merged[-1][1] is None:
            merged[-1] = (merged[-1][0] * size, None)
        else:
            merged.append((size, name))
    if not merged or all(n is None for _, n in merged):
        return None
    if len(merged) == 1:
        return merged[0][1]
    return Blocked(tuple(s for s, _ in merged), tuple(n for _, n in merged))


def _name_groups(E: Engine, alias) -> dict[int, str]:
    """Readable, unique names for every unfrozen class that some state-dict axis uses."""
    A = E.A
    roots: list[int] = []
    for canon in dict.fromkeys(alias.values()):
        for atoms in E.params.get(canon, ()):
            for leaf in (lf for a in atoms for lf in A.leaves(a)):
                r = A.find(leaf)
                if A.size[r] > 1 and not A.is_frozen(r) and r not in roots:
                    roots.append(r)
    names, taken, residual = {}, set(), 0
    for r in roots:
        hints = A.hints.get(r, [])
        # several producing layers in different modules write it: a residual stream (layers of
        # one module multiplied together, like a gated MLP's gate and up projections, are not)
        parents = {n.rsplit(".", 1)[0].rpartition(".")[0] for p, n in hints if p == OUT_HINT}
        best = max(hints, key=lambda h: h[0], default=None)
        if best is not None and best[0] >= HEAD_HINT - 1:
            base = best[1]
        elif len(parents) >= 2:
            base, residual = f"residual_{residual}", residual + 1
        elif best is not None:
            base = best[1]
        else:
            base = f"group_{len(names)}"
        name, i = f"P_{base.lstrip('.')}", 2
        while name in taken:
            name, i = f"P_{base.lstrip('.')}_{i}", i + 1
        taken.add(name)
        names[r] = name
    return names


def describe_spec(spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor] | None = None) -> str:
    """A readable summary: each group with its size (given a state dict) and the axes it permutes,
    then the fixed keys with their reasons."""
    sizes = spec.perm_sizes(state_dict) if state_dict is not None else {}
    lines = []
    for perm, slots in spec.perm_to_axes.items():
        where = []
        for key, axis in slots:
            entry = spec.axes_to_perm[key][axis]
            if isinstance(entry, Blocked):
                f = spec.factor(key, axis, perm)
                where.append(f"{key}[{axis}:{f}/{len(entry.shape)}]")
            else:
                where.append(f"{key}[{axis}]")
        size = f" ({sizes[perm]} units)" if perm in sizes else ""
        under = f" nested under {spec.nested[perm]}" if perm in spec.nested else ""
        lines.append(f"{perm}{size}{under}: " + ", ".join(where))
    for key in spec.fixed:
        lines.append(f"fixed {key}: {spec.fixed_reasons.get(key, '(no reason given)')}")
    return "\n".join(lines)


def symmetry_bits(spec: PermutationSpec, state_dict: Mapping[str, torch.Tensor]) -> float:
    """log2 of the size of the permutation group a spec states: Σ log2 n! over plain groups, and
    |Q| · log2 m! for a perm nested under Q with blocks of m (its blocks move with Q)."""
    sizes = spec.perm_sizes(state_dict)
    bits = 0.0
    for p, n in sizes.items():
        q = spec.nested.get(p)
        k, m = (sizes[q], n // sizes[q]) if q is not None else (1, n)
        bits += k * math.lgamma(m + 1) / math.log(2)
    return bits


# --- comparing specs (up to naming) --------------------------------------------------------------
def _slots(spec: PermutationSpec) -> dict[str, set]:
    groups: dict[str, set] = {}
    for key, entries in spec.axes_to_perm.items():
        for axis, entry in enumerate(entries):
            if isinstance(entry, str):
                groups.setdefault(entry, set()).add((key, axis, None, 0))
            elif isinstance(entry, Blocked):
                factors = [(s, p) for s, p in zip(entry.shape, entry.perms) if s != 1]
                canon = _entry(factors)
                if isinstance(canon, str):
                    groups.setdefault(canon, set()).add((key, axis, None, 0))
                elif isinstance(canon, Blocked):
                    for f, p in enumerate(canon.perms):
                        if p is not None:
                            groups[p] = groups.get(p, set()) | {(key, axis, canon.shape, f)}
    return groups


def spec_equivalent(a: PermutationSpec, b: PermutationSpec) -> bool:
    """Same keys, and the same partition of (key, axis, factor) slots into groups (names aside)."""
    return not spec_difference(a, b)


def spec_difference(a: PermutationSpec, b: PermutationSpec) -> list[str]:
    """Human-readable differences between two specs up to group naming (empty when equivalent)."""
    out = []
    ka, kb = set(a.axes_to_perm), set(b.axes_to_perm)
    if ka != kb:
        out.append(f"keys only in first: {sorted(ka - kb)}; only in second: {sorted(kb - ka)}")
    ga, gb = _slots(a), _slots(b)
    pa = {frozenset(s): n for n, s in ga.items()}
    pb = {frozenset(s): n for n, s in gb.items()}
    for s in pa.keys() - pb.keys():
        out.append(f"group {pa[s]} of first ({sorted(s)[:4]}...) is not a group of second")
    for s in pb.keys() - pa.keys():
        out.append(f"group {pb[s]} of second ({sorted(s)[:4]}...) is not a group of first")
    slots_a, slots_b = {n: frozenset(s) for n, s in ga.items()}, {n: frozenset(s) for n, s in gb.items()}
    na = {(slots_a.get(p), slots_a.get(q)) for p, q in a.nested.items()}
    nb = {(slots_b.get(p), slots_b.get(q)) for p, q in b.nested.items()}
    for what, first, second, names in (("first", na, nb, pa), ("second", nb, na, pb)):
        for p, q in first - second:
            out.append(f"in the {what} spec, {names.get(p, '?')} is nested under {names.get(q, '?')}; "
                       f"not in the other")
    return out
