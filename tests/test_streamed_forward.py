"""Streamed forwards (pyrebasin.streamed_forward, hf.streamed_hf_model): models built with meta parameters that
read each module's weights from safetensors shards just in time give the logits of the loaded model, for LLaMA,
Qwen2, Mixtral and GPT-2 (tied embeddings), in float32 and bfloat16; activation matching of two model
directories (hf.align_hf(matching="activation"), `pyrebasin align --method activation` on directories)
recovers a planted permutation and equals the in-memory activation matching. Tiny models from local configs."""
import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

import pyrebasin as prb
from pyrebasin import hf, shards
from pyrebasin.check import tolerance
from pyrebasin.streamed_forward import empty_parameters, stream_weights_, streamed_weights

transformers = pytest.importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

SMALL = dict(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),
    "mixtral": lambda: transformers.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=50, n_embd=64, n_layer=2, n_head=4, n_positions=32),
}


def save_dir(model, path, config):
    if isinstance(config, transformers.MixtralConfig):
        # the model's own stacked-expert keys (save_pretrained writes the legacy per-expert layout)
        path.mkdir(parents=True)
        config.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors",
                  metadata={"format": "pt"})
    else:
        model.save_pretrained(path, max_shard_size="60KB")


@pytest.fixture(scope="module")
def directories(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    for name, config in CONFIGS.items():
        torch.manual_seed(0)
        cfg = config()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            save_dir(transformers.AutoModelForCausalLM.from_config(cfg).eval(), root / name, cfg)
    return root


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_logits_equal_the_loaded_model(directories, name, dtype):
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    want = logits(hf.load_hf_model(directories / name, dtype=dtype), ids)
    model, weights = hf.streamed_hf_model(directories / name, dtype=dtype)
    got = logits(model, ids)
    # the same kernels on the same tensors (measured: bit-equal in both dtypes); float32 tight, bf16 at
    # check_spec's tolerance for its scale
    scale = float(want.float().abs().max())
    atol = 1e-6 * max(1.0, scale) if dtype == torch.float32 else tolerance(dtype, scale)[0]
    assert got.dtype == want.dtype and float((got.float() - want.float()).abs().max()) <= atol
    # nothing stays materialised: every parameter is back on meta, and weights lived one module at a time
    assert all(p.is_meta for p in model.parameters())
    state = shards.ShardedState(directories / name)
    largest = max(m.numel() for m in state.meta().values()) * torch.empty((), dtype=dtype).element_size()
    assert weights.alive_bytes == 0 and 0 < weights.peak_bytes <= 2 * largest
    assert weights.reads >= len(state)
    assert all(m.dtype == dtype for m in weights.meta().values() if m.is_floating_point())


def test_stream_weights_on_a_caller_model_and_errors(directories):
    cfg = CONFIGS["llama"]()
    state = shards.ShardedState(directories / "llama")
    with empty_parameters():
        model = transformers.LlamaForCausalLM(cfg).eval()
    assert all(p.is_meta for p in model.parameters())
    assert not model.model.rotary_emb.inv_freq.is_meta   # computed, not read
    weights = stream_weights_(model, state)
    assert streamed_weights(model) is weights
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(logits(model, ids), logits(hf.load_hf_model(directories / "llama"), ids), atol=1e-6)
    with pytest.raises(ValueError, match="already streams"):
        stream_weights_(model, state)
    weights.remove()
    assert streamed_weights(model) is None and not model._forward_pre_hooks
    with pytest.raises(ValueError, match="not on the meta device"):
        stream_weights_(transformers.LlamaForCausalLM(cfg), state)
    with torch.device("meta"):
        bare = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match="inv_freq.*meta device"):
        stream_weights_(bare, state)
    with empty_parameters():
        model = transformers.LlamaForCausalLM(cfg)
    partial = {k: v for k, v in state.read(list(state)).items() if "lm_head" not in k}
    with pytest.raises(ValueError, match="lacks .*lm_head.weight"):
        stream_weights_(model, partial)
    bad = dict(state.read(list(state)))
    bad["model.layers.1.mlp.up_proj.weight"] = bad["model.layers.1.mlp.up_proj.weight"].clone()
    bad["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    weights = stream_weights_(model, bad)
    with pytest.raises(ValueError, match="up_proj.weight.*non-finite"):
        logits(model, ids)
    assert weights.alive_bytes == 0 and all(p.is_meta for p in model.parameters())   # released on the error


def tiny_llama(seed):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(CONFIGS["llama"]()).eval()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A and B = A with a planted permutation, as sharded model directories; the planted perms."""
    root = tmp_path_factory.mktemp("planted")
    model_a = tiny_llama(0)
    model_a.save_pretrained(root / "a", max_shard_size="60KB")
    spec, _ = hf.load_hf_spec(root / "a")
    state_a = {k: v for k, v in model_a.state_dict().items() if k in spec.axes_to_perm}
    perms = prb.random_permutation(spec, state_a, generator=torch.Generator().manual_seed(1))
    model_b = tiny_llama(0)
    model_b.load_state_dict(prb.apply_permutation(spec, perms, state_a), strict=False)
    model_b.save_pretrained(root / "b", max_shard_size="60KB")
    return root, spec, perms


def test_streamed_activation_matching_equals_in_memory(planted):
    root, spec, perms = planted
    ids = torch.randint(0, 50, (16, 16), generator=torch.Generator().manual_seed(0))
    options = dict(batch_size=4, dtype=torch.float32, max_memory=200_000)
    streamed = hf.align_hf(root / "a", root / "b", matching="activation", data=ids, progress=False, **options)
    in_memory = prb.activation_matching(hf.load_hf_model(root / "a"), hf.load_hf_model(root / "b"), spec, ids,
                                        **options)
    inverse = {p: torch.argsort(v) for p, v in perms.items()}
    assert all(torch.equal(streamed.perms[p], inverse[p]) for p in inverse)
    assert all(torch.equal(streamed.perms[p], in_memory.perms[p]) for p in inverse)
    assert streamed.objective == pytest.approx(in_memory.objective, rel=1e-6)
    with pytest.raises(ValueError, match="needs data"):
        hf.align_hf(root / "a", root / "b", matching="activation")
    with pytest.raises(ValueError, match="matching must be"):
        hf.align_hf(root / "a", root / "b", matching="act", data=ids)
    model, _ = hf.streamed_hf_model(root / "a")
    with pytest.raises(ValueError, match="state_a must be None"):
        prb.activation_matching(model, model, spec, ids, state_a={})


def test_cli_activation_on_directories(planted, tmp_path):
    from pyrebasin.cli import main

    root, _, perms = planted
    text = tmp_path / "corpus.txt"
    text.write_text("".join(chr(ord("a") + (i * 7 + i // 5) % 26) for i in range(2048)))
    out, found = tmp_path / "aligned", tmp_path / "perms.json"
    args = ["align", "--a", str(root / "a"), "--b", str(root / "b"), "--out", str(out), "--method", "activation",
            "--seq-len", "16", "--batch-tokens", "64", "--max-memory", "200KB", "--perms", str(found)]
    # byte-level ids reach 'z' = 122, past this model's 50-word vocabulary: a one-line error, no output
    assert main(args + ["--data", str(text), "--no-progress"]) == 2 and not out.exists()
    ids = torch.randint(0, 50, (4096,), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    assert main(args + ["--data", str(tmp_path / "ids.pt"), "--no-progress"]) == 0
    got = {p: torch.tensor(v) for p, v in json.loads(found.read_text()).items()}
    assert all(torch.equal(got[p], torch.argsort(v)) for p, v in perms.items())
    test = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(5))
    aligned = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert torch.allclose(logits(aligned, test), logits(hf.load_hf_model(root / "b"), test), atol=1e-5)
    assert main(["align", "--a", str(root / "a"), "--b", str(root / "b"), "--out", str(tmp_path / "o2"),
                 "--method", "activation", "--no-progress"]) == 2   # --data missing
