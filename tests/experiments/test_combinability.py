"""Real-data checks of the mode combinability studies on mnist1d MLPs (trained once, cached): aligned
combinations stay close to the endpoints while naive ones collapse; transitive alignment keeps the
barrier far below naive; combinability degrades as the matching is perturbed; combinations are new
functions. Plus the `pyrebasin combine` CLI end to end."""
import importlib
import json

import pytest
import torch

from pyrebasin import cli

# The package re-exports functions named like their modules (`combinability`, ...): import the modules.
comb = importlib.import_module("pyrebasin.experiments.combinability")
rob = importlib.import_module("pyrebasin.experiments.robustness")
sim = importlib.import_module("pyrebasin.experiments.similarity_study")
trans = importlib.import_module("pyrebasin.experiments.transitivity")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    model, spec, states, (x, y) = comb.mnist1d_mlps(3, width=128, depth=3, epochs=10)
    data = (x[:500], y[:500])
    return model, spec, states, data, comb.align(spec, states[0], states[1])


def test_aligned_combinations_stay_near_endpoints(trained, tmp_path):
    model, spec, (a, b, _), data, perms = trained
    md, d, pngs = comb.combinability_section(model, spec, a, b, data, tmp_path, perms=perms, n=8,
                                             distributions=("uniform", "bernoulli(0.5)"),
                                             granularities=("element", "neuron", "layer"))
    study = comb.CombinabilityStudy(**d)
    mean_acc = study.endpoints["mean_accuracy"]
    for dist in ("uniform(0, 1)", "bernoulli(0.5)"):
        for gran in ("element", "neuron", "layer"):
            naive, aligned = study.row(dist, gran, False), study.row(dist, gran, True)
            # naive combinations collapse towards chance, aligned ones stay near the endpoints
            assert aligned["accuracy"]["q50"] > naive["accuracy"]["q50"] + 0.15, (dist, gran)
            assert aligned["accuracy"]["q50"] > mean_acc - 0.15, (dist, gran)
            assert aligned["loss"]["q50"] < naive["loss"]["q50"], (dist, gran)
            assert aligned["frac_accuracy_within_eps"] >= naive["frac_accuracy_within_eps"]
    assert study.row("uniform(0, 1)", "neuron", True)["frac_accuracy_within_eps"] > 0.3
    assert pngs[0].exists() and "Mode combinability" in md and json.dumps(d)


def test_transitive_alignment_barrier_far_below_naive(trained):
    model, spec, (a, b, c), data, _ = trained
    study = trans.transitivity(model, spec, a, b, c, data, ts=7)
    assert study.barriers["direct"] < 0.3 * study.barriers["naive"]
    assert study.barriers["transitive"] < 0.5 * study.barriers["naive"]
    assert study.barriers["direct"] <= study.barriers["transitive"] + 0.05


def test_robustness_degrades_with_q(trained, tmp_path):
    model, spec, (a, b, _), data, perms = trained
    study = rob.robustness(model, spec, a, b, data, perms=perms, qs=(0.0, 0.1, 0.5, 1.0), noise=(0.0, 1.0), n=6,
                           ts=5)
    q, barrier = study.series("shuffle", "barrier")
    _, ham = study.series("shuffle", "hamming")
    _, acc = study.series("shuffle", "combination_accuracy_median")
    assert ham == sorted(ham) and ham[0] == 0.0 and ham[-1] > 0.9
    assert barrier[-1] > barrier[0] + 0.3 and barrier[2] > barrier[0]
    assert acc[0] > acc[-1] + 0.15 and acc[2] < acc[0]
    _, nb = study.series("noise", "barrier")
    assert nb[0] == pytest.approx(barrier[0]) and nb[1] > nb[0]
    assert rob.plot_robustness(study, tmp_path / "robustness.png").stat().st_size > 1000


def test_combinations_are_different_functions(trained):
    model, spec, (a, b, _), data, perms = trained
    study = sim.similarity_study(model, spec, a, b, data, perms=perms, n=4)
    naive, aligned = study.metrics["naive"], study.metrics["aligned"]
    # naive combinations are far from both endpoints; aligned ones near them, yet distinct functions
    assert naive["combo-A"]["disagreement"] > aligned["combo-A"]["disagreement"] + 0.2
    assert aligned["combo-combo"]["disagreement"] > 0.05 and aligned["combo-combo"]["js"] > 0.0
    assert aligned["combo-A"]["weight_l2"] < naive["combo-A"]["weight_l2"]
    assert aligned["A-B"]["weight_cosine"] > naive["A-B"]["weight_cosine"] + 0.2


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
