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
from .trace import model_inputs

__all__ = ["check_spec", "CheckReport", "SpecCheckError", "tolerance", "compute_dtype",
           "needs_jitter"]


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


# (atol as a share of the largest reference output, rtol) per compute dtype. A correct spec changes
# only the order of floating sums; in bf16/fp16 that moves outputs by a few ulps of their scale.
# The low-precision bounds are 4 eps (bf16 3.1%, fp16 0.39% of max |output|), well below what a
# wrong spec does (measured in docs/trace.md).
_TOLERANCE = {torch.float64: (1e-10, 1e-8), torch.float32: (1e-5, 1e-4),
              torch.float16: (4 * torch.finfo(torch.float16).eps, 4 * torch.finfo(torch.float16).eps),
              torch.bfloat16: (4 * torch.finfo(torch.bfloat16).eps, 4 * torch.finfo(torch.bfloat16).eps)}


def tolerance(dtype: torch.dtype, scale: float) -> tuple[float, float]:
    """check_spec's default (atol, rtol) for outputs computed in `dtype` whose largest magnitude is
    `scale`: fp32/fp64 absolute (atol scaled up only for outputs beyond 1), fp16/bf16 relative to
    the output scale (their rounding is)."""
    share, rtol = _TOLERANCE.get(dtype, _TOLERANCE[torch.float32])
    if dtype in (torch.float16, torch.bfloat16):
        return share * scale, rtol
    return share * max(1.0, scale), rtol


def compute_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The lowest-precision floating dtype of a state (float32 when it has none)."""
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    return max(dtypes, key=lambda d: torch.finfo(d).eps) if dtypes else torch.float32


def check_spec(model: nn.Module, spec: PermutationSpec, example_inputs: Any, *, seed: int = 0,
               atol: float | None = None, rtol: float | None = None,
               modes: tuple[str, ...] = ("eval", "train"), randomize: bool = True,
               raise_on_failure: bool = True) -> CheckReport:
    """Permute every group of `spec` at random (seeded) and compare the model's outputs with the
    original's through `torch.func.functional_call`, in each of `modes`.

    Train mode also compares the buffers the forward updates (BatchNorm running stats): the
    permuted model's updated buffers must equal the permuted updated buffers of the original.
    Dropout modules are kept in eval mode (their masks are random per unit). randomize=True first
    replaces, seeded, the tensors whose values could hide a wrong entry by jittered copies
    (`needs_jitter`: those under 65536 entries, such as BatchNorm's ones and zeros and zero biases,
    and constant ones); large non-constant weights are generic already. atol/rtol default to the
    state's compute dtype (`tolerance`: fp32 1e-5 / 1e-4, bf16 and fp16 4 eps of the output scale).
    Inputs are prepared as for `trace_spec` (`use_cache=False` for Hugging Face LMs). Memory: the
    model plus one permuted copy of its state, built tensor by tensor (jittered copies are dropped
    as they are permuted); parameters are passed uncopied, only buffers are cloned per run. The
    caller's model is untouched (its modes are set on a private view). Raises SpecCheckError on a
    mismatch (or returns the failing report: raise_on_failure=False).
    """
    for m in modes:
        if m not in ("eval", "train"):
            raise ValueError(f"modes must hold 'eval' and/or 'train', got {m!r}")
    args, kwargs = model_inputs(model, example_inputs)
    state_vars = model.state_dict(keep_vars=True)
    if any(v.is_meta for v in state_vars.values()):
        raise ValueError("check_spec needs the model's weights, but its state is on the meta device "
                         "(load the weights, or check a small model of the same architecture)")
    first: dict[int, str] = {}
    keep = [k for k, v in state_vars.items() if first.setdefault(id(v), k) == k]  # one per tie
    state = {k: state_vars[k].detach() for k in keep}
    sizes = spec.perm_sizes({k: state_vars[k] for k in state_vars})
    copied: set[str] = set()
    if randomize:
        state, copied = _jitter(state, seed)
    perms = random_permutation(spec, state_vars, generator=seed)
    buffers = {k for k, _ in model.named_buffers()} & set(keep)
    views = {mode: _mode(model, mode == "train") for mode in modes}
    runs_a = {mode: _run(views[mode], state, buffers, args, kwargs, seed) for mode in modes}
    state = _permuted(spec, perms, state, consume=copied)
    diffs, failures, buffer_diff = {}, [], 0.0
    dtype = compute_dtype(state)
    for mode in modes:
        out_a, bufs_a = runs_a.pop(mode)
        out_b, bufs_b = _run(views[mode], state, buffers, args, kwargs, seed)
        if len(out_a) != len(out_b) or not out_a:
            failures.append(f"{mode}: the model returned no comparable tensor outputs")
            continue
        d = 0.0
        for i, (a, b) in enumerate(zip(out_a, out_b)):
            if a.shape != b.shape:
                failures.append(f"{mode}: output {i} shape {list(a.shape)} vs {list(b.shape)}")
                continue
            a, b = a.double(), b.double()
            scale = float(a.abs().max()) if a.numel() else 0.0
            at, rt = tolerance(dtype, scale)
            at, rt = at if atol is None else atol, rt if rtol is None else rtol
            di = float((a - b).abs().max()) if a.numel() else 0.0
            d = max(d, di)
            if not torch.allclose(a, b, atol=at, rtol=rt):
                failures.append(f"{mode}: output {i} differs by up to {di:.3e} after permuting "
                                f"(atol {at:.2e}, rtol {rt:.2e} for {dtype})")
        diffs[mode] = d
        if mode == "train" and bufs_a:
            sub = spec.restrict(bufs_a)
            expect = apply_permutation(sub, {p: perms[p] for p in sub.perm_sizes(bufs_a)}, bufs_a)
            for k in bufs_a:
                e, got = expect[k].double(), bufs_b[k].double()
                delta = float((e - got).abs().max()) if e.numel() else 0.0
                buffer_diff = max(buffer_diff, delta)
                at, rt = tolerance(dtype, float(e.abs().max()) if e.numel() else 0.0)
                at, rt = at if atol is None else atol, rt if rtol is None else rtol
                if not torch.allclose(e, got, atol=at, rtol=rt):
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


def _run(view: nn.Module, state: dict, buffers: set, args, kwargs, seed: int):
    """Outputs of `view` on `state` and, per buffer, its value after the forward. Parameters are
    passed as they are (a forward does not write them); buffers are cloned (BatchNorm updates its
    running stats in place)."""
    run_state = {k: (v.clone() if k in buffers else v) for k, v in state.items()}
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = torch.func.functional_call(view, run_state, args, kwargs)
    return _leaves(out), {k: run_state[k] for k in buffers}


def _permuted(spec: PermutationSpec, perms, state: dict, *, consume: set) -> dict:
    """`apply_permutation` one tensor at a time; the tensors of `consume` (our own jittered copies)
    are dropped as their permuted copies appear, so one copy of the state is alive (plus one tensor)."""
    out = {}
    for k in list(state):
        sub = spec.restrict([k])
        one = {k: state[k]}
        if k in consume:
            del state[k]
        out[k] = apply_permutation(sub, {p: perms[p] for p in sub.perm_sizes(one)}, one)[k]
        del one
    return out


_CHUNK = 1 << 20  # noise is drawn in chunks: no float64 copy of a whole (embedding-sized) tensor
GENERIC_NUMEL = 1 << 16  # a non-constant tensor this large is left as it is by the jitter


def needs_jitter(v: torch.Tensor) -> bool:
    """A floating tensor whose values could hide a wrong permutation: small ones (biases, norm scales,
    BatchNorm statistics: often ones and zeros) and constant ones (zero- or one-initialised weights).
    A large non-constant tensor is generic already; jittering it would only cost a copy."""
    if not (v.is_floating_point() and v.numel()):
        return False
    if v.numel() < GENERIC_NUMEL:
        return True
    lo, hi = torch.aminmax(v.reshape(-1))
    return bool(lo == hi)


def _jitter(state: dict[str, torch.Tensor], seed: int) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The state with `needs_jitter` tensors replaced by seeded jittered copies, and their keys."""
    gen = torch.Generator().manual_seed(seed + 1)
    out, copied = {}, set()
    for k, v in state.items():
        if not needs_jitter(v):
            out[k] = v
            continue
        positive = bool((v > 0).all())  # variances, scales: stay positive
        scale = 0.0 if positive or v.numel() == 1 else float(v.std())
        new, flat = torch.empty_like(v), v.reshape(-1)
        dst = new.view(-1)
        noise_dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
        for s in range(0, flat.numel(), _CHUNK):
            x = flat[s:s + _CHUNK]
            noise = torch.rand(x.numel(), generator=gen, dtype=noise_dtype).to(v.device)
            if positive:
                dst[s:s + _CHUNK] = x * (0.5 + noise)
            else:
                dst[s:s + _CHUNK] = x + (noise - 0.5) * (scale or 0.1)
        out[k] = new
        copied.add(k)
    return out, copied
