"""Forwards of models larger than memory: a model whose parameters live on the meta device reads each
module's own weights from a lazy checkpoint (`shards.ShardedState`) just before that module runs and
drops them as soon as it returns, so at most one module's weights (plus its callers' own, for modules
that hold parameters and children) are alive during a forward.

    with empty_parameters():                      # parameters on meta; buffers (rotary inv_freq) computed
        model = build_model()
    weights = stream_weights_(model, ShardedState("llama"), dtype=torch.bfloat16)
    logits = model(ids).logits                    # weights read module by module
    weights.remove()                              # hooks gone; the model is back to meta parameters
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from ._heap import release_heap

__all__ = ["empty_parameters", "stream_weights_", "streamed_weights", "StreamedWeights", "release_heap"]

_ATTR = "_pyrebasin_streamed_weights"


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Build modules with their parameters on the meta device (shapes and dtypes, no storage, their
    initialisers run on meta at no cost) while buffers are made as usual: non-persistent buffers that
    a module computes in `__init__` (rotary `inv_freq`, causal masks) get their real values, which a
    checkpoint does not hold. Not thread-safe: it swaps `nn.Module.register_parameter` while open."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        p = module._parameters.get(name)
        if p is not None and not p.is_meta:
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def streamed_weights(model: nn.Module) -> StreamedWeights | None:
    """The `StreamedWeights` installed on `model` (or on the module it is a view of), or None."""
    return getattr(model, _ATTR, None)


class StreamedWeights(Mapping):
    """The weights a streamed model reads, as a mapping checkpoint key -> meta tensor (the shape and
    compute dtype it is read in; no data). Made by `stream_weights_`; `remove()` takes the hooks off.

    `reads` counts the tensors read so far and `peak_bytes` the most weight bytes alive at once."""

    def __init__(self, model: nn.Module, state: Mapping, plan: dict[str, list[tuple]],
                 keys: dict[str, torch.Tensor]):
        self.model, self.state, self._plan, self._keys = model, state, plan, keys
        self._alive: list[tuple[dict, str, torch.Tensor]] = []   # (owner dict, name, meta original)
        self._checked: set[str] = set()
        self._handles: list = []
        self.reads, self.alive_bytes, self.peak_bytes = 0, 0, 0

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._keys[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def meta(self) -> dict[str, torch.Tensor]:
        return dict(self._keys)

    def _read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        if hasattr(self.state, "read"):   # ShardedState: one map opened per shard, closed after the copy
            return self.state.read(keys)
        return {k: self.state[k] for k in keys}

    def _load(self, module: nn.Module, entries: list[tuple]) -> None:
        """Put the module's own weights in place (on this module object: a `mode_view` copy of the
        model gets them, the model it views keeps its meta tensors)."""
        got = self._read(list(dict.fromkeys(e[2] for e in entries)))
        for kind, name, key, meta in entries:
            t = got[key]
            if tuple(t.shape) != tuple(meta.shape):
                raise ValueError(f"streamed weights: {key!r} has shape {list(t.shape)} in the checkpoint but the "
                                 f"model expects {list(meta.shape)}")
            if key not in self._checked:
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"streamed weights: {key!r} holds {int((~torch.isfinite(t)).sum())} "
                                     "non-finite value(s) (NaN or Inf)")
                self._checked.add(key)
            t = t.to(meta.dtype) if t.is_floating_point() else t
            table = module._parameters if kind == "param" else module._buffers
            self._alive.append((table, name, table[name]))
            table[name] = nn.Parameter(t, requires_grad=False) if kind == "param" else t
            self.reads += 1
            self.alive_bytes += t.numel() * t.element_size()
        self.peak_bytes = max(self.peak_bytes, self.alive_bytes)

    def _release(self, module: nn.Module | None = None) -> None:
        """Back to the meta tensors: the module's own weights, or every weight still alive (None)."""
        tables = None if module is None else (module._parameters, module._buffers)
        keep = []
        for table, name, original in self._alive:
            if tables is None or any(table is t for t in tables):
                t = table[name]
                self.alive_bytes -= t.numel() * t.element_size()
                table[name] = original
            else:
                keep.append((table, name, original))
        self._alive = keep

    def _install(self) -> None:
        model = self.model
        # first: a forward that stopped early (an exception past every hook) leaves nothing behind
        self._handles.append(model.register_forward_pre_hook(lambda m, args: self._release()))
        for name, entries in self._plan.items():
            module = model.get_submodule(name)
            self._handles.append(module.register_forward_pre_hook(lambda m, args, e=entries: self._load(m, e)))
            self._handles.append(module.register_forward_hook(lambda m, args, out: self._release(m),
                                                              always_call=True))

        def end(m, args, out=None):   # last, also when the forward raised: nothing stays alive
            self._release()
            release_heap()
        self._handles.append(model.register_forward_hook(end, always_call=True))
        setattr(model, _ATTR, self)

    def remove(self) -> None:
        """Take the hooks off the model (its parameters stay on the meta device)."""
        self._release()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)


def _tied_keys(model: nn.Module, state: Mapping) -> dict[str, str]:
    """Checkpoint key of every state-dict key of the model: itself, or for a weight saved once and
    shared (lm_head tied to the embedding) the name under which the checkpoint holds it."""
    by_id: dict[int, list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(v), []).append(k)
    out = {}
    for names in by_id.values():
        held = [k for k in names if k in state]
        for k in names:
            if held:
                out[k] = k if k in state else held[0]
    return out


def stream_weights_(model: nn.Module, state: Mapping, *, dtype: torch.dtype | None = None) -> StreamedWeights:
    """Make `model` (its parameters on the meta device, e.g. built under `empty_parameters()`) read its
    weights from `state` as it runs: each module holding parameters (or persistent buffers, which are
    moved to meta here) gets a forward pre-hook that reads its own tensors from `state` (a
    `ShardedState` reads them from the shards' memory maps and closes them; any mapping works) and a
    forward hook that puts the meta tensors back, also when the forward raises. Floating tensors are
    converted to `dtype` (default: each meta parameter's dtype). Modifies `model` (hooks, persistent
    buffers to meta); `StreamedWeights.remove()` undoes the hooks.

    Every parameter must be on the meta device and every state-dict key found in `state` (a tied
    weight under any of its names); a weight read outside its module's forward (a functional use of
    another module's parameter) is not supported and fails with a meta-device error."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"stream_weights_: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(state, Mapping):
        raise TypeError(f"stream_weights_: state must be a mapping of str -> Tensor, got {type(state).__name__}")
    if streamed_weights(model) is not None:
        raise ValueError("stream_weights_: the model already streams its weights; remove() those hooks first")
    real = [k for k, p in model.named_parameters() if not p.is_meta]
    if real:
        raise ValueError(f"stream_weights_: parameters {real[:4]} are not on the meta device; build the model "
                         "under pyrebasin.streamed_forward.empty_parameters()")
    unset = [f"{m}.{b}".lstrip(".") for m, mod in model.named_modules() for b, t in mod._buffers.items()
             if t is not None and t.is_meta and b in mod._non_persistent_buffers_set]
    if unset:
        raise ValueError(f"stream_weights_: non-persistent buffers {unset[:4]} are on the meta device and no "
                         "checkpoint holds them; build the model under "
                         "pyrebasin.streamed_forward.empty_parameters() so that its modules compute them")
    source = _tied_keys(model, state)
    # a persistent buffer the checkpoint leaves out but the model computed (not on meta) stays as built
    missing = [k for k, v in model.state_dict(keep_vars=True).items() if k not in source
               and (isinstance(v, nn.Parameter) or v.is_meta)]
    if missing:
        raise ValueError(f"stream_weights_: the checkpoint lacks {missing[:5]}, which {type(model).__name__} has")
    meta_of = state.meta() if hasattr(state, "meta") else None
    plan: dict[str, list[tuple]] = {}
    keys: dict[str, torch.Tensor] = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        persistent = set(module._buffers) - module._non_persistent_buffers_set
        entries = []
        for kind, table in (("param", module._parameters), ("buffer", module._buffers)):
            for name, t in table.items():
                if t is None or (kind == "buffer" and (name not in persistent or prefix + name not in source)):
                    continue
                key = source[prefix + name]
                stored = meta_of[key] if meta_of is not None else None
                want = dtype if dtype is not None and t.is_floating_point() else t.dtype
                if stored is not None and not stored.is_floating_point():
                    want = stored.dtype
                meta = torch.empty(t.shape, dtype=want, device="meta")
                if kind == "buffer" and not t.is_meta:
                    table[name] = meta
                entries.append((kind, name, key, meta))
                keys.setdefault(key, meta)
        if entries and mod_name not in plan:
            plan[mod_name] = entries
    weights = StreamedWeights(model, state, plan, keys)
    weights._install()
    return weights
