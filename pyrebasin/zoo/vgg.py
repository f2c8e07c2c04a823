"""Small VGG for 1-D or 2-D inputs: conv-norm-relu blocks with max-pooling, then flatten -> MLP head.

The classifier reads the flattened feature map, so its input axis is a Blocked (channel, position)
axis: the last conv's channel permutation expands across each channel's spatial block.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..spec import Blocked, PermutationSpec
from ._spec_helpers import conv, dense, norm


def _make_norm(kind: str | None, c: int, dim: int) -> nn.Module:
    if kind is None:
        return nn.Identity()
    if kind == "bn":
        return (nn.BatchNorm1d if dim == 1 else nn.BatchNorm2d)(c)
    return nn.GroupNorm(1, c)  # "ln": LayerNorm over (C, *spatial) with a per-channel affine


class VGG(nn.Module):
    def __init__(self, in_channels: int = 1, input_size: int = 40, conv_dim: int = 1,
                 cfg: Sequence[int | str] = (16, 16, "M", 32, 32, "M", 64, "M"),
                 width_multiplier: int = 1, hidden: int = 128, classes: int = 10,
                 norm: str | None = "bn"):
        super().__init__()
        if conv_dim not in (1, 2):
            raise ValueError(f"VGG conv_dim={conv_dim}; expected 1 or 2")
        if norm not in (None, "ln", "bn"):
            raise ValueError(f"VGG norm={norm!r}; expected None, 'ln' or 'bn'")
        self.conv_dim, self.norm_kind, self.in_channels, self.input_size = conv_dim, norm, in_channels, input_size
        Conv = nn.Conv1d if conv_dim == 1 else nn.Conv2d
        Pool = nn.MaxPool1d if conv_dim == 1 else nn.MaxPool2d
        self.features = nn.ModuleList()
        self.plan: list[tuple[str, int]] = []  # ("conv", index in features) or ("pool", index)
        c, size = in_channels, input_size
        for item in cfg:
            if item == "M":
                self.features.append(Pool(2))
                size //= 2
            else:
                w = int(item) * width_multiplier
                self.features.append(Conv(c, w, 3, padding=1, bias=norm is None))
                self.features.append(_make_norm(norm, w, conv_dim))
                self.features.append(nn.ReLU())
                c = w
        self.out_channels, self.spatial = c, size ** conv_dim
        self.fc1 = nn.Linear(c * self.spatial, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == self.conv_dim + 1:  # unbatched channel dim: [B, L] -> [B, 1, L]
            x = x.unsqueeze(1)
        for f in self.features:
            x = f(x)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))

    def stitch_points(self) -> list[str]:
        """Where `prb.stitching` cuts: every ReLU module of the features, then `fc1` (pre-ReLU)."""
        return [f"features.{i}" for i, f in enumerate(self.features) if isinstance(f, nn.ReLU)] + ["fc1"]

    def permutation_spec(self) -> PermutationSpec:
        axes = {}
        prev = None
        for i, f in enumerate(self.features):
            if isinstance(f, (nn.Conv1d, nn.Conv2d)):
                p = f"P_features.{i}"
                axes |= conv(f"features.{i}", prev, p, self.conv_dim, bias=f.bias is not None)
                axes |= norm(f"features.{i + 1}", p, self.norm_kind)
                prev = p
        axes |= dense("fc1", Blocked((self.out_channels, self.spatial), (prev, None)), "P_fc1")
        axes |= dense("fc2", "P_fc1", None)
        return PermutationSpec(axes, {"fc2.bias": "class outputs are not a symmetry"})
