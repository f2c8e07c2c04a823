"""Interoperability with git-re-basin (Ainsworth et al., JAX/flax): its spec format (perm_to_axes /
axes_to_perm dicts over flax key paths) and its parameter layout (kernels [in, out], conv HWIO).

Plain data in, plain data out (PermutationSpec.from_git_rebasin / .to_git_rebasin wrap these). flax
kernels hold the output axis last: Dense [in, out] vs torch Linear [out, in], Conv HWIO vs OIHW, so
a kernel's axes are reordered on the way in and out; every other leaf keeps its axes.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

__all__ = [
    "axes_from_git_rebasin",
    "flax_to_torch_key",
    "flax_to_torch_state",
    "git_rebasin_from_axes",
    "torch_axis_order",
    "torch_to_flax_key",
    "torch_to_flax_state",
]

KeyMap = Mapping[str, str] | Callable[[str], str] | None
# flax leaf name -> torch leaf name (BatchNorm's batch_stats leaves included)
_FLAX_TO_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "mean": "running_mean",
                       "var": "running_var"}
_KERNEL_LEAVES = ("kernel",)


def torch_axis_order(rank: int) -> list[int]:
    """For a flax kernel of `rank` axes: order[t] is the flax axis that torch axis t comes from
    ([in, out] -> [out, in]; [H, W, I, O] -> [O, I, H, W]; conv1d/3d alike)."""
    if rank < 2:
        return list(range(rank))
    return [rank - 1, rank - 2] + list(range(rank - 2))


def _is_kernel(flax_key: str) -> bool:
    return flax_key.rsplit("/", 1)[-1] in _KERNEL_LEAVES


def flax_to_torch_key(flax_key: str) -> str:
    """The default name rule: "Dense_0/kernel" -> "Dense_0.weight", "bn/mean" -> "bn.running_mean"."""
    *path, leaf = flax_key.split("/")
    return ".".join(path + [_FLAX_TO_TORCH_LEAF.get(leaf, leaf)])


def torch_to_flax_key(torch_key: str, rank: int) -> str:
    """The inverse rule: a rank >= 2 "weight" is a kernel, a rank-1 "weight" a norm's scale."""
    *path, leaf = torch_key.split(".")
    leaf = {"running_mean": "mean", "running_var": "var"}.get(leaf, leaf)
    if leaf == "weight":
        leaf = "kernel" if rank >= 2 else "scale"
    return "/".join(path + [leaf])


def _map_key(key_map: KeyMap, key: str, default: Callable[[str], str]) -> str:
    if key_map is None:
        return default(key)
    if callable(key_map):
        out = key_map(key)
    else:
        out = key_map[key] if key in key_map else default(key)
    if not isinstance(out, str):
        raise TypeError(f"key_map gave {out!r} for {key!r}; expected a str")
    return out


def _check_entries(key, entries) -> tuple:
    if isinstance(entries, (str, bytes)) or not hasattr(entries, "__len__"):
        raise TypeError(f"axes_to_perm[{key!r}] must be a tuple of perm names or None per axis, got {entries!r}")
    entries = tuple(entries)
    for e in entries:
        if e is not None and not isinstance(e, str):
            raise ValueError(f"axes_to_perm[{key!r}] holds {e!r}: git-re-basin's format has one perm name "
                             "or None per axis (no factorised/Blocked axes)")
    return entries


def _flatten(params: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in params.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out |= _flatten(v, name)
        else:
            out[name] = v
    return out


def _source_axes(spec_like, params: Mapping | None) -> dict[str, tuple]:
    """axes_to_perm of any form git-re-basin code hands around, checked against perm_to_axes."""
    if hasattr(spec_like, "axes_to_perm") and hasattr(spec_like, "perm_to_axes"):  # its NamedTuple
        axes, p2a = spec_like.axes_to_perm, spec_like.perm_to_axes
    elif isinstance(spec_like, Mapping) and ("axes_to_perm" in spec_like or "perm_to_axes" in spec_like):
        axes, p2a = spec_like.get("axes_to_perm"), spec_like.get("perm_to_axes")
    elif isinstance(spec_like, Mapping):
        values = list(spec_like.values())
        looks_p2a = values and all(isinstance(v, list) and all(isinstance(x, (tuple, list)) and len(x) == 2
                                                                for x in v) for v in values)
        axes, p2a = (None, spec_like) if looks_p2a else (spec_like, None)
    else:
        raise TypeError("spec must be git-re-basin's PermutationSpec, a dict with 'axes_to_perm' and/or "
                        f"'perm_to_axes', or one of those dicts, got {type(spec_like).__name__}")
    if axes is None:
        if params is None:
            raise ValueError("a bare perm_to_axes does not say how many axes each key has (a kernel's last "
                             "axis may be unpermuted): pass axes_to_perm too, or params= to read the ranks")
        flat = _flatten(params)
        axes = {}
        for key, value in flat.items():
            axes[key] = [None] * len(getattr(value, "shape", ()))
        for perm, pairs in p2a.items():
            for key, axis in pairs:
                if key not in axes or not 0 <= int(axis) < len(axes[key]):
                    raise ValueError(f"perm_to_axes[{perm!r}] names ({key!r}, {axis}) which params lack")
                axes[key][int(axis)] = perm
    axes = {str(k): _check_entries(k, v) for k, v in axes.items()}
    if p2a is not None:
        derived = {(p, k, a) for k, es in axes.items() for a, p in enumerate(es) if p is not None}
        given = {(p, str(k), int(a)) for p, pairs in p2a.items() for k, a in pairs}
        if derived != given:
            diff = sorted(derived ^ given)[:4]
            raise ValueError(f"perm_to_axes and axes_to_perm disagree on (perm, key, axis) {diff}")
    if params is not None:
        flat = _flatten(params)
        for key, entries in axes.items():
            if key in flat and len(getattr(flat[key], "shape", ())) != len(entries):
                raise ValueError(f"axes_to_perm[{key!r}] has {len(entries)} axes but params[{key!r}] has shape "
                                 f"{list(flat[key].shape)}")
    return axes


def axes_from_git_rebasin(spec_like, *, key_map: KeyMap = None, layout: str = "torch",
                          params: Mapping | None = None) -> dict[str, tuple]:
    """pyrebasin's axes_to_perm for a git-re-basin spec.

    layout="torch" renames keys (`key_map`: flax key -> torch key, a dict or a callable; keys it lacks
    follow `flax_to_torch_key`; default: `spec_like`'s own "key_map" entry) and reorders every
    kernel's axes to torch's; layout="flax" keeps keys and axes as they are, for flax-layout
    parameters loaded as tensors. `params` (flax params, nested
    or "a/b" keys) is only needed to read ranks when `spec_like` is a bare perm_to_axes.
    """
    if layout not in ("torch", "flax"):
        raise ValueError(f"layout={layout!r}; expected 'torch' or 'flax'")
    axes = _source_axes(spec_like, params)
    if key_map is None and isinstance(spec_like, Mapping) and isinstance(spec_like.get("key_map"), Mapping):
        key_map = spec_like["key_map"]  # written by git_rebasin_from_axes: the exact torch names
    if layout == "flax":
        return axes
    out: dict[str, tuple] = {}
    for key, entries in axes.items():
        name = _map_key(key_map, key, flax_to_torch_key)
        if name in out:
            raise ValueError(f"key_map sends two flax keys to {name!r} (one is {key!r})")
        order = torch_axis_order(len(entries)) if _is_kernel(key) else list(range(len(entries)))
        out[name] = tuple(entries[f] for f in order)
    return out


def git_rebasin_from_axes(axes_to_perm: Mapping[str, tuple], *, key_map: KeyMap = None) -> dict:
    """git-re-basin's format for pyrebasin's axes_to_perm: {"perm_to_axes", "axes_to_perm", "key_map"}.

    `key_map`: torch key -> flax key (dict or callable; default `torch_to_flax_key`). Keys that become
    kernels get flax's axis order. "key_map" in the result (flax key -> torch key) lets
    `axes_from_git_rebasin` restore the exact names.
    """
    flax_axes: dict[str, tuple] = {}
    names: dict[str, str] = {}
    for key, entries in axes_to_perm.items():
        entries = _check_entries(key, entries)
        rank = len(entries)
        name = _map_key(key_map, key, lambda k: torch_to_flax_key(k, rank))  # noqa: B023 (called at once)
        if name in flax_axes:
            raise ValueError(f"torch keys {names[name]!r} and {key!r} both become the flax key {name!r}; "
                             "pass key_map= to tell them apart")
        order = torch_axis_order(len(entries)) if _is_kernel(name) else list(range(len(entries)))
        flax = [None] * len(entries)
        for t, f in enumerate(order):
            flax[f] = entries[t]
        flax_axes[name] = tuple(flax)
        names[name] = key
    perm_to_axes: dict[str, list[tuple[str, int]]] = {}
    for name, entries in flax_axes.items():
        for axis, perm in enumerate(entries):
            if perm is not None:
                perm_to_axes.setdefault(perm, []).append((name, axis))
    return {"perm_to_axes": perm_to_axes, "axes_to_perm": flax_axes, "key_map": names}


def flax_to_torch_state(params: Mapping, *, key_map: KeyMap = None) -> dict[str, torch.Tensor]:
    """flax params (nested dicts or "a/b" keys; numpy or jax arrays) -> a torch state dict: keys renamed
    as in `axes_from_git_rebasin`, kernels transposed to torch's layout (contiguous copies)."""
    import numpy as np

    out = {}
    for key, value in _flatten(params).items():
        t = torch.as_tensor(np.asarray(value))
        if _is_kernel(key):
            t = t.permute(torch_axis_order(t.dim())).contiguous()
        name = _map_key(key_map, key, flax_to_torch_key)
        if name in out:
            raise ValueError(f"key_map sends two flax keys to {name!r} (one is {key!r})")
        out[name] = t
    return out


def torch_to_flax_state(state: Mapping[str, torch.Tensor], *, key_map: KeyMap = None,
                        nested: bool = False) -> dict:
    """A torch state dict -> flax-layout numpy arrays under flax key paths ("a/b", or nested dicts)."""
    flat: dict = {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state[{key!r}] is a {type(t).__name__}, not a Tensor")
        rank = t.dim()
        name = _map_key(key_map, key, lambda k: torch_to_flax_key(k, rank))  # noqa: B023 (called at once)
        if name in flat:
            raise ValueError(f"two torch keys become the flax key {name!r} (one is {key!r}); pass key_map=")
        order = torch_axis_order(t.dim()) if _is_kernel(name) else list(range(t.dim()))
        inverse = sorted(range(t.dim()), key=order.__getitem__)
        flat[name] = t.detach().cpu().permute(inverse).contiguous().numpy()
    if not nested:
        return flat
    tree: dict = {}
    for name, value in flat.items():
        *path, leaf = name.split("/")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree
