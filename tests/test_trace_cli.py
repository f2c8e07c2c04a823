"""`pyrebasin trace`: prints the traced groups and fixed keys, checks them, writes the spec JSON."""
import pyrebasin as prb
from pyrebasin.cli import main


def test_trace_command(tmp_path, capsys):
    out = tmp_path / "spec.json"
    code = main(["trace", "--arch", "mlp", "--arch-kwargs", '{"width": 16, "depth": 2, "norm": "bn"}',
                 "--input-shape", "4,40", "--check", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0
    assert "P_layers.0.out (16 units): layers.0.weight[0]" in text and "check_spec OK" in text
    spec = prb.PermutationSpec.from_json(out.read_text())
    assert prb.spec_equivalent(spec, prb.zoo.MLP(width=16, depth=2, norm="bn").permutation_spec())


def test_trace_command_bad_input_is_one_line(capsys):
    assert main(["trace", "--arch", "nonexistent", "--input-shape", "2,3"]) == 2
    assert "unknown --arch" in capsys.readouterr().err
