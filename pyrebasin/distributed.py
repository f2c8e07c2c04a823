"""Several processes or machines through torch.distributed (any backend: gloo on CPU, nccl on GPU).

Streaming statistics are sums, so data-parallel ranks accumulate locally and all-reduce once;
combination samples are replayable from (seed, k), so ranks split the sample range and gather.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .moments import CrossMoments

__all__ = ["is_distributed", "rank_and_world", "shard_range", "owners", "all_reduce_moments_", "broadcast_perms",
           "gather_rows", "gather_objects", "broadcast_object", "broadcast_optional", "check_same", "raise_together",
           "all_reduce_sum_", "split_map", "is_writer", "from_environment"]


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


def owners(work: Mapping[str, float], world: int) -> dict[str, int]:
    """A rank for each named job, balancing the summed `work` (largest job first onto the least
    loaded rank; ties to the earlier name and the lower rank): the same on every rank."""
    load, out, order = [0.0] * world, {}, {k: i for i, k in enumerate(work)}
    for name in sorted(work, key=lambda k: (-work[k], order[k])):
        r = min(range(world), key=lambda i: (load[i], i))
        out[name] = r
        load[r] += work[name]
    return {k: out[k] for k in work}


def all_reduce_sum_(tensors: Sequence[torch.Tensor], group=None) -> list[torch.Tensor]:
    """Sum float64 tensors (same shapes, same order on every rank) over all ranks in place, in one
    flattened all-reduce; every rank receives the same bits (a reduce then a broadcast per chunk, as
    gloo and NCCL do)."""
    tensors = list(tensors)
    if not is_distributed(group) or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dev = flat.device
    flat = flat.to(_device(group))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat, offset = flat.to(dev), 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return tensors


def all_reduce_moments_(moments: CrossMoments | Sequence[CrossMoments], group=None, *, cross: bool = True):
    """Sum the accumulators of one CrossMoments (or of a sequence of them, listed in the same order on
    every rank) over all ranks, in place, in one flattened all-reduce; returns its argument. Without
    `cross`, Σxyᵀ is left out (each rank keeps its own: REPAIR reads only the per-channel moments)."""
    many = [moments] if isinstance(moments, CrossMoments) else list(moments)
    all_reduce_sum_([t for m in many for t in (m.count, m.sum_x, m.sum_y, m.sum_xx, m.sum_yy)
                     + ((m.sum_xy,) if cross else ())], group)
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


def _device(group) -> torch.device:
    """Where this group's collectives take tensors: the current CUDA device under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_optional(value: torch.Tensor | None, n: int, src: int, group=None) -> torch.Tensor | None:
    """Rank `src`'s int64 vector of length `n`, or its None, on every rank (one broadcast of n + 1
    int64; `src` is a rank of `group`). Outside a distributed run, `value` itself."""
    if not is_distributed(group):
        return value
    buf = torch.zeros(n + 1, dtype=torch.long, device=_device(group))
    if dist.get_rank(group) == src and value is not None:
        buf[0] = 1
        buf[1:] = value.to(buf.device)
    dist.broadcast(buf, group=group, group_src=src)
    return buf[1:].cpu() if int(buf[0]) else None


def check_same(value, what: str, group=None) -> None:
    """ValueError on every rank when some rank's picklable `value` differs from rank 0's (`what`
    names the call: the ranks would otherwise wait on each other or mix different work)."""
    if not is_distributed(group):
        return
    everyone = gather_objects(value, group)
    odd = [r for r, v in enumerate(everyone) if v != everyone[0]]
    if odd:
        raise ValueError(f"{what}: rank(s) {odd} passed other arguments than rank 0 ({everyone[odd[0]]!r} vs "
                         f"{everyone[0]!r}); every rank must make the same call")


def raise_together(error: Exception | None, group=None) -> None:
    """After a rank's local part of a collective flow: when any rank met an error, a ValueError naming
    each such rank and its message, raised on every rank (instead of the others waiting on it
    forever). Outside a distributed run, `error` itself is raised."""
    if not is_distributed(group):
        if error is not None:
            raise error
        return
    failed = [(r, m) for r, m in enumerate(gather_objects(None if error is None else str(error), group))
              if m is not None]
    if failed:
        raise ValueError("; ".join(f"rank {r}: {m}" for r, m in failed)) from error


def split_map(fn, items: Sequence, *, group=None, desc: str = "", progress: bool = False, agree=None) -> list:
    """[fn(item) for item in items]; under torch.distributed (`group`) the items are split among the
    ranks by `shard_range`, each computed in its rank alone (`fn` must make no collective call: pass
    group=False inside), and the results gathered in order, so every rank returns the single-process
    list. `agree`: a picklable value every rank must pass alike (ValueError on every rank otherwise,
    naming `desc`); a ValueError of `fn` on any rank is raised on every rank."""
    spread = is_distributed(group)
    if spread:
        check_same((len(items), agree), desc or "split_map", group)
    mine = shard_range(len(items), group=group) if spread else range(len(items))
    out, error = [], None
    try:
        for i in tqdm(mine, desc=desc, disable=not progress, leave=False):
            out.append(fn(items[i]))
    except ValueError as exc:
        if not spread:
            raise
        error = exc
    if not spread:
        return out
    raise_together(error, group)
    return [r for part in gather_objects(out, group) for r in part]


def is_writer(group=None) -> bool:
    """True on the rank that writes files and shows progress: rank 0, or the only process."""
    return rank_and_world(group)[0] == 0


@contextlib.contextmanager
def from_environment():
    """Join the process group that a launcher such as torchrun describes in the environment
    (WORLD_SIZE > 1, RANK, MASTER_ADDR, MASTER_PORT) for the block, then leave it; nothing when
    there is none or a group is already initialised. Backend: NCCL for CUDA tensors when
    available, gloo for CPU ones (torch's default pair)."""
    wanted = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    if not wanted or not dist.is_available() or dist.is_initialized():
        yield
        return
    dist.init_process_group()
    try:
        yield
    finally:
        dist.destroy_process_group()
