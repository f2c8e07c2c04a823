"""The trainer: same seed -> bit-identical weights (train_ and train_zoo), another seed -> others; the
cache returns what training produced and rebuilds a torn file; the caller's global RNG is untouched."""
import pytest
import torch

import pyrebasin as prb
from pyrebasin.train import TrainConfig, evaluate, train_, train_zoo

CFG = TrainConfig(epochs=1, batch_size=256)
KW = dict(width=16, depth=1)


def subset(n=384):
    x, y, _, _ = prb.data.mnist1d()
    return x[:n], y[:n]


def fresh_mlp(seed=0):
    torch.manual_seed(seed)
    return prb.zoo.MLP(40, 32, 2)


def states_equal(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_train_is_deterministic(optimizer):
    x, y = subset()
    cfg = TrainConfig(epochs=2, batch_size=64, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 3e-3, seed=3)
    m1 = train_(fresh_mlp(), x, y, cfg, progress=False)
    m2 = train_(fresh_mlp(), x, y, cfg, progress=False)
    assert states_equal(m1.state_dict(), m2.state_dict())
    assert not m1.training
    other = train_(fresh_mlp(), x, y, TrainConfig(**{**cfg.__dict__, "seed": 4}), progress=False)
    assert not states_equal(m1.state_dict(), other.state_dict())  # another batch order
    assert not states_equal(m1.state_dict(), fresh_mlp().state_dict())  # it did train


def test_training_learns():
    x, y = subset(2000)
    model = train_(fresh_mlp(), x, y, TrainConfig(epochs=5, batch_size=64), progress=False)
    _, acc = evaluate(model, x, y)
    assert acc > 0.25  # chance is 0.1; this small MLP reaches about 0.35


def test_bad_optimizer():
    with pytest.raises(ValueError, match="optimizer='lbfgs'"):
        train_(fresh_mlp(), *subset(), TrainConfig(optimizer="lbfgs"), progress=False)


def test_evaluate_matches_a_manual_loop_and_restores_mode():
    x, y = subset(300)
    model = fresh_mlp().train()
    loss, acc = evaluate(model, x, y, batch_size=64)
    with torch.no_grad():
        out = model.eval()(x)
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(out, y)), rel=1e-5)
    assert acc == pytest.approx(float((out.argmax(-1) == y).float().mean()))
    model.train()
    evaluate(model, x, y)
    assert model.training


def test_train_zoo_same_seed_same_weights_and_cache(tmp_path, monkeypatch):
    import shutil

    for f in prb.data.cache_dir().glob("mnist1d-*.pt"):  # the data is not what is tested: reuse it
        shutil.copy(f, tmp_path / f.name)
    monkeypatch.setenv("PYREBASIN_CACHE", str(tmp_path))
    rng = torch.get_rng_state()
    m, s = train_zoo("mlp", seed=2, config=CFG, progress=False, **KW)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is not reseeded behind the caller
    files = list((tmp_path / "models").glob("mlp-*.safetensors"))
    assert len(files) == 1
    _, uncached = train_zoo("mlp", seed=2, config=CFG, cache=False, progress=False, **KW)
    assert states_equal(s, uncached)  # training twice from scratch: bit-identical
    m2, cached = train_zoo("mlp", seed=2, config=CFG, progress=False, **KW)
    assert states_equal(s, cached) and not m2.training
    cached["layers.0.weight"].add_(1)  # returned state is a copy, not the model's own tensors
    assert torch.equal(m2.state_dict()["layers.0.weight"], s["layers.0.weight"])
    _, other = train_zoo("mlp", seed=3, config=CFG, progress=False, **KW)
    assert not states_equal(s, other)
    files[0].write_bytes(b"torn")  # a torn cache entry is retrained, identically
    _, again = train_zoo("mlp", seed=2, config=CFG, progress=False, **KW)
    assert states_equal(s, again)
