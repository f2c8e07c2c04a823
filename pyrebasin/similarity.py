"""Functional (disagreement, KL/JS of softmax outputs) and weight (L2, cosine) similarity.

Representation indices (CKA, CCA, R²) join here too.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["disagreement", "kl_divergence", "js_divergence", "weight_l2", "weight_cosine"]


def _check_logits(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"logits shapes differ: {list(a.shape)} vs {list(b.shape)}")


def disagreement(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Fraction of examples whose top-1 predictions differ (over the last dim)."""
    _check_logits(logits_a, logits_b)
    return (logits_a.argmax(-1) != logits_b.argmax(-1)).float().mean(-1)


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Mean over examples of KL(softmax p || softmax q), in nats."""
    _check_logits(logits_p, logits_q)
    lp, lq = logits_p.double().log_softmax(-1), logits_q.double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean(-1)


def js_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Mean over examples of the Jensen-Shannon divergence of the two softmaxes (nats, <= ln 2)."""
    _check_logits(logits_p, logits_q)
    lp, lq = logits_p.double().log_softmax(-1), logits_q.double().log_softmax(-1)
    lm = torch.logaddexp(lp, lq) - torch.log(torch.tensor(2.0, dtype=torch.float64))
    kl = lambda la: (la.exp() * (la - lm)).sum(-1)  # noqa: E731
    return (0.5 * (kl(lp) + kl(lq))).mean(-1)


def _common_float_keys(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> list[str]:
    if set(a) != set(b):
        raise ValueError(f"state dicts have different keys: {sorted(set(a) ^ set(b))[:8]}")
    for k in a:
        if a[k].shape != b[k].shape:
            raise ValueError(f"{k!r}: shapes differ, {list(a[k].shape)} vs {list(b[k].shape)}")
    return [k for k in a if a[k].is_floating_point()]


def weight_l2(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor]) -> float:
    """‖θ_A − θ_B‖₂ over all floating-point tensors."""
    keys = _common_float_keys(state_a, state_b)
    return float(sum((state_a[k].double() - state_b[k].double()).pow(2).sum() for k in keys) ** 0.5)


def weight_cosine(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor]) -> float:
    """cos(θ_A, θ_B) of the flattened floating-point parameters."""
    keys = _common_float_keys(state_a, state_b)
    dot = sum((state_a[k].double() * state_b[k].double()).sum() for k in keys)
    na = sum(state_a[k].double().pow(2).sum() for k in keys) ** 0.5
    nb = sum(state_b[k].double().pow(2).sum() for k in keys) ** 0.5
    return float(dot / (na * nb))
