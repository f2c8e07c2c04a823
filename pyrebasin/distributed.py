"""Several processes or machines through torch.distributed (any backend: gloo on CPU, nccl on GPU).

Streaming statistics are sums, so data-parallel ranks accumulate locally and all-reduce once;
combination samples are replayable from (seed, k), so ranks split the sample range and gather.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from .moments import CrossMoments

__all__ = ["is_distributed", "rank_and_world", "shard_range", "all_reduce_moments_", "broadcast_perms",
           "gather_rows", "gather_objects", "broadcast_object"]


def is_distributed(group=None) -> bool:
    """True when `group` spans more than one process. `group`: None = the default group when
    torch.distributed is initialised (else this process alone), a ProcessGroup = that group, False =
    this process alone even inside a distributed run (the meaning of `group=` across the library)."""
    if group is False:
        return False
    if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(f"group must be None, False or a torch.distributed ProcessGroup, got {group!r}")
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_world(group=None) -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if group is False or not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard_range(n: int, rank: int | None = None, world: int | None = None, group=None) -> range:
    """This rank's contiguous share of range(n) (sizes differ by at most one)."""
    if rank is None or world is None:
        rank, world = rank_and_world(group)
    if not 0 <= rank < world:
        raise ValueError(f"shard_range: rank {rank} outside world of size {world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def all_reduce_moments_(moments: CrossMoments | Sequence[CrossMoments], group=None):
    """Sum the accumulators of one CrossMoments (or of a sequence of them, listed in the same order on
    every rank) over all ranks, in place, in one flattened all-reduce; returns its argument."""
    if not is_distributed(group):
        return moments
    many = [moments] if isinstance(moments, CrossMoments) else list(moments)
    if not many:
        return moments
    parts = [t for m in many for t in (m.count.reshape(1), m.sum_x, m.sum_y, m.sum_xx, m.sum_yy,
                                       m.sum_xy.reshape(-1))]
    flat = torch.cat(parts)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for p in parts:
        p.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    for m in many:
        m.count = m.count.reshape(())  # count was viewed as 1 element: keep it a scalar
    return moments


def broadcast_perms(perms: Mapping[str, torch.Tensor] | None, src: int = 0, group=None) -> dict[str, torch.Tensor]:
    """Every rank gets rank `src`'s permutations (e.g. solved once, used everywhere)."""
    if not is_distributed(group):
        if perms is None:
            raise ValueError("broadcast_perms: perms is None outside a distributed run")
        return dict(perms)
    box = [dict(perms) if dist.get_rank(group) == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    return {k: torch.as_tensor(v) for k, v in box[0].items()}


def gather_rows(local: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's rows in rank order (rank shares may differ in length)."""
    if not is_distributed(group):
        return local
    world = dist.get_world_size(group)
    out: list = [None] * world
    dist.all_gather_object(out, local.cpu(), group=group)
    return torch.cat(out).to(local.device)


def gather_objects(obj, group=None) -> list:
    """Every rank's picklable `obj`, in rank order ([obj] outside a distributed run)."""
    if not is_distributed(group):
        return [obj]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, src: int = 0, group=None):
    """Rank `src`'s picklable `obj` on every rank (`obj` itself outside a distributed run)."""
    if not is_distributed(group):
        return obj
    box = [obj if dist.get_rank(group) == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
