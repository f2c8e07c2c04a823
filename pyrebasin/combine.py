"""Mode combinability: replayable coefficient samplers λ and the batched evaluation of the element-wise
combinations Θ_λ = λ⊙Θ_A + (1−λ)⊙Θ_B, K models at a time (native combine op + vmap'd forward).
"""
from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from . import ops, rng
from ._chain import linear_chain
from .spec import Blocked, PermutationSpec

__all__ = ["Distribution", "CoefficientLayout", "Coefficients", "CombinationResult", "GRANULARITIES",
           "coefficient_layout", "sample_coefficients", "evaluate_combinations", "combine_states"]

GRANULARITIES = ("element", "neuron", "layer", "global")
State = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Distribution:
    """A coefficient distribution: constant(t), uniform(low, high), bernoulli(p),
    gaussian(mean, std[, clip_low, clip_high]) or beta(alpha, beta).

    `Distribution.parse("uniform(-0.5, 1.5)")`; a bare name takes the defaults (uniform(0, 1),
    bernoulli(0.5), gaussian(0.5, 0.25) unclipped, beta(0.5, 0.5), constant(0.5)); "gaussian(m, s, clip)"
    clips to [0, 1].
    """

    name: str
    params: tuple[float, ...]

    _DEFAULTS = {"uniform": (0.0, 1.0), "bernoulli": (0.5,), "gaussian": (0.5, 0.25), "beta": (0.5, 0.5),
                 "constant": (0.5,)}

    def __post_init__(self):
        if self.name not in rng.DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {self.name!r}; expected one of {sorted(rng.DISTRIBUTIONS)}")
        p = tuple(float(v) for v in self.params)
        if self.name == "gaussian" and len(p) == 2:
            p = p + (-math.inf, math.inf)
        object.__setattr__(self, "params", p)
        want = rng.DISTRIBUTIONS[self.name][1]
        if len(p) != want:
            raise ValueError(f"{self.name} takes {want} parameters, got {list(p)}")
        if self.name == "uniform" and not p[0] <= p[1]:
            raise ValueError(f"uniform(low, high) needs low <= high, got {p}")
        if self.name == "bernoulli" and not 0.0 <= p[0] <= 1.0:
            raise ValueError(f"bernoulli(p) needs 0 <= p <= 1, got {p[0]}")
        if self.name == "gaussian" and not (p[1] >= 0 and p[2] <= p[3]):
            raise ValueError(f"gaussian(mean, std, clip_low, clip_high) needs std >= 0, low <= high, got {p}")
        if self.name == "beta" and not (0 < p[0] < math.inf and 0 < p[1] < math.inf):
            raise ValueError(f"beta(alpha, beta) needs finite alpha, beta > 0, got {p}")

    @classmethod
    def parse(cls, spec: "str | float | Distribution") -> "Distribution":
        if isinstance(spec, Distribution):
            return spec
        if isinstance(spec, (int, float)):
            return cls("constant", (float(spec),))
        m = re.fullmatch(r"\s*([a-z]+)\s*(?:\((.*)\))?\s*", str(spec))
        if not m:
            raise ValueError(f"cannot parse distribution {spec!r}; e.g. 'uniform(-0.5, 1.5)', 'bernoulli(0.5)'")
        name, args = m.group(1), [a.strip() for a in (m.group(2) or "").split(",") if a.strip()]
        if name not in cls._DEFAULTS:
            raise ValueError(f"unknown distribution {name!r} in {spec!r}; expected one of {sorted(cls._DEFAULTS)}")
        if not args:
            return cls(name, cls._DEFAULTS[name])
        if name == "gaussian" and args[-1] == "clip":
            args = args[:-1] + ["0", "1"]
        try:
            return cls(name, tuple(float(a) for a in args))
        except ValueError as exc:
            raise ValueError(f"bad distribution {spec!r}: {exc}") from None

    def __str__(self) -> str:
        p = self.params
        if self.name == "gaussian" and p[2:] == (-math.inf, math.inf):
            p = p[:2]
        return f"{self.name}({', '.join(f'{v:g}' for v in p)})"


@dataclass(frozen=True)
class CoefficientLayout:
    """Which coefficient each element uses: element e (row-major) of `keys[i]` takes index
    `base[i] + (e // div[i]) % mod[i]`. Only floating-point tensors are combined."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    base: tuple[int, ...]
    div: tuple[int, ...]
    mod: tuple[int, ...]
    num_coefficients: int
    granularity: str

    def index(self, i: int) -> torch.Tensor:
        """Coefficient index of every element of tensor i, shaped like it."""
        e = torch.arange(math.prod(self.shapes[i]))
        return (self.base[i] + (e // self.div[i]) % self.mod[i]).reshape(self.shapes[i])


def _neuron_axis(key: str, shape: tuple[int, ...], spec: PermutationSpec) -> tuple[str, int, int] | None:
    """(perm, div, units) of an element's neuron: the unit along its FIRST permuted axis."""
    for axis, entry in enumerate(spec.axes_to_perm[key]):
        inner = math.prod(shape[axis + 1:])
        if isinstance(entry, str):
            return entry, inner, shape[axis]
        if isinstance(entry, Blocked):
            for f, p in enumerate(entry.perms):
                if p is not None:
                    return p, inner * math.prod(entry.shape[f + 1:]), entry.shape[f]
    return None


def coefficient_layout(state: State, granularity: str = "element", spec: PermutationSpec | None = None
                       ) -> CoefficientLayout:
    """The coefficient index map of a state dict at a granularity.

    element: one λ per scalar (index = position in the concatenation of all floating tensors);
    neuron: one λ per unit of a perm group, shared by every element whose first permuted axis lies in
    that unit (weight rows of the layer the unit belongs to; the next layer's input columns are owned
    by that layer's own output units, the head's columns by the last hidden units), biases, norm
    params and BN buffers — tensors no perm touches (e.g. the head bias) get one λ each; needs `spec`;
    layer: one λ per module (the key up to its last '.'); global: one λ for everything.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}; expected one of {GRANULARITIES}")
    keys = [k for k, v in state.items() if v.is_floating_point()]
    shapes = [tuple(state[k].shape) for k in keys]
    base, div, mod = [], [], []
    offsets, total = {}, 0          # neuron: perm groups first, then one index per untouched tensor
    if granularity == "neuron":
        if spec is None:
            raise ValueError("granularity='neuron' needs a PermutationSpec (pass the spec, and the state)")
        sizes = spec.perm_sizes(state)
        for p in spec.perm_names:
            offsets[p], total = total, total + sizes[p]
    modules: dict[str, int] = {}
    for key, shape in zip(keys, shapes):
        numel = max(1, math.prod(shape))
        if granularity == "element":
            b, d, m = total, 1, numel
            total += math.prod(shape)
        elif granularity == "global":
            b, d, m, total = 0, numel, 1, 1
        elif granularity == "layer":
            b = modules.setdefault(key.rpartition(".")[0], len(modules))
            d, m, total = numel, 1, len(modules)
        else:
            found = _neuron_axis(key, shape, spec)
            if found is None:
                b, d, m = total, numel, 1
                total += 1
            else:
                p, d, m = found
                b, d = offsets[p], max(1, d)
        base.append(b)
        div.append(d)
        mod.append(m)
    return CoefficientLayout(tuple(keys), tuple(shapes), tuple(base), tuple(div), tuple(mod), total, granularity)


@dataclass(frozen=True)
class Coefficients:
    """n replayable coefficient samples: sample k's λ is a pure function of (seed, sample_begin + k),
    drawn in-kernel by `combine_states` / `evaluate_combinations` and never stored."""

    layout: CoefficientLayout
    distribution: Distribution
    seed: int
    n: int
    sample_begin: int = 0

    def __len__(self) -> int:
        return self.n

    def _range(self, begin: int, end: int | None) -> torch.Tensor:
        end = self.n if end is None else end
        if not 0 <= begin <= end <= self.n:
            raise ValueError(f"sample range [{begin}, {end}) outside [0, {self.n})")
        return torch.arange(self.sample_begin + begin, self.sample_begin + end, dtype=torch.int64)

    def values(self, begin: int = 0, end: int | None = None) -> torch.Tensor:
        """λ as a float64 tensor [K, num_coefficients] (materialised: for inspection and tests)."""
        s = self._range(begin, end)
        idx = torch.arange(self.layout.num_coefficients, dtype=torch.int64)
        d = self.distribution
        return rng.coefficients(d.name, d.params, self.seed, s[:, None], idx[None, :])

    def per_tensor(self, begin: int = 0, end: int | None = None) -> dict[str, torch.Tensor]:
        """λ expanded to every element: key -> float64 [K, *shape]."""
        v = self.values(begin, end)
        return {k: v[:, self.layout.index(i).reshape(-1)].reshape(len(v), *self.layout.shapes[i])
                for i, k in enumerate(self.layout.keys)}

    def sample(self, k: int) -> dict[str, torch.Tensor]:
        """Regenerate sample k alone: key -> λ shaped like the tensor."""
        return {key: v[0] for key, v in self.per_tensor(k, k + 1).items()}

    def describe(self) -> dict:
        return {"distribution": str(self.distribution), "granularity": self.layout.granularity,
                "seed": self.seed, "n": self.n, "sample_begin": self.sample_begin,
                "num_coefficients": self.layout.num_coefficients}


def sample_coefficients(spec_or_state: PermutationSpec | State, n: int, distribution="uniform",
                        granularity: str = "element", seed: int = 0, *, state: State | None = None,
                        sample_begin: int = 0) -> Coefficients:
    """n coefficient samples over a state dict's tensors (lazy and replayable).

    `spec_or_state`: a state dict (shapes), or a PermutationSpec together with `state=` (needed for
    granularity="neuron"). `distribution`: a `Distribution`, a string such as "uniform(-0.5, 1.5)",
    "bernoulli(0.5)", "beta(2, 2)", "gaussian(0.5, 0.2, clip)", or a float t (constant: LMC).
    """
    if isinstance(spec_or_state, PermutationSpec):
        spec = spec_or_state
        if state is None:
            raise ValueError("sample_coefficients(spec, ...) needs state= (a state dict giving the shapes)")
    else:
        spec, state = None, spec_or_state
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if sample_begin < 0 or sample_begin + n > 2**32:
        raise ValueError(f"samples [{sample_begin}, {sample_begin + n}) must lie in [0, 2^32)")
    layout = coefficient_layout(state, granularity, spec)
    return Coefficients(layout, Distribution.parse(distribution), int(seed), n, int(sample_begin))


def _check_pair(state_a: State, state_b: State) -> None:
    if set(state_a) != set(state_b):
        raise ValueError(f"state dicts have different keys: {sorted(set(state_a) ^ set(state_b))[:8]}")
    for k in state_a:
        a, b = state_a[k], state_b[k]
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(f"{k!r}: A is {a.dtype} {list(a.shape)} but B is {b.dtype} {list(b.shape)}")


def combine_states(state_a: State, state_b: State, coefficients, begin: int = 0, end: int | None = None
                   ) -> dict[str, torch.Tensor]:
    """Samples [begin, end) of the combinations, stacked: key -> [K, *shape] (float keys only).

    `coefficients`: a `Coefficients` (λ drawn in-kernel by the fused native op), a 1-D sequence of
    scalars t (global constant λ = t: the linear path), or a mapping key -> λ [n, *shape]
    (broadcastable) for arbitrary user coefficients. The inputs are never modified.
    """
    _check_pair(state_a, state_b)
    if isinstance(coefficients, Coefficients):
        lay = coefficients.layout
        missing = [k for k in lay.keys if k not in state_a or tuple(state_a[k].shape) != lay.shapes[lay.keys.index(k)]]
        if missing or len(lay.keys) != sum(v.is_floating_point() for v in state_a.values()):
            raise ValueError(f"coefficients were sampled for another state dict (mismatch at {missing[:4]})")
        end = coefficients.n if end is None else end
        coefficients._range(begin, end)
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
            a, b = state_a[k], state_b[k]
            out[k] = (b + lam.reshape(lam.shape + (1,) * (a.dim() + 1 - lam.dim())) * (a - b)).to(a.dtype)
        return out
    ts = torch.as_tensor(coefficients, dtype=torch.float64).reshape(-1)[begin:end]
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


def _peak_rss() -> int | None:
    try:
        import resource
        import sys
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)
    except (ImportError, OSError):
        return None


def _batches(data, batch_size: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        if len(x) != len(y):
            raise ValueError(f"data: {len(x)} inputs but {len(y)} labels")
        bs = len(y) if batch_size is None else batch_size
        return [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(y), max(1, bs))]
    if isinstance(data, Iterable):
        return [(x, y) for x, y in data]
    raise TypeError(f"data must be (x, y) tensors or an iterable of (x, y) batches, got {type(data).__name__}")


def _check_model(model: torch.nn.Module, state: State) -> None:
    """functional_call(strict=False) would quietly take the model's own tensor for a missing key."""
    own = model.state_dict()
    missing, extra = [k for k in own if k not in state], [k for k in state if k not in own]
    if missing or extra:
        raise ValueError(f"state dicts do not match the model: missing {missing[:6]}, unexpected {extra[:6]}")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{k!r} has shape {list(state[k].shape)} but the model expects {list(v.shape)}")


def _check_labels(y: torch.Tensor, classes: int) -> None:
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got {y.dtype}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ValueError(f"labels must lie in [0, {classes}) (the model has {classes} outputs), "
                         f"got range [{int(y.min())}, {int(y.max())}]")


def _loss_and_correct(out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


@torch.no_grad()
def evaluate_combinations(model: torch.nn.Module, state_a: State, state_b: State, coefficients, data, *,
                          chunk: int = 16, batch_size: int | None = 1000, return_logits: bool = False,
                          progress: bool = False) -> CombinationResult:
    """Loss and accuracy of every combination θ_B + λ_k ⊙ (θ_A − θ_B), `chunk` models at a time.

    Each chunk's K parameter sets come from one fused `combine_batched` call and run through one
    `torch.func.vmap` of `functional_call(model, ...)` (a plain chain of Linear layers and activations
    runs as addmm/baddbmm on the stacked parameters instead), so the per-model Python overhead of a
    loop disappears and peak memory is bounded by `chunk` (reported). The model runs in eval mode (its
    flag is restored); neither it nor the state dicts are modified. `coefficients`: see
    `combine_states`. Non-float buffers (e.g. num_batches_tracked) are taken from A.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    _check_pair(state_a, state_b)
    _check_model(model, state_a)
    n = len(coefficients) if not isinstance(coefficients, Mapping) else len(next(iter(coefficients.values())))
    fixed = {k: v for k, v in state_a.items() if not v.is_floating_point()}
    batches = _batches(data, batch_size)
    if not sum(len(y) for _, y in batches):
        raise ValueError("evaluate_combinations: data is empty (no samples to evaluate on)")
    device = next(iter(state_a.values())).device
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    params_bytes = sum(v.numel() * v.element_size() for v in state_a.values() if v.is_floating_point())

    def forward(params, x):
        return torch.func.functional_call(model, (params, fixed), (x,), strict=False)

    vforward = torch.func.vmap(forward, in_dims=(0, None))
    # Linear/activation chains (MLPs) skip vmap: addmm/baddbmm straight on the stacked parameters.
    chain = linear_chain(model) if not fixed else None
    if chain is not None and all(chain.accepts(x) for x, _ in batches):
        vforward = chain.forward  # noqa: F811 - same signature and result as the vmap'd functional_call
    losses, accs, all_logits = [], [], []
    total = sum(len(y) for _, y in batches)
    flags = [(m, m.training) for m in model.modules()]  # per module: model.train(x) would clobber mixed flags
    model.eval()
    start = time.perf_counter()
    try:
        for begin in tqdm(range(0, n, chunk), desc="combinations", disable=not progress, leave=False):
            end = min(n, begin + chunk)
            stacked = combine_states(state_a, state_b, coefficients, begin, end)
            loss = torch.zeros(end - begin, dtype=torch.float64, device=device)
            correct = torch.zeros(end - begin, dtype=torch.float64, device=device)
            chunk_logits = []
            for x, y in batches:
                x, y = x.to(device), y.to(device)
                out = vforward(stacked, x)                      # [K, B, classes]
                if begin == 0:  # once per batch: cross_entropy would fail deep inside (IndexError)
                    _check_labels(y, out.shape[-1])
                chunk_loss, chunk_correct = _loss_and_correct(out, y)
                loss += chunk_loss.double()
                correct += chunk_correct.double()
                if return_logits:
                    chunk_logits.append(out.float().cpu())
            losses.append(loss / total)
            accs.append(correct / total)
            if return_logits:
                all_logits.append(torch.cat(chunk_logits, 1))
            del stacked
    finally:
        for m, flag in flags:
            m.training = flag
    if on_cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = int(torch.cuda.max_memory_allocated(device)) if on_cuda else _peak_rss()
    desc = coefficients.describe() if isinstance(coefficients, Coefficients) else {"n": n}
    empty = torch.zeros(0, dtype=torch.float64)
    return CombinationResult(torch.cat(losses).cpu() if losses else empty, torch.cat(accs).cpu() if accs else empty,
                             min(chunk, max(n, 1)), min(chunk, max(n, 1)) * params_bytes, peak, seconds, desc,
                             torch.cat(all_logits) if return_logits and all_logits else None)
