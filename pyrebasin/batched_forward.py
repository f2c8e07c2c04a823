"""The batched forward of the evaluator: out [K, B, ...] of K stacked parameter sets of one model.

Three routes, fastest first: the Linear-chain path (`_chain`), the traced-graph engine (the model's
eval-mode forward traced once per input signature into aten ops by `make_fx` on fake tensors, then
interpreted with K-batched rules: grouped convolutions, batched GEMMs, stacked-statistics norms,
attention over K·B batches, vmap of the single op for anything without a rule), and the general
`vmap(functional_call)` / loop. Each route is compared with `functional_call` on a probe first.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._batched_rules import KV, Context, apply
from ._batched_stats import BN_OPS, batch_norm_statistics, running_stat_keys
from ._chain import fingerprint, linear_chain
from ._chain import forget as forget_chain
from .lm import logits_of, model_kwargs

__all__ = ["BatchedForward", "TracedGraph", "trace_graph", "forget", "tolerance"]

Params = dict[str, torch.Tensor]
_GRAPHS: "weakref.WeakKeyDictionary[nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
_KEEP = 8   # traced input signatures kept per model (the last batch of a split is often smaller)
# CPU: models per pass through the graph chosen so that one layer's activations of the group stay near
# this many bytes: measured (docs/perf-combine.md), groups whose layers exceed a few MiB fall out of
# cache and lose to one model at a time; GPUs run the whole chunk at once.
GROUP_BYTES = 4 << 20


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) of the probe comparison: reassociated sums and other kernels differ by rounding."""
    return {torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2), torch.float64: (1e-7, 1e-9)}.get(
        dtype, (1e-3, 1e-4))


class TracedGraph:
    """An aten graph of one model's eval-mode forward for one input signature, run on K stacked sets."""

    def __init__(self, gm: torch.fx.GraphModule, pkeys: list[str], fkeys: list[str], out_spec):
        self.gm, self.pkeys, self.fkeys, self.out_spec = gm, pkeys, fkeys, out_spec
        gm.graph.eliminate_dead_code()   # e.g. the pooling indices an eval forward never reads
        self.nodes = [n for n in gm.graph.nodes]
        self.last_use = _last_uses(self.nodes)
        self.fallbacks: set[str] = set()
        vals = [n.meta.get("val") for n in self.nodes if n.op == "call_function"]
        # one model's largest activation: what a group of models holds per layer
        self.activation_bytes = max([v.numel() * v.element_size() for v in vals if isinstance(v, torch.Tensor)],
                                    default=0)

    def run(self, params: Params, fixed: Mapping[str, torch.Tensor], inputs: list[torch.Tensor],
            conv: str = "auto", group: int | None = None) -> object:
        """Outputs [K, ...] of the K stacked sets; on CPUs `group` models at a time (default: as many
        as keep one layer's activations near `GROUP_BYTES`, so they stay cache-resident and no
        multi-MB buffer is page-faulted per layer)."""
        k = next(iter(params.values())).shape[0]
        if group is None:
            on_cpu = not inputs or inputs[0].device.type == "cpu"
            group = max(1, min(k, GROUP_BYTES // max(1, self.activation_bytes))) if on_cpu else k
        if group >= k:
            return self._run(params, fixed, inputs, conv, k)
        parts = [self._run({n: v[i:i + group] for n, v in params.items()}, fixed, inputs, conv, min(group, k - i))
                 for i in range(0, k, group)]
        flat = [tree_flatten(p) for p in parts]
        return tree_unflatten([torch.cat(vs) if isinstance(vs[0], torch.Tensor) else vs[0]
                               for vs in zip(*[f[0] for f in flat])], flat[0][1])

    def statistics(self, params: Params, fixed: Mapping[str, torch.Tensor], inputs: list[torch.Tensor],
                   acc: dict, conv: str = "auto") -> bool:
        """RESET's pass of one batch: every BatchNorm normalises with each model's batch statistics; their
        count-weighted sums are added to `acc[stat key] = [n, Σ n·value [K, C]]`. False when the graph's
        statistics are not plain state keys (the caller then resets state by state)."""
        keys = running_stat_keys(self.nodes, self.pkeys + self.fkeys)
        if not keys:
            return False
        k = next(iter(params.values())).shape[0]
        on_cpu = not inputs or inputs[0].device.type == "cpu"
        group = max(1, min(k, GROUP_BYTES // max(1, self.activation_bytes))) if on_cpu else k
        parts = []
        for i in range(0, k, group):
            stats: dict = {}
            self._run({n: v[i:i + group] for n, v in params.items()}, fixed, inputs, conv, min(group, k - i), stats)
            parts.append(stats)
        for name, (mean_key, var_key) in keys.items():
            n = parts[0][name][0]
            for j, key in ((1, mean_key), (2, var_key)):
                slot = acc.setdefault(key, [0, 0.0])
                slot[0] += n
                slot[1] = slot[1] + torch.cat([p[name][j] for p in parts])
        return True

    def _run(self, params, fixed, inputs, conv, k, stats=None):
        ctx = Context(k, inputs[0].device.type if inputs else "cpu", conv)
        ctx.stats = stats
        feed = [KV(params[n]) for n in self.pkeys] + [fixed[n] for n in self.fkeys] + list(inputs)
        env: dict = {}
        it = iter(feed)
        out = None
        for node in self.nodes:
            if node.op == "placeholder":
                env[node] = next(it)
            elif node.op == "get_attr":
                env[node] = getattr(self.gm, node.target)
            elif node.op == "call_function":
                args = torch.fx.node.map_arg(node.args, env.__getitem__)
                kwargs = torch.fx.node.map_arg(node.kwargs, env.__getitem__)
                if node.target is _getitem:
                    env[node] = args[0][args[1]]
                else:
                    ctx.node = node
                    env[node] = batch_norm_statistics(ctx, node, args) if stats is not None and \
                        node.target in BN_OPS else apply(ctx, node.target, args, kwargs)
            elif node.op == "output":
                out = torch.fx.node.map_arg(node.args[0], env.__getitem__)
            else:
                raise NotImplementedError(f"graph node {node.op} {node.target}")
            for dead in self.last_use.get(node, ()):
                env.pop(dead, None)   # activations die as soon as the graph is done with them
        self.fallbacks |= ctx.fallbacks
        leaves, spec = tree_flatten(out, is_leaf=_is_kv)
        flat = [v.t if isinstance(v, KV) else (v.unsqueeze(0).expand(k, *v.shape) if isinstance(v, torch.Tensor)
                                              else v) for v in leaves]
        return tree_unflatten(flat, self.out_spec if self.out_spec is not None else spec)


_getitem = __import__("operator").getitem


def _is_kv(v) -> bool:
    return isinstance(v, KV)


def _last_uses(nodes) -> dict:
    seen, out = set(), {}
    for node in reversed(nodes):
        for inp in node.all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                out.setdefault(node, []).append(inp)
    return out


def _signature(params: Params, fixed, inputs, in_spec) -> tuple:
    sig = lambda t: (tuple(t.shape), t.dtype, t.device)  # noqa: E731
    return (tuple((n, sig(v[0])) for n, v in params.items()), tuple((n, sig(v)) for n, v in fixed.items()),
            tuple(sig(t) for t in inputs), repr(in_spec))


def trace_graph(model: nn.Module, view: nn.Module, params: Params, fixed: Mapping[str, torch.Tensor], x,
                extra: Mapping | None = None) -> TracedGraph | None:
    """The traced graph of `view` (the eval-mode view of `model`) for these stacked `params` and input
    `x` (a tensor, or a mapping passed as keyword arguments, with `extra` keyword arguments), cached per
    model; its output is the model's logits (`lm.logits_of`). None when the forward cannot be traced on
    fake tensors (data-dependent control flow, hooks, untraceable code)."""
    if any(m._forward_hooks or m._forward_pre_hooks for m in view.modules()):
        return None   # hooks run in functional_call; a trace would bake in (or drop) their effects
    leaves, in_spec = tree_flatten(x)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        return None
    extra = dict(extra or {})
    key = (fingerprint(model), _signature(params, fixed, leaves, in_spec), repr(sorted(extra.items())))
    cache = _GRAPHS.setdefault(model, OrderedDict())
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    pkeys, fkeys = list(params), list(fixed)
    as_kwargs = isinstance(x, Mapping)

    def f(*flat):
        p = dict(zip(pkeys, flat[:len(pkeys)]))
        p.update(zip(fkeys, flat[len(pkeys):len(pkeys) + len(fkeys)]))
        xs = tree_unflatten(list(flat[len(pkeys) + len(fkeys):]), in_spec)
        if as_kwargs:
            return logits_of(functional_call(view, p, (), {**extra, **xs}, strict=False, tie_weights=False))
        return logits_of(functional_call(view, p, (xs,), extra or None, strict=False, tie_weights=False))

    proto = [v[0] for v in params.values()] + list(fixed.values()) + leaves
    try:
        from torch.fx.experimental.proxy_tensor import make_fx
        gm = make_fx(torch.func.functionalize(f, remove="mutations"), tracing_mode="fake")(*proto)
    except Exception:  # noqa: BLE001 - anything untraceable keeps the general path
        graph = None
    else:
        codegen = getattr(gm.graph, "_codegen", None)
        info = getattr(codegen, "pytree_info", None)
        graph = TracedGraph(gm, pkeys, fkeys, getattr(info, "out_spec", None))
    cache[key] = graph
    while len(cache) > _KEEP:
        cache.popitem(last=False)
    return graph


def forget(model: nn.Module) -> None:
    """Drop every cached trace of `model` (a probe found one disagreeing with the model)."""
    _GRAPHS.pop(model, None)
    forget_chain(model)


def _close(got, want) -> bool:
    g, w = tree_flatten(got)[0], tree_flatten(want)[0]
    if len(g) != len(w):
        return False
    for a, b in zip(g, w):
        if isinstance(b, torch.Tensor):
            if not isinstance(a, torch.Tensor) or a.shape != b.shape:
                return False
            if b.is_floating_point():
                rtol, atol = tolerance(b.dtype)
                if not torch.allclose(a.to(b.dtype), b, rtol=rtol, atol=atol, equal_nan=True):
                    return False
            elif not torch.equal(a, b):
                return False
        elif a != b:
            return False
    return True


_PROBE_ROWS = 8


def _rows(x, n: int):
    """The first n rows of a batch (a tensor, or a mapping whose tensors share their first dimension)."""
    leaves, spec = tree_flatten(x)
    sizes = {t.shape[0] if isinstance(t, torch.Tensor) and t.dim() else None for t in leaves}
    if len(sizes) != 1 or None in sizes or next(iter(sizes)) <= n:
        return x
    return tree_unflatten([t[:n] for t in leaves], spec)


class BatchedForward:
    """out [K, B, ...] of K stacked parameter sets: the Linear chain where recognised, else the traced
    graph engine (`engine=False` skips it), else vmap(functional_call) (`use_vmap`) or a loop over the K
    sets. `fixed`: the non-float tensors every set shares (settable: corrections may replace them).
    The first call of each route compares it with the loop of `functional_call` on the first two sets
    of the batch; a route that disagrees (a forward-steering attribute changed, data-dependent branches
    the trace fixed) is dropped, with its cached trace, for the general path. `route` says which ran."""

    def __init__(self, model: nn.Module, view: nn.Module, fixed: Mapping[str, torch.Tensor], use_vmap: bool = True,
                 fast_path: bool = True, *, engine: bool = True, conv: str = "auto"):
        if conv not in ("auto", "grouped", "loop"):
            raise ValueError(f"conv={conv!r}; expected 'auto', 'grouped' or 'loop'")
        self.model, self.view, self.fixed, self.use_vmap, self.conv = model, view, dict(fixed), use_vmap, conv
        self.chain = linear_chain(model) if fast_path and not fixed else None
        self.engine = engine and fast_path
        self.checked: set = set()
        self.route = None
        self.extra = model_kwargs(model)   # use_cache=False for HF models
        self.run = vmap(self.one, in_dims=(0, None))
        self.vmap_failed = False

    def one(self, p: Params, x) -> torch.Tensor:
        """The logits of one parameter set; a mapping of inputs is passed as keyword arguments."""
        if isinstance(x, Mapping):
            out = functional_call(self.view, (p, self.fixed), (), {**self.extra, **x}, strict=False,
                                  tie_weights=False)
        else:
            out = functional_call(self.view, (p, self.fixed), (x,), self.extra or None, strict=False,
                                  tie_weights=False)
        return logits_of(out)

    def general(self, params: Params, x) -> torch.Tensor:
        k = next(iter(params.values())).shape[0]
        if self.use_vmap and k > 1 and not self.vmap_failed:
            self.route = "vmap"
            try:
                return self.run(params, x)
            except (RuntimeError, NotImplementedError) as err:   # an op vmap cannot batch: loop instead
                if "vmap" not in str(err).lower() and "batch" not in str(err).lower():
                    raise
                self.vmap_failed = True
        self.route = "loop"
        return torch.stack([self.one({n: v[i] for n, v in params.items()}, x) for i in range(k)])

    def _probe(self, name: str, fn, params: Params, x) -> bool:
        """Compare a route with the loop of functional_call once per (route, input signature)."""
        leaves = tree_flatten(x)[0]
        key = (name, tuple((tuple(t.shape), t.dtype) for t in leaves if isinstance(t, torch.Tensor)))
        if key in self.checked:
            return True
        two = {n: v[:2] for n, v in params.items()}
        x = _rows(x, _PROBE_ROWS)
        use_vmap, self.use_vmap = self.use_vmap, False
        try:
            want = self.general(two, x)
        finally:
            self.use_vmap = use_vmap
        ok = _close(fn(two, x), want)
        if ok:
            self.checked.add(key)
        else:
            forget(self.model)
        return ok

    def __call__(self, params: Params, x) -> object:
        if self.chain is not None and isinstance(x, torch.Tensor) and self.chain.accepts(x):
            if self._probe("chain", self.chain.forward, params, x):
                self.route = "chain"
                return self.chain.forward(params, x)
            self.chain = None
        # On CPU a loop of single forwards already runs near the GEMM rate (1.0-1.2x K forwards) and the
        # engine measured 0.6-1.2x the loop's speed (docs/perf-combine.md): a caller that asked for no
        # vmap (interpolate) keeps the loop there; the engine replaces vmap, which it beats 2-3.7x.
        wants = self.use_vmap or any(v.device.type != "cpu" for v in params.values())
        if self.engine and wants and params and \
                trace_graph(self.model, self.view, params, self.fixed, x, self.extra) is not None:
            if self._probe("engine", self._engine, params, x):
                self.route = "engine"
                return self._engine(params, x)
            self.engine = False
        return self.general(params, x)

    def reset_statistics(self, params: Params, inputs) -> dict[str, torch.Tensor] | None:
        """The recomputed BatchNorm running statistics (key -> [K, C], count-weighted averages of the
        batch statistics, as `repair.reset_bn`) of the K stacked sets over the batches `inputs`, in one
        engine pass per batch; None where the engine cannot run this model (the caller loops)."""
        if not self.engine or not params:
            return None
        acc: dict = {}
        for x in inputs:
            graph = trace_graph(self.model, self.view, params, self.fixed, x, self.extra)
            if graph is None or not graph.statistics(params, self.fixed, tree_flatten(x)[0], acc, self.conv):
                return None
        if not acc or any(key not in params for key in acc):
            return None
        return {key: (total / n).to(params[key].dtype) for key, (n, total) in acc.items()}

    def _engine(self, params: Params, x) -> object:
        graph = trace_graph(self.model, self.view, params, self.fixed, x, self.extra)
        if graph is None:   # this input signature does not trace (the probe's rows did): the general path
            return self.general(params, x)
        return graph.run(params, self.fixed, tree_flatten(x)[0], self.conv)
