"""Hugging Face model directories in and out (pyrebasin.hf), streamed weight matching (matching.streamed)
and the streamed safetensors writer, on a tiny LLaMA (2 layers, hidden 64, 4 heads / 2 KV heads) built
from a config: no download."""
import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import pyrebasin as prb
from pyrebasin import hf, shards
from pyrebasin.matching.streamed import StreamedCosts, streamed_weight_matching

transformers = pytest.importorskip("transformers")


def tiny_config():
    return transformers.LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                    bos_token_id=0, eos_token_id=0, pad_token_id=0)


def build(seed):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(tiny_config()).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A (3+ shards), B = A with a planted permutation, C = an independent model; the planted perms."""
    root = tmp_path_factory.mktemp("hf")
    transformers.utils.logging.set_verbosity_error()
    model_a = build(0)
    model_a.save_pretrained(root / "a", max_shard_size="60KB")
    spec, _ = hf.load_hf_spec(root / "a")
    state_a = {k: v for k, v in model_a.state_dict().items() if k in spec.axes_to_perm}
    planted = prb.random_permutation(spec, state_a, generator=torch.Generator().manual_seed(1))
    model_b = build(0)
    model_b.load_state_dict(prb.apply_permutation(spec, planted, state_a), strict=False)
    model_b.save_pretrained(root / "b", max_shard_size="60KB")
    build(2).save_pretrained(root / "c", max_shard_size="60KB")
    return root, spec, planted


def test_spec_on_meta_covers_the_checkpoint(pair):
    root, spec, _ = pair
    state = shards.ShardedState(root / "a")
    assert set(spec.axes_to_perm) == set(state) and len(state.files) >= 3
    assert spec.perm_sizes(state.meta())["P_model.layers.0.mlp.gate_proj.out"] == 96
    assert hf.hf_model_on_meta(root / "a").model.embed_tokens.weight.is_meta


def test_align_directory_recovers_the_plant_and_loads(pair, tmp_path):
    root, spec, planted = pair
    out = tmp_path / "aligned"
    result = hf.align_hf(root / "a", root / "b", out, progress=False, block_bytes=20_000)
    inverse = {p: torch.argsort(v) for p, v in planted.items()}
    for p, v in inverse.items():
        assert torch.equal(result.perms[p], v), p
    # same shard names and keys, bit-equal to A, metadata and the non-weight files kept
    assert sorted(f.name for f in out.glob("*.safetensors")) == sorted(f.name for f in (root / "b").glob("*.safetensors"))
    assert json.loads((out / "model.safetensors.index.json").read_text()) == \
        json.loads((root / "b" / "model.safetensors.index.json").read_text())
    assert (out / "config.json").read_text() == (root / "b" / "config.json").read_text()
    assert (out / "generation_config.json").is_file()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h, safe_open(str(root / "b" / f.name), "pt") as g:
            assert h.metadata() == g.metadata()
        got, want = load_file(f), load_file(root / "a" / f.name)
        assert all(torch.equal(got[k], want[k]) for k in got)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    aligned = transformers.AutoModelForCausalLM.from_pretrained(out)
    model_b = transformers.AutoModelForCausalLM.from_pretrained(root / "b")
    torch.testing.assert_close(logits(aligned, ids), logits(model_b, ids), rtol=1e-5, atol=1e-5)
    assert not list(tmp_path.glob(".aligned*"))  # no temporary folder left behind


def test_streamed_equals_in_memory_weight_matching(pair):
    root, spec, _ = pair
    lazy_a, lazy_c = shards.ShardedState(root / "a"), shards.ShardedState(root / "c")
    full_a, full_c = dict(lazy_a.read(lazy_a)), dict(lazy_c.read(lazy_c))
    plain = spec.without_nesting(lazy_a.meta())  # the plain streamed path (StreamedCosts) on the shared-perm spec
    want = prb.weight_matching(plain, full_a, full_c, seed=3)
    got = streamed_weight_matching(plain, lazy_a, lazy_c, seed=3, block_bytes=30_000, cache_bytes=100_000)
    assert {p: v.tolist() for p, v in got.perms.items()} == {p: v.tolist() for p, v in want.perms.items()}
    assert got.objective == pytest.approx(want.objective, rel=1e-9)
    costs = StreamedCosts(plain, lazy_a, lazy_c, block_bytes=30_000)
    assert costs.objective(want.perms) == pytest.approx(want.objective[-1], rel=1e-9)
    assert costs.blocks_read > 1 and not hasattr(costs, "a")  # read in blocks, nothing held


@pytest.mark.parametrize("b", ["b", "c"])
def test_streamed_equals_in_memory_staged_matching(pair, b):
    """The traced (nested) spec: the staged solve streamed equals it in memory (B: planted, ends certified
    in stage 2; C: independent, ends with the nested descent)."""
    root, spec, planted = pair
    lazy_a, lazy_b = shards.ShardedState(root / "a"), shards.ShardedState(root / b)
    want = prb.weight_matching(spec, dict(lazy_a.read(lazy_a)), dict(lazy_b.read(lazy_b)), seed=3)
    got = streamed_weight_matching(spec, lazy_a, lazy_b, seed=3, block_bytes=30_000, cache_bytes=100_000)
    assert spec.nested and got.stage == want.stage == ("families" if b == "b" else "descent")
    assert got.certified == want.certified == (b == "b")
    assert {p: v.tolist() for p, v in got.perms.items()} == {p: v.tolist() for p, v in want.perms.items()}
    assert got.objective == pytest.approx(want.objective, rel=1e-9) and got.iterations == want.iterations
    if b == "b":
        assert all(torch.equal(got.perms[p], torch.argsort(v)) for p, v in planted.items())


def test_bad_directories(pair, tmp_path):
    root, spec, planted = pair
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file({"x": torch.zeros(1)}, bare / "model.safetensors")
    with pytest.raises(ValueError, match="no config.json"):
        hf.load_hf_spec(bare)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((root / "a" / "config.json").read_text())
    index = json.loads((root / "a" / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: "model-missing.safetensors" for k in index["weight_map"]}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-missing.safetensors"):
        hf.load_hf_spec(broken)
    with pytest.raises(ValueError, match="is the input directory"):
        hf.align_hf(root / "a", root / "b", root / "b", progress=False)
    with pytest.raises(ValueError, match="not empty"):
        hf.save_permuted_hf(root / "b", spec, planted, root / "c")
    with pytest.raises(ValueError, match="max_shard_size"):
        shards.parse_size("lots")


def test_output_is_written_atomically(pair, tmp_path, monkeypatch):
    root, spec, planted = pair
    out = tmp_path / "out"
    hf.save_permuted_hf(root / "b", spec, planted, out, max_shard_size="100KB", progress=False)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    assert len([n for n in before if n.endswith(".safetensors")]) > 1 and "model.safetensors.index.json" in before
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("disk on fire")
        return prb.apply_permutation(*args)

    monkeypatch.setattr(shards, "apply_permutation", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        hf.save_permuted_hf(root / "b", spec, planted, out, progress=False, overwrite=True)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # the old directory is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # and no temporary is left


def test_streamed_safetensors_writer(tmp_path):
    tensors = {"w": torch.randn(3, 5).to(torch.bfloat16), "i": torch.arange(7), "s": torch.tensor(2.5)}
    meta = {k: v.to("meta") for k, v in tensors.items()}
    path = shards.save_safetensors_streamed(tmp_path / "x.safetensors", meta, tensors.items(), metadata={"format": "pt"})
    back = load_file(path)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    with safe_open(str(path), "pt") as h:
        assert h.metadata() == {"format": "pt"}
    with pytest.raises(ValueError, match="where the header"):
        shards.save_safetensors_streamed(tmp_path / "y.safetensors", meta, list(tensors.items())[::-1])
    assert not (tmp_path / "y.safetensors").exists()
    save_file(tensors, tmp_path / "ref.safetensors")  # the same bytes as safetensors' own writer reads back
    assert load_file(tmp_path / "ref.safetensors").keys() == back.keys()


def test_cli_align_directories(pair, tmp_path):
    from pyrebasin.cli import main

    root, _, _ = pair
    out = tmp_path / "cli"
    assert main(["align", "--a", str(root / "a"), "--b", str(root / "b"), "--out", str(out),
                 "--max-shard-size", "80KB", "--perms", str(tmp_path / "perms.json"), "--no-progress"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in out.glob("*.safetensors")}
    aligned, model_a = load_file(next(out.glob("*.safetensors"))), shards.ShardedState(root / "a")
    assert all(torch.equal(v, model_a[k]) for k, v in aligned.items())
    assert main(["align", "--a", str(root / "a"), "--b", str(root / "b"), "--out", str(out), "--no-progress"]) == 2
