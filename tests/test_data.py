"""Offline datasets: shapes, dtypes and label ranges; determinism (same seed -> same tensors); the cache
(written once, reused, rebuilt when torn); mnist1d built by its local generator, never downloaded."""
import pytest
import torch

import pyrebasin as prb
from pyrebasin import data


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYREBASIN_CACHE", str(tmp_path))
    return tmp_path


def test_mnist1d_standard_split():
    x, y, xt, yt = prb.data.mnist1d()
    assert x.shape == (4000, 40) and xt.shape == (1000, 40)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.shape == (4000,) and yt.shape == (1000,)
    assert set(y.unique().tolist()) == set(range(10))
    again = prb.data.mnist1d()
    assert all(torch.equal(a, b) for a, b in zip((x, y, xt, yt), again))


def test_mnist1d_is_generated_locally_and_cached(fresh_cache, monkeypatch):
    import mnist1d.data

    def no_network(*args, **kwargs):
        raise AssertionError("mnist1d tried to download")

    monkeypatch.setattr(mnist1d.data.requests, "get", no_network)
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    first = data.mnist1d(num_samples=300, seed=7)
    files = list(fresh_cache.glob("mnist1d-*.pt"))
    assert len(files) == 1
    n = first[0].shape[0] + first[2].shape[0]
    assert n == 300 and first[0].shape[1] == 40
    cached = data.mnist1d(num_samples=300, seed=7)  # from the file now
    assert all(torch.equal(a, b) for a, b in zip(first, cached))
    other = data.mnist1d(num_samples=300, seed=8)
    assert not torch.equal(other[0], first[0])
    files[0].write_bytes(b"torn")  # a torn cache file is rebuilt, with the same content
    rebuilt = data.mnist1d(num_samples=300, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(first, rebuilt))


def test_digits(fresh_cache):
    x, y, xt, yt = data.digits()
    assert x.shape[1:] == (8, 8) and x.shape[0] + xt.shape[0] == 1797
    assert xt.shape[0] == round(1797 * 0.2)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and x.dtype == torch.float32
    assert set(y.unique().tolist()) == set(range(10))
    same = data.digits()
    assert all(torch.equal(a, b) for a, b in zip((x, y, xt, yt), same))
    other = data.digits(seed=1)
    assert not torch.equal(other[3], yt)  # another seed, another split
    assert sorted(torch.cat([other[1], other[3]]).tolist()) == sorted(torch.cat([y, yt]).tolist())


def test_load_by_name():
    assert data.load("mnist1d")[0].shape == (4000, 40)
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        data.load("cifar")


def test_cache_dir_env(fresh_cache):
    assert data.cache_dir() == fresh_cache
