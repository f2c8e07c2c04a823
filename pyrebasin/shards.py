"""Checkpoints too large for memory: safetensors shards read lazily (`ShardedState`, one tensor copied out
of the memory-mapped file at a time) and permuted copies written tensor by tensor, in the input's shard
layout or re-sharded by size, beside an index, each shard atomically.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .fileio import atomic_write, atomic_write_text
from .spec import PermutationSpec, apply_permutation, check_permutations

__all__ = ["shard_files", "ShardedState", "permute_safetensors", "save_safetensors_streamed",
           "parse_size", "shard_plan", "INDEX_NAME"]

INDEX_NAME = "model.safetensors.index.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_NAMES = {v: k for k, v in _DTYPES.items()}


def shard_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Shard paths of a checkpoint: one .safetensors file, a `*.safetensors.index.json`, a folder
    holding either, or an explicit list of files."""
    if isinstance(source, (list, tuple)):
        files = [Path(f) for f in source]
    else:
        path = Path(source)
        if path.is_dir():
            indexes = sorted(path.glob("*.safetensors.index.json"))
            path = indexes[0] if indexes else path
            if path.is_dir():
                files = sorted(path.glob("*.safetensors"))
                if not files:
                    raise FileNotFoundError(f"no .safetensors files in {str(source)!r}")
                return files
        if path.name.endswith(".index.json"):
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}: not a safetensors index (no readable 'weight_map': {exc})") from None
            files = [path.parent / f for f in dict.fromkeys(weight_map.values())]
        else:
            files = [path]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint shards not found: {missing}")
    return files


def index_file(source) -> Path | None:
    """The `*.safetensors.index.json` of a checkpoint source (None for a file list or a lone file)."""
    if isinstance(source, (list, tuple)):
        return None
    src = Path(source)
    if src.name.endswith(".index.json"):
        return src
    if src.is_dir():
        return next(iter(sorted(src.glob("*.safetensors.index.json"))), None)
    return None


class ShardedState(Mapping):
    """A (sharded) safetensors checkpoint as a read-only mapping key -> tensor, read only when asked.

    Opening reads the headers alone (shapes, dtypes, metadata). Each read opens the shard's memory
    map, copies the tensors out and closes it, so no mapped page stays resident: the process holds
    only the tensors its caller keeps. `meta()` describes every tensor without reading one.
    """

    def __init__(self, source: str | os.PathLike | Sequence[str | os.PathLike]):
        self.files = shard_files(source)
        self.index = index_file(source)
        self.file_of: dict[str, Path] = {}
        self.metadata: dict[Path, dict | None] = {}
        self._meta: dict[str, torch.Tensor] = {}
        for f in self.files:
            try:
                handle = safe_open(str(f), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for a bad header
                raise ValueError(f"{f}: not a readable safetensors file ({exc})") from None
            with handle:
                self.metadata[f] = handle.metadata()
                for k in handle.keys():
                    if k in self.file_of:
                        raise ValueError(f"key {k!r} appears in two shards ({self.file_of[k].name}, {f.name})")
                    self.file_of[k] = f
                    sl = handle.get_slice(k)
                    self._meta[k] = torch.empty(sl.get_shape(), dtype=_DTYPES[sl.get_dtype()], device="meta")
        if self.index is not None:
            listed = json.loads(self.index.read_text())["weight_map"]
            wrong = [k for k, f in listed.items() if k not in self.file_of or self.file_of[k].name != Path(f).name]
            if wrong:
                raise ValueError(f"{self.index}: the weight_map puts {wrong[:5]} in shards that do not hold them")

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.file_of:
            raise KeyError(key)
        return self.read([key])[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.file_of)

    def __len__(self) -> int:
        return len(self.file_of)

    def __contains__(self, key) -> bool:
        return key in self.file_of

    def meta(self) -> dict[str, torch.Tensor]:
        """Meta tensors (shape and dtype, no data) of every key."""
        return dict(self._meta)

    def nbytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self._meta.values())

    def layout(self) -> dict[Path, list[str]]:
        """Each shard's keys, in file order."""
        out: dict[Path, list[str]] = {f: [] for f in self.files}
        for k, f in self.file_of.items():
            out[f].append(k)
        return out

    def read(self, keys: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The tensors of `keys` (fresh CPU tensors; floating ones converted to `dtype` if given),
        each shard's map opened once and closed before returning."""
        keys = list(keys)
        unknown = [k for k in keys if k not in self.file_of]
        if unknown:
            raise KeyError(f"not in the checkpoint: {unknown[:5]}")
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.file_of[k], []).append(k)
        out = {}
        for f, ks in by_file.items():
            with safe_open(str(f), framework="pt") as handle:
                for k in ks:
                    t = handle.get_tensor(k)
                    out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return {k: out[k] for k in keys}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "2GiB" (as `save_pretrained`'s max_shard_size)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"max_shard_size={size} must be >= 1 byte")
        return size
    if not isinstance(size, str):
        raise TypeError(f"max_shard_size must be an int or a string like '5GB', got {type(size).__name__}")
    text = size.strip().upper()
    for unit, scale in (("GIB", 1 << 30), ("MIB", 1 << 20), ("KIB", 1 << 10), ("GB", 10**9), ("MB", 10**6),
                        ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            try:
                value = float(text[:-len(unit)])
            except ValueError:
                break
            if value > 0:
                return max(1, int(value * scale))
            break
    raise ValueError(f"max_shard_size={size!r}: expected a positive size like '5GB', '500MB' or '2GiB'")


def save_safetensors_streamed(path: str | os.PathLike, meta: Mapping[str, torch.Tensor],
                              tensors: Iterable[tuple[str, torch.Tensor]], *, metadata: dict | None = None) -> Path:
    """Write a safetensors file atomically from `tensors`, an iterable of (key, tensor) in the order of
    `meta` (key -> a tensor or meta tensor of the same shape and dtype), each written as it comes:
    the header is known from `meta`, so no whole file is ever in memory."""
    header, offset = {}, 0
    for k, m in meta.items():
        n = m.numel() * m.element_size()
        header[k] = {"dtype": _NAMES[m.dtype], "shape": list(m.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    def write(tmp: str) -> None:
        order = iter(meta.items())
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
            for k, t in tensors:
                want, m = next(order, (None, None))
                if k != want or tuple(t.shape) != tuple(m.shape) or t.dtype != m.dtype:
                    raise ValueError(f"{path}: got tensor {k!r} {t.dtype} {list(t.shape)} where the header "
                                     f"has {want!r}" + (f" {m.dtype} {list(m.shape)}" if m is not None else ""))
                fh.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
            if next(order, None) is not None:
                raise ValueError(f"{path}: fewer tensors than the header lists")

    return atomic_write(path, write)


def shard_plan(meta: Mapping[str, torch.Tensor], max_shard_size: int) -> list[tuple[str, list[str]]]:
    """(output file name, keys) per shard: the keys in order, cut before a tensor that would take a
    shard past `max_shard_size` bytes (Hugging Face names; one shard is "model.safetensors")."""
    groups, size = [[]], 0
    for k, m in meta.items():
        n = m.numel() * m.element_size()
        if groups[-1] and size + n > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    if len(groups) == 1:
        return [("model.safetensors", groups[0])]
    return [(f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors", ks) for i, ks in enumerate(groups)]


def _plan(state: ShardedState, max_shard_size: int | None) -> list[tuple[str, list[str]]]:
    """(output file name, keys) per output shard: the input's layout, or key order cut by size."""
    if max_shard_size is None:
        return [(f.name, ks) for f, ks in state.layout().items()]
    meta = state.meta()
    return shard_plan({k: meta[k] for k in state}, max_shard_size)


def permute_safetensors(spec: PermutationSpec, perms: Mapping[str, torch.Tensor],
                        source: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                        *, progress: bool = True, max_shard_size: int | str | None = None) -> list[Path]:
    """Apply `perms` to a (sharded) safetensors checkpoint, one tensor in memory at a time.

    Every key of every shard must be declared in `spec`, and every key of `spec` found in some shard.
    Output shards keep their names, key order and metadata (and the index file, if any) under
    `out_dir`; with `max_shard_size` (bytes or "5GB") the tensors are cut into shards of at most that
    size in key order (HF names, a new index). The inputs are never modified. Returns the written
    shard paths.
    """
    state = ShardedState(source)
    out = Path(out_dir)
    if any(f.resolve().parent == out.resolve() for f in state.files):
        raise ValueError(f"out_dir {str(out)!r} holds the input shards; choose another folder")
    meta = state.meta()
    sizes = spec.perm_sizes(meta)  # shapes only: the spec and the perms are checked before writing
    check_permutations(spec, perms, sizes)
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    plan = _plan(state, limit)
    metadata = next((m for m in state.metadata.values() if m), None)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    bar = tqdm(total=len(meta), desc="permute tensors", unit="tensor", disable=not progress, leave=False)

    def permuted(keys):
        for k in keys:
            t = state.read([k])[k]
            sub = spec.restrict([k])
            if sub.perm_to_axes:
                t = apply_permutation(sub, {p: perms[p] for p in sub.perm_to_axes}, {k: t})[k]
            bar.update()
            yield k, t

    for name, keys in plan:
        own = state.metadata[state.file_of[keys[0]]] if limit is None else metadata
        own = dict(own or {})
        own.setdefault("format", "pt")  # transformers refuses shards without it
        written.append(save_safetensors_streamed(out / name, {k: meta[k] for k in keys}, permuted(keys),
                                                 metadata=own))
    bar.close()
    if limit is None and state.index is not None:
        atomic_write_text(out / state.index.name, state.index.read_text())
    elif len(plan) > 1:
        extra = json.loads(state.index.read_text()).get("metadata", {}) if state.index is not None else {}
        index = {"metadata": {**extra, "total_size": state.nbytes()},
                 "weight_map": {k: name for name, keys in plan for k in keys}}
        atomic_write_text(out / (state.index.name if state.index else INDEX_NAME), json.dumps(index, indent=2))
    return written
