"""The `pyrebasin combine` CLI end to end and the demo's combinability sections; the studies' real-data
claims over several seed pairs live in tests/claims/test_combinability.py."""
import importlib
import json

import pytest

from pyrebasin import cli

# The package re-exports functions named like their modules (`combinability`, ...): import the module.
comb = importlib.import_module("pyrebasin.experiments.combinability")

pytestmark = pytest.mark.slow


def test_cli_combine_writes_json_markdown_png(tmp_path, capsys):
    rc = cli.main(["combine", "--studies", "combinability", "transitivity", "--quick", "--examples", "200",
                   "--granularities", "element", "global", "--threads", "1", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "combine.json").read_text())
    assert {"combinability", "transitivity"} <= set(report)
    assert (tmp_path / "combinability.png").stat().st_size > 1000 and (tmp_path / "transitivity.png").exists()
    assert "Transitivity" in (tmp_path / "combine.md").read_text()
    assert cli.main(["combine", "--arch-kwargs", "[1]", "--out", str(tmp_path)]) == 2


def test_demo_discovers_the_four_sections_and_runs_one(tmp_path):
    from pyrebasin.experiments import demo

    keys = [demo.section_key(f) for f in demo.sections()]
    for key in ("mode_combinability", "transitivity_of_alignment", "matching_robustness", "combination_similarity"):
        assert key in keys
    ctx = demo.DemoContext(demo.DemoConfig.make(quick=True), tmp_path, progress=False)
    md, data, figs = comb.mode_combinability_section(ctx)
    assert md.startswith("## Mode combinability") and data["rows"] and figs[0].exists()
