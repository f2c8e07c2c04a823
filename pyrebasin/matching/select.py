"""Data-aware choice between weight-matching runs (issue #12 §2, docs/matchers.md "Data-aware choice").

Weight matching's objective Σ <W_A, π(W_B)> is a proxy: near-optimal permutations found from different
group orders score within a fraction of a percent of each other, yet their interpolation barriers can
differ by a third (VGG, ResNet20 LayerNorm, the transformer of the matcher study). Given the model and
some of its training data, `weight_matching(..., model=, data=)` runs several group orders and, of those
within `TIE` of the best objective, keeps the one whose midpoint θ(½) = ½·(θ_A + π(θ_B)) has the lowest
loss on that data; this module scores and chooses them.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ..batches import splits

__all__ = ["MidpointScore", "DATA_RESTARTS", "TIE"]

# Group orders tried when `data` is given and `restarts` is not, and the tie: runs whose objective is
# within TIE x |best objective| of the best run's are compared on the data (chosen in docs/matchers.md;
# read at call time; math.inf compares every run).
DATA_RESTARTS = 4
TIE = 0.0025


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class MidpointScore:
    """Loss of the midpoint between state A and a permuted B on `data` (one split: an (x, y) pair, an
    iterable of batches, a DataLoader or token batches, as `interpolate` reads them), lower is better.
    A net with BatchNorm gets its statistics recomputed at the midpoint on the same data (RESET), as
    matched BN nets are evaluated; other buffers are interpolated. `loss` and `batch_size` go to
    `interpolate`. The score of each candidate is kept in `scores` (candidate seed -> loss)."""

    def __init__(self, model: nn.Module, data, *, loss=None, batch_size: int | None = 1000):
        if not isinstance(model, nn.Module):
            raise TypeError(f"weight_matching: model must be an nn.Module (the one the states belong to), "
                            f"got {type(model).__name__}")
        named = splits(data, "data")
        if len(named) != 1:
            raise ValueError(f"weight_matching: data must be one split to score candidates on, got splits "
                             f"{sorted(named)}")
        (self.data,) = named.values()
        self.model, self.loss, self.batch_size = model, loss, batch_size
        self.reset = _has_batchnorm(model)
        self.scores: dict[int, float] = {}

    def __call__(self, seed: int, state_a: Mapping[str, torch.Tensor], state_b_aligned: Mapping[str, torch.Tensor]
                 ) -> float:
        from ..lmc import interpolate  # evaluation sits beside matching in the core layer; imported on use

        curve = interpolate(self.model, state_a, state_b_aligned, self.data, ts=[0.5],
                            buffers="reset" if self.reset else "interpolate",
                            stat_data=self.data if self.reset else None, batch_size=self.batch_size,
                            loss=self.loss, group=False)
        value = curve.values("loss")[0]
        if not math.isfinite(value):
            raise ValueError(f"weight_matching: the midpoint loss of group order {seed} on data is {value}; the "
                             "data or the model's outputs are not finite")
        self.scores[seed] = value
        return value

    def choose(self, runs, spec, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor]):
        """The run (a `MatchResult`) with the lowest midpoint loss among `runs` whose final objective is
        within `TIE` of the best one's (the first on equal losses); only those are evaluated."""
        from ..spec import apply_permutation

        top = max(r.objective[-1] for r in runs)
        tied = [r for r in runs if r.objective[-1] >= top - TIE * abs(top)]
        losses = [self(r.seed, state_a, apply_permutation(spec, r.perms, state_b)) for r in tied]
        return tied[losses.index(min(losses))]
