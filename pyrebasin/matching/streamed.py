"""Weight matching in bounded memory: the cost provider reads A's and B's tensors from memory-mapped
safetensors shards block by block, converts each block to float32 and frees it, so neither model is held.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from ..shards import ShardedState
from ..spec import PermutationSpec
from .costs import WeightCosts
from .weight import MatchResult, weight_matching

__all__ = ["StreamedCosts", "streamed_weight_matching", "BLOCK_BYTES", "CACHE_BYTES"]

BLOCK_BYTES = 128 << 20  # float32 bytes of one side's tensors converted at once (a bigger tensor is its own block)
CACHE_BYTES = 512 << 20  # float64 cost matrices kept for rank-|S| updates


class StreamedCosts(WeightCosts):
    """`WeightCosts` over two lazy states (`ShardedState`, or any mapping with `meta()` and
    `read(keys, dtype)`): every cost, update and objective reads the tensors it needs in blocks of
    at most `block_bytes` float32 bytes per model, so the memory held is the cost cache
    (`cache_bytes`), the constant costs and one block of each model, whatever the models' size."""

    def __init__(self, spec: PermutationSpec, state_a, state_b, *, cache_bytes: int = CACHE_BYTES,
                 block_bytes: int = BLOCK_BYTES):
        self.block_bytes = block_bytes
        self.blocks_read = 0  # blocks converted so far (what the streaming costs, in reads)
        super().__init__(spec, state_a, state_b, cache_bytes=cache_bytes)

    @staticmethod
    def describe(state, spec: PermutationSpec) -> Mapping[str, torch.Tensor]:
        return state.meta() if hasattr(state, "meta") else state

    def hold(self, state_a, state_b, keys: list[str], dtype: torch.dtype) -> torch.device:
        for name, state in (("state_a", state_a), ("state_b", state_b)):
            if not (hasattr(state, "read") and hasattr(state, "meta")):
                raise TypeError(f"streamed weight matching: {name} is a {type(state).__name__}; expected a "
                                "ShardedState (or a mapping with meta() and read(keys, dtype))")
        self.source_a, self.source_b = state_a, state_b
        meta = state_a.meta()
        self.block_of = {}
        block, size = 0, 0
        for k in keys:
            n = meta[k].numel() * torch.empty((), dtype=dtype).element_size()
            if size and size + n > self.block_bytes:
                block, size = block + 1, 0
            self.block_of[k] = block
            size += n
        return torch.device("cpu")

    def tensors(self, keys: list[str]):
        """(A, B) float32/64 tensors of `keys`, one block at a time (read, converted, then dropped)."""
        blocks: dict[int, list[str]] = {}
        for k in keys:
            blocks.setdefault(self.block_of[k], []).append(k)
        for _, ks in sorted(blocks.items()):
            a = self.source_a.read(ks, self.dtype)
            b = self.source_b.read(ks, self.dtype)
            self.blocks_read += 1
            yield a, b
            del a, b


def streamed_weight_matching(spec: PermutationSpec, source_a, source_b, *, cache_bytes: int = CACHE_BYTES,
                             block_bytes: int = BLOCK_BYTES, **options) -> MatchResult:
    """`weight_matching` (same options and result) on two checkpoints read lazily: `source_a`/`source_b`
    are `ShardedState`s or what `ShardedState` opens (a folder, an index, a .safetensors file, a list
    of shards). Peak memory: about `cache_bytes` + the constant costs + 4 x `block_bytes` + the
    largest tensor in float32, independent of the models' size."""
    states = [s if hasattr(s, "read") and hasattr(s, "meta") else ShardedState(_path(s, n))
              for s, n in ((source_a, "source_a"), (source_b, "source_b"))]

    def provider(spec_, a, b):
        return StreamedCosts(spec_, a, b, cache_bytes=cache_bytes, block_bytes=block_bytes)

    return weight_matching(spec, states[0], states[1], provider=provider, **options)


def _path(source, name: str):
    if isinstance(source, (str, os.PathLike, list, tuple)):
        return source
    raise TypeError(f"streamed_weight_matching: {name} is a {type(source).__name__}; expected a ShardedState, "
                    "a path or a list of shard paths")
