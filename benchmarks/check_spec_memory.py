"""Peak memory of `check_spec` on a locally built Hugging Face LLaMA (~110-230 MB, from a config; no
download), as a ratio to the model's bytes, in fp32 and bf16.

Each case runs in a fresh subprocess: build the model, trace its spec, then reset the kernel's peak-RSS
mark (/proc/self/clear_refs) and run `check_spec` (eval mode). Reported: `extra` = (peak RSS during
check_spec − RSS before it) / model bytes, and `total` = 1 + extra, the model itself included (the
target: total ≤ 2; a check that never writes the caller's weights needs one permuted copy, total ≥ 2).
`--tree DIR` also measures the pyrebasin of another checkout (e.g. the main branch) in the same run,
for a before/after ratio.

Usage: python benchmarks/check_spec_memory.py [--tree /work/main] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=12,
              num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64)


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def measure(dtype: str) -> dict:
    """One case, in this process (the subprocess side)."""
    import gc
    import time
    import warnings

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    import pyrebasin as prb
    logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).to(getattr(torch, dtype)).eval()
    ids = {"input_ids": torch.randint(0, CONFIG["vocab_size"], (2, 16)), "use_cache": False}  # older trees too
    spec = prb.trace_spec(model, ids)
    model_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    gc.collect()
    before = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak mark restarts from the current RSS
    t0 = time.process_time()
    report = prb.check_spec(model, spec, ids, modes=("eval",))
    cpu = time.process_time() - t0
    peak = _kib("VmHWM")
    return {"dtype": dtype, "model_mb": model_bytes / 2**20, "extra": (peak - before) / model_bytes,
            "total": 1 + (peak - before) / model_bytes, "max_abs_diff": report.max_abs_diff["eval"],
            "ok": report.ok, "check_cpu_s": cpu}


def run_case(tree: Path, dtype: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1")
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import check_spec_memory as m; "
            f"print(json.dumps(m.measure({dtype!r})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tree, capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        return {"dtype": dtype, "error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, help="also measure the pyrebasin of this checkout (before/after)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "check_spec_memory.json")
    args = ap.parse_args()
    trees = {"this tree": ROOT} | ({"other tree": args.tree} if args.tree else {})
    rows = []
    for label, tree in trees.items():
        for dtype in ("float32", "bfloat16"):
            rows.append({"tree": label, "path": str(tree)} | run_case(tree, dtype))
    load = os.getloadavg()[0]
    print(f"check_spec peak RSS / model bytes (LLaMA {CONFIG['hidden_size']}x{CONFIG['num_hidden_layers']}, "
          f"load {load:.2f})")
    print(f"{'tree':<12}{'dtype':<10}{'model MB':>9}{'extra':>8}{'total':>8}{'max|Δ|':>11}{'cpu s':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['tree']:<12}{r['dtype']:<10} error: {r['error']}")
            continue
        print(f"{r['tree']:<12}{r['dtype']:<10}{r['model_mb']:>9.1f}{r['extra']:>8.2f}{r['total']:>8.2f}"
              f"{r['max_abs_diff']:>11.2e}{r['check_cpu_s']:>7.1f}")
    sys.path.insert(0, str(ROOT))
    from pyrebasin.fileio import atomic_write_text
    atomic_write_text(args.json, json.dumps({"config": CONFIG, "load": load, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
