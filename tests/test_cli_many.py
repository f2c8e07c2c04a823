"""`pyrebasin merge` and `pyrebasin connectivity` driven as a user would (tiny MLPs saved to disk), their
one-line errors (exit 2), and the demo's "merge" and "connectivity" sections on their own."""
import json

import pytest
import torch

import pyrebasin as prb
import pyrebasin.cli
from pyrebasin.io import load_state, save_state
from pyrebasin.train import TrainConfig, train_
from tests.test_cli import assert_png, cli, cli_inprocess

KW = '{"width": 16, "depth": 2}'


def tiny(seed: int, x, y) -> dict:
    """A width-16 MLP trained 4 epochs on 2000 mnist1d rows (under a second)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = prb.zoo.MLP(width=16, depth=2)
    train_(model, x, y, TrainConfig(epochs=4, seed=seed), progress=False)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """A, two planted permutations of A (MergeMany must undo them exactly), three other seeds, a data file."""
    d = tmp_path_factory.mktemp("many")
    spec = prb.zoo.MLP(width=16, depth=2).permutation_spec()
    x, y, xt, yt = prb.data.mnist1d()
    x, y, xt, yt = x[:2000], y[:2000], xt[:500], yt[:500]
    a = tiny(0, x, y)
    planted = [prb.random_permutation(spec, a, generator=g) for g in (11, 12)]
    save_state(a, d / "A.safetensors")
    for i, p in enumerate(planted, 1):
        torch.save(prb.apply_permutation(spec, p, a), d / f"A{i}.pt")
    for s in (1, 2, 3):
        save_state(tiny(s, x, y), d / f"M{s}.safetensors")
    torch.save({"x_train": x, "y_train": y, "x_test": xt, "y_test": yt}, d / "data.pt")
    return d, spec, a, planted


def test_merge_undoes_planted_permutations(many, tmp_path):
    d, spec, a, planted = many
    models = [d / "A.safetensors", d / "A1.pt", d / "A2.pt"]
    r = cli("merge", "--arch", "mlp", "--arch-kwargs", KW, "--models", *models, "--out", tmp_path / "merged.safetensors",
            "--perms", tmp_path / "perms.json", "--data", d / "data.pt", "--report", tmp_path / "rep", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    merged = load_state(tmp_path / "merged.safetensors")
    assert set(merged) == set(a)
    for k in a:
        torch.testing.assert_close(merged[k], a[k], rtol=0, atol=1e-6)
    perms = json.loads((tmp_path / "perms.json").read_text())
    assert perms["models"] == [str(m) for m in models] and len(perms["perms"]) == 3
    states = [a] + [prb.apply_permutation(spec, p, a) for p in planted]
    for state, p in zip(states, perms["perms"]):
        back = prb.apply_permutation(spec, {k: torch.tensor(v) for k, v in p.items()}, state)
        for k in a:
            torch.testing.assert_close(back[k], a[k], rtol=0, atol=0)
    rep = json.loads((tmp_path / "rep" / "merge.json").read_text())
    assert rep["split"] == "test" and rep["converged"]
    assert rep["accuracy"]["merged"] == pytest.approx(rep["accuracy"]["models"][0], abs=1e-9)
    mm = torch.tensor(rep["barriers"]["merge_many"]["endpoint_mean"])
    assert mm.shape == (3, 3) and float(mm.abs().max()) < 1e-5
    assert "MergeMany of 3 models" in r.stdout and "mean pairwise loss barrier" in r.stdout


def test_merge_without_data_writes_state_only(many, tmp_path, capsys):
    d, *_ = many
    r = cli_inprocess(capsys, "merge", "--arch", "mlp", "--arch-kwargs", KW, "--models", d / "M1.safetensors",
                      d / "M2.safetensors", d / "M3.safetensors", "--out", tmp_path / "m.pt", "--no-progress")
    assert r.returncode == 0, r.stderr
    merged = load_state(tmp_path / "m.pt")
    prb.zoo.MLP(width=16, depth=2).load_state_dict(merged)
    assert not (tmp_path / "perms.json").exists()


@pytest.mark.parametrize("align", ["none", "weight", "merge"])
def test_connectivity_writes_a_symmetric_map(many, tmp_path, capsys, align):
    d, *_ = many
    models = [d / "A.safetensors", d / "M1.safetensors", d / "M2.safetensors", d / "M3.safetensors"]
    args = ["connectivity", "--arch", "mlp", "--arch-kwargs", KW, "--models", *models, "--data", d / "data.pt",
            "--out", tmp_path / "map", "--ts", "5", "--align", align, "--clusters", "2", "--no-progress"]
    r = cli(*args, "--plane", "--grid", "5") if align == "none" else cli_inprocess(capsys, *args)
    assert r.returncode == 0, r.stderr[-2000:]
    cmap = json.loads((tmp_path / "map" / "connectivity.json").read_text())
    assert cmap["align"] == (None if align == "none" else align) and cmap["n_clusters"] == 2
    assert len(cmap["clusters"]) == 4 and set(cmap["clusters"]) == {0, 1}
    assert cmap["names"] == ["A", "M1", "M2", "M3"] and cmap["ts"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for kind, m in cmap["barriers"].items():
        m = torch.tensor(m)
        assert m.shape == (4, 4), kind
        assert torch.equal(m, m.T) and torch.equal(m.diagonal(), torch.zeros(4, dtype=m.dtype)), kind
    if align == "none":  # other seeds are not linearly connected (measured: any_chord max 0.18; weight-matched 0.04)
        assert float(torch.tensor(cmap["barriers"]["any_chord"]).max()) > 0.05
    assert_png(tmp_path / "map" / "connectivity.png")
    if align == "none":
        assert_png(tmp_path / "map" / "loss_plane.png")
        assert "clusters [" in r.stdout


BAD = [
    (["merge", "--models", "{d}/A.safetensors", "--out", "{t}/m.pt"], "--models needs at least 2 checkpoints"),
    (["merge", "--models", "{d}/A.safetensors", "{d}/M1.safetensors", "--out", "{d}/M1.safetensors"],
     "is the --models[1] input"),
    (["merge", "--models", "{d}/A.safetensors", "{d}/M1.safetensors", "--out", "{t}/m.pt", "--perms",
      "{d}/A.safetensors"], "is the --models[0] input"),
    (["merge", "--models", "{d}/A.safetensors", "{d}/A.safetensors", "--out", "{t}/m.pt"], "give each model once"),
    (["merge", "--models", "{d}/A.safetensors", "{d}/M1.safetensors", "--out", "{t}/m.pt", "--report", "{t}/r"],
     "--report needs --data"),
    (["merge", "--models", "{d}/A.safetensors", "{d}/M1.safetensors", "--out", "{t}/m.txt"], ".txt"),
    (["merge", "--models", "{d}/A.safetensors", "{d}/missing.pt", "--out", "{t}/m.pt"], "missing.pt"),
    (["connectivity", "--models", "{d}/A.safetensors", "--data", "{d}/data.pt", "--out", "{t}/o"],
     "--models needs at least 2 checkpoints"),
    (["connectivity", "--models", "{d}/A.safetensors", "{d}/M1.safetensors", "--data", "{d}/data.pt", "--out",
      "{t}/o", "--ts", "1"], "argument --ts: must be >= 2, got 1"),
    (["connectivity", "--models", "{d}/A.safetensors", "{d}/M1.safetensors", "--data", "{d}/data.pt", "--out",
      "{t}/o", "--clusters", "3"], "--clusters 3 exceeds the number of models (2)"),
    (["connectivity", "--models", "{d}/A.safetensors", "{d}/M1.safetensors", "--data", "{d}/data.pt", "--out",
      "{t}/o", "--plane"], "--plane needs at least 3 models"),
    (["connectivity", "--models", "{d}/A.safetensors", "{d}/M1.safetensors", "--data", "{d}/data.pt", "--out",
      "{t}/o", "--align", "sinkhorn"], "invalid choice: 'sinkhorn'"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[f"{a[0]}-{i}" for i, (a, _) in enumerate(BAD)])
def test_bad_inputs_are_one_line_errors(many, tmp_path, capsys, argv, message):
    d, *_ = many
    argv = [a.format(d=d, t=tmp_path) for a in argv]
    argv[1:1] = ["--arch", "mlp", "--arch-kwargs", KW]
    capsys.readouterr()
    try:
        rc = prb.cli.main(argv)
    except SystemExit as exc:  # argparse's usage errors (bad --ts, unknown --align) exit here
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err and err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.pt").exists()


def test_bad_input_through_a_subprocess(many, tmp_path):
    d, *_ = many
    r = cli("connectivity", "--arch", "mlp", "--arch-kwargs", KW, "--models", d / "A.safetensors", "--data",
            d / "data.pt", "--out", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "--models needs at least 2 checkpoints" in r.stderr


@pytest.mark.slow
def test_demo_many_model_sections(tmp_path):
    from pyrebasin.experiments.demo import run_demo

    report = run_demo(tmp_path, quick=True, progress=False, only=["merge", "connectivity"])
    sections = {s["key"]: s for s in report["sections"]}
    assert list(sections) == ["merge", "connectivity"]
    merge = sections["merge"]["data"]
    assert merge["n"] == 3 and set(merge["mean_barrier"]) == {"naive", "pairwise", "merge_many"}
    assert merge["cycle_error"]["merge_many"] == 0.0 and merge["cycle_error"]["pairwise"] > 0
    assert merge["mean_barrier"]["merge_many"] < 0.5 * merge["mean_barrier"]["naive"]
    assert merge["accuracy"]["merge_many_average"] > merge["accuracy"]["naive_average"]
    conn = sections["connectivity"]["data"]
    assert len(conn["names"]) == 6 and conn["planted"] == [0, 0, 0, 1, 1, 1]
    for key in ("naive", "weight"):
        assert len(conn[key]["clusters"]) == 6 and isinstance(conn[key]["recovered"], bool)
        m = torch.tensor(conn[key]["map"]["barriers"]["any_chord"])
        assert torch.equal(m, m.T) and float(m.diagonal().abs().max()) == 0
    for s in sections.values():
        assert s["figures"] and s["summary"]
        for f in s["figures"]:
            assert_png(tmp_path / f)
    md = (tmp_path / "report.md").read_text()
    assert "MergeMany" in md and "connectivity_naive.png" in md
