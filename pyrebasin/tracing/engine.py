"""The frontend-neutral graph walk of `trace_spec`: one `Call` per op, one atom list per tensor axis.

Frontends (fx, torch.export) turn a model into `Graph`s of `Call`s with aten-style names and
argument order; `Engine.run` applies the op rules (registry.py) and leaves the union-find to trace.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .atoms import Atoms
from .registry import rule_for

Axes = list[list[int]]  # per tensor axis: the atoms whose row-major product it is


class Ref(str):
    """An argument naming a state-dict tensor directly (fx call_module parameters)."""


class Multi(list):
    """The per-output `Axes` of an op returning several tensors (split, max.dim, ...)."""


# Ops that keep an index tensor's values (reshapes, copies, dtype casts): the result still holds
# indices into the same axis. Any other use of an index tensor (see `Engine.pointers`) freezes that axis.
POINTER_PASS = frozenset({"view", "_unsafe_view", "reshape", "flatten", "squeeze", "unsqueeze", "clone",
                          "contiguous", "to", "_to_copy", "detach", "alias", "expand", "transpose",
                          "permute", "t", "getitem", "_assert_tensor_metadata"})
POINTER_USE = frozenset({"index", "getitem"})  # rules that read index tensors themselves


class UnsupportedOpError(ValueError):
    """trace_spec met an op it cannot model on permutable axes (message names op, node, module)."""


@dataclass
class Call:
    name: str                 # canonical (aten) op name: "linear", "view", "getitem", ...
    args: tuple
    kwargs: dict
    out: Any                  # the graph value it defines
    node: str                 # node name, for messages
    path: str                 # module path ("" = the root module)
    target: str               # printable op target

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        if len(self.args) > i:
            return self.args[i]
        for k in (name, "input", "self") if name in ("input", "self") else (name,):
            if k in self.kwargs:
                return self.kwargs[k]
        return default

    def where(self) -> str:
        return f"op {self.target!r} at node {self.node!r} (module {self.path or '<root>'!r})"


@dataclass
class Graph:
    calls: list[Call]
    inputs: list[Any]                      # user-input values
    outputs: list[Any]                     # user-output values
    refs: dict[Any, str]                   # graph value -> state-dict key it stands for
    consts: set[Any]                       # tensors that are neither inputs nor state (frozen)
    shape: Callable[[Any], Any]            # value -> shape tuple, list of shapes, or None
    frontend: str


def hashable(x) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


class Engine:
    """Holds atoms for every tensor axis of a Graph and of the state dict, and runs the rules."""

    def __init__(self, graph: Graph, state_shapes: dict[str, tuple[int, ...]],
                 unknown: str = "error"):
        self.g, self.unknown = graph, unknown
        self.A = Atoms()
        self.vals: dict[Any, Axes | Multi] = {}
        self.params: dict[str, Axes] = {}
        self.used: dict[str, str] = {}  # state key -> first op that used it
        self.state_shapes = state_shapes
        self.counters: dict[str, int] = {}  # per-module op counts (naming hand-written attention)
        # index tensors whose *values* point into a permutable axis (topk over router logits): value
        # -> that axis's atoms; a Multi output's element is keyed (value, i)
        self.pointers: dict[Any, list[int]] = {}
        # for nested perms (tracing/nesting.py): (index tensor axes, the axis its values point into)
        # of each `w[ids]`, and (output value, axes an op mixes along) of ops that reduce internally
        self.carriers: list[tuple[Axes, list[int]]] = []
        self.mixes: list[tuple[Any, Axes]] = []

    # --- values ---
    def param(self, key: str) -> Axes:
        if key not in self.params:
            self.params[key] = [[self.A.new(s)] for s in self.state_shapes[key]]
        return self.params[key]

    def ax(self, v: Any) -> Axes | None:
        """Axes of a tensor argument (None for non-tensors)."""
        if isinstance(v, Ref):
            return self.param(str(v))
        try:
            hash(v)
        except TypeError:
            return None
        if v in self.g.refs:
            return self.param(self.g.refs[v])
        out = self.vals.get(v)
        if out is None and isinstance(self.g.shape(v), tuple):  # a tensor no rule described
            raise UnsupportedOpError(f"trace_spec: tensor {v!r} has no axis description "
                                     f"(produced by an op that was not modelled)")
        return None if isinstance(out, Multi) else out

    def fresh(self, shape, reason: str | None) -> Axes:
        return [[self.A.new(s, reason)] for s in shape]

    def out_shape(self, c: Call):
        """The shape of c's output: a tuple, a list of shapes (several outputs), or None."""
        return self.g.shape(c.out)

    def fresh_out(self, c: Call, reason: str | None) -> None:
        """Describe c's output(s) by new atoms, frozen for `reason` (None: free to permute)."""
        shape = self.out_shape(c)
        if isinstance(shape, tuple):
            self.vals[c.out] = self.fresh(shape, reason)
        elif isinstance(shape, list):
            self.vals[c.out] = Multi(self.fresh(s, reason) if isinstance(s, tuple) else None for s in shape)

    def unmodelled(self, c: Call) -> None:
        """The rule of ops without one: fine when no permutable axis reaches them (constants, masks,
        position ids); otherwise an UnsupportedOpError (unknown="error") or frozen axes (unknown="freeze")."""
        ins = self.tensor_args(c)
        live = [a for axes in ins for atoms in axes for a in atoms if not self.A.is_frozen(a)
                and self.A.size[a] > 1]
        why = f"unsupported {c.where()}"
        if live:
            if self.unknown == "error":
                raise UnsupportedOpError(
                    f"trace_spec cannot model {c.where()}: its tensor inputs carry permutable axes. "
                    f"Pass unknown='freeze' to freeze every axis it touches, or write the spec by hand.")
            for axes in ins:
                self.freeze(axes, why)
        self.fresh_out(c, why if live else "computed from constants and inputs only")

    def size(self, atoms: list[int]) -> int:
        n = 1
        for a in atoms:
            n *= self.A.size[a]
        return n

    def tie(self, xs: list[int], ys: list[int], reason: str) -> None:
        if self.size(xs) != self.size(ys):
            raise AssertionError(f"tie of axes of sizes {self.size(xs)} and {self.size(ys)}: {reason}")
        self.A.union_seq(xs, ys, reason)

    def freeze(self, axes: Axes | list[int], reason: str) -> None:
        for item in axes:
            for a in (item if isinstance(item, list) else [item]):
                self.A.freeze(a, reason)

    def mixing(self, c: Call, axes: Axes | list[int]) -> None:
        """Record that `c` mixes values along `axes` (a contraction, softmax, normalisation): a perm
        nested under a class of those axes cannot stay nested through it (tracing/nesting.py)."""
        self.mixes.append((c.out, [a if isinstance(a, list) else [a] for a in axes]))

    def set_out(self, c: Call, axes: Axes | Multi) -> None:
        shape = self.g.shape(c.out)
        if isinstance(axes, Multi):
            assert isinstance(shape, list) and len(shape) == len(axes), (c.where(), shape)
            for s, a in zip(shape, axes):
                assert s is None or a is None or [self.size(x) for x in a] == list(s), (c.where(), s)
        else:
            sizes = [self.size(x) for x in axes]
            assert tuple(sizes) == tuple(shape), f"{c.where()}: rule gave {sizes}, graph says {shape}"
        self.vals[c.out] = axes

    def tensor_args(self, c: Call) -> list[Axes]:
        found = []

        def walk(x):
            if isinstance(x, (list, tuple)):
                for y in x:
                    walk(y)
            elif isinstance(x, dict):
                for y in x.values():
                    walk(y)
            else:
                a = self.ax(x)
                if a is not None:
                    found.append(a)
                multi = self.vals.get(x) if isinstance(a, type(None)) and hashable(x) else None
                if isinstance(multi, Multi):  # a tuple-valued op's outputs
                    found.extend(m for m in multi if m is not None)
        walk(c.args)
        walk(c.kwargs)
        return found

    def _pointer_uses(self, c: Call) -> None:
        """Index tensors met by `c`: passed on by reshapes and copies, read by index rules; any
        other op sees index values that a permutation of their axis would change, so it freezes."""
        found = []

        def walk(x):
            if isinstance(x, (list, tuple)):
                for y in x:
                    walk(y)
            elif hashable(x) and x in self.pointers:
                found.append(x)
        walk(c.args)
        walk(tuple(c.kwargs.values()))
        key = tuple(c.args[:2])
        if c.name == "getitem" and len(key) == 2 and hashable(key) and key in self.pointers:
            self.pointers[c.out] = self.pointers[key]  # the indices output of a top-k
        if not found:
            return
        if c.name == "getitem" and found[0] is not c.arg(0, "self"):
            return  # x[ids]: the getitem rule reads the index tensor
        if c.name in POINTER_PASS and found[0] is c.arg(0, "self"):
            self.pointers[c.out] = self.pointers[found[0]]
        elif c.name not in POINTER_USE:
            for v in found:
                self.freeze([self.pointers[v]], f"indices into the axis are used by {c.where()}")

    def mark_used(self, c: Call) -> None:
        def walk(x):
            if isinstance(x, (list, tuple)):
                for y in x:
                    walk(y)
            elif isinstance(x, Ref):
                self.used.setdefault(str(x), c.where())
            else:
                try:
                    key = self.g.refs.get(x)
                except TypeError:
                    key = None
                if key is not None:
                    self.used.setdefault(key, c.where())
        walk(c.args)
        walk(tuple(c.kwargs.values()))

    # --- the walk ---
    def run(self) -> None:
        for v in self.g.inputs:
            shape = self.g.shape(v)
            if isinstance(shape, tuple):
                self.vals[v] = self.fresh(shape, "model input axis")
        for v in self.g.consts:
            shape = self.g.shape(v)
            if isinstance(shape, tuple):
                self.vals[v] = self.fresh(shape, "constant tensor (not in the state dict)")
        for c in self.g.calls:
            self.mark_used(c)
            self._pointer_uses(c)
            rule = rule_for(c.name)
            if rule is None:
                self.unmodelled(c)
                continue
            rule(self, c)
            shape = self.g.shape(c.out)
            if c.out not in self.vals and (isinstance(shape, tuple) or (
                    isinstance(shape, list) and any(isinstance(x, tuple) for x in shape))):
                self.unmodelled(c)  # the rule left a tensor output undescribed
        for key, where in self.used.items():  # passed to an op whose rule never read it
            if key not in self.params:
                self.params[key] = self.fresh(self.state_shapes[key], f"passed to {where}, "
                                              f"which does not permute it")
        for v in self.g.outputs:
            if hashable(v) and v in self.pointers:
                self.freeze([self.pointers[v]], "indices into the axis reach the model output")
            out = self.vals.get(v) if not isinstance(v, Ref) else self.param(str(v))
            if out is None and v in self.g.refs:
                out = self.param(self.g.refs[v])
            for axes in (out if isinstance(out, Multi) else [out]):
                if axes is not None:
                    self.freeze(axes, "reaches the model output")
