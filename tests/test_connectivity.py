"""Connectivity maps: the barrier matrices are symmetric with a zero diagonal, spectral clustering
recovers planted groups (a block distance matrix, and children of two trained parents), the loss
plane hits the three models at its corners, and the JSON and PNG outputs are written."""
from __future__ import annotations

import json

import pytest
import torch

import pyrebasin as prb
from pyrebasin.maps import affinity, pairwise_barriers, spectral_clusters
from pyrebasin.zoo import MLP


def _blobs(n: int = 600, dim: int = 10, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(classes, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + torch.randn(n, dim, generator=g), y


def _trained(seed: int, data, steps: int = 150):
    torch.manual_seed(seed)
    model = MLP(10, 32, 2, 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = data
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _children(state, n: int, sigma: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [{k: v + sigma * v.std() * torch.randn(v.shape, generator=g) for k, v in state.items()} for _ in range(n)]


def test_block_distances_give_the_planted_clusters():
    g = torch.Generator().manual_seed(0)
    truth = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    t = torch.tensor(truth)
    d = torch.where(t[:, None] == t[None, :], 0.1, 2.0) + 0.05 * torch.rand(9, 9, generator=g)
    d = (d + d.T) / 2
    d.fill_diagonal_(0)
    out = spectral_clusters(d)
    assert out["chosen_by"] == "eigengap" and out["n_clusters"] == 3
    assert out["labels"] == truth
    assert spectral_clusters(d, n_clusters=3)["labels"] == truth
    aff, delta = affinity(d)
    assert delta == pytest.approx(float(d[~torch.eye(9, dtype=torch.bool)].median()))
    assert torch.allclose(aff.diagonal(), torch.ones(9, dtype=torch.float64))
    with pytest.raises(ValueError, match="square"):
        spectral_clusters(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="n_clusters"):
        spectral_clusters(d, n_clusters=10)


def test_children_of_two_parents_cluster_by_parent():
    data = _blobs()
    model, p0 = _trained(0, data)
    _, p1 = _trained(1, data)
    states = _children(p0, 3, 0.3, seed=10) + _children(p1, 3, 0.3, seed=11)
    cmap = prb.connectivity_map(model, states, data, ts=9)
    for kind, m in cmap.barriers.items():
        assert m.shape == (6, 6)
        assert torch.equal(m, m.T), kind
        assert torch.equal(m.diagonal(), torch.zeros(6, dtype=torch.float64)), kind
        assert bool((m >= 0).all()), kind
    assert cmap.clusters == [0, 0, 0, 1, 1, 1]
    assert cmap.n_clusters == 2
    within = cmap.barriers["any_chord"][:3, :3].max()
    across = cmap.barriers["any_chord"][:3, 3:].min()
    assert across > within
    # weight matching cannot undo the pairs' different parents here, but the map stays a map
    aligned = prb.connectivity_map(model, states, data, ts=9, align="weight", kinds=["endpoint_mean"])
    assert torch.equal(aligned.barriers["endpoint_mean"].diagonal(), torch.zeros(6, dtype=torch.float64))
    back = prb.ConnectivityMap.from_dict(json.loads(cmap.to_json()))
    assert back.clusters == cmap.clusters and torch.equal(back.barriers["linear"], cmap.barriers["linear"])


def test_alignment_removes_planted_permutations_from_the_map(tmp_path):
    data = _blobs(seed=1)
    model, state = _trained(2, data)
    spec = model.permutation_spec()
    states = [prb.apply_permutation(spec, prb.random_permutation(spec, state, generator=i), state) for i in range(4)]
    naive, _ = pairwise_barriers(model, states, data, ts=7, kinds=["linear"])
    assert float(naive["linear"][0, 1:].min()) > 0.05   # permuted copies are far apart unaligned
    for align in ("weight", "activation", "merge"):
        m, curves = pairwise_barriers(model, states, data, ts=7, kinds=["linear"], align=align)
        assert float(m["linear"].abs().max()) < 1e-4, align
        assert set(curves) == {(i, j) for i in range(4) for j in range(i + 1, 4)}
    cmap = prb.connectivity_map(model, states, data, ts=5, align="weight", n_clusters=1, names=list("abcd"))
    png = cmap.plot(tmp_path / "map.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cmap.to_json(tmp_path / "map.json")
    assert json.loads((tmp_path / "map.json").read_text())["names"] == list("abcd")
    with pytest.raises(ValueError, match="align="):
        pairwise_barriers(model, states, data, align="sinkhorn")
    with pytest.raises(ValueError, match="kinds="):
        pairwise_barriers(model, states, data, kinds=["peak"])
    with pytest.raises(ValueError, match="t=0"):
        pairwise_barriers(model, states, data, ts=[0.2, 0.5])


def test_loss_plane_corners_are_the_models(tmp_path):
    data = _blobs(seed=2)
    model, a = _trained(3, data, steps=40)
    _, b = _trained(4, data, steps=40)
    _, c = _trained(5, data, steps=40)
    plane = prb.loss_plane(model, a, b, c, data, grid=([0.0, 0.5, 1.0], [0.0, 1.0]))
    assert plane.loss.shape == (2, 3)
    for (iv, iu), s in (((0, 0), a), ((0, 2), b), ((1, 0), c)):
        want = prb.evaluate_combinations(model, s, s, [1.0], data).loss[0]
        assert float(plane.loss[iv, iu]) == pytest.approx(float(want), rel=1e-5, abs=1e-6)
    from pyrebasin.experiments.connectivity import plot_loss_plane
    grid = prb.loss_plane(model, a, b, c, data, grid=5)
    assert plot_loss_plane(grid, tmp_path / "plane.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads(grid.to_json())["us"][0] == -0.25
    with pytest.raises(ValueError, match="grid"):
        prb.loss_plane(model, a, b, c, data, grid=1)
    with pytest.raises(ValueError, match="state_c"):
        prb.loss_plane(model, a, b, {k: v for k, v in c.items() if k != "head.bias"}, data)


def test_batches_are_data_too():
    data = _blobs(n=200, seed=4)
    model, state = _trained(6, data, steps=30)
    spec = model.permutation_spec()
    states = [state, prb.apply_permutation(spec, prb.random_permutation(spec, state, generator=1), state)]
    batches = [(data[0][i:i + 50], data[1][i:i + 50]) for i in range(0, 200, 50)]
    whole, _ = pairwise_barriers(model, states, data, ts=5, kinds=["linear"], align="activation")
    split, _ = pairwise_barriers(model, states, batches, ts=5, kinds=["linear"], align="activation")
    torch.testing.assert_close(split["linear"], whole["linear"], rtol=1e-4, atol=1e-6)
    with pytest.raises(TypeError, match="data must be"):
        pairwise_barriers(model, states, {"x": data}, ts=5)
