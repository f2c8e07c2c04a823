"""Shared fixtures of the API contract tests: tiny models, data, and snapshot/compare helpers that
catch any change to a caller's model (parameters, buffers, training flag, hooks) or state dict."""
from __future__ import annotations

import torch
from torch import nn

import pyrebasin as prb


def tiny_mlp(seed: int, norm: str | None = "bn", dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    m = prb.zoo.MLP(in_features=8, width=6, depth=2, classes=3, norm=norm).to(dtype)
    if norm == "bn":  # non-trivial running stats, so a silent reset or lerp of them shows
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm1d):
                    mod.running_mean.normal_()
                    mod.running_var.uniform_(0.5, 2.0)
                    mod.num_batches_tracked.fill_(7)
    return m


def tiny_data(n: int = 32, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def clone_sd(sd):
    return {k: v.clone() for k, v in sd.items()}


def assert_sd_equal(before, after):
    assert list(before) == list(after), "state dict keys changed"
    for k in before:
        assert before[k].dtype == after[k].dtype, f"{k}: dtype changed"
        assert torch.equal(before[k], after[k]), f"{k}: values changed"


def snapshot(model: nn.Module) -> dict:
    hooks = {name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                    len(getattr(m, "_backward_pre_hooks", {})))
             for name, m in model.named_modules()}
    return {"sd": state(model), "training": {n: m.training for n, m in model.named_modules()},
            "hooks": hooks, "grads": [p.grad for p in model.parameters()],
            "requires_grad": [p.requires_grad for p in model.parameters()],
            "ids": [id(t) for t in list(model.parameters()) + list(model.buffers())]}


def assert_model_unchanged(model: nn.Module, snap: dict) -> None:
    assert_sd_equal(snap["sd"], state(model))
    assert {n: m.training for n, m in model.named_modules()} == snap["training"], "training flag changed"
    now = snapshot(model)
    assert now["hooks"] == snap["hooks"], "hooks left on the model"
    assert all(g is None for g in now["grads"]) == all(g is None for g in snap["grads"]), ".grad set"
    assert now["requires_grad"] == snap["requires_grad"], "requires_grad changed"
    assert now["ids"] == snap["ids"], "parameters/buffers were replaced"
