"""Several processes: 2 gloo ranks x 1 thread against 1 process x 1 thread on this machine, as throughput
ratios measured in one run, for `evaluate_combinations` (MLP, K samples), activation statistics
(activation matching; REPAIR endpoint statistics on an MLP with BatchNorm) and weight matching (groups
split by owner: memory split, the descent itself stays sequential).

Usage: python benchmarks/distributed_ratios.py [--k 64] [--width 512] [--rows 4096] [--json out.json]
Wall ratios are what a user waits (they need two free cores); CPU ratios compare the work per rank, so
they show the cost of the split and the collectives even on a loaded machine (the load is printed).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pyrebasin as prb
from pyrebasin.distributed import shard_range
from pyrebasin.fileio import atomic_write


def _setup(args):
    torch.manual_seed(0)
    model = prb.zoo.MLP(64, args.width, 3, classes=10)
    state_a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    state_b = {k: v.detach().clone() for k, v in prb.zoo.MLP(64, args.width, 3, classes=10).state_dict().items()}
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(args.rows, 64, generator=g), torch.randint(0, 10, (args.rows,), generator=g)
    coef = prb.sample_coefficients(state_a, args.k, "uniform(-0.5, 1.5)", seed=3)
    torch.manual_seed(4)
    bn = prb.zoo.MLP(64, args.width, 3, classes=10, norm="bn")
    bn_a = {k: v.detach().clone() for k, v in bn.state_dict().items()}
    torch.manual_seed(5)
    bn_b = {k: v.detach().clone() for k, v in prb.zoo.MLP(64, args.width, 3, classes=10, norm="bn").state_dict().items()}
    return model, state_a, state_b, x, y, coef, (bn, bn_a, bn_b)


def _flows(args, group, rank, world):
    """{flow: (wall s, CPU s, result)}: best of args.repeat after one warm-up, ranks started together."""
    model, state_a, state_b, x, y, coef, (bn, bn_a, bn_b) = _setup(args)
    spec = model.permutation_spec()
    # each rank reads its own shard of the statistics data (data parallel), all of it in one process
    stat = x.repeat(args.stat_repeat, 1)
    rows = shard_range(len(stat), rank, world)
    calls = {
        "evaluate_combinations": lambda: prb.evaluate_combinations(
            model, state_a, state_b, coef, (x, y), chunk=args.chunk, batch_size=1024, group=group).loss,
        "activation_statistics": lambda: prb.activation_matching(
            model, model, spec, stat[rows.start:rows.stop], state_a=state_a, state_b=state_b, batch_size=1024,
            group=group).perms,
        "repair_statistics": lambda: prb.endpoint_stats(bn, bn_a, bn_b, stat[rows.start:rows.stop], batch_size=1024,
                                                        group=group).std_b,
        "weight_matching": lambda: prb.weight_matching(spec, state_a, state_b, group=group).perms,
    }
    out = {}
    for name, fn in calls.items():
        fn()
        best = (float("inf"), float("inf"), None)
        for _ in range(args.repeat):
            if group is not False:
                dist.barrier()
            t, c = time.perf_counter(), time.process_time()
            r = fn()
            best = min(best, (time.perf_counter() - t, time.process_time() - c, r), key=lambda b: b[0])
        out[name] = best
    out["cost_bytes"] = _cost_bytes(args, group)
    return out


def _cost_bytes(args, group) -> int:
    """Bytes weight matching's cost provider holds on this rank once every group it owns was built,
    for an MLP 64-width x depth in bf16 (as a large checkpoint would be: the float32 copies, unit
    matrices, constant and cached float64 costs), counted by storage (views of the inputs: nothing)."""
    from pyrebasin.matching.costs import WeightCosts
    states = []
    for seed in (6, 7):
        torch.manual_seed(seed)
        m = prb.zoo.MLP(64, args.width, args.mem_depth, classes=10)
        states.append({k: v.detach().to(torch.bfloat16) for k, v in m.state_dict().items()})
    spec, (a16, b16) = m.permutation_spec(), states
    costs = WeightCosts(spec, a16, b16, group=group)
    for p in costs.sizes:
        if costs.owns(p):
            costs.cost(p)
    seen, total = set(), 0
    held = [*costs.a.values(), *costs.b.values(), *(t.a_units for ts in costs.terms.values() for t in ts),
            *(c for c in costs.constant.values() if c is not None), *(c[0] for c in costs.cache.values())]
    for t in held:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def _worker(rank, world, port, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pyrebasin.matching import costs
    costs.SPLIT_MIN_BYTES = 0   # split by group although this MLP's costs are small (a large model's path)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results[rank] = _flows(args, None, rank, world)
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--stat-repeat", type=int, default=4, help="statistics data = rows x this")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mem-depth", type=int, default=8, help="hidden layers of the MLP of the memory figure")
    ap.add_argument("--json")
    args = ap.parse_args()
    load_before = os.getloadavg()
    torch.set_num_threads(1)
    single = _flows(args, False, 0, 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, port, args, results), nprocs=2, join=True)
        ranks = dict(results)
    report = {"cores": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
              "k": args.k, "chunk": args.chunk, "width": args.width, "rows": args.rows,
              "stat_rows": args.rows * args.stat_repeat, "flows": {}}
    print(f"{os.cpu_count()} cores, load average {load_before[0]:.1f} (before) {os.getloadavg()[0]:.1f} (after); "
          f"MLP 64-{args.width}x3-10, K={args.k} chunk={args.chunk}, {args.rows} eval rows, "
          f"{args.rows * args.stat_repeat} statistics rows")
    mem1, mem2 = single.pop("cost_bytes"), [ranks[r].pop("cost_bytes") for r in sorted(ranks)]
    report["weight_matching_cost_bytes"] = {"1x1": mem1, "per_rank_2x1": mem2, "ratio_max_rank": max(mem2) / mem1}
    print(f"weight matching cost memory (MLP 64-{args.width}x{args.mem_depth}, bf16): 1 process {mem1 / 2**20:.1f} MiB, ranks "
          f"{', '.join(f'{m / 2**20:.1f}' for m in mem2)} MiB (busiest rank {max(mem2) / mem1:.2f}x)")
    for name, (wall1, cpu1, r1) in single.items():
        wall2 = max(ranks[r][name][0] for r in ranks)   # the flow ends when its slowest rank does
        cpu2 = max(ranks[r][name][1] for r in ranks)
        same = all(_equal(ranks[r][name][2], r1) for r in ranks)
        report["flows"][name] = {"wall_1x1_s": wall1, "wall_2x1_s": wall2, "throughput_ratio": wall1 / wall2,
                                 "cpu_1x1_s": cpu1, "cpu_per_rank_2x1_s": cpu2, "cpu_ratio": cpu1 / cpu2,
                                 "same_result": same}
        print(f"{name}: 1x1 {wall1:.3f}s, 2x1 {wall2:.3f}s -> throughput {wall1 / wall2:.2f}x "
              f"(CPU per rank {cpu1 / cpu2:.2f}x); same result as one process: {same}")
    print(json.dumps(report, indent=1))
    if args.json:
        atomic_write(args.json, lambda tmp: _write_text(tmp, json.dumps(report, indent=1)))


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _equal(a, b) -> bool:
    """Bit for bit; float64 statistics summed in another order: to 1e-10 relative."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if a.dtype == torch.float64:
        return bool(torch.allclose(a, b, rtol=1e-10, atol=0))
    return torch.equal(a, b)


if __name__ == "__main__":
    main()
