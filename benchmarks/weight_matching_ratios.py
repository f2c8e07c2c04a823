"""Weight matching speed and objective, measured in one run: pyrebasin (native backend) against our
reference backend, the textbook Git Re-Basin loop, and the peer rebasin==0.0.47 (in a subprocess).

    PYTHONPATH=$PWD python benchmarks/weight_matching_ratios.py [--threads 1] [--skip-textbook]
Peer: benchmarks/install_peers.sh (its column is skipped, with a message, when it is not installed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import pyrebasin as prb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_DIR = os.environ.get("PYREBASIN_PEER_DIR", str(Path(__file__).resolve().parents[1] / ".venv-rebasin" / "site"))

CONFIGS = {
    "mlp 40-512x3 (mnist1d-trained)": dict(arch="mlp", kwargs={}, input_shape=[2, 40], trained=10),
    "mlp 784-512-512-10": dict(arch="mlp", kwargs=dict(in_features=784, width=512, depth=2, classes=10),
                               input_shape=[2, 784]),
    "mlp 784-2048x3-10": dict(arch="mlp", kwargs=dict(in_features=784, width=2048, depth=3, classes=10),
                              input_shape=[2, 784]),
    "resnet20x4 (2-D, bn)": dict(arch="resnet20", kwargs=dict(width_multiplier=4, conv_dim=2, in_channels=3),
                                 input_shape=[2, 3, 32, 32]),
}


def states(cfg):
    if cfg.get("trained"):
        from pyrebasin.train import TrainConfig

        out = [prb.train.train_zoo(cfg["arch"], seed=s, config=TrainConfig(epochs=cfg["trained"]), progress=False,
                                   **cfg["kwargs"]) for s in (0, 1)]
        return out[0][0].permutation_spec(), out[0][1], out[1][1]
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = prb.zoo.build(cfg["arch"], **cfg["kwargs"])
        out.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return model.permutation_spec(), out[0], out[1]


def objective(spec, a, b):
    return sum(float(torch.dot(a[k].double().reshape(-1), b[k].double().reshape(-1)))
               for k in a if k not in spec.fixed)


def timed(fn, repeat=1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def run_peer(cfg, a, b, threads):
    if not os.path.isdir(os.path.join(PEER_DIR, "rebasin")):
        return None, f"peer skipped: rebasin not installed in {PEER_DIR} (run benchmarks/install_peers.sh)"
    with tempfile.TemporaryDirectory() as tmp:
        pa, pb, out = (os.path.join(tmp, n) for n in ("a.safetensors", "b.safetensors", "out.safetensors"))
        save_file({k: v.contiguous() for k, v in a.items()}, pa)
        save_file({k: v.contiguous() for k, v in b.items()}, pb)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([PEER_DIR, ROOT]), OMP_NUM_THREADS=str(threads))
        arg = json.dumps({k: v for k, v in {**cfg, "threads": threads}.items() if k != "trained"})
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "_peer_rebasin.py"), arg, pa, pb, out],
                              env=env, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            return None, "peer failed: " + proc.stderr.strip().splitlines()[-1][:200]
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        from safetensors.torch import load_file
        res["state"] = load_file(out)
        return res, None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-textbook", action="store_true")
    ap.add_argument("--only", default=None, help="substring of a config name")
    ap.add_argument("--seeds", type=int, default=1, help="group-order seeds whose best objective is shown")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads}  native={prb.native_available()}  LAP default={prb.matching.default_solver()}")
    for name, cfg in CONFIGS.items():
        if args.only and args.only not in name:
            continue
        spec, a, b = states(cfg)
        t_nat, r_nat = timed(lambda: prb.weight_matching(spec, a, b), repeat=2)
        with prb.use_backend("reference"):
            t_ref, r_ref = timed(lambda: prb.weight_matching(spec, a, b))
        sweeps = r_nat.iterations
        print(f"\n== {name}: {sum(len(v) for v in prb.identity_permutation(spec, a).values())} units in "
              f"{len(r_nat.perms)} perm groups, {sweeps} sweeps")
        print(f"  pyrebasin native    {t_nat:8.3f} s  ({t_nat / sweeps:.4f} s/sweep)  objective {r_nat.objective[-1]:.6f}")
        if args.seeds > 1:
            others = [prb.weight_matching(spec, a, b, seed=s).objective[-1] for s in range(1, args.seeds)]
            print(f"  (best objective over seeds 0..{args.seeds - 1}: {max([r_nat.objective[-1]] + others):.6f})")
        sched = prb.matching.weight.COUPLING_SCHEDULE
        t_sch, r_sch = timed(lambda: prb.weight_matching(spec, a, b, schedule=sched), repeat=2)
        print(f"  schedule {sched}  {t_sch:8.3f} s  ({r_sch.iterations} sweeps)           objective {r_sch.objective[-1]:.6f}")
        print(f"  reference backend   {t_ref:8.3f} s  ratio {t_ref / t_nat:6.2f}x            objective {r_ref.objective[-1]:.6f}")
        with prb.use_backend("native"):
            t_cold, _ = timed(lambda: prb.weight_matching(spec, a, b, warm_start=False))
            t_scipy, _ = timed(lambda: prb.weight_matching(spec, a, b, solver="scipy"))
        print(f"  LAP: jv cold {t_cold:.3f} s, scipy {t_scipy:.3f} s (whole matching; warm jv {t_nat:.3f} s)")
        if not args.skip_textbook:
            sys.path.insert(0, ROOT)
            from tests.test_matching_weight import textbook_weight_matching

            t_tb, (p_tb, h_tb) = timed(lambda: textbook_weight_matching(spec, a, b))
            print(f"  textbook loop       {t_tb:8.3f} s  ratio {t_tb / t_nat:6.2f}x  ({len(h_tb) - 1} sweeps) "
                  f"objective {h_tb[-1]:.6f}")
        peer, why = run_peer(cfg, a, b, args.threads)
        if peer is None:
            print(f"  rebasin 0.0.47      {why}")
        else:
            obj = objective(spec, a, peer["state"])

            def versus(ours):
                return f"{'same or better' if obj >= ours - 1e-6 * abs(obj) else 'LOWER'} than ours: {obj - ours:+.4g}"

            print(f"  rebasin 0.0.47      {peer['match_s']:8.3f} s  ratio {peer['match_s'] / t_nat:6.2f}x default, "
                  f"{peer['match_s'] / t_sch:.2f}x schedule ({peer['sweeps']} sweeps, {peer['match_s'] / peer['sweeps']:.4f} "
                  f"s/sweep; +{peer['init_s']:.2f} s graph tracing) objective {obj:.6f} (default: {versus(r_nat.objective[-1])}; "
                  f"schedule: {versus(r_sch.objective[-1])})")


if __name__ == "__main__":
    main()
