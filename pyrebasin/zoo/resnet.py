"""ResNet20 (3 stages x 3 basic blocks, widths 16/32/64 x width_multiplier) for 1-D or 2-D inputs.

Each stage's residual stream shares one permutation (stem/shortcut outputs, every block's second
conv and norm); each block's inner channels have their own. norm="bn" (BatchNorm), "ln"
(GroupNorm(1, C): LayerNorm over channels and positions) or None.
"""
from __future__ import annotations

import torch
from torch import nn

from ..spec import PermutationSpec
from ._spec_helpers import conv, dense, norm


def _norm(kind: str | None, c: int, dim: int) -> nn.Module:
    if kind is None:
        return nn.Identity()
    if kind == "bn":
        return (nn.BatchNorm1d if dim == 1 else nn.BatchNorm2d)(c)
    return nn.GroupNorm(1, c)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, kind: str | None, dim: int):
        super().__init__()
        Conv = nn.Conv1d if dim == 1 else nn.Conv2d
        self.conv1 = Conv(c_in, c_out, 3, stride=stride, padding=1, bias=kind is None)
        self.norm1 = _norm(kind, c_out, dim)
        self.conv2 = Conv(c_out, c_out, 3, padding=1, bias=kind is None)
        self.norm2 = _norm(kind, c_out, dim)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(Conv(c_in, c_out, 1, stride=stride, bias=kind is None),
                                          _norm(kind, c_out, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return torch.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet20(nn.Module):
    def __init__(self, width_multiplier: int = 1, norm: str | None = "bn", classes: int = 10,
                 in_channels: int = 1, conv_dim: int = 1, blocks_per_stage: int = 3):
        super().__init__()
        if conv_dim not in (1, 2):
            raise ValueError(f"ResNet20 conv_dim={conv_dim}; expected 1 or 2")
        if norm not in (None, "ln", "bn"):
            raise ValueError(f"ResNet20 norm={norm!r}; expected None, 'ln' or 'bn'")
        self.norm_kind, self.conv_dim, self.blocks_per_stage = norm, conv_dim, blocks_per_stage
        Conv = nn.Conv1d if conv_dim == 1 else nn.Conv2d
        widths = [16 * width_multiplier, 32 * width_multiplier, 64 * width_multiplier]
        self.conv1 = Conv(in_channels, widths[0], 3, padding=1, bias=norm is None)
        self.norm1 = _norm(norm, widths[0], conv_dim)
        stages = []
        c = widths[0]
        for s, w in enumerate(widths):
            blocks = []
            for b in range(blocks_per_stage):
                blocks.append(BasicBlock(c, w, 2 if (s > 0 and b == 0) else 1, norm, conv_dim))
                c = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.linear = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == self.conv_dim + 1:
            x = x.unsqueeze(1)
        x = torch.relu(self.norm1(self.conv1(x)))
        for stage in self.stages:
            x = stage(x)
        return self.linear(x.flatten(2).mean(-1))

    def stitch_points(self) -> list[str]:
        """Where `prb.stitching` cuts: the stem's `norm1` (pre-ReLU), then every block (post-ReLU)."""
        return ["norm1"] + [f"stages.{s}.{b}" for s, stage in enumerate(self.stages) for b in range(len(stage))]

    def permutation_spec(self) -> PermutationSpec:
        d, k = self.conv_dim, self.norm_kind
        bias = k is None
        axes = conv("conv1", None, "P_stage0", d, bias) | norm("norm1", "P_stage0", k)
        stream = "P_stage0"
        for s, stage in enumerate(self.stages):
            out_stream = f"P_stage{s}"
            for b, block in enumerate(stage):
                pre = f"stages.{s}.{b}"
                inner = f"P_{pre}.inner"
                axes |= conv(f"{pre}.conv1", stream, inner, d, bias) | norm(f"{pre}.norm1", inner, k)
                axes |= conv(f"{pre}.conv2", inner, out_stream, d, bias) | norm(f"{pre}.norm2", out_stream, k)
                if block.shortcut is not None:
                    axes |= conv(f"{pre}.shortcut.0", stream, out_stream, d, bias)
                    axes |= norm(f"{pre}.shortcut.1", out_stream, k)
                stream = out_stream
        axes |= dense("linear", stream, None)
        return PermutationSpec(axes, {"linear.bias": "class outputs are not a symmetry"})
