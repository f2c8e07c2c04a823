"""Hostile CLI inputs (issue 12 §3), one regression test per class: every one is a one-line error
with exit status 2, raised before any work, and no input or earlier output is replaced."""
from __future__ import annotations

import errno
import os
import pathlib

import pytest
import torch

from pyrebasin.batches import batches
from pyrebasin.cli import main
from tests import test_cli
from tests.test_cli import MLP_KW, cli, cli_inprocess

ckpts = test_cli.ckpts  # the trained checkpoints fixture (module scope)


def one_line_error(r, command, message):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"pyrebasin {command}: error:") and message in lines[0], lines[0]


def usage_error(capsys, argv, message):
    """argparse refuses the value (exit 2) in the same one-line form."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert info.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    return lines[0]


def pair_args(d, **flags):
    args = {"--arch": "mlp", "--arch-kwargs": MLP_KW, "--a": d / "A.safetensors", "--b": d / "B.pt"}
    args.update({f"--{k.replace('_', '-')}": v for k, v in flags.items()})
    return [str(x) for kv in args.items() for x in kv if x is not None]  # None: a flag without value


# --- numeric options: refused, never clipped or truncated ---------------------------------------

BAD_OPTIONS = [
    (["combine", "--examples", "-5"], "argument --examples: must be >= 0, got -5"),
    (["combine", "--eps", "nan"], "argument --eps: must be finite"),
    (["combine", "--eps", "-0.1"], "argument --eps: must be >= 0"),
    (["combine", "--epochs", "-1"], "argument --epochs: must be >= 1"),
    (["combine", "--width", "0"], "argument --width: must be >= 1, got 0"),
    (["combine", "--n", "0"], "argument --n: must be >= 1, got 0"),
    (["combine", "--n", "2.5"], "argument --n: expected an integer, got '2.5'"),
    (["stitch", "--epochs", "-3"], "argument --epochs: must be >= 1"),
    (["stitch", "--lr", "inf"], "argument --lr: must be finite"),
    (["stitch", "--rank-fraction", "2"], "argument --rank-fraction: must be <= 1"),
    (["stitch", "--depth", "0"], "argument --depth: must be >= 1"),
    (["trace", "--arch", "mlp", "--input-shape", "2,40", "--vocab", "-1"], "argument --vocab: must be >= 0"),
    (["combine", "--seed", "1.5"], "argument --seed: expected an integer, got '1.5'"),
    (["combine", "--seed", str(2**64)], "argument --seed: must be <= 9223372036854775807"),
    (["stitch", "--seeds", "0", "-1"], "argument --seeds: must be >= 0"),
    (["interpolate", "--arch", "mlp", "--a", "a.pt", "--b", "b.pt", "--out", "o", "--ts", "1"], "--ts: must be >= 2"),
    (["interpolate", "--arch", "mlp", "--a", "a.pt", "--b", "b.pt", "--out", "o", "--samples", "0"],
     "--samples: must be >= 1"),
    (["align", "--arch", "mlp", "--a", "a.pt", "--b", "b.pt", "--out", "o.pt", "--max-iter", "0"],
     "--max-iter: must be >= 1"),
]


@pytest.mark.parametrize("argv, message", BAD_OPTIONS, ids=[m[:28] for _, m in BAD_OPTIONS])
def test_bad_numeric_options_are_one_line_usage_errors(argv, message, capsys):
    line = usage_error(capsys, argv, message)
    assert line.startswith(f"pyrebasin {argv[0]}: error:")


# --- labels and inputs of a data file -----------------------------------------------------------

def _data_file(d, name, x, y):
    path = d / f"{name}.pt"
    torch.save({"x_train": x, "y_train": y}, path)
    return path


def test_float_labels_are_refused_not_truncated(ckpts, tmp_path, capsys):
    x = torch.randn(64, 40)
    f = _data_file(tmp_path, "float_y", x, torch.rand(64) * 9.9)  # .long() would have made 0..9 classes
    r = cli_inprocess(capsys, "align", *pair_args(ckpts, out=tmp_path / "o.pt", data=f, method="activation"))
    one_line_error(r, "align", "labels must be integer class indices, got torch.float32")


def test_one_hot_labels_get_a_hint(ckpts, tmp_path, capsys):
    y = torch.nn.functional.one_hot(torch.randint(0, 10, (64,)), 10).float()
    f = _data_file(tmp_path, "onehot", torch.randn(64, 40), y)
    r = cli_inprocess(capsys, "interpolate", *pair_args(ckpts, out=tmp_path / "curve", data=f, ts=3))
    one_line_error(r, "interpolate", "one-hot? pass y.argmax(1)")
    assert not (tmp_path / "curve").exists()


def test_nan_inputs_get_the_api_error_not_an_accuracy(ckpts, tmp_path, capsys):
    # the CLI reported accuracy 1.0 on NaN inputs; now it refuses them with the data checks' message
    x = torch.randn(64, 40)
    x[3, 5] = float("nan")
    y = torch.randint(0, 10, (64,))
    f = _data_file(tmp_path, "nan_x", x, y)
    r = cli_inprocess(capsys, "interpolate", *pair_args(ckpts, out=tmp_path / "curve", data=f, ts=3))
    with pytest.raises(ValueError) as api:
        list(batches((x, y), name=f"--data {f} train"))
    one_line_error(r, "interpolate", str(api.value))
    assert "non-finite" in str(api.value)


def test_empty_data_is_named(ckpts, tmp_path, capsys):
    f = _data_file(tmp_path, "empty", torch.zeros(0, 40), torch.zeros(0, dtype=torch.long))
    r = cli_inprocess(capsys, "align", *pair_args(ckpts, out=tmp_path / "o.pt", data=f, method="activation"))
    one_line_error(r, "align", "is empty (0 rows)")


def test_meta_tensors_in_a_checkpoint_are_refused(ckpts, tmp_path, capsys):
    b = torch.load(ckpts / "B.pt")
    torch.save({k: torch.empty(v.shape, device="meta") for k, v in b.items()}, tmp_path / "meta.pt")
    r = cli_inprocess(capsys, "align", *pair_args(ckpts, b=tmp_path / "meta.pt", out=tmp_path / "o.pt"))
    one_line_error(r, "align", "is a meta tensor (no data)")


# --- factories and output paths -----------------------------------------------------------------

def broken_factory(**kwargs):
    raise RuntimeError("weights server unreachable\nsecond line of the story")


def test_a_raising_factory_is_named(capsys):
    r = cli_inprocess(capsys, "trace", "--arch", "tests.test_hostile_cli:broken_factory", "--input-shape", "2,3")
    one_line_error(r, "trace", "'tests.test_hostile_cli:broken_factory': the factory raised RuntimeError")
    assert "weights server unreachable" in r.stderr


def test_a_zero_width_model_is_refused(capsys):
    r = cli_inprocess(capsys, "trace", "--arch", "mlp", "--arch-kwargs", '{"width": 0}', "--input-shape", "2,40")
    one_line_error(r, "trace", "MLP width=0: sizes must be positive ints")


@pytest.mark.parametrize("where", ["under_a_file", "onto_a_directory"])
def test_an_unwritable_output_fails_before_any_work(ckpts, tmp_path, where, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir.safetensors").mkdir()
    out = {"under_a_file": tmp_path / "file" / "o.safetensors", "onto_a_directory": tmp_path / "dir.safetensors"}[where]
    message = {"under_a_file": "is a file, not a directory", "onto_a_directory": "it is a directory"}[where]
    r = cli_inprocess(capsys, "align", *pair_args(ckpts, out=out))
    one_line_error(r, "align", message)
    assert r.stdout == ""  # refused before matching
    r = cli_inprocess(capsys, "trace", "--arch", "mlp", "--input-shape", "2,40", "--out",
                      tmp_path / "file" / "spec.json")
    one_line_error(r, "trace", "is a file, not a directory")
    r = cli_inprocess(capsys, "interpolate", *pair_args(ckpts, out=tmp_path / "file", ts=3))
    one_line_error(r, "interpolate", "is a file, not a directory")


def test_a_full_disk_is_one_line_and_keeps_the_old_output(ckpts, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"previous")

    def full(self, data):
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    r = cli_inprocess(capsys, "align", *pair_args(ckpts, out=out, no_progress=None))
    one_line_error(r, "align", f"no space left on the device while writing {out}")
    assert out.read_bytes() == b"previous" and os.listdir(tmp_path) == ["o.safetensors"]


@pytest.mark.parametrize("clash", ["perms_is_out", "out_is_a", "out_is_b", "perms_is_b"])
def test_an_output_never_replaces_an_input_or_another_output(ckpts, tmp_path, clash, capsys):
    # `align --perms X --out X` replaced the checkpoint by JSON; `--out` equal to --a/--b overwrote it
    d = tmp_path / "c"
    d.mkdir()
    for name in ("A.safetensors", "B.pt"):
        (d / name).write_bytes((ckpts / name).read_bytes())
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    out = {"perms_is_out": tmp_path / "x.pt", "out_is_a": d / "A.safetensors", "out_is_b": d / "B.pt",
           "perms_is_b": tmp_path / "o.pt"}[clash]
    perms = {"perms_is_out": tmp_path / "x.pt", "perms_is_b": d / "B.pt"}.get(clash, tmp_path / "p.json")
    r = cli_inprocess(capsys, "align", *pair_args(d, out=out, perms=perms, no_progress=None))
    message = {"perms_is_out": "--out and --perms are the same file", "out_is_a": "is the --a input",
               "out_is_b": "is the --b input", "perms_is_b": "--perms"}[clash]
    if clash == "perms_is_b":
        message = f"--perms {d / 'B.pt'} is the --b input"
    one_line_error(r, "align", message)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "p.json").exists()


def test_a_refused_value_through_a_real_process(tmp_path):
    r = cli("combine", "--n", "0", "--out", tmp_path)
    one_line_error(r, "combine", "argument --n: must be >= 1, got 0")
