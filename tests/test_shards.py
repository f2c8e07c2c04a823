"""Streaming permutation of sharded safetensors checkpoints equals the in-memory result."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import pyrebasin as prb
from pyrebasin.shards import permute_safetensors


def _write_shards(state, folder, n_shards=3):
    keys = list(state)
    chunks = [keys[i::n_shards] for i in range(n_shards)]
    weight_map = {}
    for i, chunk in enumerate(chunks):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: state[k].contiguous() for k in chunk}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in chunk})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_equals_in_memory(tmp_path):
    model = prb.zoo.Transformer(d_model=32, heads=4, layers=2)
    spec, state = model.permutation_spec(), model.state_dict()
    perms = prb.random_permutation(spec, state, 0)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    _write_shards(state, src)
    written = permute_safetensors(spec, perms, src, dst, progress=False)
    assert len(written) == 3 and (dst / "model.safetensors.index.json").exists()
    got = {}
    for f in written:
        got.update(load_file(str(f)))
    expected = prb.apply_permutation(spec, perms, state)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert all(torch.equal(v, state[k]) for f in src.glob("*.safetensors") for k, v in load_file(str(f)).items())


def test_bad_perm_is_caught_before_anything_is_written(tmp_path):
    model = prb.zoo.MLP(40, 8, 2)
    spec, state = model.permutation_spec(), model.state_dict()
    perms = prb.random_permutation(spec, state, 0)
    perms["P_layers.1"] = torch.zeros(8, dtype=torch.long)
    src = tmp_path / "src"
    src.mkdir()
    _write_shards(state, src, 2)
    with pytest.raises(ValueError, match="'P_layers.1' is not a permutation"):
        permute_safetensors(spec, perms, src, tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists()


def test_undeclared_key_in_a_shard(tmp_path):
    model = prb.zoo.MLP(40, 8, 1)
    spec, state = model.permutation_spec(), dict(model.state_dict())
    state["stray"] = torch.zeros(2)
    save_file(state, str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match=r"not declared in the spec.*stray"):
        permute_safetensors(spec, prb.random_permutation(spec, model.state_dict(), 0), tmp_path / "m.safetensors",
                            tmp_path / "out", progress=False)
