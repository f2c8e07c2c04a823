"""The staged solve of nested specs (pyrebasin/matching/staged.py) against the joint nested descent and the
shared subgroup alone, measured in one run.

HF LLaMAs from local configs (random init, GQA 8 query / 2 KV heads, the traced nested spec), B = A with a
planted *nested* perm (query heads and value dims drawn per KV group), and B' = A + noise x each
tensor's std with the same plant. Each pair is matched by weight matching (method "default",
nested = "staged" | "joint" | "shared") in memory and streamed from sharded safetensors directories
(`streamed_weight_matching`). Reported per run: wall and CPU seconds, the final objective, whether it
was certified and which stage ended it, and how many perms were recovered exactly.

    PYTHONPATH=$PWD python benchmarks/staged_matching.py [--sizes 512x4,1024x2] [--dtype float32|bfloat16]
        [--noise 0.3] [--where memory,streamed] [--out benchmarks/results/staged_matching.json]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

import pyrebasin as prb
from pyrebasin import hf, shards
from pyrebasin.fileio import atomic_write_text
from pyrebasin.matching.streamed import streamed_weight_matching

MODES = ("staged", "joint", "shared")


def llama(hidden, layers, dtype, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                                            num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                                            max_position_embeddings=32)).eval().to(dtype)


def noisy(state, scale, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {k: (v + scale * v.std() * torch.randn(v.shape, generator=g)).to(v.dtype)
            if v.is_floating_point() and v.numel() > 1 else v for k, v in state.items()}


def pairs(root: Path, noise: float, sizes, dtype):
    for size in sizes:
        model = llama(**size, dtype=dtype)
        d = root / f"h{size['hidden']}"
        model.save_pretrained(d / "a", max_shard_size="8MB")
        spec, _ = hf.load_hf_spec(d / "a")
        a = {k: v.detach().clone() for k, v in model.state_dict().items() if k in spec.axes_to_perm}
        planted = prb.random_permutation(spec, a, generator=torch.Generator().manual_seed(1))
        for name, b in (("planted", prb.apply_permutation(spec, planted, a)),
                        (f"noisy {noise:g}", prb.apply_permutation(spec, planted, noisy(a, noise)))):
            model.load_state_dict(b, strict=False)
            model.save_pretrained(d / name.replace(" ", "_"), max_shard_size="8MB")
            yield size, name, spec, a, b, d / "a", d / name.replace(" ", "_"), prb.invert_permutation(planted)


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--sizes", default="512x4,1024x2", help="hidden x layers, comma-separated")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--where", default="memory,streamed", help="memory and/or streamed, comma-separated")
    ap.add_argument("--out", default="benchmarks/results/staged_matching.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sizes = [dict(hidden=int(h), layers=int(n)) for h, n in (s.split("x") for s in args.sizes.split(","))]
        todo = list(pairs(Path(tmp), args.noise, sizes, getattr(torch, args.dtype)))
        wheres = args.where.split(",")
        bar = tqdm(total=len(todo) * len(MODES) * len(wheres), desc="staged matching")
        for size, name, spec, a, b, dir_a, dir_b, truth in todo:
            for mode in MODES:
                for where in wheres:
                    if where == "memory":
                        run = lambda: prb.weight_matching(spec, a, b, nested=mode)  # noqa: E731
                    else:
                        run = lambda: streamed_weight_matching(  # noqa: E731
                            spec, shards.ShardedState(dir_a), shards.ShardedState(dir_b), nested=mode)
                    res, wall, cpu = timed(run)
                    rows.append(dict(**size, pair=name, mode=mode, where=where, wall_s=round(wall, 3),
                                     cpu_s=round(cpu, 3), objective=res.objective[-1], bound=res.bound,
                                     certified=res.certified, stage=res.stage,
                                     exact=sum(torch.equal(res.perms[p], v) for p, v in truth.items()),
                                     perms=len(truth)))
                    bar.set_postfix(h=size["hidden"], pair=name, mode=mode, where=where, s=f"{wall:.1f}")
                    bar.update()
        bar.close()
    out = dict(load=os.getloadavg(), threads=torch.get_num_threads(), dtype=args.dtype, noise=args.noise, rows=rows)
    atomic_write_text(args.out, json.dumps(out, indent=1))
    for r in rows:
        print(f"h{r['hidden']} L{r['layers']} {r['pair']:10s} {r['mode']:7s} {r['where']:8s} {r['wall_s']:7.2f}s "
              f"cpu {r['cpu_s']:7.2f}s obj {r['objective']:.6f} cert {r['certified']!s:5s} {r['stage']:9s} "
              f"{r['exact']}/{r['perms']}")
    print("load", out["load"])


if __name__ == "__main__":
    main()
