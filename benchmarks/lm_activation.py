"""Activation matching of a TinyLlama-shaped causal LM (random bf16 weights built locally from a config;
B = A with a planted permutation) on token batches: peak RSS as a ratio to the model's bytes, time,
recovery, for float64 / float32 moments under a memory budget.

    PYTHONPATH=$PWD python benchmarks/lm_activation.py                      # 1.1B, 8192 tokens, 1 GiB
    PYTHONPATH=$PWD python benchmarks/lm_activation.py --small --compare    # seconds; f32 vs f64 too
    PYTHONPATH=$PWD python benchmarks/lm_activation.py --dirs               # model directories, streamed
    PYTHONPATH=$PWD python benchmarks/lm_activation.py --dirs --layers 2    # a smoke run of that

Writes benchmarks/results/lm_activation[_small].json (atomically) and prints a table. Peak RSS is
`resource.getrusage(RUSAGE_SELF).ru_maxrss`, so run one configuration per process.

`--dirs`: A and B = A with a planted permutation written as sharded model directories (random bf16
weights, matrices N(0, 0.02^2), norms 1 + N(0, 0.1^2), one tensor in memory at a time), then
`pyrebasin align --a A --b B --out OUT --method activation --data ids.pt` in a child process, both
models run as streamed forwards (weights read module by module from the shards): the child's peak
RSS (ru_maxrss), wall and CPU time, groups recovered, aligned B bit-equal to A. Writes
benchmarks/results/lm_activation_dirs[_<N>l].json.
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
import time
import warnings
from pathlib import Path

import torch

import pyrebasin as prb
from pyrebasin.fileio import atomic_write_text
from pyrebasin.shards import shard_plan

try:
    from ._hfdirs import write_dir
except ImportError:  # run as a script: benchmarks/ is on sys.path
    from _hfdirs import write_dir

TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
SMALL = dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux


def build(config: dict, seed: int):
    """A LLaMA in bf16 straight away (no fp32 copy), its spec traced on the meta device, B = A permuted."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()
    cfg = LlamaConfig(**config, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with torch.device("meta"):
        meta = LlamaForCausalLM(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = prb.trace_spec(meta, {"input_ids": torch.zeros(1, 8, dtype=torch.long, device="meta"),
                                     "use_cache": False})
    del meta
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(default)
    state_a = dict(model.state_dict())
    planted = prb.random_permutation(spec, state_a, generator=seed + 1)
    state_b = prb.apply_permutation(spec, planted, state_a)
    return model, spec, state_b, prb.invert_permutation(planted)


def compare_dtypes(model, spec, state_b, ids, batch) -> dict:
    """Correlations of float32 shifted moments against float64 at every site of the model (small config)."""
    from pyrebasin.matching.activation_stats import find_sites, model_forward, site_view
    from pyrebasin.moments import CrossMoments
    sites = find_sites(model, spec)
    moments = {s: (CrossMoments(1), CrossMoments(1, dtype=torch.float32)) for s in []}
    acts = {}
    handles = []
    for s in sites:
        mod = model.get_submodule(s.module)
        if s.where == "in":
            handles.append(mod.register_forward_pre_hook(lambda m, a, s=s: acts.__setitem__(s, a[0])))
        else:
            handles.append(mod.register_forward_hook(lambda m, a, o, s=s: acts.__setitem__(s, o)))
    worst = 0.0
    try:
        with torch.no_grad():
            for i in range(0, len(ids), batch):
                model_forward(model, dict(model.state_dict()), {"input_ids": ids[i:i + batch]}, {"use_cache": False})
                for s, t in acts.items():
                    v, cd = site_view(t, s)
                    if s not in moments:
                        moments[s] = (CrossMoments(v.shape[cd]), CrossMoments(v.shape[cd], dtype=torch.float32))
                    moments[s][0].update(v, channel_dim=cd)
                    moments[s][1].update(v, channel_dim=cd)
    finally:
        for h in handles:
            h.remove()
    for m64, m32 in moments.values():
        worst = max(worst, float((m32.corr().double() - m64.corr()).abs().max()))
    return {"sites": len(moments), "max_abs_corr_diff_f32_vs_f64": worst}


def build_dirs(work: Path, config: dict, seed: int = 0):
    """Directories A and B = π(A) under `work`; returns (planted perms, model bytes)."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.utils import logging

    from pyrebasin import hf
    logging.set_verbosity_error()
    cfg = LlamaConfig(**config, tie_word_embeddings=False, dtype="bfloat16", bos_token_id=0, eos_token_id=0,
                      pad_token_id=0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    meta = {k: torch.empty(v.shape, dtype=torch.bfloat16, device="meta") for k, v in model.state_dict().items()}
    keys = list(meta)

    def init(k):
        g = torch.Generator().manual_seed(seed * 100003 + keys.index(k))
        t = 1.0 + 0.1 * torch.randn(meta[k].shape, generator=g) if k.endswith("norm.weight") else \
            0.02 * torch.randn(meta[k].shape, generator=g)
        return t.to(torch.bfloat16)

    write_dir(work / "a", cfg, meta, shard_plan(meta, 10**9), init)
    spec, state_a = hf.load_hf_spec(work / "a")
    planted = prb.random_permutation(spec, state_a.meta(), generator=torch.Generator().manual_seed(seed + 1))

    def permuted(k):
        sub = spec.restrict([k])
        t = state_a[k]
        return prb.apply_permutation(sub, {p: planted[p] for p in sub.perm_to_axes}, {k: t})[k] \
            if sub.perm_to_axes else t

    write_dir(work / "b", cfg, meta, shard_plan(meta, 10**9), permuted)
    return planted, state_a.nbytes()


def run_dirs(args, config: dict) -> None:
    """The planted pair as model directories, aligned by the CLI (streamed forwards) in a child process."""
    from pyrebasin.shards import ShardedState

    if args.layers is not None:
        config = dict(config, num_hidden_layers=args.layers)
    work = Path(args.work or tempfile.mkdtemp(prefix="lm_activation_dirs_"))
    try:
        t0 = time.perf_counter()
        planted, model_bytes = build_dirs(work, config)
        build_s = time.perf_counter() - t0
        ids = torch.randint(0, config["vocab_size"], (args.tokens // args.seq_len, args.seq_len),
                            generator=torch.Generator().manual_seed(0))
        torch.save(ids, work / "ids.pt")
        out, perms = work / "out", work / "perms.json"
        budget = f"{int(args.max_memory_mib)}MiB"
        cmd = [sys.executable, "-m", "pyrebasin.cli", "align", "--a", str(work / "a"), "--b", str(work / "b"),
               "--out", str(out), "--method", "activation", "--data", str(work / "ids.pt"), "--seq-len",
               str(args.seq_len), "--batch-tokens", str(args.batch * args.seq_len), "--max-memory", budget,
               "--moments", args.dtype, "--perms", str(perms), "--no-progress"]
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS=str(args.threads))
        load_before = os.getloadavg()
        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        w0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - w0
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode:
            raise RuntimeError(f"align failed ({proc.returncode}): {proc.stderr[-3000:]}")
        found = {p: torch.tensor(v) for p, v in json.loads(perms.read_text()).items()}
        exact = sum(torch.equal(found[p], torch.argsort(v)) for p, v in planted.items())
        a, got = ShardedState(work / "a"), ShardedState(out)
        bit_equal = set(a) == set(got) and all(torch.equal(a[k], got[k]) for k in a)
        gib, peak = model_bytes / 2**30, usage.ru_maxrss / 2**20
        budget_gib = args.max_memory_mib / 1024
        row = {"config": ("small" if args.small else "tinyllama-1.1b") + (f"-{args.layers}l" if args.layers else ""),
               "mode": "model directories, streamed forwards (CLI child process)", "model_gib": gib,
               "tokens": int(ids.numel()), "batch_tokens": args.batch * args.seq_len, "dtype": args.dtype,
               "max_memory_gib": budget_gib, "threads": args.threads, "peak_rss_gib": peak,
               "peak_over_one_model": peak / gib, "target_gib": 1.5 * gib + budget_gib,
               "peak_minus_budget_over_one_model": (peak - budget_gib) / gib,
               "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime - c0.ru_utime - c0.ru_stime,
               "build_s": build_s, "groups": len(planted), "groups_exact": exact, "aligned_bit_equal_to_a": bit_equal,
               "cli": proc.stdout.strip(), "load_before": load_before, "load_after": os.getloadavg()}
        name = "lm_activation_dirs" + ("_small" if args.small else "") + (f"_{args.layers}l" if args.layers else "")
        dest = Path(args.out or Path(__file__).parent / "results" / f"{name}.json")
        atomic_write_text(dest, json.dumps(row, indent=2) + "\n")
        print(f"{row['config']}: {gib:.2f} GiB/model, {row['tokens']} tokens, peak {peak:.2f} GiB = "
              f"{row['peak_over_one_model']:.2f}x one model (target {row['target_gib']:.2f} GiB), wall {wall:.0f} s, "
              f"cpu {row['cpu_s']:.0f} s, {exact}/{len(planted)} groups, bit-equal {bit_equal}; load "
              f"{load_before[0]:.1f} -> {row['load_after'][0]:.1f} -> {dest}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a 4-layer, 128-wide LLaMA (seconds)")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4, help="sequences per batch")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--max-memory-mib", type=float, default=1024.0, help="moments budget (0 = unbounded)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--compare", action="store_true", help="also measure float32 vs float64 correlations")
    ap.add_argument("--out", default=None)
    ap.add_argument("--dirs", action="store_true", help="model directories aligned by the CLI, streamed forwards")
    ap.add_argument("--layers", type=int, default=None, help="--dirs: override the number of layers (a smoke run)")
    ap.add_argument("--work", default=None, help="--dirs: folder for the model directories (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="--dirs: keep the model directories")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = SMALL if args.small else TINYLLAMA
    if args.dirs:
        return run_dirs(args, config)
    t0 = time.perf_counter()
    model, spec, state_b, inverse = build(config, seed=0)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    built_s, rss_built = time.perf_counter() - t0, rss_gib()
    ids = torch.randint(0, config["vocab_size"], (args.tokens // args.seq_len, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    budget = None if args.max_memory_mib <= 0 else int(args.max_memory_mib * 2**20)
    dtype = getattr(torch, args.dtype)
    c0, w0 = time.process_time(), time.perf_counter()
    result = prb.activation_matching(model, model, spec, ids, state_b=state_b, batch_size=args.batch, dtype=dtype,
                                     max_memory=budget, progress=True)
    cpu_s, wall_s = time.process_time() - c0, time.perf_counter() - w0
    peak = rss_gib()
    exact = sum(bool(torch.equal(result.perms[p], inverse[p])) for p in inverse)
    gib = model_bytes / 2**30
    budget_gib = (budget or 0) / 2**30
    row = {"config": "small" if args.small else "tinyllama-1.1b", "params": sum(t.numel() for t in model.parameters()),
           "model_gib": gib, "tokens": int(ids.numel()), "batch_tokens": args.batch * args.seq_len,
           "dtype": args.dtype, "max_memory_gib": budget_gib or None, "threads": args.threads,
           "peak_rss_gib": peak, "rss_after_build_gib": rss_built,
           "peak_over_one_model": peak / gib, "peak_over_two_models": peak / (2 * gib),
           "peak_minus_budget_over_two_models": (peak - budget_gib) / (2 * gib),
           "match_wall_s": wall_s, "match_cpu_s": cpu_s, "build_s": built_s,
           "groups": len(inverse), "groups_exact": exact, "objective": result.objective[-1],
           "load_avg": os.getloadavg()}
    if args.compare:
        row["dtype_check"] = compare_dtypes(model, spec, state_b, ids, args.batch)
    out = Path(args.out or Path(__file__).parent / "results" / f"lm_activation{'_small' if args.small else ''}.json")
    atomic_write_text(out, json.dumps(row, indent=2) + "\n")
    print(f"{'config':<16}{'GiB':>6}{'tokens':>8}{'dtype':>9}{'budget':>8}{'peak':>7}{'/1 model':>10}"
          f"{'/2 models':>10}{'wall s':>8}{'exact':>9}")
    print(f"{row['config']:<16}{gib:>6.2f}{row['tokens']:>8}{args.dtype:>9}{budget_gib:>8.2f}{peak:>7.2f}"
          f"{row['peak_over_one_model']:>10.2f}{row['peak_over_two_models']:>10.2f}{wall_s:>8.1f}"
          f"{exact:>5}/{len(inverse)}")
    if "dtype_check" in row:
        print("float32 vs float64 correlations:", row["dtype_check"])
    print("load average:", row["load_avg"], "->", out)


if __name__ == "__main__":
    main()
