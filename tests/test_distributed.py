"""torch.distributed (gloo, 2 local processes on 127.0.0.1): all-reduced moments equal the moments
of the whole data; shards cover the range; perms broadcast; rows gathered in rank order."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyrebasin.distributed import all_reduce_moments_, broadcast_perms, gather_rows, rank_and_world, shard_range
from pyrebasin.moments import CrossMoments


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, x, y, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        rows = shard_range(len(x))
        m = CrossMoments(x.shape[1], y.shape[1]).update(x[rows.start:rows.stop], y[rows.start:rows.stop])
        all_reduce_moments_(m)
        perms = broadcast_perms({"P": torch.randperm(5, generator=torch.Generator().manual_seed(rank))})
        gathered = gather_rows(torch.full((len(rows),), float(rank)))
        results[rank] = (m.corr(), float(m.count), perms["P"], gathered, rank_and_world())
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_ranks_reduce_to_the_whole_data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(101, 6, generator=g), torch.randn(101, 4, generator=g)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, _free_port(), x, y, results), nprocs=2, join=True)
        results = dict(results)
    whole = CrossMoments(6, 4).update(x, y)
    for rank in (0, 1):
        corr, count, perm, gathered, rw = results[rank]
        assert count == 101 and rw == (rank, 2)
        torch.testing.assert_close(corr, whole.corr(), atol=1e-12, rtol=0)
        assert torch.equal(perm, torch.randperm(5, generator=torch.Generator().manual_seed(0)))
        assert gathered.tolist() == [0.0] * 51 + [1.0] * 50


def test_shard_range_partitions():
    for n in (0, 1, 7, 100):
        for world in (1, 2, 3, 8):
            parts = [shard_range(n, r, world) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="rank 3 outside world of size 2"):
        shard_range(5, 3, 2)
