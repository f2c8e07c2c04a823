"""Checkpoint I/O: round trips in both formats, nested and DataParallel layouts, one-line errors for
missing/corrupt/non-state-dict files, atomic writes that leave nothing behind, --arch resolution."""
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import pyrebasin as prb
from pyrebasin.io import (atomic_write, atomic_write_text, load_state, model_from_factory, parse_kwargs, save_state,
                          state_suffix)
from pyrebasin.zoo import resolve_arch


def sample_state():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in prb.zoo.MLP(8, 6, 2, classes=3, norm="bn").state_dict().items()}


def assert_same(a, b):
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".bin"])
def test_round_trip(tmp_path, suffix):
    state = sample_state()
    path = save_state(state, tmp_path / f"m{suffix}")
    assert_same(load_state(path), state)
    assert oct(os.stat(path).st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode
    assert sorted(os.listdir(tmp_path)) == [f"m{suffix}"]   # no temporary file left


def test_nested_and_data_parallel_layouts(tmp_path):
    state = sample_state()
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "nested.pt")
    assert_same(load_state(tmp_path / "nested.pt"), state)
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "dp.pt")
    assert_same(load_state(tmp_path / "dp.pt"), state)


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*absent.pt"):
        load_state(tmp_path / "absent.pt")
    with pytest.raises(ValueError, match=r"unknown checkpoint format '\.npz'"):
        load_state(tmp_path / "x.npz")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.safetensors: not a readable safetensors file"):
        load_state(tmp_path / "junk.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="junk.pt: not a readable PyTorch checkpoint"):
        load_state(tmp_path / "junk.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list"):
        load_state(tmp_path / "list.pt")
    torch.save({"w": torch.zeros(1), "lr": 0.1}, tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match=r"non-tensor entries \['lr'\]"):
        load_state(tmp_path / "mixed.pt")
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled module: refused, no code runs
    with pytest.raises(ValueError, match="module.pt: not a readable PyTorch checkpoint"):
        load_state(tmp_path / "module.pt")


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "old")

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, failing)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_resolve_arch():
    m = resolve_arch("mlp", {"width": 16, "depth": 1})
    assert isinstance(m, prb.zoo.MLP) and m.widths == [16] and not m.training
    m = resolve_arch("pyrebasin.zoo.vgg:VGG", {"norm": None})
    assert isinstance(m, prb.zoo.VGG) and m.norm_kind is None
    assert isinstance(resolve_arch("torch.nn:Linear", {"in_features": 2, "out_features": 3}), nn.Linear)
    with pytest.raises(ValueError, match="unknown --arch 'mpl'"):
        resolve_arch("mpl")
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod'"):
        resolve_arch("no_such_mod:f")
    with pytest.raises(ValueError, match="has no attribute 'Nope'"):
        resolve_arch("pyrebasin.zoo:Nope")
    with pytest.raises(ValueError, match="unexpected keyword argument 'widht'"):
        resolve_arch("mlp", {"widht": 3})
    with pytest.raises(TypeError, match="returned a dict"):
        resolve_arch("builtins:dict", {"a": 1})
    # core io knows no zoo name: only module:factory
    assert isinstance(model_from_factory("torch.nn:Linear", {"in_features": 2, "out_features": 3}), nn.Linear)
    with pytest.raises(ValueError, match="expected 'module:factory'"):
        model_from_factory("mlp")


def test_state_suffix():
    assert state_suffix(Path("a/b.safetensors")) == ".safetensors"
    with pytest.raises(ValueError, match=r"b.npz: unknown checkpoint format '.npz'"):
        state_suffix(Path("a/b.npz"))


def test_parse_kwargs():
    assert parse_kwargs(None) == {} and parse_kwargs('{"width": 8}') == {"width": 8}
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_kwargs("{width: 8}")
    with pytest.raises(ValueError, match="JSON object"):
        parse_kwargs("[1, 2]")
