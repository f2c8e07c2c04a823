"""Checkpoints and files for the CLI and reports: state dicts from .safetensors/.pt, atomic writes,
and models from a `module:factory` name, with one-line errors naming what is wrong (zoo names: zoo.resolve_arch).
"""
from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .fileio import atomic_save_safetensors, atomic_write, atomic_write_text

__all__ = ["load_state", "save_state", "state_suffix", "atomic_write", "atomic_write_text",
           "model_from_factory", "parse_kwargs", "first_line", "STATE_SUFFIXES"]

STATE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_NESTED = ("state_dict", "model_state_dict", "model", "state")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type when it has none), for one-line errors."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def state_suffix(path: Path) -> str:
    """The checkpoint format of `path` by its suffix; a ValueError naming the file for any other."""
    if path.suffix not in STATE_SUFFIXES:
        raise ValueError(f"{path}: unknown checkpoint format {path.suffix or '(no suffix)'!r}; "
                         f"expected one of {list(STATE_SUFFIXES)}")
    return path.suffix


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict (CPU tensors) from a .safetensors or .pt/.pth/.bin file.

    .pt files are read with `weights_only=True` (no code runs); a dict nesting the tensors under
    "state_dict" / "model_state_dict" / "model" / "state" is unwrapped, and a DataParallel "module."
    prefix on every key is dropped. Raises FileNotFoundError or ValueError naming the file.
    """
    path = Path(path)
    suffix = state_suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            obj = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise ValueError(f"{path}: not a readable safetensors file ({first_line(exc)})") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: not a readable PyTorch checkpoint ({first_line(exc)})") from None
    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _NESTED:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad or not obj:
        raise ValueError(f"{path}: not a state dict of tensors" + (f" (non-tensor entries {bad[:5]})" if bad else " (empty)"))
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def save_state(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write a state dict atomically, as safetensors or torch.save by the file's suffix."""
    path = Path(path)
    suffix = state_suffix(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if suffix == ".safetensors":
        return atomic_save_safetensors(tensors, path)
    return atomic_write(path, lambda tmp: torch.save(tensors, tmp))


def parse_kwargs(text: str | None, what: str = "--arch-kwargs") -> dict:
    """A JSON object of keyword arguments (None or empty: {})."""
    if not text:
        return {}
    try:
        out = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} is not valid JSON ({exc.msg} at char {exc.pos}): {text!r}") from None
    if not isinstance(out, dict):
        raise ValueError(f"{what} must be a JSON object like '{{\"width\": 128}}', got {text!r}")
    return out


def model_from_factory(arch: str, kwargs: Mapping | None = None) -> nn.Module:
    """Build a model from "module:factory" (any importable callable returning an nn.Module, a dotted
    attribute path after the colon), called with `kwargs`; returned in eval mode."""
    kwargs = dict(kwargs or {})
    mod_name, sep, attr = arch.partition(":")
    if not sep or not mod_name:
        raise ValueError(f"--arch {arch!r}: expected 'module:factory'")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"--arch {arch!r}: cannot import module {mod_name!r} ({first_line(exc)})") from None
    factory = module
    for part in attr.split("."):
        if not part or not hasattr(factory, part):
            raise ValueError(f"--arch {arch!r}: module {mod_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"--arch {arch!r}: {attr!r} is not callable")
    return call_factory(arch, factory, kwargs)


def call_factory(arch: str, factory, kwargs: Mapping) -> nn.Module:
    """factory(**kwargs) as a model in eval mode; a wrong argument or a non-module result is one
    error naming `arch` (the name the user gave)."""
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise ValueError(f"--arch {arch!r} with arguments {dict(kwargs)}: {first_line(exc)}") from None
    except Exception as exc:  # whatever a user's factory raises is reported as its failure, in one line
        raise ValueError(f"--arch {arch!r}: the factory raised {type(exc).__name__} with arguments {dict(kwargs)}: "
                         f"{first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise TypeError(f"--arch {arch!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()
