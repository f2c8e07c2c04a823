"""`pyrebasin align` on Hugging Face model directories: time, peak RSS / model bytes and recovery of a planted
permutation, on LLaMA pairs built locally from a config with random weights (no download).

    PYTHONPATH=$PWD python benchmarks/hf_align.py [--preset tiny|tinyllama|7b] [--layers N] [--only b|b_noisy]
        [--method default|textbook|...] [--work DIR] [--keep|--build-only|--reuse] [--log FILE]

For each preset: A (random bf16 weights, written shard by shard), B = A with a planted permutation, and
B' = A + noise (std `--noise` x each tensor's std), then the same permutation. Each pair is aligned in a
child process by `hf.align_hf` (what `pyrebasin align --a A --b B --out OUT` runs on directories); its peak
RSS is the child's ru_maxrss, its CPU time the child's user + system time; with `--log`, its progress bars
and a line a minute (elapsed, VmHWM, VmRSS, CPU time, load) go to that file, so a partial run still shows
the sweeps done and their times. Recovery: groups whose found
permutation is the planted one's inverse; for the planted pair also aligned weights bit-equal to A.
Writes benchmarks/results/hf_align_<preset>.json and prints a table. Needs 3x the model's bytes of disk.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

try:
    from ._hfdirs import write_dir
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from _hfdirs import write_dir

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {  # TinyLlama-1.1B and LLaMA-2-7B shapes (and a tiny one to try the script)
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=50, shard="60KB"),
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000, shard="1GB"),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000, shard="5GB"),
}


def build_pair(work: Path, preset: str, layers: int | None, noise: float, seed: int = 0,
               pairs: tuple = ("b", "b_noisy")):
    """A and those of B (planted) and B' (noisy) named in `pairs` under `work`, each tensor generated,
    permuted and written on its own (never a model in memory); returns (spec, planted perms, model bytes)."""
    from transformers import LlamaConfig

    from pyrebasin import hf
    from pyrebasin.shards import ShardedState, parse_size, shard_plan
    from pyrebasin.spec import apply_permutation, random_permutation

    shape = dict(PRESETS[preset])
    shard = parse_size(shape.pop("shard"))
    if layers is not None:
        shape["num_hidden_layers"] = layers
    config = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_config(config)
    meta = {k: torch.empty(v.shape, dtype=torch.bfloat16, device="meta") for k, v in model.state_dict().items()}
    plan = shard_plan(meta, shard)
    keys = list(meta)

    def init(k):
        g = torch.Generator().manual_seed(seed * 100003 + keys.index(k))
        shape = meta[k].shape
        t = 1.0 + 0.1 * torch.randn(shape, generator=g) if k.endswith("norm.weight") else \
            0.02 * torch.randn(shape, generator=g)
        return t.to(torch.bfloat16)

    write_dir(work / "a", config, meta, plan, init)
    spec, state_a = hf.load_hf_spec(work / "a")
    planted = random_permutation(spec, state_a.meta(), generator=torch.Generator().manual_seed(seed + 1))

    def permuted(k, t):
        sub = spec.restrict([k])
        return apply_permutation(sub, {p: planted[p] for p in sub.perm_to_axes}, {k: t})[k] if sub.perm_to_axes else t

    if "b" in pairs:
        write_dir(work / "b", config, meta, plan, lambda k: permuted(k, state_a[k]))

    def noisy(k):
        a = state_a[k].float()
        # its own stream: seeded like A's init (seed * 100003 + index at seed 0), the "noise" was A's
        # own draws and B' a rescaled A (earlier versions measured that pair; the CPU generator keeps
        # only a seed's low 32 bits, so an offset of 2**40 changed nothing)
        g = torch.Generator().manual_seed(1_000_000_007 + seed * 7919 + keys.index(k))
        return permuted(k, (a + noise * a.std() * torch.randn(a.shape, generator=g)).to(torch.bfloat16))

    if "b_noisy" in pairs:
        write_dir(work / "b_noisy", config, meta, plan, noisy)
    return spec, planted, ShardedState(work / "a").nbytes()


# What `pyrebasin align A B --out OUT` runs (hf.align_hf), with a method and the result's fields printed as JSON.
CHILD = """import json, sys, time
from pyrebasin import hf
a, b, out, perms, method, progress = sys.argv[1:]
t0 = time.perf_counter()
r = hf.align_hf(a, b, out, method=method, progress=progress == "1")
open(perms, "w").write(json.dumps({p: v.tolist() for p, v in r.perms.items()}))
print(json.dumps(dict(seconds=round(time.perf_counter() - t0, 2), sweeps=r.iterations, objective=r.objective,
                      phase_starts=r.phase_starts, certified=r.certified, bound=r.bound, stage=r.stage)))
"""


def _monitor(pid: int, log, stop: threading.Event, every: float = 60.0) -> None:
    """Every `every` s, one line in `log`: elapsed, the child's VmHWM / VmRSS and CPU time, the load."""
    t0, tick = time.perf_counter(), os.sysconf("SC_CLK_TCK")
    while not stop.wait(every):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return
        mem = {ln.split(":")[0]: int(ln.split()[1]) / 2**20 for ln in status.splitlines()
               if ln.startswith(("VmHWM", "VmRSS"))}
        cpu = (int(fields[11]) + int(fields[12])) / tick
        log.write(f"\n[monitor] {time.perf_counter() - t0:7.0f} s  VmHWM {mem.get('VmHWM', 0):.2f} GiB  "
                  f"VmRSS {mem.get('VmRSS', 0):.2f} GiB  cpu {cpu:.0f} s  load {os.getloadavg()[0]:.2f}\n")
        log.flush()


def align(work: Path, b: str, threads: int, method: str = "default", log: Path | None = None) -> dict:
    """`hf.align_hf` (the CLI's `align` on directories) in a child process; its wall and CPU time, peak RSS,
    the perms it found and its result's fields. With `log`, its progress bars and a memory/CPU line a minute go there."""
    out, perms = work / f"out_{b}_{os.getpid()}", work / f"perms_{b}_{os.getpid()}.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-c", CHILD, str(work / "a"), str(work / b), str(out), str(perms), method,
           "1" if log else "0"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "a") if log else tempfile.TemporaryFile("w+") as err:
        err.write(f"\n[align {b}, method {method}, load {os.getloadavg()[0]:.2f}, {time.ctime()}]\n")
        err.flush()
        child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        stop = threading.Event()
        watch = threading.Thread(target=_monitor, args=(child.pid, err, stop), daemon=True)
        if log:  # the child appends to the same file (O_APPEND), so the lines interleave whole
            watch.start()
        stdout, _ = child.communicate()
        stop.set()
        if log:
            watch.join()
        tail = ""
        if not log:
            err.seek(0)
            tail = err.read()[-2000:]
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.CompletedProcess(cmd, child.returncode, stdout, tail)
    if proc.returncode:
        raise RuntimeError(f"align failed ({proc.returncode}): {proc.stderr[-2000:] or f'see {log}'}")
    return dict(wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime,
                peak_rss=usage.ru_maxrss * 1024, result=json.loads(proc.stdout.strip().splitlines()[-1]),
                perms={p: torch.tensor(v) for p, v in json.loads(perms.read_text()).items()}, out=out)


def aligned_equals_a(work: Path, out: Path) -> bool:
    from pyrebasin.shards import ShardedState

    a, got = ShardedState(work / "a"), ShardedState(out)
    return set(a) == set(got) and all(torch.equal(a[k], got[k]) for k in a)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tinyllama")
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers (a quick run)")
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=None, help="folder for the model directories (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the model directories")
    ap.add_argument("--only", choices=("b", "b_noisy"), default=None, help="align only this pair")
    ap.add_argument("--reuse", action="store_true", help="reuse the model directories already under --work (kept)")
    ap.add_argument("--method", default="default", help="weight matching method (matching.weight.METHODS)")
    ap.add_argument("--build-only", action="store_true", help="build the pair under --work (kept) and stop")
    ap.add_argument("--log", default=None, help="append the aligner's progress and a memory line a minute here")
    args = ap.parse_args(argv)
    from pyrebasin.fileio import atomic_write_text

    work = Path(args.work or tempfile.mkdtemp(prefix="hf_align_"))
    try:
        t0 = time.perf_counter()
        pairs = ("b", "b_noisy") if args.only is None else (args.only,)
        if args.reuse and all((work / d / "config.json").is_file() for d in ("a",) + pairs):
            from pyrebasin import hf
            from pyrebasin.spec import random_permutation

            spec, state_a = hf.load_hf_spec(work / "a")  # the planted perms replayed from their seed
            planted = random_permutation(spec, state_a.meta(), generator=torch.Generator().manual_seed(1))
            model_bytes = state_a.nbytes()
        else:
            spec, planted, model_bytes = build_pair(work, args.preset, args.layers, args.noise, pairs=pairs)
        build_s = time.perf_counter() - t0
        inverse = {p: torch.argsort(v) for p, v in planted.items()}
        rows = {}
        print(f"built in {build_s:.0f} s", flush=True)
        if args.build_only:
            return 0
        for b in pairs:
            load = os.getloadavg()[0]
            r = align(work, b, args.threads, args.method, Path(args.log) if args.log else None)
            exact = sum(torch.equal(r["perms"][p], v) for p, v in inverse.items())
            rows[b] = dict(wall_s=round(r["wall_s"], 1), cpu_s=round(r["cpu_s"], 1), peak_rss_gib=r["peak_rss"] / 2**30,
                           rss_over_model=r["peak_rss"] / model_bytes, groups_exact=exact, groups=len(inverse),
                           load_before=load, load_after=os.getloadavg()[0], **r["result"])
            if b == "b":
                rows[b]["aligned_bit_equal_to_a"] = aligned_equals_a(work, r["out"])
            shutil.rmtree(r["out"])
        result = dict(preset=args.preset, layers=args.layers, noise=args.noise, threads=args.threads, method=args.method,
                      model_gib=model_bytes / 2**30, build_s=round(build_s, 1), runs=rows)
        name = f"hf_align_{args.preset}" + (f"_{args.layers}l" if args.layers else "") + \
            (f"_{args.only}" if args.only else "") + ("" if args.method == "default" else f"_{args.method}") + ".json"
        atomic_write_text(ROOT / "benchmarks" / "results" / name, json.dumps(result, indent=1))
        print(f"{args.preset} ({model_bytes / 2**30:.2f} GiB bf16 per model, built in {build_s:.0f} s)")
        print(f"{'pair':10} {'wall s':>8} {'cpu s':>8} {'peak GiB':>9} {'RSS/model':>9} {'exact':>8} {'load':>10}")
        for b, r in rows.items():
            print(f"{b:10} {r['wall_s']:8.1f} {r['cpu_s']:8.1f} {r['peak_rss_gib']:9.2f} {r['rss_over_model']:9.2f} "
                  f"{r['groups_exact']:>4}/{r['groups']:<3} {r['load_before']:4.1f}/{r['load_after']:4.1f}")
    finally:
        if not (args.keep or args.reuse or args.build_only):
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
