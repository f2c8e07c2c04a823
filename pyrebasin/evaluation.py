"""The one batched evaluator: per-state loss (and accuracy) of n parameter sets, K at a time, on data read
through `batches` — LMC curves, combinations and REPAIR/RESET-corrected points all run through `evaluate`."""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from .batched_forward import BatchedForward
from .batches import (
    batches,
    check_batch_size,
    check_labels,
    is_pair,
    require_reiterable,
    splits,
)
from .distributed import gather_objects, is_distributed, shard_range
from .lm import (
    LossParts,
    NextTokenLoss,
    check_token_ids,
    is_token_batch,
    logits_of,
    model_kwargs,
    vocabulary_size,
)
from .module_state import mode_view

__all__ = ["StateSource", "PathPoints", "Evaluation", "evaluate", "loss_and_correct", "Correction", "Loss"]

State = Mapping[str, torch.Tensor]
Params = dict[str, torch.Tensor]
# loss(out [K, B, ...], y [B, ...] | None) -> per-example losses [K, B], or lm.LossParts(sum [K, B], count [B],
# correct [K, B] | None) for means over a varying number of targets; a loss with `uses_inputs = True` is called
# loss(out, y, x). The hook for non-classifier losses (lm.NextTokenLoss is one).
Loss = Callable[..., "torch.Tensor | LossParts"]
# correction(state, t) -> a new state (t: the path position of the state, None where it has none)
Correction = Callable[[dict[str, torch.Tensor], "float | None"], dict[str, torch.Tensor]]


class StateSource(Protocol):
    """n parameter sets, made `stack(begin, end)` at a time: float key -> [K, *shape]. `fixed`: the
    non-float tensors every set shares; `position(i)`: set i's path position t (or None)."""

    fixed: dict[str, torch.Tensor]
    param_bytes: int      # floating bytes of one set
    device: torch.device  # where the sets are made

    def __len__(self) -> int: ...
    def stack(self, begin: int, end: int) -> Params: ...
    def position(self, i: int) -> float | None: ...


class PathPoints:
    """The points θ(t) = (1−t)·θ_A + t·θ_B of a path (exact at t = 0 and 1; integer buffers from A)."""

    def __init__(self, state_a: State, state_b: State, ts: Sequence[float]):
        self.a, self.b, self.ts = state_a, state_b, [float(t) for t in ts]
        self.keys = [k for k, v in state_a.items() if v.is_floating_point()]
        self.fixed = {k: v for k, v in state_a.items() if not v.is_floating_point()}
        self.param_bytes = sum(state_a[k].numel() * state_a[k].element_size() for k in self.keys)
        self.device = next(iter(state_a.values())).device if state_a else torch.device("cpu")

    def __len__(self) -> int:
        return len(self.ts)

    def position(self, i: int) -> float:
        return self.ts[i]

    def stack(self, begin: int, end: int) -> Params:
        out = {}
        for k in self.keys:
            a, b = self.a[k], self.b[k]
            # lerp in the opmath type (float32 for 16-bit dtypes), as torch.lerp with a float weight does
            op = torch.promote_types(a.dtype, torch.float32)
            w = torch.tensor(self.ts[begin:end], dtype=op, device=a.device).view(-1, *([1] * a.dim()))
            out[k] = torch.lerp(a.to(op), b.to(a.device, op), w).to(a.dtype)
        return out


@dataclass
class Evaluation:
    """Per-state metrics of one `evaluate` call: split -> float64 [n] (accuracy None with a custom loss)."""

    loss: dict[str, torch.Tensor]
    accuracy: dict[str, torch.Tensor] | None
    chunk: int
    chunk_param_bytes: int           # stacked parameters of one chunk
    peak_memory_bytes: int | None    # CUDA: max_memory_allocated during the call; CPU: the process's peak RSS
    seconds: float
    logits: dict[str, torch.Tensor] | None = None   # split -> [n, N, ...] when return_logits=True


def loss_and_correct(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and number of correct argmax predictions per model of logits [K, B, C]."""
    k = out.shape[0]
    t = out.transpose(1, 2)   # [K, C, B]: contiguous when the logits come from the Linear chain
    if not t.is_contiguous():
        loss = F.cross_entropy(out.flatten(0, 1).float(), y.repeat(k), reduction="none").view(k, -1).sum(1)
        return loss, (out.argmax(-1) == y).sum(1)
    t = t.float()
    loss = F.cross_entropy(t, y.expand(k, -1), reduction="none").sum(1)
    # argmax(-1) == y, without a strided argmax over C: the target logit beats every earlier class
    # strictly and ties or beats every later one (argmax returns the first maximum).
    tgt = t.gather(1, y.view(1, 1, -1).expand(k, 1, -1))            # [K, 1, B]
    before = torch.arange(t.shape[1], device=t.device).view(1, -1, 1) < y.view(1, 1, -1)
    neg = torch.tensor(float("-inf"), device=t.device)
    ok = (torch.where(before, t, neg).amax(1, keepdim=True) < tgt) & \
        (torch.where(before, neg, t).amax(1, keepdim=True) <= tgt)
    return loss, ok.sum((1, 2))


def _peak_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)
    except (ImportError, OSError):
        return None


def _available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


_CHECK_ABOVE = 64 << 20   # smaller stacks cannot be what exhausts a machine: skip reading its free memory


def check_chunk_memory(k: int, param_bytes: int, device: torch.device, chunk: int, copies: int = 1) -> int:
    """Bytes of `k` stacked states; a ValueError naming them when `copies` of them exceed the free memory."""
    need = k * param_bytes * copies
    free = _available_memory(device) if need > _CHECK_ABOVE else None
    if free is not None and need > free:
        raise ValueError(f"chunk={chunk}: {k} stacked states need {need} bytes ({need / 2**30:.2f} GiB) of "
                         f"parameters but {free} bytes ({free / 2**30:.2f} GiB) are free on {device}; "
                         "pass a smaller chunk")
    return k * param_bytes


def _reader(data, name: str, batch_size: int | None, labels: str):
    """A re-readable source of (x, y) batches: tensors are sliced once, loaders re-iterated per chunk.
    Without a custom loss a bare tensor must be token ids [B, T] (a causal LM's own targets)."""
    if isinstance(data, torch.Tensor) and labels == "required" and not is_token_batch(data):
        raise TypeError(f"{name} is a bare tensor of inputs; evaluation needs labels: pass an (x, y) pair")
    labels = "optional" if labels == "required" else labels   # token batches carry their targets
    if isinstance(data, torch.Tensor) or is_pair(data):
        fixed = list(batches(data, batch_size=batch_size, labels=labels, name=name))
        return lambda: fixed
    require_reiterable(data, name)
    return lambda: batches(data, batch_size=batch_size, labels=labels, name=name)


def _loss_parts(per, k: int, b: int) -> tuple[torch.Tensor, float, torch.Tensor | None]:
    """(summed loss [K], number of targets, correct [K] | None) of one batch from a Loss's return value."""
    if isinstance(per, LossParts):
        total, count, correct = per
        if tuple(total.shape) != (k, b) or tuple(count.shape) != (b,) or (
                correct is not None and tuple(correct.shape) != (k, b)):
            raise ValueError(f"loss= returned LossParts of shapes sum {list(total.shape)}, count {list(count.shape)}"
                             f", correct {None if correct is None else list(correct.shape)}; expected "
                             f"{[k, b]}, {[b]}, {[k, b]}")
        return total.sum(1), float(count.sum()), None if correct is None else correct.sum(1)
    if not isinstance(per, torch.Tensor) or tuple(per.shape) != (k, b):
        raise ValueError(f"loss= must return per-example losses [K, B] = {[k, b]}, "
                         f"got {list(per.shape) if isinstance(per, torch.Tensor) else per!r}")
    return per.sum(1), b, None


def _corrected(source: StateSource, stacked: Params, begin: int, correction: Correction,
               forward: BatchedForward) -> tuple[Params, dict]:
    """Apply `correction` to every state of a chunk and restack (float keys; non-float from the first);
    a correction with a `batched(forward, stacked, fixed)` method (RESET) may do the whole chunk at once."""
    fast = getattr(correction, "batched", None)
    new = fast(forward, stacked, source.fixed) if fast is not None else None
    if new is not None:
        return new, forward.fixed
    k = next(iter(stacked.values())).shape[0] if stacked else 0
    states = [correction({**{n: v[i] for n, v in stacked.items()}, **source.fixed}, source.position(begin + i))
              for i in range(k)]
    fixed = {n: v for n, v in states[0].items() if not v.is_floating_point()}
    return {n: torch.stack([s[n] for s in states]) for n in stacked}, fixed


@torch.no_grad()
def evaluate(model: torch.nn.Module, source: StateSource, data, *, chunk: int = 16, batch_size: int | None = 1000,
             loss: Loss | None = None, correction: Correction | None = None, use_vmap: bool = True,
             fast_path: bool = True, return_logits: bool = False, progress: bool = False,
             desc: str = "evaluate", group=None) -> Evaluation:
    """Mean loss (cross-entropy by default) and accuracy of every state of `source` on every split of
    `data` (an (x, y) pair, an iterable of batches, a DataLoader, or a dict of named ones).

    `chunk` states are stacked at a time (stacks over 64 MiB are checked against the free memory) and
    run through `batched_forward.BatchedForward` (the Linear-chain fast path, else the traced-graph
    engine, else `vmap(functional_call)` (`use_vmap`) or one `functional_call` per state; `fast_path=False`
    keeps the last two), always on a private eval-mode view of `model`
    (`mode_view`): the caller's module, its flags and the states are never modified. `correction(state,
    t)` changes each state before it is evaluated (REPAIR/RESET, see `repair.RepairCorrection`).
    `loss(out, y) -> [K, B]` replaces cross-entropy (accuracy is then None). A causal LM (logits
    [batch, tokens, vocab], or a ModelOutput holding them) on token batches (ids [B, T], or mappings with
    input_ids / attention_mask / labels, passed as keyword arguments with use_cache=False where the model
    takes it) is scored by `lm.NextTokenLoss`: loss = mean next-token cross-entropy over the positions
    with a target (padding masked), accuracy = next-token top-1 accuracy; perplexity = exp(loss).

    Under torch.distributed (`group`: None = the default group when initialised, a group, or False for
    this process alone) every rank passes the same source and data; the chunks are split by
    `shard_range`, each evaluated exactly as in one process, and the metrics gathered, so every rank
    returns the single-process result bit for bit (`seconds` and peak memory are this rank's)."""
    chunk = check_batch_size(chunk, "chunk")
    check_batch_size(batch_size, allow_none=True)
    n = len(source)
    named = {k: _reader(v, k, batch_size, "required" if loss is None else "optional")
             for k, v in splits(data).items()}
    device = source.device
    k_max = min(chunk, max(n, 1))
    chunk_bytes = check_chunk_memory(k_max, source.param_bytes, device, chunk, 2 if correction else 1)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    view = mode_view(model)
    forward = BatchedForward(model, view, source.fixed, use_vmap, fast_path)
    f64 = {"dtype": torch.float64, "device": device}
    losses = {s: [] for s in named}
    accs = {s: [] for s in named}
    logits = {s: [] for s in named} if return_logits else None
    next_token, vocab = NextTokenLoss(), vocabulary_size(model)
    scored = loss is None   # accuracy is reported unless a custom loss gives no correct counts
    start = time.perf_counter()
    spread = is_distributed(group)
    # whole chunks per rank: each state is evaluated in the very stack it has in one process
    mine = shard_range(-(-n // chunk), group=group) if spread else range(-(-n // chunk))
    with tqdm(total=min(n, mine.stop * chunk) - mine.start * chunk, desc=desc, disable=not progress,
              leave=False) as bar:
        for begin in range(mine.start * chunk, min(n, mine.stop * chunk), chunk):
            end = min(n, begin + chunk)
            stacked = source.stack(begin, end)
            if correction is not None:
                stacked, forward.fixed = _corrected(source, stacked, begin, correction, forward)
            for split, read in named.items():
                tot, hits, rows, outs = torch.zeros(end - begin, **f64), torch.zeros(end - begin, **f64), 0, []
                for i, (x, y) in enumerate(read()):
                    x = x.to(device) if isinstance(x, torch.Tensor) else {k: v.to(device) for k, v in x.items()}
                    if isinstance(x, Mapping) and "labels" in x:   # HF convention: labels travel with the inputs
                        x = dict(x)
                        y = x.pop("labels") if y is None else y
                    y = None if y is None else y.to(device)
                    check_token_ids(x, vocab, f"{split} batch {i}")
                    out = forward(stacked, x)
                    b = y.shape[0] if y is not None else out.shape[1]
                    if out.dim() < 2 or out.shape[:2] != (end - begin, b):
                        raise ValueError(f"{split} batch {i}: the model's output has shape {list(out.shape[1:])} for "
                                         f"a batch of {b}; expected the batch dimension first")
                    fn = loss
                    if fn is None and out.dim() == 4 and (y is None or y.dim() == 2):
                        fn = next_token   # a causal LM: logits [K, B, T, V], its own inputs as targets
                    if fn is None:
                        if out.dim() != 3:
                            raise ValueError(f"{split} batch {i}: model output has shape {list(out.shape[1:])}; "
                                             "expected [batch, classes] logits, [batch, tokens, vocab] LM logits "
                                             "(or pass loss=)")
                        if y is None:
                            raise ValueError(f"{split} batch {i} has no labels; pass (x, y) pairs")
                        check_labels(y, out.shape[-1], f"{split} batch {i}")
                        lo, ok = loss_and_correct(out, y)
                        hits += ok.double()
                        rows += b
                    else:
                        per = fn(out, y, x) if getattr(fn, "uses_inputs", False) else fn(out, y)
                        lo, count, ok = _loss_parts(per, end - begin, b)
                        rows += count
                        if ok is not None:
                            hits += ok.double()
                            scored = True
                    tot += lo.double()
                    if logits is not None:
                        outs.append(out.float().cpu())
                if not rows:
                    raise ValueError(f"{split}: no position has a target (every label is ignored or padding)")
                losses[split].append(tot / rows)
                accs[split].append(hits / rows)
                if logits is not None:
                    logits[split].append(torch.cat(outs, 1))
            bar.update(end - begin)
            del stacked
    if on_cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if spread:   # one all-gather of every rank's rows, concatenated in rank (= state) order
        parts = gather_objects(({s: [t.cpu() for t in v] for s, v in losses.items()},
                                {s: [t.cpu() for t in v] for s, v in accs.items()},
                                None if logits is None else {s: [t.cpu() for t in v] for s, v in logits.items()},
                                (n, chunk, sorted(named), logits is None), scored), group)
        odd = [r for r, p in enumerate(parts) if p[3] != parts[0][3]]
        if odd:   # a rank that evaluated another source would corrupt the rows silently
            raise ValueError(f"evaluate: rank(s) {odd} passed another number of states, chunk, splits or "
                             f"return_logits than rank 0 ({[p[3] for p in parts]}); every rank must pass the same")
        losses, accs = ({s: [t for p in parts for t in p[j][s]] for s in named} for j in (0, 1))
        scored = any(p[4] for p in parts)   # a rank without chunks never saw the loss report correct counts
        if logits is not None:
            logits = {s: [t for p in parts for t in p[2][s]] for s in named}
    empty = torch.zeros(0, dtype=torch.float64)
    cat = lambda d: {s: (torch.cat(v).cpu() if v else empty) for s, v in d.items()}
    return Evaluation(cat(losses), cat(accs) if scored else None, k_max, chunk_bytes if n else 0,
                      _peak_memory(device), seconds,
                      {s: torch.cat(v) for s, v in logits.items() if v} if logits is not None else None)
