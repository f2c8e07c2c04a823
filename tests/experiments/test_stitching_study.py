"""`pyrebasin stitch` end to end and the study's argument checks; its real-data claims over several seed
pairs live in tests/claims/test_stitching_study.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

import pyrebasin as prb


def check_png(path: Path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert img[..., :3].std() > 0.05  # something is drawn


def test_the_demo_finds_the_section():
    from pyrebasin.experiments import demo

    assert "stitching" in [demo.section_key(f) for f in demo.sections()]


def test_study_rejects_unknown_configs():
    with pytest.raises(ValueError, match="'affine', 'magic'"):
        prb.experiments.stitching("mlp", configs=(("affine", "magic"),), progress=False)


@pytest.mark.slow
def test_cli_writes_json_markdown_and_png(tmp_path):
    out = tmp_path / "stitch"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(prb.__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "pyrebasin.cli", "stitch", "--width", "128", "--depth", "3", "--epochs", "10",
           "--configs", "affine:least_squares", "semi_match:least_squares", "--layers", "norms.1", "norms.2",
           "--stitch-epochs", "1", "--no-progress", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    d = json.loads((out / "stitching.json").read_text())
    assert d["layers"] == ["norms.1", "norms.2"] and d["seeds"] == [0, 1]
    assert {(r["kind"], r["init"]) for r in d["rows"]} == {("affine", "least_squares"), ("semi_match", "least_squares")}
    assert all(0 <= r["relative_accuracy"] <= 1.5 for r in d["rows"])
    assert "norms.2" in (out / "stitching.md").read_text()
    check_png(out / "stitching.png")
    bad = subprocess.run(cmd[:4] + ["--configs", "affine"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "KIND:INIT" in bad.stderr
