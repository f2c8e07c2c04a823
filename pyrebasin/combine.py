"""Mode combinability: the element-wise combinations Θ_λ = λ⊙Θ_A + (1−λ)⊙Θ_B, made K at a time by the
fused native op and evaluated by the one batched evaluator (`evaluation.evaluate`)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from . import ops
from .coefficients import (
    GRANULARITIES,
    CoefficientLayout,
    Coefficients,
    Distribution,
    coefficient_layout,
    sample_coefficients,
)
from .evaluation import Correction, Loss, evaluate
from .module_state import check_pair, check_state

__all__ = ["Distribution", "CoefficientLayout", "Coefficients", "CombinationResult", "Combinations", "GRANULARITIES",
           "coefficient_layout", "sample_coefficients", "evaluate_combinations", "combine_states"]

State = Mapping[str, torch.Tensor]


def _check_pair(state_a: State, state_b: State) -> None:
    check_pair(None, state_a, state_b, same_dtype=True)   # the fused op takes one dtype per tensor pair


def _num_samples(coefficients) -> int:
    if isinstance(coefficients, Coefficients):
        return len(coefficients)
    if isinstance(coefficients, Mapping):
        if not coefficients:
            raise ValueError("explicit coefficients are an empty mapping")
        return len(torch.as_tensor(next(iter(coefficients.values()))))
    return len(_scalars(coefficients))


def _scalars(coefficients) -> torch.Tensor:
    if isinstance(coefficients, (str, bytes)) or not isinstance(coefficients, (Sequence, torch.Tensor)):
        raise TypeError("coefficients must be Coefficients, a mapping key -> λ or a 1-D sequence of scalars λ, "
                        f"got {type(coefficients).__name__}")
    lam = torch.as_tensor(coefficients, dtype=torch.float64).reshape(-1)
    if not bool(torch.isfinite(lam).all()):
        raise ValueError(f"coefficients hold non-finite values: {lam[~torch.isfinite(lam)][:4].tolist()}")
    return lam


def combine_states(state_a: State, state_b: State, coefficients, begin: int = 0, end: int | None = None
                   ) -> dict[str, torch.Tensor]:
    """Samples [begin, end) of the combinations, stacked: key -> [K, *shape] (float keys only).

    `coefficients`: a `Coefficients` (λ drawn in-kernel by the fused native op), a 1-D sequence of
    scalars λ (one global λ each: the linear path, λ = 1 − t for `interpolate`'s t), or a mapping
    key -> λ [n, *shape] (broadcastable) for arbitrary user coefficients. λ weights A; NaN/Inf in the
    states or the coefficients are refused. The inputs are never modified.
    """
    _check_pair(state_a, state_b)
    return _combine(state_a, state_b, coefficients, begin, end)


def _check_layout(state: State, lay: CoefficientLayout) -> None:
    missing = [k for k in lay.keys if k not in state or tuple(state[k].shape) != lay.shapes[lay.keys.index(k)]]
    if missing or len(lay.keys) != sum(v.is_floating_point() for v in state.values()):
        raise ValueError(f"coefficients were sampled for another state dict (mismatch at {missing[:4]})")


def _combine(state_a: State, state_b: State, coefficients, begin: int, end: int | None) -> dict[str, torch.Tensor]:
    if isinstance(coefficients, Coefficients):
        lay = coefficients.layout
        _check_layout(state_a, lay)
        end = coefficients.n if end is None else end
        coefficients.sample_range(begin, end)
        d = coefficients.distribution
        outs = ops.combine_batched([state_a[k] for k in lay.keys], [state_b[k] for k in lay.keys],
                                   lay.base, lay.div, lay.mod, d.name, d.params, coefficients.seed,
                                   coefficients.sample_begin + begin, end - begin)
        return dict(zip(lay.keys, outs))
    keys = [k for k, v in state_a.items() if v.is_floating_point()]
    if isinstance(coefficients, Mapping):
        bad = [k for k in keys if k not in coefficients]
        if bad:
            raise ValueError(f"explicit coefficients lack keys {bad[:8]}")
        out = {}
        for k in keys:
            lam = torch.as_tensor(coefficients[k])[begin:end].to(state_a[k].device)
            if lam.is_floating_point() and not bool(torch.isfinite(lam).all()):
                raise ValueError(f"explicit coefficients[{k!r}] hold non-finite values (NaN or Inf)")
            a, b = state_a[k], state_b[k]
            out[k] = (b + lam.reshape(lam.shape + (1,) * (a.dim() + 1 - lam.dim())) * (a - b)).to(a.dtype)
        return out
    ts = _scalars(coefficients)[begin:end]
    out = {}
    for k in keys:
        a, b = state_a[k], state_b[k]
        lam = ts.to(a.device, torch.promote_types(a.dtype, torch.float32)).reshape(-1, *([1] * a.dim()))
        out[k] = (b + lam * (a - b)).to(a.dtype)
    return out


@dataclass
class CombinationResult:
    """Per-sample metrics of the combinations (loss: mean cross-entropy; accuracy in [0, 1])."""

    loss: torch.Tensor
    accuracy: torch.Tensor
    chunk: int
    chunk_param_bytes: int           # stacked parameters of one chunk (the op's output)
    peak_memory_bytes: int | None    # CUDA: max_memory_allocated during the call; CPU: the process's peak RSS
    seconds: float
    coefficients: dict = field(default_factory=dict)
    logits: torch.Tensor | None = None   # [n, N, classes] when return_logits=True

    def to_dict(self) -> dict:
        return {"loss": self.loss.tolist(), "accuracy": self.accuracy.tolist(), "chunk": self.chunk,
                "chunk_param_bytes": self.chunk_param_bytes, "peak_memory_bytes": self.peak_memory_bytes,
                "seconds": self.seconds, "coefficients": self.coefficients}


class Combinations:
    """The combinations of A and B as an `evaluation.StateSource`: chunks come from `combine_states`
    (one fused op call per chunk for `Coefficients`); non-float buffers come from A."""

    def __init__(self, state_a: State, state_b: State, coefficients):
        _check_pair(state_a, state_b)
        self.a, self.b, self.coefficients, self.n = state_a, state_b, coefficients, _num_samples(coefficients)
        if isinstance(coefficients, Coefficients):
            _check_layout(state_a, coefficients.layout)
        self.fixed = {k: v for k, v in state_a.items() if not v.is_floating_point()}
        self.param_bytes = sum(v.numel() * v.element_size() for v in state_a.values() if v.is_floating_point())
        self.device = next(iter(state_a.values())).device if state_a else torch.device("cpu")
        c = coefficients
        self._lams = _scalars(c) if not isinstance(c, (Coefficients, Mapping)) else None
        self._const = c.constant() if isinstance(c, Coefficients) else None

    def __len__(self) -> int:
        return self.n

    def stack(self, begin: int, end: int) -> dict[str, torch.Tensor]:
        return _combine(self.a, self.b, self.coefficients, begin, end)

    def position(self, i: int) -> float | None:
        """The path position t = 1 − λ of a global-constant combination (None for any other λ)."""
        if self._lams is not None:
            return 1.0 - float(self._lams[i])
        return None if self._const is None else 1.0 - self._const


@torch.no_grad()
def evaluate_combinations(model: torch.nn.Module, state_a: State, state_b: State, coefficients, data, *,
                          chunk: int = 16, batch_size: int | None = 1000, return_logits: bool = False,
                          loss: Loss | None = None, correction: Correction | None = None,
                          progress: bool = False, group=None) -> CombinationResult:
    """Loss and accuracy of every combination θ_B + λ_k ⊙ (θ_A − θ_B), `chunk` models at a time.

    `data`: an (x, y) pair (sliced into `batch_size` rows), an iterable of (x, y) batches or a
    DataLoader. Each chunk's K parameter sets come from one fused `combine_batched` call and run
    through `evaluation.evaluate` (a Linear/activation chain as addmm/baddbmm on the stacked
    parameters, any other model by the traced-graph engine of `batched_forward`), so per-model Python overhead
    disappears and peak memory is bounded by `chunk` (reported; a chunk that cannot fit is refused
    with the bytes it needs). The model runs on a private eval-mode view; neither it nor the state
    dicts are modified. `coefficients`: see `combine_states`. `correction(state, t)`: applied to each
    combination first (t = 1 − λ for global constants, else None). `loss(out, y) -> [K, B]` replaces
    cross-entropy (accuracy is then NaN). Under torch.distributed every rank passes the same arguments
    and the chunks are split among the ranks (`group`: see `evaluation.evaluate`); every rank gets the
    single-process result, bit for bit.
    """
    if isinstance(data, Mapping) and "input_ids" not in data:
        raise TypeError("evaluate_combinations evaluates one data set (an (x, y) pair, batches or a DataLoader); "
                        f"got named splits {sorted(map(str, data))[:6]}: call it once per split")
    check_state(model, state_a, "state_a")
    check_state(model, state_b, "state_b")
    source = Combinations(state_a, state_b, coefficients)
    r = evaluate(model, source, data, chunk=chunk, batch_size=batch_size, loss=loss, correction=correction,
                 use_vmap=True, return_logits=return_logits, progress=progress, desc="combinations",
                 group=group)
    lo = r.loss["data"]
    acc = r.accuracy["data"] if r.accuracy is not None else torch.full_like(lo, float("nan"))
    desc = coefficients.describe() if isinstance(coefficients, Coefficients) else {"n": source.n}
    return CombinationResult(lo, acc, r.chunk, r.chunk_param_bytes, r.peak_memory_bytes, r.seconds, desc,
                             r.logits["data"] if r.logits else None)
