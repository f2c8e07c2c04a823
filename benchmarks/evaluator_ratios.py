"""The batched evaluator on conv nets and the transformer, as ratios measured in one run per model:

evaluate_combinations (K combinations, neuron λ) vs (i) a loop of combine + load_state_dict + forward
per model, (ii) K forwards of one model (the floor of any per-model evaluation), (iii) the general
vmap(functional_call) path (with --vmap, timed once), and interpolate(ts=K) vs (ii); peak memory of
the batched call (RSS on CPU in a fresh process per model; CUDA max_memory_allocated) as a ratio to
one model's bytes and to the chunk's stacked parameters; the cost of RESET per combination (BN models).

Usage: python benchmarks/evaluator_ratios.py [--threads 2] [--device cpu|cuda] [--quick] [--cases vgg_bn,...]
       [--json benchmarks/results/evaluator_ratios.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

try:
    from ._timing import best_of_clocks
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from _timing import best_of_clocks

# name: (zoo arch, kwargs, input shape per example, K, N)
CASES = {
    "vgg_bn_1d": ("vgg", {"norm": "bn"}, (40,), 32, 1000),
    "resnet20x2_ln_1d": ("resnet20", {"norm": "ln", "width_multiplier": 2}, (40,), 32, 1000),
    "resnet20x2_bn_1d": ("resnet20", {"norm": "bn", "width_multiplier": 2}, (40,), 32, 1000),
    "resnet20_ln_2d": ("resnet20", {"norm": "ln", "conv_dim": 2, "in_channels": 3}, (3, 32, 32), 8, 256),
    "resnet20_bn_2d": ("resnet20", {"norm": "bn", "conv_dim": 2, "in_channels": 3}, (3, 32, 32), 8, 256),
    "transformer": ("transformer", {}, (40,), 32, 1000),
}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(name: str, device: str, repeat: int, quick: bool, with_vmap: bool) -> dict:
    import pyrebasin as prb
    from pyrebasin.combine import Combinations
    from pyrebasin.evaluation import evaluate
    from pyrebasin.repair import ResetCorrection

    arch, kwargs, shape, k, n = CASES[name]
    if quick:
        k, n = max(4, k // 4), max(64, n // 4)
    dev = torch.device(device)
    torch.manual_seed(0)
    model = prb.zoo.build(arch, **kwargs).eval().to(dev)
    a = {key: v.clone() for key, v in model.state_dict().items()}
    torch.manual_seed(1)
    b = {key: v.to(dev) for key, v in prb.zoo.build(arch, **kwargs).state_dict().items()}
    for key in a:   # BN statistics away from their init, so the normalisation does something
        if key.endswith("running_var"):
            a[key], b[key] = a[key] + torch.rand_like(a[key]), b[key] + torch.rand_like(b[key])
    x, y = torch.randn(n, *shape, device=dev), torch.randint(0, 10, (n,), device=dev)
    c = prb.sample_coefficients(model.permutation_spec(), k, "uniform", "neuron", seed=0, state=a)
    chunk = k
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    model_bytes = sum(v.numel() * v.element_size() for v in a.values() if v.is_floating_point())

    def timed(fn):
        def go():
            fn()
            sync()
        return best_of_clocks(go, repeat)

    base_rss = _rss()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base_cuda = torch.cuda.memory_allocated(dev)
    res = {}
    ours = timed(lambda: res.setdefault("r", prb.evaluate_combinations(model, a, b, c, (x, y), chunk=chunk,
                                                                       batch_size=None)))
    peak = (torch.cuda.max_memory_allocated(dev) - base_cuda) if dev.type == "cuda" else _peak() - base_rss
    probe = prb.zoo.build(arch, **kwargs).eval().to(dev)

    def loop():
        with torch.no_grad():
            for i in range(k):
                one = {key: v[0] for key, v in prb.combine_states(a, b, c, i, i + 1).items()}
                probe.load_state_dict(one | {key: v for key, v in a.items() if not v.is_floating_point()})
                torch.nn.functional.cross_entropy(probe(x), y).item()

    def k_forwards():
        with torch.no_grad():
            for _ in range(k):
                torch.nn.functional.cross_entropy(model(x), y).item()

    t_loop = timed(loop)
    t_floor = timed(k_forwards)
    src = Combinations(a, b, c)
    t_vmap = (None, None)
    if with_vmap:   # the general path, once (it is the slow one)
        t = time.perf_counter()
        evaluate(model, src, (x, y), chunk=chunk, batch_size=None, fast_path=False, use_vmap=True)
        sync()
        t_vmap = (time.perf_counter() - t, None)
    t_interp = timed(lambda: prb.interpolate(model, a, b, (x, y), k, chunk=chunk, batch_size=None))
    out = {"K": k, "N": n, "chunk": chunk, "model_bytes": model_bytes,
           "seconds": ours[0], "cpu_seconds": ours[1], "loop_s": t_loop[0], "k_forwards_s": t_floor[0],
           "vmap_s": t_vmap[0], "interpolate_s": t_interp[0],
           "speedup_vs_loop": t_loop[0] / ours[0], "cpu_speedup_vs_loop": t_loop[1] / ours[1],
           "ratio_to_k_forwards": ours[0] / t_floor[0], "cpu_ratio_to_k_forwards": ours[1] / t_floor[1],
           "speedup_vs_vmap": t_vmap[0] and t_vmap[0] / ours[0],
           "interpolate_ratio_to_k_forwards": t_interp[0] / t_floor[0],
           "peak_memory_bytes": peak, "peak_over_model_bytes": peak / model_bytes,
           "peak_over_chunk_param_bytes": peak / res["r"].chunk_param_bytes}
    if "bn" in name:   # RESET per combination: statistics recomputed on 256 inputs for each of 4 combinations
        few = prb.sample_coefficients(model.permutation_spec(), 4, "uniform", "neuron", seed=0, state=a)
        fix = ResetCorrection(model, (x[:256], y[:256]), batch_size=256)
        plain = timed(lambda: prb.evaluate_combinations(model, a, b, few, (x, y), chunk=4, batch_size=None))
        reset = timed(lambda: prb.evaluate_combinations(model, a, b, few, (x, y), chunk=4, batch_size=None,
                                                        correction=fix))
        fast = ResetCorrection(model, (x[:256], y[:256]), batch_size=256, batched=True)   # one engine pass a chunk
        batched = timed(lambda: prb.evaluate_combinations(model, a, b, few, (x, y), chunk=4, batch_size=None,
                                                          correction=fast))
        out["reset"] = {"K": 4, "stat_rows": 256, "plain_s": plain[0], "reset_s": reset[0],
                        "reset_cost_per_combination_s": (reset[0] - plain[0]) / 4,
                        "reset_over_plain": reset[0] / plain[0], "batched_reset_s": batched[0],
                        "batched_reset_over_plain": batched[0] / plain[0],
                        "batched_reset_checked": fast.checked}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="K/4 and N/4: a smoke run")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--json", default=None, help="write the results here (atomically)")
    p.add_argument("--vmap", action="store_true", help="also time the general vmap(functional_call) path (once)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:   # one case in a fresh process: its peak RSS is its own
        print(json.dumps(run_case(args.child, args.device, args.repeat, args.quick, args.vmap)))
        return
    names = [s for s in args.cases.split(",") if s]
    bad = [s for s in names if s not in CASES]
    if bad:
        raise SystemExit(f"unknown --cases {bad}; expected some of {sorted(CASES)}")
    result = {"threads": args.threads, "device": args.device, "load_before": os.getloadavg(), "cases": {}}
    for name in names:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--threads", str(args.threads),
               "--repeat", str(args.repeat), "--device", args.device]
        cmd += (["--quick"] if args.quick else []) + (["--vmap"] if args.vmap else [])
        t = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            result["cases"][name] = {"error": done.stderr.strip().splitlines()[-1:]}
        else:
            result["cases"][name] = json.loads(done.stdout.strip().splitlines()[-1])
        result["cases"][name]["wall_s"] = time.perf_counter() - t
        r = result["cases"][name]
        if "error" in r:
            print(f"{name:18s} error: {r['error']}", flush=True)
        else:
            print(f"{name:18s} K={r['K']:3d} N={r['N']:5d}  {r['seconds']:.3f}s  vs loop {r['speedup_vs_loop']:.2f}x "
                  f"faster (cpu {r['cpu_speedup_vs_loop']:.2f}x)  vs K forwards {r['ratio_to_k_forwards']:.2f}x "
                  f"(cpu {r['cpu_ratio_to_k_forwards']:.2f}x)  "
                  + (f"vs vmap {r['speedup_vs_vmap']:.1f}x faster  " if r["speedup_vs_vmap"] else "")
                  + f"interpolate/K-fwd {r['interpolate_ratio_to_k_forwards']:.2f}x  peak "
                  f"{r['peak_memory_bytes'] / 2**20:.0f} MiB ({r['peak_over_chunk_param_bytes']:.1f}x chunk params)"
                  + (f"  RESET {r['reset']['reset_over_plain']:.1f}x plain (batched "
                     f"{r['reset']['batched_reset_over_plain']:.1f}x)" if "reset" in r else ""), flush=True)
    result["load_after"] = os.getloadavg()
    if args.json:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from pyrebasin.fileio import atomic_write_text
        atomic_write_text(args.json, json.dumps(result, indent=1))
    print(json.dumps({"load_before": result["load_before"], "load_after": result["load_after"]}))


if __name__ == "__main__":
    main()
