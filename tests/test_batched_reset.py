"""RESET per combination in one batched engine pass (`ResetCorrection(batched=True)`) against the
state-by-state `reset_bn` loop: same statistics, same losses, and the fallbacks."""
import pytest
import torch
from torch import nn

import pyrebasin as prb
from pyrebasin import zoo
from pyrebasin.repair import ResetCorrection, reset_bn


def _pair(arch, **kw):
    torch.manual_seed(0)
    model = zoo.build(arch, **kw)
    a = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    return model, a, zoo.build(arch, **kw).state_dict()


def _run(model, a, b, data, stat, *, batched, k=5, batch_size=None):
    c = prb.sample_coefficients(model.permutation_spec(), k, "uniform", "neuron", seed=3, state=a)
    fix = ResetCorrection(model, stat, batch_size=batch_size or 1000, batched=batched)
    return prb.evaluate_combinations(model, a, b, c, data, chunk=k, batch_size=None, correction=fix), fix


@pytest.mark.parametrize("arch,kw", [("vgg", {"norm": "bn"}), ("resnet20", {"norm": "bn"})])
def test_batched_reset_equals_the_loop(arch, kw):
    model, a, b = _pair(arch, **kw)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 40, generator=g), torch.randint(0, 10, (96,), generator=g)
    stat = x[:67]   # an odd count, two batches of statistics data
    fast, fix = _run(model, a, b, (x, y), stat, batched=True, batch_size=40)
    slow, ref = _run(model, a, b, (x, y), stat, batched=False, batch_size=40)
    assert fix.checked is True and ref.checked is None
    torch.testing.assert_close(fast.loss, slow.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.accuracy, slow.accuracy)
    # and the statistics themselves, state by state
    from pyrebasin.batched_forward import BatchedForward
    from pyrebasin.module_state import mode_view
    stacked = {k: torch.stack([a[k], b[k]]) for k in a if a[k].is_floating_point()}
    fixed = {k: v for k, v in a.items() if not v.is_floating_point()}
    got = BatchedForward(model, mode_view(model), fixed).reset_statistics(stacked, [stat[:40], stat[40:]])
    for i, s in enumerate((a, b)):
        want = reset_bn(model, s, stat, batch_size=40)
        for key, v in got.items():
            torch.testing.assert_close(v[i], want[key], rtol=1e-5, atol=1e-7)
    assert len(got) == 2 * sum(isinstance(m, nn.BatchNorm1d) for m in model.modules())


class SharedBN(nn.Module):
    """BN on the raw input (a value shared by the K models) and one BN module called twice."""

    def __init__(self):
        super().__init__()
        self.bn_in = nn.BatchNorm1d(6)
        self.fc1, self.fc2, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        h = self.bn(torch.relu(self.fc1(self.bn_in(x))))
        return self.out(self.bn(torch.relu(self.fc2(h))))

    def permutation_spec(self):
        return prb.PermutationSpec({k: (None,) * v.dim() for k, v in self.state_dict().items()})


def test_batched_reset_input_bn_and_a_bn_called_twice():
    torch.manual_seed(0)
    model = SharedBN()
    a = {k: v.clone() for k, v in model.state_dict().items()}
    b = {k: v + 0.3 * torch.randn_like(v) if v.is_floating_point() else v for k, v in a.items()}
    x, y = torch.randn(50, 6), torch.randint(0, 3, (50,))
    fast, fix = _run(model, a, b, (x, y), x, batched=True, k=3, batch_size=20)
    slow, _ = _run(model, a, b, (x, y), x, batched=False, k=3, batch_size=20)
    assert fix.checked is True
    torch.testing.assert_close(fast.loss, slow.loss, rtol=1e-5, atol=1e-6)


def test_batched_reset_falls_back_and_defaults():
    model, a, b = _pair("vgg", norm="bn")
    x, y = torch.randn(32, 40), torch.randint(0, 10, (32,))
    model.features[0].register_forward_hook(lambda m, i, o: None)   # hooks: no engine trace
    fast, fix = _run(model, a, b, (x, y), x, batched=True, k=3)
    slow, _ = _run(model, a, b, (x, y), x, batched=False, k=3)
    assert fix.checked is False   # fell back to the loop, same numbers
    torch.testing.assert_close(fast.loss, slow.loss)
    model, a, b = _pair("vgg", norm="bn")
    _, auto = _run(model, a, b, (x, y), x, batched=None, k=3)
    assert auto.checked is None   # CPU default: state by state, never tried
    with pytest.raises(ValueError, match="batched="):
        ResetCorrection(model, x, batched="yes")
    torch.manual_seed(0)
    small = SharedBN()   # BatchNorm1d on [B, C]: one value per channel in a batch of 1
    s = small.state_dict()
    xs, ys = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for batched in (True, False):
        with pytest.raises(ValueError, match="needs >= 2"):
            _run(small, s, s, (xs, ys), xs, batched=batched, k=3, batch_size=1)
