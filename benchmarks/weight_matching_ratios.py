"""Weight matching speed and objective, measured in one run: pyrebasin's default matcher and its textbook
loop against our reference backend, the original Git Re-Basin code (JAX) and rebasin==0.0.47 (subprocesses).

    PYTHONPATH=$PWD python benchmarks/weight_matching_ratios.py [--threads 1] [--skip-textbook]
Peers: benchmarks/install_peers.sh for rebasin; for the original, a venv with jax + scipy (PEER_PYTHON, e.g.
python -m venv V && V/bin/pip install jax scipy) and the src/ dir of a samuela/git-re-basin checkout
(GIT_REBASIN_SRC). A peer's column is skipped, with a message, when it is not installed.
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
from pyrebasin.io import atomic_write_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIT_REBASIN_SRC = os.environ.get("GIT_REBASIN_SRC")
PEER_PYTHON = os.environ.get("PEER_PYTHON")
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


CPU = {}  # id(result) -> best CPU seconds of its timed() call (process time: robust to a loaded machine)


def timed(fn, repeat=1):
    best, cpu, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        best, cpu = min(best, time.perf_counter() - t), min(cpu, time.process_time() - c)
    CPU[id(out)] = cpu
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


def run_original(spec, a, b, threads):
    """The original Git Re-Basin weight_matching (JAX, group orders from PRNGKey(0)): (seconds, sweeps,
    perms) or (None, why)."""
    if not (GIT_REBASIN_SRC and PEER_PYTHON):
        return None, "original skipped: set GIT_REBASIN_SRC (its src/ dir) and PEER_PYTHON (a python with jax)"
    if any(not (e is None or isinstance(e, str)) for es in spec.axes_to_perm.values() for e in es):
        return None, "original skipped: the spec has Blocked axes (the original's spec format has none)"
    import numpy as np

    axes = {k: list(v) for k, v in spec.axes_to_perm.items() if k not in set(spec.fixed)}
    with tempfile.TemporaryDirectory() as tmp:
        pa, pb, pj = (os.path.join(tmp, n) for n in ("a.npz", "b.npz", "axes.json"))
        np.savez(pa, **{k: a[k].numpy() for k in axes})
        np.savez(pb, **{k: b[k].numpy() for k in axes})
        Path(pj).write_text(json.dumps(axes))
        flags = f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} intra_op_parallelism_threads={threads}"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
                   MKL_NUM_THREADS=str(threads), XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
        env.pop("PYTHONPATH", None)
        proc = subprocess.run([PEER_PYTHON, os.path.join(ROOT, "benchmarks", "_peer_gitrebasin.py"), GIT_REBASIN_SRC,
                               pj, pa, pb, "2"], env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return None, "original failed: " + proc.stderr.strip().splitlines()[-1][:200]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return res["match_s"], res["sweeps"], {k: torch.tensor(v) for k, v in res["perms"].items()}, res["match_cpu_s"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-textbook", action="store_true")
    ap.add_argument("--only", default=None, help="substring of a config name")
    ap.add_argument("--seeds", type=int, default=1, help="group-order seeds whose best objective is shown")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "weight_matching_ratios.json"))
    args = ap.parse_args()
    results = dict(threads=args.threads, torch=torch.__version__, default=prb.matching.METHODS["default"],
                   load_before=os.getloadavg(), configs={})
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads}  native={prb.native_available()}  LAP default={prb.matching.default_solver()}")
    for name, cfg in CONFIGS.items():
        if args.only and args.only not in name:
            continue
        spec, a, b = states(cfg)
        t_nat, r_nat = timed(lambda: prb.weight_matching(spec, a, b), repeat=2)
        t_tb, r_tb = timed(lambda: prb.weight_matching(spec, a, b, method="textbook"), repeat=2)
        with prb.use_backend("reference"):
            t_ref, r_ref = timed(lambda: prb.weight_matching(spec, a, b))
        rec = results["configs"][name] = dict(
            default=dict(wall_s=t_nat, cpu_s=CPU[id(r_nat)], sweeps=r_nat.iterations, objective=r_nat.objective[-1]),
            textbook=dict(wall_s=t_tb, cpu_s=CPU[id(r_tb)], sweeps=r_tb.iterations, objective=r_tb.objective[-1]))
        print(f"\n== {name}: {sum(len(v) for v in prb.identity_permutation(spec, a).values())} units in "
              f"{len(r_nat.perms)} perm groups; default = {prb.matching.METHODS['default']}")
        print(f"  pyrebasin default   {t_nat:8.3f} s  ({r_nat.iterations} sweeps)  objective {r_nat.objective[-1]:.6f}")
        print(f"  pyrebasin textbook  {t_tb:8.3f} s  ({r_tb.iterations} sweeps, {t_tb / r_tb.iterations:.4f} s/sweep)  "
              f"objective {r_tb.objective[-1]:.6f}")
        if args.seeds > 1:
            others = [prb.weight_matching(spec, a, b, seed=s, method="textbook").objective[-1] for s in range(1, args.seeds)]
            print(f"  (textbook, best objective over seeds 0..{args.seeds - 1}: {max([r_tb.objective[-1]] + others):.6f})")
        print(f"  reference backend   {t_ref:8.3f} s  ratio {t_ref / t_nat:6.2f}x            objective {r_ref.objective[-1]:.6f}")
        with prb.use_backend("native"):
            t_cold, _ = timed(lambda: prb.weight_matching(spec, a, b, method="textbook", warm_start=False))
            t_scipy, _ = timed(lambda: prb.weight_matching(spec, a, b, method="textbook", solver="scipy"))
        print(f"  LAP (textbook loop): jv cold {t_cold:.3f} s, scipy {t_scipy:.3f} s (warm jv {t_tb:.3f} s)")
        if not args.skip_textbook:
            sys.path.insert(0, ROOT)
            from tests.test_matching_weight import textbook_weight_matching

            t_tl, (p_tl, h_tl) = timed(lambda: textbook_weight_matching(spec, a, b))
            print(f"  test's textbook loop {t_tl:7.3f} s  ratio {t_tl / t_tb:6.2f}x textbook ({len(h_tl) - 1} sweeps) "
                  f"objective {h_tl[-1]:.6f}")
        orig = run_original(spec, a, b, args.threads)
        if orig[0] is None:
            print(f"  Git Re-Basin (JAX)  {orig[1]}")
        else:
            t_o, sw_o, p_o, c_o = orig
            obj_o = objective(spec, a, prb.apply_permutation(spec, p_o, b))
            c_nat, c_tb = CPU[id(r_nat)], CPU[id(r_tb)]
            rec["original"] = dict(wall_s=t_o, cpu_s=c_o, sweeps=sw_o, objective=obj_o, cpu_ratio_default=c_o / c_nat,
                                   wall_ratio_default=t_o / t_nat, cpu_ratio_textbook=c_o / c_tb)
            print(f"  Git Re-Basin (JAX)  {t_o:8.3f} s  ({sw_o} sweeps, {t_o / sw_o:.4f} s/sweep)  objective {obj_o:.6f}; "
                  f"ratio {t_o / t_nat:.2f}x default, {t_o / t_tb:.2f}x textbook "
                  f"(per sweep {(t_o / sw_o) / (t_tb / r_tb.iterations):.2f}x textbook); CPU time {c_o:.3f} s: "
                  f"{c_o / c_nat:.2f}x default ({c_nat:.3f} s), {c_o / c_tb:.2f}x textbook ({c_tb:.3f} s)")
        peer, why = run_peer(cfg, a, b, args.threads)
        if peer is None:
            print(f"  rebasin 0.0.47      {why}")
        else:
            obj = objective(spec, a, peer["state"])
            rec["rebasin_0.0.47"] = dict(wall_s=peer["match_s"], cpu_s=peer["match_cpu_s"], sweeps=peer["sweeps"],
                                         objective=obj, cpu_ratio_default=peer["match_cpu_s"] / CPU[id(r_nat)],
                                         wall_ratio_default=peer["match_s"] / t_nat,
                                         cpu_ratio_textbook=peer["match_cpu_s"] / CPU[id(r_tb)])

            def versus(ours):
                return f"{'same or better' if obj >= ours - 1e-6 * abs(obj) else 'LOWER'} than ours: {obj - ours:+.4g}"

            print(f"  rebasin 0.0.47      {peer['match_s']:8.3f} s  ratio {peer['match_s'] / t_nat:6.2f}x default, "
                  f"{peer['match_s'] / t_tb:.2f}x textbook ({peer['sweeps']} sweeps, {peer['match_s'] / peer['sweeps']:.4f} "
                  f"s/sweep; +{peer['init_s']:.2f} s graph tracing) objective {obj:.6f} (default: {versus(r_nat.objective[-1])}; "
                  f"textbook: {versus(r_tb.objective[-1])}); CPU time {peer['match_cpu_s'] / CPU[id(r_nat)]:.2f}x "
                  f"default, {peer['match_cpu_s'] / CPU[id(r_tb)]:.2f}x textbook")

    results["load_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(results, indent=1))
    print(f"\nwrote {args.out} (load {results['load_before'][0]:.1f} -> {results['load_after'][0]:.1f})")


if __name__ == "__main__":
    main()
