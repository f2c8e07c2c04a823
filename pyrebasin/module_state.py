"""Models as functions of state dicts: state checks, private eval-mode views of a caller's module,
and the (1−t)·θ_A + t·θ_B path — so no function flips a flag on, or copies the tensors of, a user's model."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["State", "check_state", "check_pair", "check_finite_state", "model_state", "mode_view", "lerp_state"]

State = Mapping[str, torch.Tensor]

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def check_state(model: nn.Module, state: State, name: str = "state") -> None:
    """`state` must hold exactly the model's state-dict keys with the model's shapes (errors name them)."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{name} must be a mapping of str -> Tensor, got {type(state).__name__}")
    ref = model.state_dict(keep_vars=True)
    missing = [k for k in ref if k not in state]
    extra = [k for k in state if k not in ref]
    if missing or extra:
        raise ValueError(f"{name} does not match the model: missing keys {missing[:6]}"
                         f"{' ...' if len(missing) > 6 else ''}, unexpected keys {extra[:6]}"
                         f"{' ...' if len(extra) > 6 else ''}")
    for k, v in ref.items():
        t = state[k]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {k!r} is a {type(t).__name__}, not a Tensor")
        if t.is_meta:
            raise ValueError(f"{name}: {k!r} is a meta tensor (no data); load real weights first")
        if t.shape != v.shape:
            raise ValueError(f"{name}: {k!r} has shape {list(t.shape)} but the model expects {list(v.shape)}")


def check_finite_state(state: State, name: str = "state") -> None:
    """Refuse NaN/Inf in floating tensors: they poison every point of a path (lerp(a, nan, 0) is nan)."""
    for k, v in state.items():
        if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name}: {k!r} holds {int((~torch.isfinite(v)).sum())} non-finite value(s) (NaN or Inf)")


def check_pair(model: nn.Module | None, state_a: State, state_b: State, *, finite: bool = True,
               same_dtype: bool = False) -> None:
    """Two states of one model: same keys, shapes and floating-ness (dtypes too with `same_dtype`), tensors
    only, NaN/Inf refused with `finite` (and the model's keys and shapes when a model is given)."""
    if model is not None:
        check_state(model, state_a, "state_a")
        check_state(model, state_b, "state_b")
    for name, s in (("state_a", state_a), ("state_b", state_b)):
        if not isinstance(s, Mapping):
            raise TypeError(f"{name} must be a mapping of str -> Tensor, got {type(s).__name__}")
    if set(state_a) != set(state_b):
        raise ValueError(f"state_a and state_b have different keys: {sorted(set(state_a) ^ set(state_b))[:8]}")
    for k, a in state_a.items():
        b = state_b[k]
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            raise TypeError(f"{k!r}: expected tensors, got {type(a).__name__} and {type(b).__name__}")
        if a.shape != b.shape:
            raise ValueError(f"{k!r}: state_a has shape {list(a.shape)} but state_b {list(b.shape)}")
        if a.is_floating_point() != b.is_floating_point() or (same_dtype and a.dtype != b.dtype):
            raise ValueError(f"{k!r}: state_a is {a.dtype} but state_b is {b.dtype}")
    if finite:
        check_finite_state(state_a, "state_a")
        check_finite_state(state_b, "state_b")


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own tensors, detached: its state dict plus non-persistent buffers (e.g. rotary
    `inv_freq`), which `functional_call` would otherwise miss when a state dict replaces them."""
    out = {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()}
    for k, v in model.named_buffers():
        out.setdefault(k, v.detach())
    return out


def _view(module: nn.Module, training: bool, memo: dict[int, nn.Module]) -> nn.Module:
    if id(module) in memo:  # a submodule registered twice (shared) stays shared
        return memo[id(module)]
    # A new __dict__ over the same tensors, written directly: copy.copy's reduce protocol and
    # Module.__setattr__ cost more than the rest of an evaluation call for a small model.
    c = object.__new__(type(module))
    d = c.__dict__
    d.update(module.__dict__)
    memo[id(module)] = c
    d["_parameters"] = module._parameters.copy()
    d["_buffers"] = module._buffers.copy()
    for h in _HOOK_DICTS:  # hooks added to the view must not appear on the caller's module
        if h in d:
            d[h] = d[h].copy()
    d["_modules"] = {n: (None if m is None else _view(m, training, memo)) for n, m in module._modules.items()}
    d["training"] = training
    return c


def mode_view(model: nn.Module, *, training: bool = False) -> nn.Module:
    """A structural copy of `model` with every submodule's `training` flag set to `training`.

    It shares the caller's parameters and buffers (nothing is copied but the module objects), and
    its flags and hooks are its own, so evaluating it — from any thread — leaves the caller's module
    exactly as it was. Run it through `torch.func.functional_call` with the state to evaluate."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return _view(model, training, {})


def lerp_state(state_a: State, state_b: State, t: float) -> dict[str, torch.Tensor]:
    """(1−t)·θ_A + t·θ_B for floating tensors (exact at t=0 and t=1); integer buffers come from A."""
    return {k: torch.lerp(a, state_b[k].to(a.dtype), float(t)) if a.is_floating_point() else a.clone()
            for k, a in state_a.items()}
