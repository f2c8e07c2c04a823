"""Nested matching on Hugging Face models built from tiny local configs: LLaMA with GQA (query heads and
value dims per KV group) and Mixtral (each expert's hidden units under the expert perm). B = A with a
planted nested perm; matching recovers it and the aligned B equals A bit for bit."""
import pytest
import torch

import pyrebasin as prb
from pyrebasin.spec import PermutationSpec

transformers = pytest.importorskip("transformers")


def _nested(spec: PermutationSpec) -> PermutationSpec:
    """The traced spec with its per-group perms nested under their outer perm (by name, when the trace
    does not state them itself): GQA `group_heads` and `vo` under `heads`, MoE `experts.hidden` under `experts`."""
    if spec.nested:
        return spec
    names = set(spec.perm_names)
    nested = {}
    for p in names:
        for tail, outer in ((".self_attn.group_heads", ".self_attn.heads"), (".self_attn.vo", ".self_attn.heads"),
                            (".mlp.experts.hidden", ".mlp.experts")):
            if p.endswith(tail) and p[:-len(tail)] + outer in names:
                nested[p] = p[:-len(tail)] + outer
    return PermutationSpec(spec.axes_to_perm, spec.fixed_reasons, nested)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=8, num_key_value_heads=2,
                                        max_position_embeddings=16)).eval()


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
                                            num_key_value_heads=2, num_experts_per_tok=2, intermediate_size=24,
                                            num_local_experts=4, max_position_embeddings=16)).eval()


def _qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    torch.manual_seed(0)
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, num_experts_per_tok=2, intermediate_size=48,
                                              moe_intermediate_size=16, num_experts=4, shared_expert_intermediate_size=24,
                                              decoder_sparse_step=1, mlp_only_layers=[],
                                              max_position_embeddings=16)).eval()


def _gpt2():   # MHA: each head's q/k dims nested under the heads
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                      bos_token_id=0, eos_token_id=0)).eval()


MODELS = {"llama": _llama, "mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "gpt2": _gpt2}


def _planted(model, spec, seed):
    a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    planted = prb.random_permutation(spec, a, seed)
    b = prb.apply_permutation(spec, planted, a)
    model_b = type(model)(model.config).eval()
    model_b.load_state_dict(b)
    return a, b, planted, model_b


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_hf_planted_nested_perm_is_recovered_by_weight_matching(arch):
    model = MODELS[arch]()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    spec = _nested(prb.trace_spec(model, ids))
    per_layer = {"llama": 2, "mixtral": 3, "qwen2_moe": 3, "gpt2": 1}[arch]   # GQA heads/value dims, experts' units
    assert len(spec.nested) == 2 * per_layer
    sizes = spec.perm_sizes(model.state_dict())
    assert all(sizes[p] > sizes[q] for p, q in spec.nested.items())   # per group: not one shared perm
    a, b, planted, model_b = _planted(model, spec, 5)
    with torch.no_grad():
        torch.testing.assert_close(model_b(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    res = prb.weight_matching(spec, a, b)
    aligned = prb.apply_permutation(spec, res.perms, b)
    assert all(torch.equal(aligned[k], a[k]) for k in a)
    assert all(torch.equal(res.perms[p], v) for p, v in prb.invert_permutation(planted).items())


def test_hf_llama_planted_nested_perm_is_recovered_by_activation_matching():
    model = _llama()
    ids = torch.randint(0, 50, (8, 12), generator=torch.Generator().manual_seed(1))
    spec = _nested(prb.trace_spec(model, ids[:2]))
    a, b, planted, model_b = _planted(model, spec, 9)
    res = prb.activation_matching(model, model_b, spec, ids, batch_size=4)
    aligned = prb.apply_permutation(spec, res.perms, b)
    assert all(torch.equal(aligned[k], a[k]) for k in a)


def test_hf_llama_streamed_weight_matching_takes_nested_specs(tmp_path):
    """`streamed_weight_matching` (checkpoints read lazily) goes through the same family solver."""
    from safetensors.torch import save_file

    from pyrebasin.matching.streamed import streamed_weight_matching
    model = _llama()
    spec = _nested(prb.trace_spec(model, torch.randint(0, 50, (2, 7))))
    a, b, planted, _ = _planted(model, spec, 13)
    save_file({k: v.contiguous() for k, v in a.items()}, str(tmp_path / "a.safetensors"))
    save_file({k: v.contiguous() for k, v in b.items()}, str(tmp_path / "b.safetensors"))
    res = streamed_weight_matching(spec, tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert all(torch.equal(res.perms[p], v) for p, v in prb.invert_permutation(planted).items())
