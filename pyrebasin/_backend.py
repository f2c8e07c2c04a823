"""Which implementation of the native ops runs: "native" (the C++/CUDA extension) or "reference".

The default is "native" when `pyrebasin._C` loaded, else "reference"; `PYREBASIN_BACKEND` overrides
it, `use_backend(...)` switches it for a block. `PYREBASIN_REQUIRE_NATIVE=1` makes a failed load fatal.
"""
from __future__ import annotations

import contextlib
import contextvars
import os

import torch

__all__ = ["backend", "use_backend", "native_available", "native_error", "has_kernel"]

_BACKENDS = ("native", "reference")

try:
    from . import _C  # noqa: F401  (registers torch.ops.pyrebasin.*)

    _NATIVE_ERROR: str | None = None
except ImportError as exc:  # a pure-Python install, or a broken build
    _NATIVE_ERROR = f"{type(exc).__name__}: {exc}"
    if os.environ.get("PYREBASIN_REQUIRE_NATIVE", "0") == "1":
        raise ImportError(
            "PYREBASIN_REQUIRE_NATIVE=1 but the native extension pyrebasin._C did not load "
            f"({_NATIVE_ERROR}); rebuild with `pip install --no-build-isolation -e .`"
        ) from exc


def native_available() -> bool:
    """True when the C++ extension loaded."""
    return _NATIVE_ERROR is None


def native_error() -> str | None:
    """Why the extension did not load (None when it did)."""
    return _NATIVE_ERROR


def _default() -> str:
    env = os.environ.get("PYREBASIN_BACKEND")
    if env is not None:
        if env not in _BACKENDS:
            raise ValueError(f"PYREBASIN_BACKEND={env!r}; expected one of {_BACKENDS}")
        if env == "native" and not native_available():
            raise ImportError(f"PYREBASIN_BACKEND=native but pyrebasin._C did not load: {_NATIVE_ERROR}")
        return env
    return "native" if native_available() else "reference"


_current: contextvars.ContextVar[str] = contextvars.ContextVar("pyrebasin_backend", default=_default())


def backend() -> str:
    """The backend in force: "native" or "reference"."""
    return _current.get()


@contextlib.contextmanager
def use_backend(name: str):
    """Run a block with the given backend: `with prb.use_backend("reference"): ...`."""
    if name not in _BACKENDS:
        raise ValueError(f"use_backend({name!r}): expected one of {_BACKENDS}")
    if name == "native" and not native_available():
        raise RuntimeError(f"use_backend('native'): the extension did not load: {_NATIVE_ERROR}")
    token = _current.set(name)
    try:
        yield
    finally:
        _current.reset(token)


_KERNELS: set[tuple[str, str]] = set()  # (op, device type) found registered: a registration is never undone


def has_kernel(op: str, device_type: str) -> bool:
    """Whether `pyrebasin::<op>` has a native kernel for a device type ("cpu", "cuda"). A kernel found is
    remembered (the dispatcher query costs ~50 us, and every op wrapper asks at each call)."""
    if (op, device_type) in _KERNELS:
        return True
    if not native_available():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    found = torch._C._dispatch_has_kernel_for_dispatch_key(f"pyrebasin::{op}", key)
    if found:
        _KERNELS.add((op, device_type))
    return found


def use_native(op: str, device: torch.device) -> bool:
    """Dispatch decision of the wrappers in ops.py: native backend chosen and a kernel exists."""
    return backend() == "native" and has_kernel(op, device.type)
