"""Alignment beyond permutations: an orthogonal map Q of the residual stream (Procrustes on residual
activations), applied through the spec's groups, with the normalisation layers handled so the function
is exactly preserved.

Why it is exact. A residual map x -> Qx passes through a norm N when N(Qx) = Q N(x):
- RMSNorm without scale: ||Qx|| = ||x|| for every orthogonal Q, so any Q passes.
- LayerNorm without affine: also subtracts the mean (1ᵀx/d); Q passes when Q1 = 1 (then Qᵀ1 = 1,
  centring commutes with Q and the norm is kept), so its maps fix the all-ones direction.
A norm's scale γ (and LayerNorm's shift β) are folded into the Linear layers that read its output first
(SliceGPT): W' = W diag(γ), b' = b + Wβ, γ' = 1, β' = 0. Then writers into the residual (embeddings,
o_proj, fc2 rows and biases) become Q W, readers (q/k/v, fc1, the LM head) W Qᵀ. Not supported: a norm
whose output feeds anything but Linear layers with bias (β ≠ 0 needs a bias to fold into), non-elementwise
norms (GroupNorm over channels), and maps of spaces other than the residual stream.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from ..module_state import mode_view
from ..spec import AxisEntry, Blocked, PermutationSpec, apply_permutation
from .heads import cross_moments_at

__all__ = ["apply_orthogonal", "fold_norms", "norm_kind", "procrustes", "residual_procrustes"]

State = Mapping[str, torch.Tensor]
_NORMS = (nn.LayerNorm, nn.RMSNorm)


def norm_kind(module: nn.Module) -> str:
    """"ln" (LayerNorm: maps must fix the all-ones direction) or "rms" (RMSNorm: any orthogonal map)."""
    if isinstance(module, nn.LayerNorm):
        return "ln"
    if isinstance(module, nn.RMSNorm):
        return "rms"
    raise ValueError(f"{type(module).__name__} is not a LayerNorm or RMSNorm: no orthogonal map is known to pass it")
def _mode_product(t: torch.Tensor, q: torch.Tensor, axis: int, entry: AxisEntry, factor: int) -> torch.Tensor:
    """q (n x n) applied along one axis (or one Blocked factor of it): new[.., i, ..] = Σ_j q[i, j] old[.., j, ..]."""
    shape = t.shape
    if isinstance(entry, Blocked):
        t = t.reshape(shape[:axis] + entry.shape + shape[axis + 1:])
        axis += factor
    out = torch.tensordot(q.to(device=t.device, dtype=torch.float64), t.double(), dims=([1], [axis]))
    return out.movedim(0, axis).reshape(shape).to(t.dtype)


def apply_orthogonal(spec: PermutationSpec, maps: Mapping[str, torch.Tensor], state_dict: State,
                     *, scales=(), atol: float = 1e-5) -> dict[str, torch.Tensor]:
    """`apply_permutation` with groups beyond permutations: `maps[name]` is a permutation (1-D integer)
    or an orthogonal matrix Q [n, n] (float), applied on the same axes as a perm would be: every
    tensor's axis of that group becomes Q ×_axis old (a perm is Q = eye[perm]), so rows that write
    into the group's space and columns that read from it both rotate and W' x' = W x holds.

    `scales`: keys that are elementwise scales on a matrix group's axis (norm weights): a diagonal
    scale commutes with every Q only when it is constant, so each must be constant along it (else
    ValueError) and is kept as is; fold the norms' scales into the layers that follow first
    (`fold_norms`). Q must satisfy |QᵀQ − I| ≤ `atol` (ValueError naming the
    group otherwise); the input is untouched."""
    if not isinstance(maps, Mapping):
        raise TypeError(f"maps must be a dict group name -> perm or orthogonal matrix, got {type(maps).__name__}")
    sizes = spec.perm_sizes(state_dict)
    matrices = {k: v for k, v in maps.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    for name, q in matrices.items():
        n = sizes.get(name)
        if n is None:
            raise ValueError(f"apply_orthogonal: maps names group {name!r}, which the spec does not have")
        if q.shape != (n, n):
            raise ValueError(f"apply_orthogonal: matrix for {name!r} has shape {list(q.shape)}; "
                             f"its group has {n} units")
        err = float((q.double().T @ q.double() - torch.eye(n, dtype=torch.float64, device=q.device)).abs().max())
        if not err <= atol:
            raise ValueError(f"apply_orthogonal: matrix for {name!r} is not orthogonal (max |QᵀQ − I| = {err:.3g})")
    scales = set(scales)
    perms = {k: v for k, v in maps.items() if k not in matrices}
    perms |= {k: torch.arange(sizes[k]) for k in matrices}
    out = apply_permutation(spec, perms, state_dict)
    for name, pairs in spec.perm_to_axes.items():
        if name not in matrices:
            continue
        for key, axis in pairs:
            t, entry = out[key], spec.axes_to_perm[key][axis]
            if key in scales:
                v = t.movedim(axis, 0).reshape(t.shape[axis], -1)
                if not bool((v == v[:1]).all()):
                    raise ValueError(f"apply_orthogonal: scale {key!r} is not constant along group {name!r}: "
                                     "fold it into the layers that read it first")
                continue
            if not t.is_floating_point():
                raise TypeError(f"apply_orthogonal: {key!r} is {t.dtype}; a matrix group acts on floating tensors")
            out[key] = _mode_product(t, matrices[name], axis, entry, spec.factor(key, axis, name))
    return out


@torch.no_grad()
def fold_norms(model: nn.Module, state: State, example: torch.Tensor, norms: Sequence[str]) -> dict[str, torch.Tensor]:
    """A new state computing the same function with every norm in `norms` scale-free (γ = 1, β = 0):
    γ and β are folded into the Linear layers that read the norm's output, found by one traced
    forward on `example` (ValueError when a norm's output reaches no Linear, or β ≠ 0 meets a Linear
    without bias). The input state is untouched."""
    mods = dict(model.named_modules())
    missing = [n for n in norms if n not in mods]
    if missing:
        raise ValueError(f"fold_norms: {missing[:4]} are not modules of the model")
    for n in norms:
        norm_kind(mods[n])
    outs: dict[str, torch.Tensor] = {}
    readers: dict[str, list[str]] = {n: [] for n in norms}
    view = mode_view(model)
    vmods = dict(view.named_modules())
    handles = [vmods[n].register_forward_hook(lambda _m, _a, o, n=n: outs.__setitem__(n, o)) for n in norms]

    def reader(name):
        def hook(_m, args):
            for n, o in outs.items():
                if args[0] is o:
                    readers[n].append(name)
        return hook
    handles += [m.register_forward_pre_hook(reader(name)) for name, m in vmods.items() if isinstance(m, nn.Linear)]
    try:
        functional_call(view, dict(state), (example,))
    finally:
        for h in handles:
            h.remove()
    new = {k: v.clone() for k, v in state.items()}
    for n in norms:
        if not readers[n]:
            raise ValueError(f"fold_norms: the output of {n!r} is read by no Linear layer")
        gamma = state.get(f"{n}.weight")
        beta = state.get(f"{n}.bias")
        for lin in readers[n]:
            w = state[f"{lin}.weight"].double()
            if beta is not None and bool(beta.ne(0).any()):
                if f"{lin}.bias" not in state:
                    raise ValueError(f"fold_norms: {n!r} has a shift but {lin!r}, which reads it, has no bias")
                new[f"{lin}.bias"] = (state[f"{lin}.bias"].double() + w @ beta.double()).to(state[f"{lin}.bias"].dtype)
            if gamma is not None:
                new[f"{lin}.weight"] = (w * gamma.double()).to(state[f"{lin}.weight"].dtype)
        if gamma is not None:
            new[f"{n}.weight"] = torch.ones_like(gamma)
        if beta is not None:
            new[f"{n}.bias"] = torch.zeros_like(beta)
    return new


def procrustes(cross: torch.Tensor, *, fix_ones: bool = False) -> torch.Tensor:
    """The orthogonal Q maximising tr(Q crossᵀ) (= argmin Σ ||x_A − Q x_B||² for cross = Σ x_A x_Bᵀ):
    Q = U Vᵀ from the SVD of `cross`; with `fix_ones`, Q restricted to maps with Q1 = 1 (solved on the
    orthogonal complement of the all-ones vector: Q = 11ᵀ/d + B R Bᵀ)."""
    c = cross.double()
    d = c.shape[0]
    if c.dim() != 2 or c.shape[1] != d:
        raise ValueError(f"procrustes: cross must be square [d, d], got {list(cross.shape)}")
    if not fix_ones:
        u, _, vh = torch.linalg.svd(c)
        return u @ vh
    ones = torch.full((d, 1), d ** -0.5, dtype=torch.float64)
    basis = torch.linalg.qr(torch.cat([ones, torch.eye(d, dtype=torch.float64)[:, : d - 1]], 1))[0][:, 1:]
    u, _, vh = torch.linalg.svd(basis.T @ c @ basis)
    return ones @ ones.T + basis @ (u @ vh) @ basis.T


def residual_procrustes(model_a: nn.Module, model_b: nn.Module, norms: Sequence[str], data, *,
                        state_a: State | None = None, state_b: State | None = None, batch_size: int = 256,
                        max_batches: int | None = None, progress: bool = False) -> torch.Tensor:
    """Q [d, d] aligning B's residual stream to A's: the residual is read at the input of every norm in
    `norms` (pooled over them and every token), Q from `procrustes` on Σ x_A x_Bᵀ, fixing the all-ones
    direction when any of the norms is a LayerNorm."""
    mods = dict(model_a.named_modules())
    kinds = {norm_kind(mods[n]) for n in norms}
    m = cross_moments_at(model_a, model_b, {n: (n, "in") for n in norms}, data, state_a=state_a, state_b=state_b,
                         batch_size=batch_size, max_batches=max_batches, progress=progress,
                         pool={n: "res" for n in norms})["res"]
    return procrustes(m.sum_xy.cpu(), fix_ones="ln" in kinds).float()
