"""Permute checkpoints too large for memory: safetensors shards are streamed one at a time, each
through one fused permute_multi call, and written atomically beside an updated index.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .fileio import atomic_save_safetensors, atomic_write_text
from .spec import PermutationSpec, apply_permutation, check_permutations

__all__ = ["shard_files", "permute_safetensors"]


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
            weight_map = json.loads(path.read_text())["weight_map"]
            files = [path.parent / f for f in dict.fromkeys(weight_map.values())]
        else:
            files = [path]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint shards not found: {missing}")
    return files


def permute_safetensors(spec: PermutationSpec, perms: Mapping[str, torch.Tensor],
                        source: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                        *, progress: bool = True) -> list[Path]:
    """Apply `perms` to a (sharded) safetensors checkpoint, one shard in memory at a time.

    Every key of every shard must be declared in `spec`, and every key of `spec` found in some shard.
    Output shards keep their names (and the index file, if any) under `out_dir`; the inputs are
    never modified. Returns the written shard paths.
    """
    files = shard_files(source)
    out = Path(out_dir)
    if any(f.resolve().parent == out.resolve() for f in files):
        raise ValueError(f"out_dir {str(out)!r} holds the input shards; choose another folder")
    # Pass 1: shapes only (no tensor data) -> validate the spec and the perms before writing anything.
    layout: dict[Path, list[str]] = {}
    meta: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            layout[f] = list(handle.keys())
            for k in layout[f]:
                if k in meta:
                    raise ValueError(f"key {k!r} appears in two shards (second: {f.name})")
                meta[k] = torch.empty(handle.get_slice(k).get_shape(), device="meta")
    sizes = spec.perm_sizes(meta)
    check_permutations(spec, perms, sizes)
    # Pass 2: one shard in memory at a time.
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for f in tqdm(files, desc="permute shards", disable=not progress or len(files) < 2):
        with safe_open(str(f), framework="pt") as handle:
            metadata = handle.metadata()
            state = {k: handle.get_tensor(k) for k in layout[f]}
        sub = spec.restrict(state)
        new = apply_permutation(sub, {p: perms[p] for p in sub.perm_to_axes}, state)
        target = out / f.name
        atomic_save_safetensors(new, target, metadata=metadata)
        written.append(target)
    index = _index_file(source)
    if index is not None:
        atomic_write_text(out / index.name, index.read_text())
    return written


def _index_file(source) -> Path | None:
    if isinstance(source, (list, tuple)):
        return None
    src = Path(source)
    if src.name.endswith(".index.json"):
        return src
    if src.is_dir():
        return next(iter(sorted(src.glob("*.safetensors.index.json"))), None)
    return None
