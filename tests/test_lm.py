"""The language-model objective of the evaluator: next-token loss of causal LMs (HF ModelOutput or plain
logits), padding masked, token-weighted, perplexity; and a custom loss= for non-classifiers."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pyrebasin as prb
from pyrebasin.lm import LossParts, NextTokenLoss, logits_of, next_token_targets, perplexity

transformers = pytest.importorskip("transformers")


def _gpt2(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _llama(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg).eval()


def _ids(n=6, t=10, vocab=53, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _hf_loss(model, state, ids, mask=None):
    """HF's own mean next-token loss (labels = inputs, shifted inside, -100 ignored)."""
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = torch.func.functional_call(model, state, (), {"input_ids": ids, "attention_mask": mask,
                                                            "labels": labels, "use_cache": False},
                                           tie_weights=False)
    return float(out.loss)


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_interpolate_endpoints_are_the_models_own_next_token_loss(build):
    a, b = build(0), build(1)
    vocab = a.config.vocab_size
    ids = _ids(vocab=vocab)
    sa, sb = a.state_dict(), b.state_dict()
    curve = prb.interpolate(a, sa, sb, ids, ts=[0.0, 0.5, 1.0], batch_size=4)
    assert curve.loss["data"][0] == pytest.approx(_hf_loss(a, sa, ids), rel=1e-5)
    assert curve.loss["data"][-1] == pytest.approx(_hf_loss(a, sb, ids), rel=1e-5)
    assert curve.perplexity() == pytest.approx([math.exp(v) for v in curve.loss["data"]])
    assert all(0.0 <= v <= 1.0 for v in curve.accuracy["data"])
    assert prb.barrier(curve, "perplexity") == pytest.approx(
        max(curve.perplexity()) - 0.5 * (curve.perplexity()[0] + curve.perplexity()[-1]))


def test_padding_is_masked_and_the_mean_is_token_weighted():
    a, b = _llama(0), _llama(1)
    ids = _ids(n=4, t=9)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0          # right padding of different lengths
    mask[2, 3:] = 0
    padded = ids.masked_fill(mask == 0, 0)
    batch = {"input_ids": padded, "attention_mask": mask}
    sa, sb = a.state_dict(), b.state_dict()
    curve = prb.interpolate(a, sa, sb, [batch], ts=[0.0, 1.0])
    assert curve.loss["data"][0] == pytest.approx(_hf_loss(a, sa, padded, mask), rel=1e-5)
    # what the padded positions hold does not matter
    other = {"input_ids": ids.masked_fill(mask == 0, 7), "attention_mask": mask}
    again = prb.interpolate(a, sa, sb, [other], ts=[0.0, 1.0])
    assert again.loss["data"] == pytest.approx(curve.loss["data"], rel=1e-6)
    # labels inside the batch (HF convention) give the same number
    labelled = {**batch, "labels": padded.masked_fill(mask == 0, -100)}
    assert prb.interpolate(a, sa, sb, [labelled], ts=[0.0, 1.0]).loss["data"] == pytest.approx(curve.loss["data"])


def test_combinations_of_a_language_model_match_the_curve():
    a, b = _gpt2(0), _gpt2(1)
    ids = _ids(vocab=61)
    sa, sb = a.state_dict(), b.state_dict()
    res = prb.evaluate_combinations(a, sa, sb, torch.tensor([[1.0], [0.0], [0.5]]), ids, chunk=2)
    curve = prb.interpolate(a, sa, sb, ids, ts=[0.0, 1.0, 0.5])
    assert res.loss.tolist() == pytest.approx(curve.loss["data"], rel=1e-5)
    assert res.accuracy.tolist() == pytest.approx(curve.accuracy["data"])


class _TinyLM(nn.Module):
    """Plain logits [B, T, V] (no ModelOutput)."""

    def __init__(self, vocab=17, d=8):
        super().__init__()
        self.emb, self.out = nn.Embedding(vocab, d), nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):   # mapping batches arrive as keyword arguments
        return self.out(torch.tanh(self.emb(input_ids)))


def test_plain_logits_and_hand_computed_loss():
    torch.manual_seed(0)
    m = _TinyLM()
    ids = torch.randint(0, 17, (5, 7))
    s = m.state_dict()
    curve = prb.interpolate(m, s, s, ids, ts=2)
    with torch.no_grad():
        logits = m(ids)
    want = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 17), ids[:, 1:].reshape(-1))
    acc = (logits[:, :-1].argmax(-1) == ids[:, 1:]).double().mean()
    assert curve.loss["data"][0] == pytest.approx(float(want), rel=1e-6)
    assert curve.accuracy["data"][0] == pytest.approx(float(acc))


def test_bad_token_data_is_refused_with_the_reason():
    m = _TinyLM()
    s = m.state_dict()
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 17\)"):
        prb.interpolate(m, s, s, torch.tensor([[1, 2, 40]]), ts=2)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="no position has a target"):
        prb.interpolate(m, s, s, [{"input_ids": ids, "attention_mask": torch.tensor([[1, 0, 0]])}], ts=2)
    with pytest.raises(TypeError, match="bare tensor"):
        prb.interpolate(m, s, s, torch.randn(3, 4), ts=2)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        NextTokenLoss()(torch.zeros(1, 1, 3, 17), None, {"input_ids": ids, "attention_mask": torch.ones(1, 2)})
    with pytest.raises(TypeError, match="integer token ids"):
        next_token_targets(torch.zeros(2, 3), None)


def test_a_custom_regression_loss_runs_end_to_end():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    x, y = torch.randn(20, 3), torch.randn(20, 2)
    sa = {k: v.clone() for k, v in m.state_dict().items()}
    sb = {k: v + 0.1 for k, v in sa.items()}
    mse = lambda out, y: ((out - y) ** 2).mean(-1)   # noqa: E731  [K, B]
    curve = prb.interpolate(m, sa, sb, (x, y), ts=[0.0, 1.0], loss=mse)
    with torch.no_grad():
        want = float(((torch.func.functional_call(m, sb, (x,)) - y) ** 2).mean())
    assert curve.loss["data"][1] == pytest.approx(want, rel=1e-6)
    assert curve.accuracy == {}
    # LossParts from a custom loss: a weighted mean, with accuracy from its correct counts
    def parts(out, y):
        err = ((out - y) ** 2).sum(-1)
        return LossParts(err, torch.full((y.shape[0],), 2.0), (err < 1).double())
    r = prb.interpolate(m, sa, sb, (x, y), ts=[0.0, 1.0], loss=parts)
    assert r.loss["data"][1] == pytest.approx(want, rel=1e-6)
    assert 0 <= r.accuracy["data"][1] <= 1


def test_logits_of_and_perplexity():
    t = torch.zeros(2)
    assert logits_of(t) is t and logits_of({"logits": t}) is t and logits_of((t, 1)) is t
    with pytest.raises(TypeError, match="without 'logits'"):
        logits_of({"x": t})
    assert perplexity(0.0) == 1.0 and perplexity(1e6) == math.inf
