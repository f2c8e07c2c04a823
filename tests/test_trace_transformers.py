"""trace_spec on sequence models: hand-written GPT blocks (causal, GQA, RoPE), a ViT with
nn.MultiheadAttention, LSTM/GRU stacks, and tiny randomly initialised Hugging Face GPT-2 / LLaMA /
Qwen2 / BERT models (built from a config, no download)."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyrebasin as prb


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """HF-style q/k/v/o projections, heads by view + transpose, scores by matmul + softmax."""

    def __init__(self, d, heads, kv_heads, seq, rope):
        super().__init__()
        self.h, self.kv, self.hd, self.rope = heads, kv_heads, d // heads, rope
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, kv_heads * self.hd)
        self.v_proj = nn.Linear(d, kv_heads * self.hd)
        self.o_proj = nn.Linear(d, d)
        pos = torch.arange(seq)[:, None] / 10 ** (torch.arange(self.hd // 2) / self.hd)
        self.register_buffer("cos", torch.cat([pos.cos(), pos.cos()], -1), persistent=False)
        self.register_buffer("sin", torch.cat([pos.sin(), pos.sin()], -1), persistent=False)
        self.register_buffer("mask", torch.tril(torch.ones(seq, seq)), persistent=False)

    def forward(self, x):
        b, t, d = x.shape
        q = self.q_proj(x).view(b, t, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        if self.rope:
            q = q * self.cos + rotate_half(q) * self.sin
            k = k * self.cos + rotate_half(k) * self.sin
        k = k.repeat_interleave(self.h // self.kv, dim=1)
        v = v.repeat_interleave(self.h // self.kv, dim=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)
        att = att.masked_fill(self.mask[:t, :t] == 0, float("-inf")).softmax(dim=-1)
        return self.o_proj((att @ v).transpose(1, 2).reshape(b, t, d))


class GPT(nn.Module):
    def __init__(self, vocab=13, d=16, heads=4, kv_heads=4, seq=6, layers=2, rope=False):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.1 * torch.randn(seq, d))
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict(dict(
                ln1=nn.LayerNorm(d), attn=Attention(d, heads, kv_heads, seq, rope), ln2=nn.LayerNorm(d),
                up=nn.Linear(d, 2 * d), gate=nn.Linear(d, 2 * d), down=nn.Linear(2 * d, d))))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.tok(ids) + self.pos[: ids.shape[1]]
        for blk in self.blocks:
            x = x + blk["attn"](blk["ln1"](x))
            h = blk["ln2"](x)
            x = x + blk["down"](F.silu(blk["gate"](h)) * blk["up"](h))
        return self.head(self.ln_f(x))


@pytest.mark.parametrize("kv_heads,rope", [(4, False), (2, True)])
def test_hand_written_gpt(kv_heads, rope):
    torch.manual_seed(0)
    model, ids = GPT(kv_heads=kv_heads, rope=rope), torch.randint(0, 13, (3, 6))
    spec = prb.trace_spec(model, ids)
    ax = spec.axes_to_perm
    q, v, o = ax["blocks.0.attn.q_proj.weight"][0], ax["blocks.0.attn.v_proj.weight"][0], \
        ax["blocks.0.attn.o_proj.weight"][1]
    if kv_heads == 4:  # whole heads, q/k within-head dims, v/o within-head dims
        assert q == prb.Blocked((4, 4), ("P_blocks.0.attn.heads", "P_blocks.0.attn.qk"))
        assert ax["blocks.0.attn.k_proj.weight"][0] == q
        assert o == v == prb.Blocked((4, 4), ("P_blocks.0.attn.heads", "P_blocks.0.attn.vo"))
    else:  # GQA: q heads = (kv heads, heads per group); RoPE freezes the q/k within-head dims
        assert q.shape == (2, 2, 4) and q.perms[0] is not None and q.perms[1] is not None
        assert q.perms[2] is None
        assert ax["blocks.0.attn.k_proj.weight"][0] == prb.Blocked((2, 4), (q.perms[0], None))
        assert v.shape == (2, 4) and v.perms[0] == q.perms[0] and v.perms[1] is not None
        assert o == prb.Blocked((2, 2, 4), q.perms[:2] + v.perms[1:])
    assert ax["pos"] == (None, "P_residual_0") and ax["tok.weight"] == (None, "P_residual_0")
    assert ax["blocks.1.up.weight"][0] == ax["blocks.1.gate.weight"][0] == "P_blocks.1.gate.out"
    prb.check_spec(model, spec, ids)


class ViT(nn.Module):
    def __init__(self, d=16, heads=4, patch=4, need_weights=False):
        super().__init__()
        self.need_weights = need_weights
        self.embed = nn.Conv2d(1, d, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, 10)

    def forward(self, img):
        x = self.embed(img.unsqueeze(1)).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=self.need_weights)[0]
        x = x + self.mlp(self.ln2(x))
        return self.head(x[:, 0])


@pytest.mark.parametrize("need_weights", [False, True])
def test_vit_with_multihead_attention(need_weights):
    torch.manual_seed(0)
    model, img = ViT(need_weights=need_weights), torch.randn(3, 8, 8)
    spec = prb.trace_spec(model, img)  # fx leaves MultiheadAttention opaque: torch.export is used
    ax = spec.axes_to_perm
    res = ax["embed.weight"][0]
    assert res is not None and ax["cls"] == (None, None, res) and ax["attn.out_proj.bias"] == (res,)
    packed = ax["attn.in_proj_weight"]  # rows (q|k|v, heads, head dim): one head perm, one dim perm
    assert packed[1] == res and packed[0].shape == (3, 4, 4) and packed[0].perms[0] is None
    assert None not in packed[0].perms[1:]
    assert ax["attn.out_proj.weight"] == (res, prb.Blocked((4, 4), packed[0].perms[1:]))
    prb.check_spec(model, spec, img)


class Recurrent(nn.Module):
    def __init__(self, kind, layers, bidirectional, read_state):
        super().__init__()
        self.rnn = getattr(nn, kind)(4, 6, num_layers=layers, batch_first=True,
                                     bidirectional=bidirectional)
        self.fc = nn.Linear(6 * (2 if bidirectional else 1), 2)
        self.fh = nn.Linear(6, 2)
        self.read_state = read_state

    def forward(self, x):
        out, state = self.rnn(x)
        y = self.fc(out).mean(1)
        if self.read_state:  # h_n holds every layer's units in one axis
            y = y + self.fh(state[0] if isinstance(state, tuple) else state).sum(0)
        return y


@pytest.mark.parametrize("kind,layers,bidirectional,read_state",
                         [("LSTM", 2, True, False), ("GRU", 2, False, True), ("RNN", 1, True, True)])
def test_recurrent(kind, layers, bidirectional, read_state):
    torch.manual_seed(0)
    model, x = Recurrent(kind, layers, bidirectional, read_state), torch.randn(3, 5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = prb.trace_spec(model, x)
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[kind]
    rows = spec.axes_to_perm["rnn.weight_hh_l0"][0]
    assert (rows == "P_rnn.l0") if gates == 1 else rows == prb.Blocked((gates, 6), (None, "P_rnn.l0"))
    assert spec.axes_to_perm["rnn.weight_hh_l0"][1] == "P_rnn.l0"
    if layers == 2:  # the layers share one group only when h_n (all layers in one axis) is read
        assert ("P_rnn.l1" in spec.perm_names) == (not read_state)
    prb.check_spec(model, spec, x)


def hf_models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                      bos_token_id=0, eos_token_id=0, attn_pdrop=0.0,
                                      resid_pdrop=0.0, embd_pdrop=0.0))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=16,
                                         bos_token_id=0, eos_token_id=0, pad_token_id=0))
    return {"gpt2": gpt2, "llama": llama}


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")  # only the HF tests need it (test extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf_models()


def test_hf_gpt2(hf):
    model = hf["gpt2"]
    inputs = {"input_ids": torch.randint(0, 50, (2, 7)), "use_cache": False}
    spec = prb.trace_spec(model, inputs)
    ax = spec.axes_to_perm
    res = ax["transformer.wte.weight"][1]
    assert ax["lm_head.weight"] == ax["transformer.wte.weight"] == (None, res)  # tied
    assert ax["transformer.wpe.weight"] == (None, res)
    c_attn = ax["transformer.h.0.attn.c_attn.weight"]  # HF Conv1D: [in, 3*out]
    assert c_attn[0] == res and c_attn[1].shape == (3, 4, 8) and c_attn[1].perms[0] is None
    assert c_attn[1].perms[1] == "P_transformer.h.0.attn.heads"
    assert ax["transformer.h.1.mlp.c_proj.weight"] == ("P_transformer.h.1.mlp.c_fc.out", res)
    report = prb.check_spec(model, spec, inputs)
    assert len(report.perm_sizes) == 7


def test_hf_llama_gqa_rope(hf):
    model = hf["llama"]
    inputs = {"input_ids": torch.randint(0, 50, (2, 7)), "use_cache": False}
    spec = prb.trace_spec(model, inputs)
    ax = spec.axes_to_perm
    q = ax["model.layers.0.self_attn.q_proj.weight"][0]
    assert q.shape == (2, 2, 8) and q.perms[2] is None  # rotary: no within-head q/k perm
    assert q.perms[:2] == ("P_model.layers.0.self_attn.heads", "P_model.layers.0.self_attn.group_heads")
    v = ax["model.layers.0.self_attn.v_proj.weight"][0]
    assert v == prb.Blocked((2, 8), (q.perms[0], "P_model.layers.0.self_attn.vo"))
    mlp = ax["model.layers.1.mlp.down_proj.weight"]
    assert mlp[1] == ax["model.layers.1.mlp.gate_proj.weight"][0] == ax["model.layers.1.mlp.up_proj.weight"][0]
    assert ax["model.norm.weight"] == (mlp[0],) == (ax["lm_head.weight"][1],)
    prb.check_spec(model, spec, inputs)


@pytest.mark.parametrize("arch", ["bert", "qwen2"])
def test_hf_more_architectures(arch):
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertModel, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 7))
    if arch == "bert":  # returns hidden states: the residual stream reaches the output, so frozen
        model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=48,
                                     max_position_embeddings=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0))
        inputs = {"input_ids": ids, "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    else:  # q/k/v biases, GQA, RoPE
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, max_position_embeddings=16))
        inputs = {"input_ids": ids, "use_cache": False}
    spec = prb.trace_spec(model, inputs)
    if arch == "bert":
        assert spec.axes_to_perm["embeddings.word_embeddings.weight"] == (None, None)
        assert "output" in spec.fixed_reasons["embeddings.LayerNorm.weight"]
        assert "P_encoder.layer.1.attention.self.heads" in spec.perm_names
    else:
        assert spec.axes_to_perm["model.layers.0.self_attn.k_proj.bias"][0].shape == (2, 8)
    prb.check_spec(model, spec, inputs)


# --- causal LMs as users call them: token ids only, meta device, MoE, planted permutations, bf16 ---
def _llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**(dict(vocab_size=50, hidden_size=32, intermediate_size=48,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2, max_position_embeddings=16) | kw)))


def _moe(arch):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM
    torch.manual_seed(0)
    common = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=16)
    if arch == "mixtral":
        return MixtralForCausalLM(MixtralConfig(intermediate_size=24, num_local_experts=4, **common))
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                                              shared_expert_intermediate_size=24, decoder_sparse_step=1,
                                              mlp_only_layers=[], **common))


def _planted(spec, state, seed=3):
    """B = A permuted at random: weight matching must find the inverse, exactly."""
    perms = prb.random_permutation(spec, state, generator=seed)
    state_b = prb.apply_permutation(spec, perms, state)
    result = prb.weight_matching(spec, state, state_b)
    aligned = prb.apply_permutation(spec, result.perms, state_b)
    return perms, result, aligned


def test_hf_token_ids_without_use_cache_and_meta_device(hf):
    model, ids = hf["llama"], torch.randint(0, 50, (2, 7))
    spec = prb.trace_spec(model, ids)  # no use_cache=False: trace_spec turns the cache off itself
    assert spec.axes_to_perm == prb.trace_spec(model, {"input_ids": ids, "use_cache": False}).axes_to_perm
    with torch.device("meta"):
        meta = type(model)(model.config)
    assert next(meta.parameters()).is_meta
    assert prb.trace_spec(meta, ids).axes_to_perm == spec.axes_to_perm  # no weights needed
    with pytest.raises(ValueError, match="meta device"):
        prb.check_spec(meta, spec, ids)
    prb.check_spec(model, spec, ids)


def test_hf_llama_gqa_groups_and_planted_permutation(hf):
    model = hf["llama"]
    spec = prb.trace_spec(model, torch.randint(0, 50, (2, 7)))
    per_layer = {"self_attn.heads", "self_attn.group_heads", "self_attn.vo", "mlp.gate_proj.out"}
    assert set(spec.perm_names) == {"P_residual_0"} | {f"P_model.layers.{i}.{g}"
                                                       for i in (0, 1) for g in per_layer}
    attn = "P_model.layers.0.self_attn"
    # 2 KV heads x 2 query heads each, head dim 8: the query heads of each KV group, and the value dims
    # of each KV head, are permuted independently (nested under the KV heads; q/k dims frozen by RoPE)
    assert {p: q for p, q in spec.nested.items() if p.startswith(attn)} == {
        f"{attn}.group_heads": f"{attn}.heads", f"{attn}.vo": f"{attn}.heads"}
    sizes = spec.perm_sizes(model.state_dict())
    assert [sizes[f"{attn}.{g}"] for g in ("heads", "group_heads", "vo")] == [2, 4, 16]
    prb.check_spec(model, spec, torch.randint(0, 50, (2, 7)))
    flat = prb.trace_spec(model, torch.randint(0, 50, (2, 7)), nested=False)   # the shared-perm subgroup
    assert flat.axes_to_perm == spec.axes_to_perm and flat.nested == {}
    assert [flat.perm_sizes(model.state_dict())[f"{attn}.{g}"] for g in ("heads", "group_heads", "vo")] == [2, 2, 8]
    state = model.state_dict()   # weight matching of nested families: pyrebasin.matching (plain spec here)
    perms, result, aligned = _planted(flat, state)
    inverse = prb.invert_permutation(perms)
    assert all(torch.equal(result.perms[p], inverse[p]) for p in perms)
    assert all(torch.equal(aligned[k], state[k]) for k in state)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_hf_moe_experts_with_router_rows(arch):
    pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _moe(arch)
    impl = model.config._experts_implementation
    ids = torch.randint(0, 50, (2, 7))
    spec = prb.trace_spec(model, ids)
    assert model.config._experts_implementation == impl  # traced through batched_mm, then restored
    ax, mlp = spec.axes_to_perm, "model.layers.1.mlp"
    experts, hidden = f"P_{mlp}.experts", f"P_{mlp}.experts.hidden"
    assert ax[f"{mlp}.gate.weight"][0] == ax[f"{mlp}.experts.gate_up_proj"][0] == \
        ax[f"{mlp}.experts.down_proj"][0] == experts  # router rows move with their experts
    assert ax[f"{mlp}.experts.gate_up_proj"][1] == prb.Blocked((2, 16 if arch == "qwen2_moe" else 24),
                                                                (None, hidden))
    assert ax[f"{mlp}.experts.down_proj"][2] == hidden
    assert ax[f"{mlp}.experts.down_proj"][1] == ax["model.norm.weight"][0]  # the residual stream
    assert spec.perm_sizes(model.state_dict())[experts] == 4
    assert spec.nested[hidden] == experts    # each expert's hidden units permuted on their own
    assert spec.perm_sizes(model.state_dict())[hidden] == 4 * (16 if arch == "qwen2_moe" else 24)
    prb.check_spec(model, spec, ids)  # run with the model's own experts implementation
    state = model.state_dict()
    flat = prb.trace_spec(model, ids, nested=False)   # weight matching below on the shared-perm spec
    assert flat.axes_to_perm == spec.axes_to_perm and hidden not in flat.nested
    prb.check_spec(model, flat, ids)
    _, result, aligned = _planted(flat, state)
    assert all(torch.equal(aligned[k], state[k]) for k in state)


def _without(spec, key, axis, factor=None):
    """`spec` with one slot's permutation removed: a wrong spec (that axis no longer follows its group)."""
    ax = dict(spec.axes_to_perm)
    entries = list(ax[key])
    if factor is None:
        entries[axis] = None
    else:
        b = entries[axis]
        entries[axis] = prb.Blocked(b.shape, tuple(None if f == factor else p for f, p in enumerate(b.perms)))
    ax[key] = tuple(entries)
    return prb.PermutationSpec(ax, spec.fixed_reasons, spec.nested)


def test_check_spec_tolerance_follows_dtype():
    pytest.importorskip("transformers")
    model, ids = _llama(hidden_size=64, intermediate_size=128, num_hidden_layers=4, vocab_size=500,
                        max_position_embeddings=64), torch.randint(0, 500, (2, 7))
    spec = prb.trace_spec(model, ids)
    fp32 = prb.check_spec(model, spec, ids, modes=("eval",))
    assert fp32.max_abs_diff["eval"] < 1e-5
    bf16 = model.to(torch.bfloat16)
    # the fixed fp32 tolerance (atol 1e-5) fails this correct spec in bf16 (seed 5: max Δ 2.0e-3 =
    # 0.0031 x max |output|; seeds 0-4: 0); the bf16 default bound is 4 eps = 0.031 x max |output|
    assert not prb.check_spec(bf16, spec, ids, modes=("eval",), seed=5, atol=1e-5, rtol=1e-4,
                              raise_on_failure=False).ok
    for seed in (0, 5):
        assert prb.check_spec(bf16, spec, ids, modes=("eval",), seed=seed).ok
    # wrong specs fail in bf16: max Δ / max |output| measured 0.76-1.07 (o_proj's v dims not
    # permuted) and 0.15-0.23 (down_proj's inputs not permuted) over seeds 0-7, 5-7x the bound
    for key, axis, factor in (("model.layers.1.self_attn.o_proj.weight", 1, 2),
                              ("model.layers.0.mlp.down_proj.weight", 1, None)):
        with pytest.raises(prb.SpecCheckError, match="bfloat16"):
            prb.check_spec(bf16, _without(spec, key, axis, factor), ids, modes=("eval",))
    from pyrebasin.check import needs_jitter, tolerance
    bound = {d: tolerance(d, 2.0)[0] for d in (torch.bfloat16, torch.float16, torch.float32)}
    assert bound[torch.bfloat16] > bound[torch.float16] > bound[torch.float32]
    assert needs_jitter(torch.ones(4)) and needs_jitter(torch.zeros(300, 300))
    assert not needs_jitter(torch.randn(300, 300))  # generic already: used uncopied


class Router(nn.Module):
    """A top-2 router over 4 experts stacked in one tensor; `use` says how else the indices are read."""

    def __init__(self, use):
        super().__init__()
        self.use = use
        self.gate = nn.Linear(6, 4, bias=False)
        self.w = nn.Parameter(torch.randn(4, 5, 6))
        self.v = nn.Parameter(torch.randn(3, 4))
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        _, ids = torch.topk(self.gate(x).softmax(-1), 2, dim=-1)
        y = self.out(torch.einsum("bkoi,bi->bo", self.w[ids], x))
        if self.use == "second_axis":  # v[:, ids] indexes an axis the rules do not tie
            y = y + self.v[:, ids].sum()
        elif self.use == "arithmetic":  # the index values themselves reach the output
            y = y + ids.float().sum()
        return y


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("use", ["gather_only", "second_axis", "arithmetic"])
def test_router_indices_gather_experts(use, frontend):
    torch.manual_seed(0)
    model, x = Router(use), torch.randn(3, 6)
    spec = prb.trace_spec(model, x, frontend=frontend)
    experts = spec.axes_to_perm["w"][0]
    if use == "gather_only":  # experts permuted with the router rows that pick them
        assert experts == "P_experts" and spec.axes_to_perm["gate.weight"] == (experts, None)
    else:  # any other use of the indices would see them change: the expert axis is frozen
        assert experts is None and spec.axes_to_perm["gate.weight"] == (None, None)
    assert spec.axes_to_perm["w"][1] is not None  # each expert's units stay permutable
    prb.check_spec(model, spec, x)


def test_meta_device_traces_like_real_weights():
    from pyrebasin.zoo import MLP, ResNet20
    for make, x in ((lambda: MLP(in_features=12, width=24, depth=2, classes=5, norm="bn"), torch.randn(4, 12)),
                    (lambda: ResNet20(norm="bn", blocks_per_stage=1), torch.randn(3, 16))):  # fx, export
        torch.manual_seed(0)
        real = make()
        with torch.device("meta"):
            meta = make()
        assert prb.trace_spec(meta, x).axes_to_perm == prb.trace_spec(real, x).axes_to_perm


class FusedQKV(nn.Module):
    """One Linear for q, k and v, sliced apart (Phi-3 style); `offset` shifts the slices off alignment."""

    def __init__(self, offset=0, d=16, heads=4):
        super().__init__()
        self.d, self.h, self.offset = d, heads, offset
        self.qkv = nn.Linear(d, 3 * d + offset)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        b, t, _ = x.shape
        y, d = self.qkv(x), self.d  # python-int bounds: fx sees them too
        q, k, v = (y[..., self.offset + i * d: self.offset + (i + 1) * d].view(b, t, self.h, -1).transpose(1, 2)
                   for i in range(3))
        att = F.scaled_dot_product_attention(q, k, v)
        return x + self.o(att.transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("offset", [0, 2])
def test_fused_qkv_sliced_into_aligned_pieces(offset):
    torch.manual_seed(0)
    model, x = FusedQKV(offset), torch.randn(2, 5, 16)
    for frontend in ("fx", "export"):
        spec = prb.trace_spec(model, x, frontend=frontend)
        rows = spec.axes_to_perm["qkv.weight"][0]
        if offset == 0:  # (q|k|v, heads, head dim): heads and one within-head perm (q, k, v share it)
            assert rows.shape == (3, 4, 4) and rows.perms[0] is None and None not in rows.perms[1:]
            assert spec.axes_to_perm["o.weight"][1] == prb.Blocked((4, 4), rows.perms[1:])
        else:  # slices that are not equal pieces of the axis: frozen
            assert rows is None and spec.axes_to_perm["o.weight"][1] is None
        prb.check_spec(model, spec, x)


def test_hf_phi3_fused_qkv():
    pytest.importorskip("transformers")
    from transformers import Phi3Config, Phi3ForCausalLM
    ids = torch.randint(0, 50, (2, 7))
    for kv in (4, 2):  # MHA: q, k, v slices are equal pieces; GQA: unequal, so frozen
        torch.manual_seed(0)
        model = Phi3ForCausalLM(Phi3Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=kv, pad_token_id=0,
                                           max_position_embeddings=16))
        spec = prb.trace_spec(model, ids)
        rows = spec.axes_to_perm["model.layers.0.self_attn.qkv_proj.weight"][0]
        if kv == 4:
            assert rows == prb.Blocked((3, 4, 8), (None, "P_model.layers.0.self_attn.heads", None))
        else:
            assert rows is None
        prb.check_spec(model, spec, ids)
