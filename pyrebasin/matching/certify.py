"""An optimality certificate for weight matching.

A permutation moves a tensor's entries without changing them, so ‖π(B_k)‖ = ‖B_k‖ and, by Cauchy–Schwarz,

    Σ_k <A_k, π(B_k)>  ≤  Σ_k ‖A_k‖·‖B_k‖   for every π,

with equality iff every π(B_k) is a non-negative multiple of A_k (B a permuted, per-tensor rescaled A; a
model matched with itself). When the descent's objective reaches this bound, no permutation scores
higher and the rest of the search (later phases, refinement, restarts) cannot gain: it is skipped.

Rounding: the objective and the norms are float64 sums of exact products (bf16/fp16/fp32 values are exact
in float64); a sum of n terms is off by at most about n·2⁻⁵³ of Σ|terms| ≤ ‖A_k‖·‖B_k‖, and the dots are
summed in chunks of 2¹⁷ (`costs.dot64`), so both sides are within ~2e-11 of the bound. `RTOL` = 1e-9 is
50x that, and far below what swapping two units changes on the random-weight LLaMA shapes of
benchmarks/hf_align.py (two MLP units: ~9e-6 of the bound at 1.1B, ~4e-6 at 7B). A certified result is therefore optimal up to `RTOL` x bound.
"""
from __future__ import annotations

import torch

from ..distributed import all_reduce_sum_
from .costs import dot64

__all__ = ["Certificate", "RTOL", "SCREEN"]

RTOL = 1e-9
# A value from the cost matrices (the streamed provider's tracked objective: float32 GEMMs) is first
# screened against the bound with this looser tolerance; only then is the exact objective computed
# (once per perm state). On the 1.1B planted pair the tracked value was 1e-5 above the bound.
SCREEN = 1e-3


class Certificate:
    """`cert(value)`: whether the objective `value` of `costs`' current perms reaches the Cauchy–Schwarz
    bound (then `certified` is set, and `exact` holds the objective recomputed in float64). The bound
    is computed once: from the norms a provider gathered in its first objective pass (`costs.norms`,
    key -> (‖A_k‖², ‖B_k‖²)) or from one pass over `costs.tensors`."""

    def __init__(self, costs, rtol: float = RTOL, screen: float = SCREEN):
        self.costs, self.rtol, self.screen = costs, rtol, screen
        self._bound: float | None = None
        self.certified = False
        self.exact: float | None = None
        self._checked: tuple | None = None  # (perm versions) of the last exact check that failed

    @property
    def bound(self) -> float:
        if self._bound is None:
            costs = self.costs
            norms = dict(getattr(costs, "norms", None) or {})
            missing = [k for k in costs.own_keys if k not in norms]
            if missing:
                buffers = tuple(torch.empty(1 << 17, dtype=torch.float64, device=costs.device) for _ in range(2))
                for a, b in costs.tensors(missing):
                    for k in b:
                        norms[k] = (dot64(a[k], a[k], buffers), dot64(b[k], b[k], buffers))
            vec = torch.tensor([(norms[k][0] * norms[k][1]) ** 0.5 if k in norms else 0.0 for k in costs.keys],
                               dtype=torch.float64)
            if costs.group is not False:  # each tensor's term on one rank, zeros elsewhere: exact
                vec = all_reduce_sum_([vec], costs.group)[0]
            self._bound = float(vec.sum())
        return self._bound

    def __call__(self, value: float) -> bool:
        if self.certified:
            return True
        bound = self.bound
        if not bound > 0 or value < bound - self.screen * bound:
            return False
        state = tuple(sorted(self.costs.version.items()))
        if state == self._checked:
            return False  # these perms were checked exactly already
        exact = self.costs.objective(self.costs.perms)  # a full float64 pass (tracked values are float32 GEMMs)
        if exact >= bound - self.rtol * bound:
            self.certified, self.exact = True, exact
            return True
        self._checked = state
        return False
