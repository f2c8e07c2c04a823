"""check_spec: does permuting a model's weights by random permutations of a spec leave its outputs
unchanged, in eval and in train mode (BatchNorm batch statistics and running-stat updates included)?"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .module_state import mode_view
from .spec import PermutationSpec, apply_permutation, random_permutation
from .trace import split_inputs

__all__ = ["check_spec", "CheckReport", "SpecCheckError"]


class SpecCheckError(AssertionError):
    """The permuted model's outputs differ from the original's: the spec is not a symmetry."""


@dataclass
class CheckReport:
    ok: bool
    max_abs_diff: dict[str, float]              # mode -> largest output difference
    buffer_diff: float                           # train mode: updated buffers vs permuted updates
    perm_sizes: dict[str, int]                   # group -> units (all permuted at random)
    modes: tuple[str, ...]
    failures: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        diffs = ", ".join(f"{m}: {d:.2e}" for m, d in self.max_abs_diff.items())
        return (f"check_spec {'OK' if self.ok else 'FAILED'}: {len(self.perm_sizes)} groups permuted, "
                f"max |Δ output| {diffs}; train-mode buffer Δ {self.buffer_diff:.2e}"
                + ("".join(f"\n  - {f}" for f in self.failures)))


def _leaves(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _leaves(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _leaves(v)]
    return []


def _mode(model: nn.Module, train: bool) -> nn.Module:
    """A private view of `model` in train or eval mode (the caller's flags are never touched)."""
    view = mode_view(model, training=train)
    for m in view.modules():
        # dropout draws a mask per unit: permuting units permutes the mask, so it is off in both
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.training = False
    return view


def check_spec(model: nn.Module, spec: PermutationSpec, example_inputs: Any, *, seed: int = 0,
               atol: float = 1e-5, rtol: float = 1e-4, modes: tuple[str, ...] = ("eval", "train"),
               randomize: bool = True, raise_on_failure: bool = True) -> CheckReport:
    """Permute every group of `spec` at random (seeded) and compare the model's outputs with the
    original's through `torch.func.functional_call`, in each of `modes`.

    Train mode also compares the buffers the forward updates (BatchNorm running stats): the
    permuted model's updated buffers must equal the permuted updated buffers of the original.
    Dropout modules are kept in eval mode (their masks are random per unit). randomize=True first
    jitters every floating tensor of the (copied) state, seeded, so that symmetric initial values
    (BatchNorm's ones and zeros, zero biases) cannot hide a wrong entry. The caller's model is
    untouched: the state is copied per run and the modes are set on a private view of the module.
    Raises SpecCheckError on a mismatch (or returns the failing report: raise_on_failure=False).
    """
    for m in modes:
        if m not in ("eval", "train"):
            raise ValueError(f"modes must hold 'eval' and/or 'train', got {m!r}")
    args, kwargs = split_inputs(example_inputs)
    state_vars = model.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    keep = [k for k, v in state_vars.items() if first.setdefault(id(v), k) == k]  # one per tie
    state = {k: v.detach() for k, v in state_vars.items()}
    if randomize:
        state = _jitter(state, seed)
    sizes = spec.perm_sizes(state)
    perms = random_permutation(spec, state, generator=seed)
    permuted = apply_permutation(spec, perms, state)
    diffs, failures, buffer_diff = {}, [], 0.0
    for mode in modes:
        view = _mode(model, mode == "train")
        runs = []
        for sd in (state, permuted):
            run_state = {k: sd[k].clone() for k in keep}
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                out = torch.func.functional_call(view, run_state, args, kwargs)
            runs.append((_leaves(out), run_state))
        (out_a, sd_a), (out_b, sd_b) = runs
        if len(out_a) != len(out_b) or not out_a:
            failures.append(f"{mode}: the model returned no comparable tensor outputs")
            continue
        d = 0.0
        for i, (a, b) in enumerate(zip(out_a, out_b)):
            if a.shape != b.shape:
                failures.append(f"{mode}: output {i} shape {list(a.shape)} vs {list(b.shape)}")
                continue
            a, b = a.double(), b.double()
            d = max(d, float((a - b).abs().max()) if a.numel() else 0.0)
            if not torch.allclose(a, b, atol=atol, rtol=rtol):
                failures.append(f"{mode}: output {i} differs by up to {d:.3e} after permuting")
        diffs[mode] = d
        if mode == "train":
            full_a = {k: sd_a[k] if k in sd_a else sd_a[state_key(state_vars, k)] for k in state}
            expect = apply_permutation(spec, perms, full_a)
            for k in keep:
                e, got = expect[k].double(), sd_b[k].double()
                delta = float((e - got).abs().max()) if e.numel() else 0.0
                buffer_diff = max(buffer_diff, delta)
                if not torch.allclose(e, got, atol=atol, rtol=rtol):
                    failures.append(f"train: updated {k!r} differs by {delta:.3e} from the "
                                    f"permuted update of the original")
    if any(f.startswith("train") for f in failures) and "eval" in diffs and not any(
            f.startswith("eval") for f in failures):
        failures.append("eval mode passes: train-mode differences often come from dropout inside "
                        "functional calls (e.g. attention dropout); set those probabilities to 0")
    report = CheckReport(not failures, diffs, buffer_diff, sizes, tuple(modes), failures)
    if failures and raise_on_failure:
        raise SpecCheckError(str(report))
    return report


def _jitter(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    out, done = {}, {}
    for k, v in state.items():
        if id(v) in done:  # tied keys stay tied
            out[k] = done[id(v)]
            continue
        if v.is_floating_point() and v.numel():
            noise = torch.rand(v.shape, generator=gen, dtype=torch.float64).to(v.device, v.dtype)
            if bool((v > 0).all()):  # variances, scales: stay positive
                new = v * (0.5 + noise)
            else:
                scale = float(v.double().std()) if v.numel() > 1 else 0.0
                new = v + (noise - 0.5) * (scale or 0.1)
        else:
            new = v
        out[k] = done[id(v)] = new
    return out


def state_key(state_vars: Mapping[str, torch.Tensor], key: str) -> str:
    """The first key holding the same tensor as `key` (tied weights share one)."""
    target = state_vars[key]
    return next(k for k, v in state_vars.items() if v is target)
