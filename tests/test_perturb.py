"""pyrebasin.matching.perturb: shuffled and noisy matchings are valid, seeded, and as far as asked."""
import pytest
import torch

import pyrebasin as prb
from pyrebasin.matching.perturb import hamming_fraction, noisy_matching, perturb_permutation


def _perms(n=200, groups=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"P{i}": torch.randperm(n, generator=g) for i in range(groups)}


@pytest.mark.parametrize("q", [0.0, 0.05, 0.25, 0.5, 1.0])
def test_perturb_valid_and_distance_tracks_q(q):
    found = _perms()
    p = perturb_permutation(found, q, seed=1)
    for k in found:
        assert torch.equal(torch.sort(p[k]).values, torch.arange(200))
    h = hamming_fraction(p, found)
    # round(q n) units are re-shuffled; a random shuffle of m leaves about one of them in place
    assert q - 0.05 <= h <= q + 1e-9 if q < 1 else h > 0.95
    assert all(torch.equal(a, b) for a, b in zip(p.values(), perturb_permutation(found, q, seed=1).values()))


def test_perturb_does_not_mutate_and_rejects_bad_q():
    found = _perms()
    before = {k: v.clone() for k, v in found.items()}
    perturb_permutation(found, 0.5, seed=0)
    assert all(torch.equal(found[k], before[k]) for k in found)
    with pytest.raises(ValueError, match="q="):
        perturb_permutation(found, 1.5)
    with pytest.raises(ValueError, match="differ"):
        hamming_fraction(found, {"P0": found["P0"]})


def test_noisy_matching_recovers_without_noise_and_degrades_with_it():
    torch.manual_seed(0)
    m = prb.zoo.MLP(40, 48, 2)
    spec, a = m.permutation_spec(), m.state_dict()
    pi = prb.random_permutation(spec, a, 3)
    b = prb.apply_permutation(spec, pi, a)
    found = prb.invert_permutation(pi)            # aligns b back onto a exactly
    assert hamming_fraction(noisy_matching(spec, a, b, found, 0.0), found) == 0.0
    h = [hamming_fraction(noisy_matching(spec, a, b, found, s, seed=2), found) for s in (0.05, 1.0, 10.0)]
    assert h[0] <= h[1] <= h[2] and h[2] > 0.5
    with pytest.raises(ValueError, match="noise"):
        noisy_matching(spec, a, b, found, -1.0)
