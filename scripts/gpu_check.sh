#!/usr/bin/env bash
# GPU readiness in one go: build the extension with CUDA, run tests/cuda and the ratio benchmarks
# (permute_multi, corr_accumulate, combine_batched, lap_solve, evaluator_ratios --device cuda), and
# write one JSON of every step's status, time and results. Each step is time-boxed; the whole run
# stays under 8 minutes (steps are skipped, and say so, once the budget is spent).
#
# Usage: scripts/gpu_check.sh [--dry-run] [--out FILE] [--only STEP,STEP]
#   --dry-run  (automatic when torch has no CUDA or no GPU is visible) skip the CUDA steps with the
#              reason, and run the CPU parts at smoke sizes (the script, the tools and the JSON are checked)
#   --out      the JSON (default benchmarks/results/gpu_check.json), written atomically
#   --only     run only these steps (the others are recorded as not selected)
# Env: PYTHON (default: .venv/bin/python if present, else python3), BUDGET_S (default 460).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT="benchmarks/results/gpu_check.json"
DRY=0
ONLY=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    --only) ONLY=",$2,"; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (expected --dry-run, --out FILE, --only STEPS)" >&2; exit 2 ;;
  esac
  shift
done
BUDGET_S="${BUDGET_S:-460}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
T0=$(date +%s)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

probe="$("$PYTHON" -c 'import torch; print(torch.__version__, torch.version.cuda or "none", int(torch.cuda.is_available()))' 2>&1)" \
  || { echo "gpu_check.sh: $PYTHON cannot import torch: $probe" >&2; exit 2; }
read -r TORCH_V TORCH_CUDA HAVE_GPU <<<"$probe"
REASON=""
if [[ $DRY == 1 ]]; then REASON="--dry-run"
elif [[ $TORCH_CUDA == none ]]; then REASON="torch $TORCH_V has no CUDA (a CPU wheel)"
elif [[ $HAVE_GPU != 1 ]]; then REASON="torch $TORCH_V has CUDA $TORCH_CUDA but no GPU is visible"
fi
if [[ -n $REASON ]]; then
  DRY=1
  echo "== CUDA steps skipped: $REASON; running the CPU parts at smoke sizes"
fi

# step NAME TIMEOUT_S CMD...: run it time-boxed; record rc, seconds and the output tail
step() {
  local name=$1 limit=$2; shift 2
  if [[ -n $ONLY && $ONLY != *",$name,"* ]]; then
    printf '%s\tskipped\t0\tnot selected (--only)\n' "$name" >> "$WORK/steps.tsv"; return
  fi
  local used=$(( $(date +%s) - T0 ))
  if (( used + 5 > BUDGET_S )); then
    printf '%s\tskipped\t0\tbudget of %ss spent\n' "$name" "$BUDGET_S" >> "$WORK/steps.tsv"
    echo "== $name: skipped (budget spent)"; return
  fi
  (( limit > BUDGET_S - used )) && limit=$(( BUDGET_S - used ))
  echo "== $name (time box ${limit}s): $*"
  local t=$(date +%s)
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$WORK/$name.log"
  printf '%s\t%s\t%s\t\n' "$name" "$rc" "$(( $(date +%s) - t ))" >> "$WORK/steps.tsv"
}
skip() {
  printf '%s\tskipped\t0\t%s\n' "$1" "$REASON" >> "$WORK/steps.tsv"
  echo "== $1: skipped ($REASON)"
}

if [[ $DRY == 0 ]]; then
  step build 240 "$PYTHON" setup.py build_ext --inplace
  step cuda_kernels 30 "$PYTHON" -c 'from pyrebasin._backend import has_kernel as h; import sys
names = ["permute_multi", "corr_accumulate", "combine_batched"]
missing = [n for n in names if not h(n, "cuda")]
print("CUDA kernels:", {n: h(n, "cuda") for n in names}); sys.exit(1 if missing else 0)'
  step tests_cuda 90 "$PYTHON" -m pytest -q -p no:cacheprovider tests/cuda
  step permute_multi 30 "$PYTHON" benchmarks/permute_multi.py --repeat 5 --json "$WORK/permute_multi.json"
  step corr_accumulate 40 "$PYTHON" benchmarks/corr_accumulate.py --samples 20000 --units 512
  step combine_batched 30 "$PYTHON" benchmarks/combine_batched.py --k 64 --json "$WORK/combine_batched.json"
  step lap_solve 40 "$PYTHON" benchmarks/lap_solve.py --n 1024 --solves 2
  step evaluator_ratios 150 "$PYTHON" benchmarks/evaluator_ratios.py --device cuda --threads 2 \
    --json "$WORK/evaluator_ratios.json"
else
  for s in build cuda_kernels tests_cuda; do skip "$s"; done
  step native_cpu 20 "$PYTHON" -c 'import pyrebasin as prb; print("backend:", prb.backend())'
  step permute_multi 30 "$PYTHON" benchmarks/permute_multi.py --repeat 1 --json "$WORK/permute_multi.json"
  step corr_accumulate 40 "$PYTHON" benchmarks/corr_accumulate.py --samples 2000 --units 32 --batch 1000 --positions 4
  step combine_batched 30 "$PYTHON" benchmarks/combine_batched.py --k 4 --repeat 1 --json "$WORK/combine_batched.json"
  step lap_solve 30 "$PYTHON" benchmarks/lap_solve.py --n 64 --solves 1 --reference-n 16
  step evaluator_ratios 90 "$PYTHON" benchmarks/evaluator_ratios.py --device cpu --threads 1 --quick --repeat 1 \
    --cases vgg_bn_1d --json "$WORK/evaluator_ratios.json"
fi

"$PYTHON" - "$WORK" "$OUT" "$DRY" "$REASON" "$(( $(date +%s) - T0 ))" <<'PY'
import json, os, sys
work, out, dry, reason, total = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4], int(sys.argv[5])
import torch
from pyrebasin.fileio import atomic_write_text
steps = {}
for line in open(os.path.join(work, "steps.tsv")):
    name, rc, secs, why = (line.rstrip("\n").split("\t") + [""])[:4]
    entry = {"status": "skipped" if rc == "skipped" else ("ok" if rc == "0" else "failed"),
             "rc": None if rc == "skipped" else int(rc), "seconds": int(secs)}
    if rc == "skipped":
        entry["reason"] = why
    if rc == "124":
        entry["reason"] = "timed out"
    log = os.path.join(work, name + ".log")
    if os.path.exists(log):
        entry["output_tail"] = open(log, errors="replace").read().splitlines()[-25:]
    res = os.path.join(work, name + ".json")
    if os.path.exists(res):
        entry["result"] = json.load(open(res))
    steps[name] = entry
failed = [n for n, e in steps.items() if e["status"] == "failed"]
report = {"mode": "dry-run" if dry else "cuda", "skipped_because": reason or None, "torch": torch.__version__,
          "torch_cuda": torch.version.cuda,
          "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
          "total_seconds": total, "failed": failed, "steps": steps}
atomic_write_text(out, json.dumps(report, indent=1))
print(f"== wrote {out}: {len(steps)} steps, failed: {failed or 'none'}, {total}s")
sys.exit(1 if failed else 0)
PY
