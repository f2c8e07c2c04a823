"""One data convention for every function that reads data (PyTorch's): an `(x, y)` pair, a tensor of
inputs, an iterable of batches or a DataLoader; named splits for evaluations; checked once, here."""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping

import torch

__all__ = ["Batch", "batches", "check_batch_size", "check_labels", "is_pair", "splits", "require_reiterable"]

Inputs = "torch.Tensor | Mapping[str, torch.Tensor]"
Batch = tuple  # (x, y): x a tensor or a mapping of tensors (token batches), y a tensor or None


def check_batch_size(value, name: str = "batch_size", *, allow_none: bool = False) -> int | None:
    """A positive int (bools and floats refused: `batch_size=-1` must not mean "no data")."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def is_pair(data) -> bool:
    """True for an `(x, y)` pair of tensors (y may be None), the single-tensor-dataset convention.

    A tuple of two is always a pair. A *list* of two tensors is ambiguous (two input batches, or
    [x, y]): it is a pair only when y has x's row count and another shape (labels, not a second
    batch of inputs); write a tuple to be explicit."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (torch.Tensor, Mapping))
            and (data[1] is None or isinstance(data[1], torch.Tensor))):
        return False
    if isinstance(data, tuple) or data[1] is None or isinstance(data[0], Mapping):
        return True
    x, y = data
    return x.dim() > 0 and y.dim() > 0 and x.shape[0] == y.shape[0] and x.shape != y.shape


def _rows(x) -> int:
    if isinstance(x, Mapping):
        sizes = {k: (v.shape[0] if isinstance(v, torch.Tensor) and v.dim() else None) for k, v in x.items()}
        if not sizes or any(s is None for s in sizes.values()) or len(set(sizes.values())) != 1:
            raise ValueError(f"data: a mapping of inputs needs tensors with one shared first dimension, got {sizes}")
        return next(iter(sizes.values()))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"data: inputs must be a tensor or a mapping of tensors, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("data: inputs are a 0-d tensor; expected a batch dimension first")
    return x.shape[0]


def _take(x, idx):
    return {k: v[idx] for k, v in x.items()} if isinstance(x, Mapping) else x[idx]


def _check_finite(x, where: str) -> None:
    for key, t in (x.items() if isinstance(x, Mapping) else [(None, x)]):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{where}: inputs{'' if key is None else f'[{key!r}]'} hold {bad} non-finite "
                             "value(s) (NaN or Inf); results on them would be meaningless")


def require_reiterable(data, name: str = "data") -> None:
    """Refuse a one-shot iterator where a function needs more than one pass over the data."""
    if is_pair(data) or isinstance(data, (torch.Tensor, Mapping)):
        return
    if not isinstance(data, Iterable):
        raise TypeError(f"{name} must be a tensor, an (x, y) pair, an iterable of batches or a DataLoader, "
                        f"got {type(data).__name__}")
    if iter(data) is data:
        raise TypeError(f"{name} is a one-shot iterator ({type(data).__name__}); pass a re-iterable "
                        "(a list of batches, a DataLoader) or tensors")


def batches(data, *, batch_size: int | None = None, labels: str = "optional", name: str = "data",
            shuffle: torch.Generator | None = None, check_finite: bool = True) -> Iterator[Batch]:
    """Yield `(x, y)` batches (y None where the data has no labels).

    data: a tensor of inputs, an `(x, y)` pair (sliced into `batch_size` rows; all rows at once when
    None), or an iterable of batches / a DataLoader whose items are tensors, `(x, y)` / `[x, y]` / `(x,)`
    sequences or mappings with `input_ids` (token batches: kept whole). labels: "optional",
    "required" (an unlabelled batch is an error) or "ignored" (y always None). `shuffle` permutes the
    rows of a pair (never a user's loader). Floating inputs holding NaN/Inf are refused.
    """
    check_batch_size(batch_size, allow_none=True)
    if labels not in ("optional", "required", "ignored"):
        raise ValueError(f"labels={labels!r}; expected 'optional', 'required' or 'ignored'")

    def out(i: int, x, y):
        n = _rows(x)
        if n == 0:
            raise ValueError(f"{name}: batch {i} is empty")
        if y is not None and labels != "ignored":
            if not isinstance(y, torch.Tensor):
                raise TypeError(f"{name}: labels of batch {i} must be a tensor, got {type(y).__name__}")
            if y.dim() == 0 or y.shape[0] != n:
                raise ValueError(f"{name}: batch {i} has {n} inputs but labels of shape {list(y.shape)}")
        if labels == "required" and y is None:
            raise ValueError(f"{name}: batch {i} has no labels; pass (x, y) pairs")
        if check_finite:
            _check_finite(x, f"{name} batch {i}")
        return x, (None if labels == "ignored" else y)

    if isinstance(data, torch.Tensor) or (isinstance(data, Mapping) and "input_ids" in data):
        data = (data, None)
    if is_pair(data):
        x, y = data
        n = _rows(x)
        if y is not None and (y.dim() == 0 or y.shape[0] != n):
            raise ValueError(f"{name}: x has {n} rows but y has shape {list(y.shape)}")
        if n == 0:
            raise ValueError(f"{name} is empty (0 rows)")
        bs = n if batch_size is None else batch_size
        order = torch.randperm(n, generator=shuffle) if shuffle is not None else None
        for i, s in enumerate(range(0, n, bs)):
            idx = order[s:s + bs] if order is not None else slice(s, s + bs)
            yield out(i, _take(x, idx), None if y is None else y[idx])
        return
    if isinstance(data, Mapping):
        raise TypeError(f"{name}: a mapping is read as token inputs only when it has 'input_ids' "
                        f"(got keys {sorted(map(str, data))[:6]}); pass (x, y) or an iterable of batches")
    if not isinstance(data, Iterable):
        raise TypeError(f"{name} must be a tensor, an (x, y) pair, an iterable of batches or a DataLoader, "
                        f"got {type(data).__name__}")
    count = 0
    for i, item in enumerate(data):
        if isinstance(item, (torch.Tensor, Mapping)):
            x, y = item, None
        elif isinstance(item, (tuple, list)) and 1 <= len(item) <= 2:
            x, y = item[0], (item[1] if len(item) == 2 else None)
        else:
            raise TypeError(f"{name}: batch {i} is a {type(item).__name__}"
                            f"{f' of length {len(item)}' if isinstance(item, (tuple, list)) else ''}; "
                            "expected a tensor, (x,) or (x, y)")
        count += 1
        yield out(i, x, y)
    if count == 0:
        raise ValueError(f"{name} yielded no batches")


def check_labels(y: torch.Tensor, classes: int, where: str = "data") -> None:
    """Class-index labels for `classes` outputs: integer dtype, values in [0, classes)."""
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        hint = " (one-hot? pass y.argmax(1))" if y.dim() == 2 and y.shape[-1] == classes else ""
        raise TypeError(f"{where}: labels must be integer class indices, got {y.dtype} of shape "
                        f"{list(y.shape)}{hint}")
    if y.dim() != 1:
        raise ValueError(f"{where}: class labels must be 1-D (one per row), got shape {list(y.shape)}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ValueError(f"{where}: labels must lie in [0, {classes}) (the model has {classes} outputs), "
                         f"got range [{int(y.min())}, {int(y.max())}]")


def splits(data, name: str = "data") -> dict[str, object]:
    """Named evaluation splits: a dict {name: data} (each any form `batches` reads), or one data
    object, named `name`. A mapping of tensors with `input_ids` is one token batch, not splits."""
    if isinstance(data, Mapping) and "input_ids" not in data:
        if not data:
            raise ValueError(f"{name} has no splits")
        for k, v in data.items():
            if not isinstance(k, str):
                raise TypeError(f"{name}: split names must be str, got {k!r}")
            if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.dim() != 2):
                raise TypeError(f"{name}: split {k!r} is a bare tensor; evaluation needs (x, y) labels "
                                "(or integer token ids [batch, tokens] for a language model)")
        return dict(data)
    return {name: data}


def finite_float(value, name: str) -> float:
    """A finite float (NaN and ±Inf refused), for numeric options such as t, eps or a coefficient."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
            isinstance(value, torch.Tensor) and value.numel() == 1):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v
