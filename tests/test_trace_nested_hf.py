"""Nested perms traced on Hugging Face models built locally from small configs (no download): the
expected nesting per architecture, check_spec in eval and train, and a planted random nested
permutation giving the same logits within check_spec's float32 tolerance."""
import warnings

import pytest
import torch

import pyrebasin as prb
from pyrebasin.check import tolerance

transformers = pytest.importorskip("transformers")
V = 50
ATTN = {"llama_gqa": "model.layers.0.self_attn", "llama_mqa": "model.layers.0.self_attn",
        "qwen2": "model.layers.0.self_attn", "mixtral": "model.layers.0.self_attn",
        "qwen2_moe": "model.layers.0.self_attn", "gpt2": "transformer.h.0.attn",
        "bert": "encoder.layer.0.attention.self"}
# per layer 0: nested perm suffix -> outer suffix (relative to the attention / MLP module)
EXPECTED = {
    "llama_gqa": {"group_heads": "heads", "vo": "heads"},          # q/k dims frozen by RoPE
    "llama_mqa": {},                                                # one KV head: nothing to nest under
    "qwen2": {"group_heads": "heads", "vo": "heads"},
    "mixtral": {"group_heads": "heads", "vo": "heads", "mlp.experts.hidden": "mlp.experts"},
    "qwen2_moe": {"group_heads": "heads", "vo": "heads", "mlp.experts.hidden": "mlp.experts"},
    "gpt2": {"qk": "heads"},       # c_attn: one within-head perm per head, shared by q, k and v
    "bert": {"qk": "heads", "vo": "heads"},
}


def build(arch):
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                              MixtralConfig, MixtralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig,
                              Qwen2MoeForCausalLM)
    torch.manual_seed(0)
    attn = dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                max_position_embeddings=16)
    if arch in ("llama_gqa", "llama_mqa"):
        return LlamaForCausalLM(LlamaConfig(intermediate_size=48, **(attn | {"num_key_value_heads": 2 if
                                                                            arch == "llama_gqa" else 1})))
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(intermediate_size=48, **attn))
    small = attn | {"hidden_size": 32, "num_attention_heads": 4, "num_experts_per_tok": 2}
    if arch == "mixtral":
        return MixtralForCausalLM(MixtralConfig(intermediate_size=24, num_local_experts=4, **small))
    if arch == "qwen2_moe":
        return Qwen2MoeForCausalLM(Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                                                  shared_expert_intermediate_size=24, decoder_sparse_step=1,
                                                  mlp_only_layers=[], **small))
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                          bos_token_id=0, eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0,
                                          embd_pdrop=0.0))
    return BertModel(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0))


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_traced_nesting_checks_and_keeps_logits(arch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build(arch)
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    spec = prb.trace_spec(model, ids)
    attn = ATTN[arch]
    layer = attn.rsplit(".", 1)[0] if "mlp" in str(EXPECTED[arch]) else attn

    def full(suffix):
        return f"P_{layer}.{suffix}" if suffix.startswith("mlp.") else f"P_{attn}.{suffix}"
    got = {p: q for p, q in spec.nested.items() if p.startswith(f"P_{layer}.")}
    assert got == {full(p): full(q) for p, q in EXPECTED[arch].items()}
    report = prb.check_spec(model, spec, ids)          # eval and train, random nested draw
    assert set(report.max_abs_diff) == {"eval", "train"}
    state = model.state_dict()
    perms = prb.random_permutation(spec, state, 5)
    for p, q in spec.nested.items():                   # the draw is block-following, not shared
        m = perms[p].numel() // perms[q].numel()
        assert torch.equal(perms[p].view(-1, m) // m, perms[q].view(-1, 1).expand(-1, m))
    model.eval()
    with torch.no_grad():
        ref = model(ids)[0]
        out = torch.func.functional_call(model, prb.apply_permutation(spec, perms, state), (ids,),
                                         tie_weights=False)[0]   # tied keys: both given, equal
    atol, rtol = tolerance(torch.float32, float(ref.abs().max()))
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    flat = prb.trace_spec(model, ids, nested=False)
    assert flat.nested == {} and flat.axes_to_perm == spec.axes_to_perm
    gained = prb.trace.symmetry_bits(spec, state) - prb.trace.symmetry_bits(flat, state)
    assert (gained > 0) == bool(spec.nested)
