"""Multi-layer perceptron with ReLU: in -> width x depth -> classes (optionally LayerNorm/BatchNorm)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..spec import PermutationSpec
from ._spec_helpers import dense, norm


class MLP(nn.Module):
    def __init__(self, in_features: int = 40, width: int | Sequence[int] = 512, depth: int = 3,
                 classes: int = 10, norm: str | None = None):
        super().__init__()
        widths = [width] * depth if isinstance(width, int) else list(width)
        if not widths:
            raise ValueError("MLP needs at least one hidden layer")
        for name, sizes in (("width", widths), ("in_features", [in_features]), ("classes", [classes])):
            if any(isinstance(w, (bool, float)) or not hasattr(w, "__index__") or w < 1 for w in sizes):
                raise ValueError(f"MLP {name}={width if name == 'width' else sizes[0]!r}: sizes must be positive ints")
        if norm not in (None, "ln", "bn"):
            raise ValueError(f"MLP norm={norm!r}; expected None, 'ln' or 'bn'")
        self.norm_kind = norm
        self.widths = widths
        dims = [in_features] + widths
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        make_norm = {None: lambda n: nn.Identity(), "ln": nn.LayerNorm, "bn": nn.BatchNorm1d}[norm]
        self.norms = nn.ModuleList(make_norm(w) for w in widths)
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer, nrm in zip(self.layers, self.norms):
            x = torch.relu(nrm(layer(x)))
        return self.head(x)

    def stitch_points(self) -> list[str]:
        """Where `prb.stitching` cuts: `norms.i`, the pre-activation each hidden ReLU reads (an
        Identity without norm; the ReLU itself is functional, so it has no module to hook)."""
        return [f"norms.{i}" for i in range(len(self.widths))]

    def permutation_spec(self) -> PermutationSpec:
        axes = {}
        prev = None
        for i in range(len(self.widths)):
            p = f"P_layers.{i}"
            axes |= dense(f"layers.{i}", prev, p)
            axes |= norm(f"norms.{i}", p, self.norm_kind)
            prev = p
        axes |= dense("head", prev, None)
        return PermutationSpec(axes, {"head.bias": "class outputs are not a symmetry"})
