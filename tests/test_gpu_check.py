"""scripts/gpu_check.sh: the script parses, and its dry run (this CPU machine) skips the CUDA steps with
the reason, runs the selected CPU step and writes its one JSON report."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_dry_run_skips_cuda_steps_and_writes_the_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--only", "native_cpu", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CUDA steps skipped: --dry-run" in done.stdout
    report = json.loads(out.read_text())
    assert report["mode"] == "dry-run" and report["failed"] == []
    for step in ("build", "cuda_kernels", "tests_cuda"):
        assert report["steps"][step] == {"status": "skipped", "rc": None, "seconds": 0, "reason": "--dry-run"}
    cpu = report["steps"]["native_cpu"]
    assert cpu["status"] == "ok" and any(line.startswith("backend: ") for line in cpu["output_tail"])
    assert report["steps"]["evaluator_ratios"]["reason"] == "not selected (--only)"
