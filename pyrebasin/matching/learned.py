"""Learned matching: permutations of B found by descending the loss of the midpoint ½(θ_A + π(θ_B)) on
data — Git Re-Basin's straight-through estimator and Sinkhorn re-basin's soft permutations."""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ..batches import batches, require_reiterable
from ..module_state import check_pair, mode_view
from ..spec import PermutationSpec, apply_permutation, check_permutations
from .lap import solve_lap
from .weight import MatchResult, weight_matching

__all__ = ["ste_matching", "sinkhorn_matching", "soft_permute"]


def _positive_int(fn: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{fn}: {name}={value!r} must be an int >= 1")
    return int(value)


def _positive_float(fn: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{fn}: {name}={value!r} must be a finite number > 0")
    return float(value)


def _check_inputs(fn: str, model, spec, state_a, state_b, data, steps, lr, batch_size, seed):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"{fn}: spec must be a PermutationSpec, got {type(spec).__name__}")
    check_pair(model, state_a, state_b)
    steps, lr = _positive_int(fn, "steps", steps), _positive_float(fn, "lr", lr)
    if batch_size is not None:
        _positive_int(fn, "batch_size", batch_size)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"{fn}: seed={seed!r} must be an int")
    require_reiterable(data)
    return steps, lr, spec.perm_sizes(state_b)


def _init_perms(fn: str, spec, state_a, state_b, init, sizes, seed) -> dict[str, torch.Tensor]:
    if init is None:
        return {p: torch.arange(n) for p, n in sizes.items()}
    if isinstance(init, str):
        if init != "weight":
            raise ValueError(f"{fn}: init={init!r}; expected None, 'weight' or a dict of perms")
        return weight_matching(spec, state_a, state_b, seed=seed).perms
    if not isinstance(init, Mapping):
        raise TypeError(f"{fn}: init must be None, 'weight' or a dict perm name -> permutation, "
                        f"got {type(init).__name__}")
    check_permutations(spec, init, sizes)
    return {p: init[p].detach().to("cpu", torch.long).clone() for p in sizes}


def _learned_keys(model: nn.Module, state) -> list[str]:
    """The model's floating parameters: what the midpoint's loss is descended over (buffers such as
    BN running statistics are interpolated, never optimised)."""
    params = dict(model.named_parameters())
    return [k for k in state if k in params and state[k].is_floating_point()]


class _Adam:
    """Adam (Kingma & Ba 2015) on a list of leaf tensors: torch.optim's would import torch._dynamo on
    first use, seconds that dwarf a short matching run."""

    def __init__(self, params: list[torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps, self.t = params, lr, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        (b1, b2), t = self.betas, self.t
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.addcdiv_(m, (v / (1 - b2 ** t)).sqrt_().add_(self.eps), value=-self.lr / (1 - b1 ** t))
            p.grad = None


def _steps_of(data, steps: int, batch_size, gen: torch.Generator):
    """`steps` labelled batches, cycling over the data in a fresh seeded order each epoch."""
    done = 0
    while done < steps:
        for x, y in batches(data, batch_size=batch_size, labels="required", shuffle=gen):
            yield x, y
            done += 1
            if done == steps:
                return


def _midpoint_loss(view, state_a, state_b_aligned, x, y) -> torch.Tensor:
    """Cross-entropy of the midpoint ½(θ_A + θ'_B) on one batch; integer buffers come from A."""
    mid = {k: 0.5 * (a + state_b_aligned[k].to(a.dtype)) if a.is_floating_point() else a
           for k, a in state_a.items()}
    device = next(iter(mid.values())).device  # batches arrive on the CPU; the states may not be
    x = {k: v.to(device) for k, v in x.items()} if isinstance(x, Mapping) else x.to(device)
    y = y.to(device)
    out = functional_call(view, mid, (x,)) if not isinstance(x, Mapping) else functional_call(view, mid, (), dict(x))
    if out.dim() > 2:  # token models: [batch, seq, classes] against [batch, seq] labels
        return F.cross_entropy(out.flatten(0, -2), y.flatten())
    return F.cross_entropy(out, y)


class _Keeper:
    """The hard perms to return: with keep="best" those of the lowest midpoint loss over all of `data`
    among the ones offered (the start first, ties to the earlier), with keep="final" the last offered."""

    def __init__(self, fn: str, keep: str, view, spec, state_a, state_b, data, batch_size):
        if keep not in ("best", "final"):
            raise ValueError(f"{fn}: keep={keep!r}; expected 'best' or 'final'")
        self.keep, self.view, self.spec, self.a, self.b = keep, view, spec, state_a, state_b
        self.data, self.batch_size = data, batch_size
        self.perms, self.loss, self.last = None, math.inf, None

    @torch.no_grad()
    def offer(self, perms: Mapping[str, torch.Tensor], final: bool = False) -> None:
        perms = {p: v.detach().to("cpu").clone() for p, v in perms.items()}
        if self.keep == "final":
            if final:
                self.perms = perms
            return
        if self.last is not None and all(torch.equal(perms[p], self.last[p]) for p in perms):
            return  # the same perms as the last check: the same loss
        self.last = perms
        aligned, total, rows = apply_permutation(self.spec, perms, self.b), 0.0, 0
        for x, y in batches(self.data, batch_size=self.batch_size, labels="required"):
            total += float(_midpoint_loss(self.view, self.a, aligned, x, y)) * y.numel()
            rows += y.numel()
        if total / rows < self.loss:
            self.perms, self.loss = perms, total / rows


def _project(spec: PermutationSpec, free, state_b, perms, seed: int) -> dict[str, torch.Tensor]:
    """The permutation of B nearest to W̃ (weight matching of B onto W̃), started from `perms`: the
    paper's loop, since W̃ moves little between steps."""
    target = {k: v.detach() for k, v in free.items()}
    return weight_matching(spec, target, {k: state_b[k] for k in target}, method="textbook", init=perms,
                           seed=seed).perms


def ste_matching(model: nn.Module, spec: PermutationSpec, state_a: Mapping[str, torch.Tensor],
                 state_b: Mapping[str, torch.Tensor], data, *, init="weight", steps: int = 1000,
                 lr: float = 3e-3, batch_size: int | None = 128, seed: int = 0, keep: str = "best",
                 check_every: int = 50, progress: bool = False) -> MatchResult:
    """Permutations of B found by Git Re-Basin's straight-through estimator (Ainsworth et al. 2023, §3.3).

    A free copy W̃ of B's parameters (starting at π₀(θ_B): `init` None is the identity, "weight" weight
    matching, or a dict of perms) is trained by Adam (`lr`) for `steps` batches of `data` (any data
    convention `batches` reads; labels required; order seeded by `seed`). Each step projects W̃ to
    the nearest permuted B (π = weight matching of B onto W̃, started from the previous π), and the
    loss is the cross-entropy of the midpoint ½(θ_A + π(θ_B)) in which π(θ_B) passes its gradient
    straight through to W̃. The model runs in eval mode on a private view (BN running statistics are
    interpolated buffers). `keep`="best" returns the projection with the lowest midpoint loss over all
    of `data` among the start, every `check_every`-th step's and the final one ("final": the final
    one); `.objective` is the batch loss of each step. Inputs are never modified.
    """
    fn = "ste_matching"
    steps, lr, sizes = _check_inputs(fn, model, spec, state_a, state_b, data, steps, lr, batch_size, seed)
    perms = _init_perms(fn, spec, state_a, state_b, init, sizes, seed)
    view, keys = mode_view(model), _learned_keys(model, state_b)
    if set(spec.restrict(keys).perm_names) != set(sizes):  # a perm acting on buffers only: learn those too
        keys = [k for k in state_b if state_b[k].is_floating_point()]
    proj_spec = spec.restrict(keys)
    with torch.no_grad():
        start = apply_permutation(spec, perms, state_b)
    free = {k: start[k].detach().clone().requires_grad_(True) for k in keys}
    opt = _Adam(list(free.values()), lr=lr)
    gen, history = torch.Generator().manual_seed(int(seed)), []
    kept = _Keeper(fn, keep, view, spec, state_a, state_b, data, batch_size)
    check_every = _positive_int(fn, "check_every", check_every)
    kept.offer(perms)
    bar = tqdm(total=steps, desc="ste matching", disable=not progress, leave=False)
    for step, (x, y) in enumerate(_steps_of(data, steps, batch_size, gen), 1):
        with torch.no_grad():
            perms = _project(proj_spec, free, state_b, perms, seed)
            aligned = apply_permutation(spec, perms, state_b)
        straight = {k: (aligned[k] + (free[k] - free[k].detach()) if k in free else aligned[k]) for k in aligned}
        loss = _midpoint_loss(view, state_a, straight, x, y)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
        if step % check_every == 0:
            kept.offer(perms)
        bar.update()
        bar.set_postfix(loss=f"{history[-1]:.4g}")
    bar.close()
    with torch.no_grad():
        kept.offer(_project(proj_spec, free, state_b, perms, seed), final=True)
    return MatchResult(kept.perms, history, steps, [0], int(seed))


def _apply_matrix(t: torch.Tensor, s: torch.Tensor, axis: int) -> torch.Tensor:
    """Row i of the result along `axis` is Σ_j s[i, j]·t[j] (a hard permutation matrix P[i, π(i)] = 1
    gives `t.index_select(axis, π)`, as `apply_permutation` does)."""
    return torch.movedim(torch.tensordot(s.to(t.dtype), t, dims=([1], [axis])), 0, axis)


def soft_permute(spec: PermutationSpec, mats: Mapping[str, torch.Tensor],
                 state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with each permuted axis multiplied by its group's [n, n] matrix (differentiable): with
    permutation matrices this is `apply_permutation`; with doubly stochastic ones a soft permutation.
    Every entry of an axis applies (a weight with two permuted axes gets both); Blocked axes reshape."""
    out = {}
    for key, t in state.items():
        if not t.is_floating_point():
            out[key] = t
            continue
        for axis, entry in enumerate(spec.axes_to_perm[key]):
            if entry is None:
                continue
            if isinstance(entry, str):
                t = _apply_matrix(t, mats[entry], axis)
                continue
            size = t.shape[axis]
            blocked = t.reshape(t.shape[:axis] + entry.shape + t.shape[axis + 1:])
            for f, p in enumerate(entry.perms):
                if p is not None:
                    blocked = _apply_matrix(blocked, mats[p], axis + f)
            t = blocked.reshape(t.shape[:axis] + (size,) + t.shape[axis + 1:])
        out[key] = t
    return out


def _sinkhorn(logits: torch.Tensor, tau: float, n_iter: int) -> torch.Tensor:
    """Doubly stochastic matrix from logits by `n_iter` row/column normalisations in log space."""
    log_s = logits / tau
    for _ in range(n_iter):
        log_s = log_s - torch.logsumexp(log_s, dim=1, keepdim=True)
        log_s = log_s - torch.logsumexp(log_s, dim=0, keepdim=True)
    return log_s.exp()


def sinkhorn_matching(model: nn.Module, spec: PermutationSpec, state_a: Mapping[str, torch.Tensor],
                      state_b: Mapping[str, torch.Tensor], data, *, init="weight", steps: int = 1000,
                      lr: float = 0.03, tau: float = 0.1, n_iter: int = 20, batch_size: int | None = 128,
                      seed: int = 0, keep: str = "best", check_every: int = 50,
                      progress: bool = False) -> MatchResult:
    """Permutations of B found by descending the midpoint's loss over soft permutations (Sinkhorn
    re-basin, Peña et al. 2023).

    Each perm group holds an [n, n] logit matrix, starting at the one-hot matrix of `init` (None:
    identity, "weight": weight matching, or a dict of perms); Sinkhorn normalisation at temperature
    `tau` (`n_iter` log-space iterations) turns it into a doubly stochastic S, every permuted axis
    of B is multiplied by its S (`soft_permute`), and Adam (`lr`) descends the cross-entropy of the
    midpoint ½(θ_A + S(θ_B)) for `steps` batches of `data` (order seeded by `seed`). The hard perms
    are the LAP optima of the logits; `keep` and `check_every` choose among them as in
    `ste_matching`. `.objective` is the batch loss of each step. The model runs in eval mode on a
    private view; inputs are never modified.
    """
    fn = "sinkhorn_matching"
    steps, lr, sizes = _check_inputs(fn, model, spec, state_a, state_b, data, steps, lr, batch_size, seed)
    tau, n_iter = _positive_float(fn, "tau", tau), _positive_int(fn, "n_iter", n_iter)
    perms = _init_perms(fn, spec, state_a, state_b, init, sizes, seed)
    device = next(iter(state_b.values())).device
    logits = {p: F.one_hot(perms[p], n).to(device, torch.float32).requires_grad_(True) for p, n in sizes.items()}
    view, learned = mode_view(model), set(_learned_keys(model, state_b))
    opt = _Adam(list(logits.values()), lr=lr)
    gen, history = torch.Generator().manual_seed(int(seed)), []
    kept = _Keeper(fn, keep, view, spec, state_a, state_b, data, batch_size)
    check_every = _positive_int(fn, "check_every", check_every)
    kept.offer(perms)
    bar = tqdm(total=steps, desc="sinkhorn matching", disable=not progress, leave=False)
    for step, (x, y) in enumerate(_steps_of(data, steps, batch_size, gen), 1):
        mats = {p: _sinkhorn(v, tau, n_iter) for p, v in logits.items()}
        soft = soft_permute(spec, mats, state_b)
        # buffers (BN running statistics) follow S without a gradient: autograd refuses them
        soft = {k: (v if k in learned else v.detach()) for k, v in soft.items()}
        loss = _midpoint_loss(view, state_a, soft, x, y)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
        if step % check_every == 0:
            kept.offer({p: solve_lap(v.detach()) for p, v in logits.items()})
        bar.update()
        bar.set_postfix(loss=f"{history[-1]:.4g}")
    bar.close()
    kept.offer({p: solve_lap(v.detach()) for p, v in logits.items()}, final=True)
    return MatchResult(kept.perms, history, steps, [0], int(seed))
