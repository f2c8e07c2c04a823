"""Language-model objectives through interpolate / barrier / evaluate_combinations and the CLI: a tiny HF
LLaMA on padded token batches (padding changes nothing), perplexity = exp(loss), a regression loss= end
to end, and `pyrebasin interpolate` on a UTF-8 text file (byte-level ids)."""
import json
import math
import warnings

import pytest
import torch
from torch import nn

import pyrebasin as prb
from pyrebasin.cli import main
from pyrebasin.io import save_state

pytest.importorskip("transformers")

VOCAB, T = 256, 10


def tiny_llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging
    logging.set_verbosity_error()
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval(), config


@pytest.fixture(scope="module")
def pair():
    model, config = tiny_llama(0)
    other, _ = tiny_llama(1)
    return model, config, dict(model.state_dict()), dict(other.state_dict())


def padded_batch(seed, pad_seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (6, T), generator=g)
    keep = torch.tensor([T, 7, 3, 10, 5, 2])
    mask = (torch.arange(T)[None] < keep[:, None]).long()
    pads = torch.randint(0, VOCAB, ids.shape, generator=torch.Generator().manual_seed(pad_seed))
    return {"input_ids": torch.where(mask.bool(), ids, pads), "attention_mask": mask}


def test_interpolate_an_hf_causal_lm_on_padded_batches(pair):
    model, _, sa, sb = pair
    curve = prb.interpolate(model, sa, sb, {"test": [padded_batch(0, 1), padded_batch(2, 3)]}, ts=3)
    other = prb.interpolate(model, sa, sb, {"test": [padded_batch(0, 9), padded_batch(2, 8)]}, ts=3)
    # right padding under a causal mask: the ids at masked positions change neither logits nor targets
    torch.testing.assert_close(torch.tensor(curve.loss["test"]), torch.tensor(other.loss["test"]), rtol=1e-6, atol=1e-6)
    # the endpoint is the token-weighted mean next-token cross-entropy of model A
    batch = padded_batch(0, 1)
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits[:, :-1]
    target = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    ce_sum = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1), ignore_index=-100,
                                         reduction="sum")
    batch2 = padded_batch(2, 3)
    with torch.no_grad():
        logits2 = model(**batch2, use_cache=False).logits[:, :-1]
    target2 = batch2["input_ids"][:, 1:].masked_fill(batch2["attention_mask"][:, 1:] == 0, -100)
    ce_sum = ce_sum + nn.functional.cross_entropy(logits2.reshape(-1, VOCAB), target2.reshape(-1),
                                                  ignore_index=-100, reduction="sum")
    n = int((target != -100).sum() + (target2 != -100).sum())
    assert curve.loss["test"][0] == pytest.approx(float(ce_sum) / n, rel=1e-5)
    assert curve.perplexity("test") == pytest.approx([math.exp(v) for v in curve.loss["test"]], rel=1e-12)
    assert prb.barrier(curve, "perplexity", split="test") >= 0.0
    assert 0.0 <= curve.accuracy["test"][0] <= 1.0


def test_evaluate_combinations_on_an_lm(pair):
    model, _, sa, sb = pair
    ids = torch.randint(0, VOCAB, (8, T), generator=torch.Generator().manual_seed(4))
    r = prb.evaluate_combinations(model, sa, sb, prb.sample_coefficients(sa, 4, distribution="uniform", seed=0), ids)
    assert r.loss.shape == (4,) and bool(torch.isfinite(r.loss).all())
    curve = prb.interpolate(model, sa, sb, {"data": ids}, ts=[0.0, 1.0])
    ends = prb.evaluate_combinations(model, sa, sb, prb.sample_coefficients(sa, 2, distribution="constant(1.0)",
                                                                            seed=0), ids)
    assert float(ends.loss[0]) == pytest.approx(curve.loss["data"][0], rel=1e-5)   # λ = 1: model A


def test_a_regression_loss_end_to_end():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    other = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    sa, sb = dict(model.state_dict()), dict(other.state_dict())
    x, y = torch.randn(40, 5), torch.randn(40, 3)
    mse = lambda out, y: ((out - y) ** 2).mean(-1)  # noqa: E731  [K, B, 3] -> [K, B]
    curve = prb.interpolate(model, sa, sb, {"test": (x, y)}, ts=3, loss=mse)
    with torch.no_grad():
        assert curve.loss["test"][0] == pytest.approx(float(((model(x) - y) ** 2).mean()), rel=1e-5)
        assert curve.loss["test"][-1] == pytest.approx(float(((other(x) - y) ** 2).mean()), rel=1e-5)
    r = prb.evaluate_combinations(model, sa, sb, prb.sample_coefficients(sa, 2, distribution="constant(0.0)"),
                                  (x, y), loss=mse)
    assert float(r.loss[0]) == pytest.approx(curve.loss["test"][-1], rel=1e-5)
    assert prb.barrier(curve, "loss", split="test") >= 0.0


def _write_pair(config, sa, sb, tmp_path):
    """config under cfg/, the two states as a.safetensors / b.safetensors (the CLI's inputs)."""
    config.save_pretrained(tmp_path / "cfg")
    save_state(sa, tmp_path / "a.safetensors")
    save_state(sb, tmp_path / "b.safetensors")


def test_cli_interpolate_on_a_text_file(pair, tmp_path, capsys):
    model, config, sa, sb = pair
    _write_pair(config, sa, sb, tmp_path)
    (tmp_path / "text.txt").write_text("pack my box with five dozen liquor jugs; ünïcödé. " * 12, encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["interpolate", "--hf-config", str(tmp_path / "cfg"), "--a", str(tmp_path / "a.safetensors"),
                   "--b", str(tmp_path / "b.safetensors"), "--data", str(tmp_path / "text.txt"), "--seq-len", "16",
                   "--ts", "3", "--align", "activation", "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "perplexity A" in printed
    report = json.loads((tmp_path / "out" / "curve.json").read_text())
    loss = report["curve"]["loss"]["train"]
    assert report["perplexity"]["train"] == pytest.approx([math.exp(v) for v in loss])
    assert report["curve"]["meta"]["objective"] == "next-token"
    assert "perplexity/endpoint_mean/train" in report["barriers"]
    torch.save(torch.tensor([[1, 2, 999]]), tmp_path / "bad.pt")
    rc = main(["interpolate", "--hf-config", str(tmp_path / "cfg"), "--a", str(tmp_path / "a.safetensors"),
               "--b", str(tmp_path / "b.safetensors"), "--data", str(tmp_path / "bad.pt"), "--ts", "2",
               "--out", str(tmp_path / "out2"), "--no-progress"])
    assert rc != 0
    assert "token ids must lie in [0, 256)" in capsys.readouterr().err


def test_cli_combine_on_two_lm_checkpoints(pair, tmp_path, capsys):
    model, config, sa, sb = pair
    _write_pair(config, sa, sb, tmp_path)
    torch.save(torch.randint(0, VOCAB, (6, 12), generator=torch.Generator().manual_seed(2)), tmp_path / "ids.pt")
    common = ["combine", "--a", str(tmp_path / "a.safetensors"), "--b", str(tmp_path / "b.safetensors"),
              "--hf-config", str(tmp_path / "cfg"), "--data", str(tmp_path / "ids.pt"), "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(common + ["--quick", "--studies", "combinability", "--out", str(tmp_path / "out")])
    assert rc == 0
    report = json.loads((tmp_path / "out" / "combine.json").read_text())
    ends = prb.interpolate(model, sa, sb, {"d": torch.load(tmp_path / "ids.pt")}, ts=[0.0, 1.0]).perplexity("d")
    assert [report["lm"]["perplexity_a"], report["lm"]["perplexity_b"]] == pytest.approx(ends, rel=1e-5)
    assert "perplexity A" in capsys.readouterr().out
    assert main(common + ["--studies", "transitivity", "--out", str(tmp_path / "o2")]) != 0
    assert "transitivity study needs three models" in capsys.readouterr().err


def test_cli_align_by_activations_on_a_text_file_recovers_a_planted_permutation(pair, tmp_path):
    model, config, sa, _ = pair
    ids = torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(3))
    spec = prb.trace_spec(model, ids)
    perms = prb.random_permutation(spec, sa, generator=torch.Generator().manual_seed(4))
    planted = prb.apply_permutation(spec, perms, sa)
    _write_pair(config, sa, planted, tmp_path)
    (tmp_path / "text.txt").write_text("def f(x):\n    return x * 2  # the stdlib-like text\n" * 20, encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["align", "--hf-config", str(tmp_path / "cfg"), "--a", str(tmp_path / "a.safetensors"),
                   "--b", str(tmp_path / "b.safetensors"), "--method", "activation", "--data",
                   str(tmp_path / "text.txt"), "--seq-len", "16", "--out", str(tmp_path / "aligned.safetensors"),
                   "--no-progress"])
    assert rc == 0
    from pyrebasin.io import load_state
    aligned = load_state(tmp_path / "aligned.safetensors")
    assert all(torch.equal(aligned[k], sa[k]) for k in sa if k in aligned)


def test_cli_interpolate_and_combine_take_two_model_directories(pair, tmp_path, capsys):
    model, config, sa, sb = pair
    from transformers import LlamaForCausalLM
    for name, state in (("A", sa), ("B", sb)):
        m = LlamaForCausalLM(config)
        m.load_state_dict(state)
        m.save_pretrained(tmp_path / name)
    ids = torch.randint(0, VOCAB, (4, T), generator=torch.Generator().manual_seed(5))
    torch.save(ids, tmp_path / "ids.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["interpolate", "--a", str(tmp_path / "A"), "--b", str(tmp_path / "B"), "--data",
                   str(tmp_path / "ids.pt"), "--ts", "2", "--out", str(tmp_path / "out"), "--no-progress"])
        assert rc == 0
        rc = main(["combine", "--a", str(tmp_path / "A"), "--b", str(tmp_path / "B"), "--data",
                   str(tmp_path / "ids.pt"), "--quick", "--studies", "combinability", "--out",
                   str(tmp_path / "comb"), "--no-progress"])
        assert rc == 0
    report = json.loads((tmp_path / "out" / "curve.json").read_text())
    want = prb.interpolate(model, sa, sb, {"train": ids}, ts=[0.0, 1.0]).loss["train"]
    assert report["curve"]["loss"]["train"] == pytest.approx(want, rel=1e-5)
    capsys.readouterr()
    rc = main(["interpolate", "--a", str(tmp_path / "A"), "--b", str(tmp_path / "a.safetensors"), "--data",
               str(tmp_path / "ids.pt"), "--out", str(tmp_path / "o3"), "--no-progress"])
    assert rc != 0 and "not one of each" in capsys.readouterr().err
