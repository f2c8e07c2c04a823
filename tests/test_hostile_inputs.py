"""Hostile inputs found by fuzzing (issue 12 §3), one regression test per class: spec entries and
permutation algebra, activation matching on degenerate or non-finite data, atomic file writes."""
from __future__ import annotations

import ast
import errno
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import pyrebasin as prb
from pyrebasin import fileio
from pyrebasin.spec import Blocked, PermutationSpec
from tests.test_matching_activation import inputs
from tests.test_matching_weight import MODELS, model_state

ROOT = Path(__file__).resolve().parents[1]


# --- spec entries ------------------------------------------------------------------------------

def test_spec_axis_entries_given_as_one_string_are_refused():
    # tuple("PQ") == ('P', 'Q'): a 2-D weight would silently get perms "P" and "Q"
    with pytest.raises(TypeError, match=r"'w'.*one entry per axis.*\('PQ',\)"):
        PermutationSpec({"w": "PQ"})
    with pytest.raises(TypeError, match="one entry per axis"):
        PermutationSpec({"w": Blocked((2, 3), ("P", None))})
    with pytest.raises(TypeError, match="must be a str"):
        PermutationSpec({1: ("P",)})
    with pytest.raises(ValueError, match="must not be empty"):
        PermutationSpec({"w": ("",)})
    assert PermutationSpec({"w": ["P", None]}).axes_to_perm == {"w": ("P", None)}


@pytest.mark.parametrize("shape", [(2.9, 3), (True, 3), (0, 3), (-2, 3), (torch.tensor(2.0), 3), ("2", 3)])
def test_blocked_sizes_must_be_positive_ints(shape):
    # int(2.9) == 2 would make a factorisation of another axis size, silently
    with pytest.raises(ValueError, match="must hold positive ints"):
        Blocked(shape, ("P", None))


def test_blocked_accepts_integer_like_sizes_and_refuses_string_perms():
    assert Blocked((np.int64(2), torch.tensor(3)), ("P", None)).shape == (2, 3)
    with pytest.raises(TypeError, match="must be a tuple"):
        Blocked((2, 3), "PQ")
    with pytest.raises(TypeError, match="perm names"):
        Blocked((2, 3), ("P", 3))


# --- permutation algebra -----------------------------------------------------------------------

@pytest.mark.parametrize("perm, error, message", [
    (torch.tensor([0, 0, 2]), ValueError, r"'P'.*duplicated indices \[0\]"),
    (torch.tensor([0.0, 2.0, 1.0]), TypeError, r"'P'.*integer tensor, got torch.float32"),
    (torch.tensor([[0, 1]]), ValueError, r"'P'.*1-D"),
    (torch.tensor([0, 3, 1]), ValueError, r"'P'.*outside \[0, 3\)"),
    (torch.tensor([-1, 0, 1]), ValueError, r"'P'.*outside"),
], ids=["duplicates", "floats", "2-D", "out of range", "negative"])
def test_invert_permutation_refuses_non_permutations(perm, error, message):
    with pytest.raises(error, match=message):
        prb.invert_permutation({"Q": torch.tensor([1, 0]), "P": perm})


def test_compose_permutations_refuses_negative_indices_and_a_shorter_second():
    first = {"P": torch.tensor([2, 0, 1])}
    with pytest.raises(ValueError, match=r"'P'.*outside"):  # first[-1] would wrap to the last unit
        prb.compose_permutations(first, {"P": torch.tensor([-1, 0, 1])})
    with pytest.raises(ValueError, match=r"'P' has 3 units in first but 2 in second"):  # would truncate
        prb.compose_permutations(first, {"P": torch.tensor([1, 0])})
    out = prb.compose_permutations(first, {"P": torch.tensor([1, 2, 0])})
    assert out["P"].tolist() == [0, 1, 2]


def test_random_permutation_refuses_a_float_or_bool_seed():
    spec, state = PermutationSpec({"w": ("P",)}), {"w": torch.zeros(4)}
    for bad in (1.5, True):
        with pytest.raises(TypeError, match="generator"):
            prb.random_permutation(spec, state, bad)


# --- activation matching: degenerate statistics ------------------------------------------------

def _self_match(name, x):
    model, state = model_state(name)
    model.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = prb.activation_matching(model, model, model.permutation_spec(), x, state_a=state, state_b=state)
    moved = {p: int((v != torch.arange(len(v))).sum()) for p, v in r.perms.items()}
    return moved, [str(w.message) for w in caught]


@pytest.mark.parametrize("case", ["normal", "one_sample", "two_samples", "constant", "zeros"])
@pytest.mark.parametrize("name", list(MODELS))
def test_matching_a_model_with_itself_gives_the_identity(name, case):
    # The identity is optimal; before, units whose correlations were undefined (zero variance) or
    # tied (two samples: every correlation is ±1) moved: 14-90 units per model on these cases.
    x = inputs(name)
    x = {"normal": x, "one_sample": x[:1], "two_samples": x[:2], "zeros": torch.zeros_like(x[:32]),
         "constant": x[:1].expand(64, *x.shape[1:]).contiguous()}[case]
    moved, messages = _self_match(name, x)
    assert not any(moved.values()), moved
    if name == "mlp" and case in ("one_sample", "constant", "zeros"):
        assert any("varies over the data" in m and "keep the identity" in m for m in messages), messages
    if case == "normal":
        assert not any("varies over the data" in m for m in messages)


def test_activation_matching_refuses_nan_data():
    model, _ = model_state("mlp")
    model.eval()
    with pytest.raises(ValueError, match="non-finite"):
        prb.activation_matching(model, model, model.permutation_spec(), torch.full((16, 12), float("nan")))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_activation_matching_names_a_non_finite_weight(value):
    # NaN weights used to read as dead units (correlation 0) and give a plausible match
    model, state = model_state("mlp")
    model.eval()
    bad = dict(state)
    bad["layers.1.weight"] = bad["layers.1.weight"].clone()
    bad["layers.1.weight"][0, 0] = value
    with pytest.raises(ValueError, match=r"state_b.*'layers.1.weight'.*non-finite"):
        prb.activation_matching(model, model, model.permutation_spec(), inputs("mlp"), state_a=state, state_b=bad)


def test_activation_matching_reads_every_data_form():
    model, state = model_state("mlp")
    model.eval()
    spec = model.permutation_spec()
    pi = prb.random_permutation(spec, state, generator=2)
    sb = prb.apply_permutation(spec, pi, state)
    x = inputs("mlp", n=200)
    y = torch.randint(0, 5, (200,))
    forms = {"tensor": x, "pair": (x, y), "batches": [(xb, yb) for xb, yb in zip(x.split(64), y.split(64))],
             "loader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)}
    inverse = prb.invert_permutation(pi)
    for form, data in forms.items():
        r = prb.activation_matching(model, model, spec, data, state_a=state, state_b=sb, batch_size=64)
        assert all(torch.equal(r.perms[p], inverse[p]) for p in pi), form
    with pytest.raises(ValueError, match="batch 1 is empty"):
        prb.activation_matching(model, model, spec, [x[:8], x[:0], x[:8]], state_a=state, state_b=sb)


class _ScaledMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)
        self.register_buffer("scale", torch.tensor(2.0), persistent=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x * self.scale)))


def test_activation_matching_default_state_with_a_non_persistent_buffer():
    torch.manual_seed(0)
    model = _ScaledMLP()
    spec = PermutationSpec({"fc1.weight": ("P", None), "fc1.bias": ("P",), "fc2.weight": (None, "P"),
                            "fc2.bias": (None,)})
    r = prb.activation_matching(model, model, spec, torch.randn(64, 4))  # used to name 'scale' as undeclared
    assert torch.equal(r.perms["P"], torch.arange(8))


@pytest.mark.parametrize("kwargs, message", [({"batch_size": 0}, "batch_size"), ({"batch_size": -1}, "batch_size"),
                                             ({"max_batches": 0}, "max_batches"), ({"max_iter": 0}, "max_iter")])
def test_activation_matching_bad_counts_are_named(kwargs, message):
    model, _ = model_state("mlp")
    with pytest.raises(ValueError, match=message):
        prb.activation_matching(model, model, model.permutation_spec(), inputs("mlp"), **kwargs)


# --- atomic writes -----------------------------------------------------------------------------

def test_a_full_disk_is_named_and_leaves_the_old_file(tmp_path):
    path = fileio.atomic_write_text(tmp_path / "spec.json", "old")

    def enospc(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=r"no space left on the device while writing .*spec.json") as info:
        fileio.atomic_write(path, enospc)
    assert info.value.errno == errno.ENOSPC
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["spec.json"]


def test_an_output_under_a_file_or_onto_a_directory_is_named(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"is a file, not a directory"):
        fileio.atomic_write_text(tmp_path / "f" / "out.json", "{}")
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="it is a directory"):
        fileio.atomic_write_text(tmp_path / "d", "{}")
    assert sorted(os.listdir(tmp_path)) == ["d", "f"] and not os.listdir(tmp_path / "d")


def test_the_named_temp_fallback_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "_O_TMPFILE", 0)
    path = fileio.atomic_write_bytes(tmp_path / "a.bin", b"old")

    def failing(tmp):
        Path(tmp).write_bytes(b"new")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fileio.atomic_write(path, failing)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.bin"]
    assert oct(os.stat(fileio.atomic_write_bytes(path, b"new")).st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


_KILLED_WRITER = """
import sys, time
from pathlib import Path
from pyrebasin.fileio import atomic_write

def write(tmp):
    with open(tmp, "wb") as f:
        f.write(b"x" * (8 << 20))
        f.flush()
    Path(sys.argv[2]).write_text("written")
    time.sleep(120)

atomic_write(sys.argv[1], write)
"""


def test_a_killed_write_leaves_no_temp_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    fd = fileio._unnamed(out)
    if fd is None:
        pytest.skip("this filesystem has no O_TMPFILE: the named-temp fallback applies")
    os.close(fd)
    (out / "spec.json").write_text("old")
    marker = tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(out / "spec.json"), str(marker)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the writer never reached its write"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert os.listdir(out) == ["spec.json"] and (out / "spec.json").read_text() == "old"


_WRITERS = {"write_text", "write_bytes", "savefig", "save_file", "dump", "to_csv", "tofile"}


def test_every_file_write_in_the_package_goes_through_fileio():
    # A raw write can leave a truncated file (a failed write left half a spec.json). Writes are
    # allowed only on the temporary path `tmp` that fileio.atomic_write hands its callable
    # (safetensors files go through fileio.atomic_save_safetensors).
    bad = []
    for path in (ROOT / "pyrebasin").rglob("*.py"):
        if path.name == "fileio.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            mode = node.args[1] if name == "open" and len(node.args) > 1 else next(
                (k.value for k in node.keywords if k.arg == "mode"), None) if name == "open" else None
            saves = (name == "save" and isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                     and f.value.id in ("torch", "np", "numpy"))
            writes = saves or name in _WRITERS or (name == "open" and isinstance(mode, ast.Constant)
                                                   and any(c in str(mode.value) for c in "wax+"))
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            # safetensors' save_file writes its own temp beside the path it gets: never atomic here
            if name == "save_file" or (writes and "tmp" not in names):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert not bad, bad
