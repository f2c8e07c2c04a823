"""prb.experiments.stitching on mnist1d MLPs (cached), its report section, and `pyrebasin stitch`."""
import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

import pyrebasin as prb

ARCH = dict(width=128, depth=3, train_config=prb.train.TrainConfig(epochs=10))


@pytest.fixture(scope="module")
def study():
    return prb.experiments.stitching(
        "mlp", seeds=(0, 1), configs=(("affine", "least_squares"), ("affine", "identity"),
                                      ("permutation", "least_squares")),
        stitch_epochs=1, progress=False, **ARCH)


def check_png(path: Path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert img[..., :3].std() > 0.05  # something is drawn


@pytest.mark.slow
def test_study_least_squares_keeps_accuracy_identity_does_not(study):
    assert study.layers == ["norms.0", "norms.1", "norms.2"]
    assert len(study.rows) == 3 * 3 * 2
    ls = study.relative_accuracy("affine", "least_squares", trained=True)
    ident0 = study.relative_accuracy("affine", "identity", trained=False)
    assert min(ls) > 0.9, ls
    assert max(ident0) < 0.5, ident0
    assert all(0.3 < study.cka[l] <= 1.0 and 0 < study.cca[l] <= 1.0 and 0.5 < study.r2[l] <= 1.0 for l in study.layers)
    assert 0.4 < study.accuracy_end < 1
    table = study.table()
    assert table.count("\n") == 2 + len(study.layers) - 1 and "`norms.1`" in table and "→" in table
    back = prb.experiments.StitchingStudy.from_dict(json.loads(json.dumps(study.to_dict())))  # JSON round trip
    assert back == study


@pytest.mark.slow
def test_study_plot_and_report_section(study, tmp_path):
    md, d, pngs = prb.experiments.stitching_section(tmp_path, study=study)
    assert md.startswith("## Stitching") and "relative accuracy" in md and pngs[0].name in md
    assert "mlp (width=128, depth=3) seed 0" in md
    assert d["layers"] == study.layers and json.loads(json.dumps(d))["cka"] == study.cka
    check_png(pngs[0])


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
