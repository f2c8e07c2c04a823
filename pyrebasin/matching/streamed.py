"""Weight matching in bounded memory: the cost provider reads A's and B's tensors from memory-mapped
safetensors shards block by block, converts each block to float32 and frees it, so neither model is held.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

import torch

from .._heap import release_heap
from ..shards import ShardedState
from ..spec import PermutationSpec
from .costs import WeightCosts, dot64
from .weight import MatchResult, weight_matching

__all__ = ["StreamedCosts", "streamed_weight_matching", "BLOCK_BYTES", "CACHE_BYTES"]

BLOCK_BYTES = 128 << 20  # float32 bytes of one side's tensors converted at once (a bigger tensor is its own block)
CACHE_BYTES = 512 << 20  # float64 cost matrices kept for rank-|S| updates
SEEN = 8  # perm states whose objective is remembered


class StreamedCosts(WeightCosts):
    """`WeightCosts` over two lazy states (`ShardedState`, or any mapping with `meta()` and
    `read(keys, dtype)`): every cost, update and objective reads the tensors it needs in blocks of
    at most `block_bytes` float32 bytes per model, so the memory held is the cost cache
    (`cache_bytes`), the constant costs and one block of each model, whatever the models' size."""

    def __init__(self, spec: PermutationSpec, state_a, state_b, *, cache_bytes: int = CACHE_BYTES,
                 block_bytes: int = BLOCK_BYTES, group=None):
        self.block_bytes = block_bytes
        self.blocks_read = 0  # blocks converted so far (what the streaming costs, in reads)
        super().__init__(spec, state_a, state_b, cache_bytes=cache_bytes, group=group)
        # The objective is tracked from the cost matrices: when group p moves to a new perm right
        # after its cost was built, the objective changes by Σ_i T[i, new(i)] - T[i, old(i)], T the
        # true (coupling 1) cost, exactly when no tensor has two slots in p (the objective is then
        # linear in p's perm). A change without a fresh cost (a refinement's kick) is tracked from p's
        # cached cost when its indices are still current; perms seen before (a rejected kick restored)
        # take their remembered objective. Any other change (or a process group) falls back to one pass.
        self.linear = {p: len({t.param for t in ts}) == len(ts) for p, ts in self.terms.items()}
        self.tracked: float | None = None
        self.last: tuple | None = None  # (group, coupling, cost, snapshot) of the last cost built
        self.streamed_passes = 0
        self.norms: dict[str, tuple[float, float]] = {}  # key -> (‖A_k‖², ‖B_k‖²), from the first pass (certify.py)
        self.seen: dict[bytes, float] = {}  # digest of the perms -> their objective (the last SEEN states)

    def cost(self, p: str, coupling: float = 1.0) -> torch.Tensor:
        c = super().cost(p, coupling)
        self.last = (p, coupling, c, self.snapshot(p))
        return c

    def set_perm(self, p: str, perm: torch.Tensor) -> None:
        last, self.last = self.last, None
        w, c = None, None
        if self.tracked is not None and self.linear[p] and self.group is False:  # ranks must agree: no tracking there
            if last is not None and last[0] == p and last[3] == self.snapshot(p) and last[1] > 0:
                _, w, c, _ = last
            else:
                w, c = self._current_cost(p)
        if c is not None:
            rows, old, new = torch.arange(self.sizes[p]), self.perms[p].cpu(), perm.cpu().long()
            base = self.constant[p]

            def true_sum(cols):
                v = c[rows, cols]
                if w != 1.0:  # undo the coupling weight: T = base + (C - base) / w
                    b = base[rows, cols] if base is not None else torch.zeros_like(v)
                    v = b + (v - b) / w
                return float(v.sum())
            self.tracked += true_sum(new) - true_sum(old)
        else:
            self.tracked = None
        super().set_perm(p, perm)
        if self.tracked is None and self.group is False:
            self.tracked = self.seen.get(self._digest())

    def _current_cost(self, p: str) -> tuple:
        """(coupling weight, cost) of group `p` without building anything: its constant cost when no
        term reads another perm, its cached cost when built from the current indices, else (None, None)."""
        if not self.coupled[p]:
            return (1.0, self.constant[p]) if self.constant[p] is not None else (None, None)
        if p not in self.cache:
            return None, None
        total, indices, _, weight = self.cache[p]
        current = [self._indices(t) for t in self.coupled[p]]
        same = all(len(o) == len(n) and all(do == dn and torch.equal(io, inew) for (do, io), (dn, inew) in zip(o, n))
                   for o, n in zip(indices, current))
        return (weight, total) if same and weight > 0 else (None, None)

    def _digest(self) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        for q in sorted(self.perms):
            h.update(q.encode())
            h.update(self.perms[q].cpu().numpy().tobytes())
        return h.digest()

    def _remember(self, value: float) -> None:
        if self.group is False:
            self.seen[self._digest()] = value
            while len(self.seen) > SEEN:
                del self.seen[next(iter(self.seen))]

    def dots(self, perms: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Tensor by tensor in the checkpoint's dtype: bf16/fp16 -> float64 is exact, so this equals
        the float32 pass with a third of its memory. The first pass also keeps each tensor's squared
        norms (the certificate's bound) while it holds them."""
        buffers = tuple(torch.empty(1 << 17, dtype=torch.float64) for _ in range(2))
        out = {}
        for k in self.own_keys:
            a, b = self.source_a.read([k])[k], self.source_b.read([k])[k]
            out[k] = dot64(a, self.permuted(k, b, perms), buffers)
            if k not in self.norms:
                self.norms[k] = (dot64(a, a, buffers), dot64(b, b, buffers))
            del a, b
        release_heap()
        return out

    def objective(self, perms: Mapping[str, torch.Tensor] | None = None) -> float:
        """The tracked objective when every change since the last streamed pass came from a cost
        matrix (see __init__), else one streamed pass over both models."""
        if perms is None and self.tracked is not None:
            # perms seen before keep the value they had (a kick that descended back gains nothing, not rounding)
            self.tracked = self.seen.get(self._digest(), self.tracked) if self.group is False else self.tracked
            self._remember(self.tracked)
            return self.tracked
        value = super().objective(perms)
        self.streamed_passes += 1
        if perms is None:
            self.tracked = value
            self._remember(value)
        return value

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
            release_heap()


def streamed_weight_matching(spec: PermutationSpec, source_a, source_b, *, cache_bytes: int = CACHE_BYTES,
                             block_bytes: int = BLOCK_BYTES, **options) -> MatchResult:
    """`weight_matching` (same options and result) on two checkpoints read lazily: `source_a`/`source_b`
    are `ShardedState`s or what `ShardedState` opens (a folder, an index, a .safetensors file, a list
    of shards). Peak memory: about `cache_bytes` + the constant costs + 4 x `block_bytes` + the
    largest tensor in float32, independent of the models' size. A spec with nested perms takes the
    staged solve (matching/staged.py): its shared-perm subgroup through `StreamedCosts`, then the nested
    families and descent reading each tensor on use (a family's tensors once per visit, 512 MiB of costs)."""
    states = [s if hasattr(s, "read") and hasattr(s, "meta") else ShardedState(_path(s, n))
              for s, n in ((source_a, "source_a"), (source_b, "source_b"))]

    def provider(spec_, a, b, **kwargs):
        return StreamedCosts(spec_, a, b, cache_bytes=cache_bytes, block_bytes=block_bytes, **kwargs)

    return weight_matching(spec, states[0], states[1], provider=provider, **options)


def _path(source, name: str):
    if isinstance(source, (str, os.PathLike, list, tuple)):
        return source
    raise TypeError(f"streamed_weight_matching: {name} is a {type(source).__name__}; expected a ShardedState, "
                    "a path or a list of shard paths")
