"""A small pre-LayerNorm transformer encoder classifier with hand-written q/k/v/o projections.

Symmetries: the residual stream (one perm through the whole network), each layer's MLP units, and
per layer the attention heads (whole heads) and the within-head dimensions (q and k share one perm,
v and o another: scores q.k and outputs o(v) are invariant to them).
"""
from __future__ import annotations

import torch
from torch import nn

from ..spec import Blocked, PermutationSpec
from ._spec_helpers import dense, norm


class Attention(nn.Module):
    causal = False   # a causal LM's attention sets it (zoo.gpt)

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} is not divisible by heads={heads}")
        self.heads, self.head_dim = heads, d_model // heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        split = lambda y: y.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        q, k = self.positions(q, k)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))

    def positions(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Position information for q and k [B, heads, T, head_dim] (none here: learned embeddings)."""
        return q, k


class Block(nn.Module):
    """Pre-norm block; `norm(d)` and `attention(d, heads)` build its norms and attention (zoo.gpt's
    causal variant passes its own), in the order ln1, attn, ln2, fc1, fc2."""

    def __init__(self, d_model: int, heads: int, mlp_ratio: int, *, norm=nn.LayerNorm, attention=None):
        super().__init__()
        self.ln1 = norm(d_model)
        self.attn = (attention or Attention)(d_model, heads)
        self.ln2 = norm(d_model)
        self.fc1 = nn.Linear(d_model, mlp_ratio * d_model)
        self.fc2 = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    """Reads a [B, L] signal as L/patch tokens of `patch` values (mnist1d: L=40)."""

    def __init__(self, seq_len: int = 40, patch: int = 4, d_model: int = 64, heads: int = 4,
                 layers: int = 2, mlp_ratio: int = 2, classes: int = 10):
        super().__init__()
        if seq_len % patch:
            raise ValueError(f"seq_len={seq_len} is not divisible by patch={patch}")
        self.patch, self.tokens, self.heads, self.d_model = patch, seq_len // patch, heads, d_model
        self.embed = nn.Linear(patch, d_model)
        self.pos = nn.Parameter(torch.randn(self.tokens, d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(d_model, heads, mlp_ratio) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x.reshape(x.shape[0], self.tokens, self.patch)) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x).mean(1))

    stitch_channel_dim = -1  # activations are [B, T, C] tokens: channels last

    def stitch_points(self) -> list[str]:
        """Where `prb.stitching` cuts: the residual stream after each block."""
        return [f"blocks.{i}" for i in range(len(self.blocks))]

    def permutation_spec(self) -> PermutationSpec:
        res = "P_res"
        hd = self.d_model // self.heads
        axes = dense("embed", None, res) | {"pos": (None, res)}
        for i in range(len(self.blocks)):
            pre = f"blocks.{i}"
            qk = Blocked((self.heads, hd), (f"P_{pre}.heads", f"P_{pre}.qk"))
            vo = Blocked((self.heads, hd), (f"P_{pre}.heads", f"P_{pre}.vo"))
            axes |= norm(f"{pre}.ln1", res, "ln")
            axes |= dense(f"{pre}.attn.q_proj", res, qk) | dense(f"{pre}.attn.k_proj", res, qk)
            axes |= dense(f"{pre}.attn.v_proj", res, vo) | dense(f"{pre}.attn.o_proj", vo, res)
            axes |= norm(f"{pre}.ln2", res, "ln")
            axes |= dense(f"{pre}.fc1", res, f"P_{pre}.mlp") | dense(f"{pre}.fc2", f"P_{pre}.mlp", res)
        axes |= norm("ln_f", res, "ln") | dense("head", res, None)
        return PermutationSpec(axes, {"head.bias": "class outputs are not a symmetry"})
