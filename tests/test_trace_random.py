"""trace_spec on random nets (hypothesis): stacks of width changes, residual blocks, BatchNorm,
RMSNorm, GroupNorm, GLU, per-head softmax, equal-piece cat and chunk; every traced spec passes
check_spec, and the fx and torch.export front ends agree."""
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import pyrebasin as prb


class RandomNet(nn.Module):
    """A random stack of width-changing, residual, norm, reshape, cat and chunk steps."""

    def __init__(self, plan, d=6):
        super().__init__()
        self.plan, self.mods = [], nn.ModuleList()
        self.inp = nn.Linear(d, 8)
        d = 8
        for step in plan:
            if (step == "chunk" and d % 4) or (step in ("heads", "gn") and d % 2):
                continue  # keep every piece at least 2 wide
            self.plan.append(step)
            if step == "linear":
                self.mods.append(nn.Linear(d, d + 2))
                d += 2
            elif step == "res":
                self.mods.append(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(),
                                               nn.Linear(2 * d, d)))
            elif step == "bn":
                self.mods.append(nn.BatchNorm1d(d))
            elif step == "rms":
                self.mods.append(nn.RMSNorm(d))
            elif step == "gn":  # (groups, per-group) blocked when 1 < groups < d
                self.mods.append(nn.GroupNorm(2, d))
            elif step == "glu":
                self.mods.append(nn.Linear(d, 2 * d))
            else:  # heads / cat / chunk: no parameters
                self.mods.append(nn.Identity())
                d = {"cat": 2 * d, "chunk": d // 2}.get(step, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = F.relu(self.inp(x))
        for step, mod in zip(self.plan, self.mods):
            if step == "res":
                x = x + mod(x)
            elif step == "glu":
                x = F.glu(mod(x), dim=-1)
            elif step == "heads":  # per-head softmax: (heads, head_dim) blocked
                x = x.view(x.shape[0], 2, -1).softmax(-1).flatten(1)
            elif step == "cat":
                x = torch.cat([x, torch.tanh(x)], -1)
            elif step == "chunk":
                a, b = x.chunk(2, dim=-1)
                x = a * torch.sigmoid(b)
            elif step in ("rms", "gn"):
                x = mod(x)
            else:
                x = F.relu(mod(x))
        return self.head(x)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.sampled_from(["linear", "res", "bn", "rms", "gn", "glu", "heads", "cat", "chunk"]),
                min_size=1, max_size=5), st.integers(0, 2 ** 16))
def test_random_nets_pass_the_invariance_check(plan, seed):
    torch.manual_seed(seed)
    model, x = RandomNet(plan), torch.randn(5, 6)
    spec = prb.trace_spec(model, x, frontend="fx")
    assert spec.axes_to_perm["inp.weight"][0] is not None  # the first hidden layer is always free
    prb.check_spec(model, spec, x, seed=seed)


@settings(max_examples=6, deadline=None)
@given(st.lists(st.sampled_from(["linear", "res", "bn", "rms", "gn", "glu", "heads", "cat", "chunk"]),
                min_size=2, max_size=5))
def test_random_nets_fx_and_export_agree(plan):
    torch.manual_seed(0)
    model, x = RandomNet(plan), torch.randn(5, 6)
    fx, ex = (prb.trace_spec(model, x, frontend=f) for f in ("fx", "export"))
    assert prb.spec_difference(fx, ex) == []
