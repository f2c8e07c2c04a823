"""A small causal GPT-style language model (pre-norm, LayerNorm or RMSNorm, RoPE or learned positions)
with hand-written q/k/v/o projections, its permutation spec and the attention layout head matching reads.

Symmetries: the residual stream (one perm through the whole network), each layer's MLP units, and per
layer the attention heads (whole heads) and the within-head dimensions: q and k share one perm, v and
o another. RoPE rotates q/k dimension pairs by position-dependent angles of distinct frequencies, so
under RoPE the q/k dimensions are not permutable (only heads are); with learned positions they are.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..matching.heads import HeadLayout
from ..spec import Blocked, PermutationSpec
from ._spec_helpers import dense
from .transformer import Attention, Block

NORMS = ("ln", "rms")
POSITIONS = ("rope", "learned")


def rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of x [B, H, T, D] (rotate-half pairs (i, i + D/2))."""
    t, d = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, d // 2, dtype=torch.float32, device=x.device) / (d // 2))
    ang = torch.arange(t, dtype=torch.float32, device=x.device)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def _norm(kind: str, d: int) -> nn.Module:
    return nn.LayerNorm(d) if kind == "ln" else nn.RMSNorm(d, eps=1e-5)


class CausalSelfAttention(Attention):
    """The zoo transformer's attention, causal, with RoPE on q and k when `rotary`."""

    causal = True

    def __init__(self, d_model: int, heads: int, rotary: bool):
        if d_model % heads or (rotary and (d_model // heads) % 2):
            raise ValueError(f"d_model={d_model} must split into heads={heads} heads of even size under RoPE")
        super().__init__(d_model, heads)
        self.rotary = rotary

    def positions(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (rope(q), rope(k)) if self.rotary else (q, k)


class GPTBlock(Block):
    """The zoo transformer's pre-norm block with LayerNorm or RMSNorm and causal (RoPE) attention."""

    def __init__(self, d_model: int, heads: int, mlp_ratio: int, norm: str, rotary: bool):
        super().__init__(d_model, heads, mlp_ratio, norm=lambda d: _norm(norm, d),
                         attention=lambda d, h: CausalSelfAttention(d, h, rotary))


class GPT(nn.Module):
    """Token ids [B, T] (T <= seq_len) -> next-token logits [B, T, vocab]; byte-level by default."""

    def __init__(self, vocab: int = 256, seq_len: int = 128, d_model: int = 128, heads: int = 4, layers: int = 2,
                 mlp_ratio: int = 4, norm: str = "ln", positions: str = "rope"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r}; expected one of {NORMS}")
        if positions not in POSITIONS:
            raise ValueError(f"positions={positions!r}; expected one of {POSITIONS}")
        self.seq_len, self.d_model, self.heads, self.norm, self.positions = seq_len, d_model, heads, norm, positions
        self.tok_emb = nn.Embedding(vocab, d_model)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        if positions == "learned":
            self.pos_emb = nn.Parameter(torch.randn(seq_len, d_model) * 0.02)
        self.blocks = nn.ModuleList(GPTBlock(d_model, heads, mlp_ratio, norm, positions == "rope")
                                    for _ in range(layers))
        self.ln_f = _norm(norm, d_model)
        self.head = nn.Linear(d_model, vocab)
        for blk in self.blocks:  # GPT-2's scaled init of the projections that write into the residual
            for lin in (blk.attn.o_proj, blk.fc2):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * layers))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[1] > self.seq_len:
            raise ValueError(f"GPT: ids must be [batch, T <= {self.seq_len}], got {list(ids.shape)}")
        x = self.tok_emb(ids)
        if self.positions == "learned":
            x = x + self.pos_emb[: ids.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))

    stitch_channel_dim = -1

    def stitch_points(self) -> list[str]:
        return [f"blocks.{i}" for i in range(len(self.blocks))]

    def norm_names(self) -> list[str]:
        """Every normalisation module, each followed by the Linear layers that read its output."""
        return [f"blocks.{i}.{n}" for i in range(len(self.blocks)) for n in ("ln1", "ln2")] + ["ln_f"]

    def head_layout(self) -> list[HeadLayout]:
        """Per layer: the attention modules, sizes and the perm names of both `permutation_spec` forms."""
        rotary = self.positions == "rope"
        out = []
        for i in range(len(self.blocks)):
            pre, p = f"blocks.{i}.attn", f"P_blocks.{i}"
            out.append(HeadLayout(q=f"{pre}.q_proj", k=f"{pre}.k_proj", o=f"{pre}.o_proj", heads=self.heads,
                                  head_dim=self.d_model // self.heads, rotary=rotary, heads_perm=f"{p}.heads",
                                  qk_perm=None if rotary else f"{p}.qk", vo_perm=f"{p}.vo",
                                  qk_flat=f"{p}.qk_flat", vo_flat=f"{p}.vo_flat"))
        return out

    def permutation_spec(self, head_dims: str = "shared") -> PermutationSpec:
        """head_dims="shared": q/k/v/o axes Blocked (heads, head_dim), one within-head perm for every
        head (what weight matching searches); "per_head": one flat perm per layer over all q/k (and
        v/o) dimensions, valid when it moves whole heads consistently (what `heads.two_level_matching`
        returns: each head its own within-head perm)."""
        if head_dims not in ("shared", "per_head"):
            raise ValueError(f"head_dims={head_dims!r}; expected 'shared' or 'per_head'")
        res, hd = "P_res", self.d_model // self.heads
        axes = {"tok_emb.weight": (None, res)}
        if self.positions == "learned":
            axes["pos_emb"] = (None, res)
        for i, lay in enumerate(self.head_layout()):
            pre = f"blocks.{i}"
            if head_dims == "shared":
                qk = Blocked((self.heads, hd), (lay.heads_perm, lay.qk_perm))
                vo = Blocked((self.heads, hd), (lay.heads_perm, lay.vo_perm))
            else:
                qk, vo = lay.qk_flat, lay.vo_flat
            for n in ("ln1", "ln2"):
                axes |= {f"{pre}.{n}.weight": (res,)} | ({f"{pre}.{n}.bias": (res,)} if self.norm == "ln" else {})
            axes |= dense(f"{pre}.attn.q_proj", res, qk) | dense(f"{pre}.attn.k_proj", res, qk)
            axes |= dense(f"{pre}.attn.v_proj", res, vo) | dense(f"{pre}.attn.o_proj", vo, res)
            axes |= dense(f"{pre}.fc1", res, f"P_{pre}.mlp") | dense(f"{pre}.fc2", f"P_{pre}.mlp", res)
        axes |= {"ln_f.weight": (res,)} | ({"ln_f.bias": (res,)} if self.norm == "ln" else {})
        axes |= dense("head", res, None)
        return PermutationSpec(axes, {"head.bias": "next-token logits are not a symmetry"})
