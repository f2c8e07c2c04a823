"""Language-model objectives for the evaluator: logits out of any model output, the next-token loss of
causal LMs (padding masked, token-weighted) and perplexity."""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch.nn import functional as F

__all__ = ["logits_of", "LossParts", "NextTokenLoss", "next_token_targets", "perplexity", "model_kwargs",
           "is_token_batch", "IGNORE_INDEX", "vocabulary_size",
           "check_token_ids"]

IGNORE_INDEX = -100   # the label that marks a position without a target (PyTorch's and HF's convention)


class LossParts(NamedTuple):
    """Per-example parts of a loss that is a mean over a variable number of targets (tokens):
    summed loss [K, B], number of targets [B], number of correct argmax predictions [K, B] or None."""

    sum: torch.Tensor
    count: torch.Tensor
    correct: torch.Tensor | None = None


def logits_of(out):
    """The logits of a model output: a Tensor as is, `.logits` of a ModelOutput (or any object),
    `out["logits"]` of a mapping, `out[0]` of a tuple/list."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        if "logits" in out:
            return out["logits"]
        raise TypeError(f"the model returned a mapping without 'logits' (keys {sorted(map(str, out))[:6]}); "
                        "return a tensor or pass loss=")
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in the model's output of type {type(out).__name__}; return a tensor, "
                    "a ModelOutput with .logits, or pass loss=")


def is_token_batch(x) -> bool:
    """Integer token ids [B, T], or a mapping holding them under 'input_ids'."""
    ids = x.get("input_ids") if isinstance(x, Mapping) else x
    return isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point() \
        and not ids.is_complex() and ids.dtype != torch.bool


def model_kwargs(model: torch.nn.Module) -> dict:
    """Extra keyword arguments for evaluating `model` on token batches: `use_cache=False` where its
    forward takes it (a KV cache is never wanted while scoring, and breaks tracing and vmap)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def vocabulary_size(model: torch.nn.Module) -> int | None:
    """Rows of the model's input embedding: HF `get_input_embeddings()`, else its nn.Embedding when it has
    exactly one (with several, which one reads the ids is unknown: None)."""
    get = getattr(model, "get_input_embeddings", None)
    emb = None
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
    if not isinstance(emb, torch.nn.Embedding):
        found = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        emb = found[0] if len(found) == 1 else None
    return None if emb is None else int(emb.num_embeddings)


def check_token_ids(x, vocab: int | None, where: str) -> None:
    """Token ids inside [0, vocab): an id outside would index past the embedding deep inside the model."""
    if vocab is None or not is_token_batch(x):
        return
    ids = x["input_ids"] if isinstance(x, Mapping) else x
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"{where}: token ids must lie in [0, {vocab}) (the model's vocabulary), got range "
                         f"[{int(ids.min())}, {int(ids.max())}]")


def next_token_targets(y, x) -> torch.Tensor:
    """Targets [B, T-1] aligned with logits[:, :-1]: labels `y` [B, T] (HF convention: aligned with the
    inputs, shifted here; IGNORE_INDEX marks no target), else the input ids shifted, with positions whose
    target is padding (attention_mask 0) ignored."""
    if y is None:
        if not is_token_batch(x):
            raise ValueError("next-token loss needs labels [batch, tokens] or token inputs (integer input_ids "
                             f"[batch, tokens]); got inputs of type {type(x).__name__}")
        ids = x["input_ids"] if isinstance(x, Mapping) else x
        target = ids[:, 1:].long()
        mask = x.get("attention_mask") if isinstance(x, Mapping) else None
        if mask is not None:
            if tuple(mask.shape) != tuple(ids.shape):
                raise ValueError(f"attention_mask has shape {list(mask.shape)}; expected input_ids' {list(ids.shape)}")
            target = target.masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
        return target
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"next-token labels must be integer token ids, got {y.dtype} of shape {list(y.shape)}")
    if y.dim() != 2:
        raise ValueError(f"next-token labels must be [batch, tokens], got shape {list(y.shape)}")
    return y[:, 1:].long()


class NextTokenLoss:
    """The causal-LM objective as a `Loss` of `evaluation.evaluate`: cross-entropy of logits[:, t] against
    token t + 1, summed per sequence over the positions that have a target, with the target count and the
    number of correct next-token predictions, so the evaluator reports the token-weighted mean loss
    (log perplexity) and next-token accuracy. Called `loss(out, y, x)` with out [K, B, T, V]."""

    uses_inputs = True

    def __init__(self, ignore_index: int = IGNORE_INDEX):
        self.ignore_index = int(ignore_index)

    def __call__(self, out: torch.Tensor, y, x=None) -> LossParts:
        if out.dim() != 4:
            raise ValueError(f"next-token loss needs logits [K, batch, tokens, vocab], got {list(out.shape)}")
        k, b, t, v = out.shape
        target = next_token_targets(y, x).to(out.device)
        if tuple(target.shape) != (b, t - 1):
            raise ValueError(f"labels give {list(target.shape)} next-token targets for logits of {b} sequences "
                             f"of {t} tokens; expected {[b, t - 1]}")
        valid = target != self.ignore_index
        if valid.any():
            lo, hi = int(target[valid].min()), int(target[valid].max())
            if lo < 0 or hi >= v:
                raise ValueError(f"token ids must lie in [0, {v}) (the model's vocabulary), got range [{lo}, {hi}]")
        safe = target.masked_fill(~valid, 0)
        logits = out[:, :, :-1].float()
        ce = F.cross_entropy(logits.reshape(-1, v), safe.expand(k, -1, -1).reshape(-1), reduction="none")
        ce = ce.view(k, b, t - 1) * valid
        hits = (logits.argmax(-1) == safe) & valid
        return LossParts(ce.sum(2), valid.sum(1), hits.sum(2))


def perplexity(mean_token_loss: float) -> float:
    """exp of a mean next-token cross-entropy (nats); inf when it overflows."""
    try:
        return math.exp(float(mean_token_loss))
    except OverflowError:
        return math.inf
