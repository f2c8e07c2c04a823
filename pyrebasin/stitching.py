"""Model stitching (Dr. Frankenstein): model_front up to a layer -> a trainable stitching layer ->
model_end from a layer on, both frozen; closed-form inits from streamed moments, training, metrics.

How the two halves run: forward hooks on a private eval-mode view of each model (`module_state.mode_view`:
the caller's flags and hooks are never touched). The front model runs (via `torch.func.functional_call`
on a frozen copy of its state) until `front_layer` fires, whose output is captured and the rest of the
forward is skipped; the end model runs on the same input with a hook that replaces `end_layer`'s
output by the stitched activation. Hooks work on any module whose forward calls the layer once,
including models that call activations functionally and branch on input shape (which torch.fx
cannot trace); the price is that the end model also computes its (discarded, gradient-free) prefix.

Where to cut and along which dim channels run, a model tells through the `Stitchable` protocol
(`stitch_points()`, optional `stitch_channel_dim`); the zoo models implement it, any other model
falls back to its activation modules and to the activation's rank.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ._stitch_layer import INITS, KINDS, StitchLayer, initialise
from .batches import batches, require_reiterable
from .module_state import mode_view
from .similarity import LinearFit, PairMoments, linear_fit

__all__ = ["KINDS", "INITS", "Stitchable", "StitchLayer", "Stitched", "StitchMetrics", "stitch", "train_stitch_",
           "evaluate_stitch", "candidate_layers", "channel_dim_of", "layer_moments", "activation"]


@runtime_checkable
class Stitchable(Protocol):
    """A model that names its own stitch points: module paths whose output is one tensor and that run
    once per forward, input side first. It may also set `stitch_channel_dim` (an int) when its
    activations do not follow the rank rule of `channel_dim_of` (e.g. -1 for [B, T, C] tokens)."""

    def stitch_points(self) -> list[str]: ...


# --- running the frozen models ---------------------------------------------------------------------

class _Stop(Exception):
    """Raised by the capture hook to skip the rest of the front model's forward."""


def _module(model: nn.Module, name: str, role: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        try:
            hint = f"candidates: {candidate_layers(model)}"
        except ValueError:
            hint = f"submodules: {[n for n, _ in model.named_modules() if n][:20]}"
        raise ValueError(f"{role}={name!r} is not a submodule of {type(model).__name__}; {hint}") from None


class _Frozen:
    """Runs `model` in eval mode on a frozen copy of its state, through a private view of the module.

    The caller's module is never touched (flags, hooks), nor its tensors: the state is detached and,
    when kept beyond one call (`copy=True`), cloned.
    """

    def __init__(self, model: nn.Module, layer: str, role: str, *, copy: bool = True):
        _module(model, layer, role)  # a bad path is named against the caller's model
        self.model, self.layer, self.role = model, layer, role
        self.view = mode_view(model, training=False)
        self.module = self.view.get_submodule(layer)
        tensors = list(model.named_parameters()) + list(model.named_buffers())
        self.state = {k: (v.detach().clone() if copy else v.detach()) for k, v in tensors}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.view, self.state, (x,))

    def run(self, x: torch.Tensor, hook) -> torch.Tensor:
        handle = self.module.register_forward_hook(hook)
        try:
            return self.forward(x)
        finally:
            handle.remove()

    def capture(self, x: torch.Tensor) -> torch.Tensor:
        """The output of `layer` on input x (the rest of the forward is skipped)."""
        out = []

        def hook(_m, _i, o):
            if not isinstance(o, torch.Tensor):
                raise ValueError(f"{self.role}={self.layer!r} outputs a {type(o).__name__}; stitching needs a "
                                 "module whose output is one tensor")
            out.append(o)
            raise _Stop

        try:
            self.run(x, hook)
        except _Stop:
            return out[0]
        raise ValueError(f"{self.role}={self.layer!r} was not called by {type(self.model).__name__}.forward")

    def substitute(self, x: torch.Tensor, make) -> torch.Tensor:
        """Model output with `layer`'s output replaced by make(original output)."""
        calls = []

        def hook(_m, _i, o):
            calls.append(1)
            if len(calls) > 1:
                raise ValueError(f"{self.role}={self.layer!r} is called more than once per forward; "
                                 "stitch at a module that runs once")
            new = make(o)
            if new.shape != o.shape:
                raise ValueError(f"stitched activation has shape {list(new.shape)} but {self.role}="
                                 f"{self.layer!r} outputs {list(o.shape)}")
            return new

        out = self.run(x, hook)
        if not calls:
            raise ValueError(f"{self.role}={self.layer!r} was not called by {type(self.model).__name__}.forward")
        return out


def channel_dim_of(model: nn.Module, rank: int) -> int:
    """The channel dim of `model`'s activations of rank `rank`: the model's `stitch_channel_dim` when
    it sets one, else -1 for [B, C] features and 1 for conv maps [B, C, *spatial]."""
    own = getattr(model, "stitch_channel_dim", None)
    if own is not None:
        if isinstance(own, bool) or not isinstance(own, int):
            raise TypeError(f"{type(model).__name__}.stitch_channel_dim must be an int, got {own!r}")
        return own
    return -1 if rank <= 2 else 1


def activation(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The output of `layer` of `model` on x (frozen, eval mode, the caller's model untouched)."""
    with torch.no_grad():
        return _Frozen(model, layer, "layer", copy=False).capture(x)


class Stitched(nn.Module):
    """model_front[:front_layer] -> `layer` (a StitchLayer, the only trainable part) -> model_end[end_layer:].

    `fit`: the least-squares fit of the end activation from the front one (`fit.r2` is its R²).
    """

    def __init__(self, front: _Frozen, end: _Frozen, layer: StitchLayer, *, kind: str, init: str,
                 fit: LinearFit | None = None):
        super().__init__()  # built by `stitch`
        self._front, self._end = front, end
        self.front_layer, self.end_layer, self.kind, self.init, self.fit = front.layer, end.layer, kind, init, fit
        self.layer = layer
        # The frozen copies travel with .to()/.double() as non-persistent buffers (not in state_dict).
        for tag, frozen in (("front", self._front), ("end", self._end)):
            for i, (k, v) in enumerate(frozen.state.items()):
                self.register_buffer(f"_{tag}_{i}", v, persistent=False)

    def _sync(self) -> None:
        for tag, frozen in (("front", self._front), ("end", self._end)):
            for i, k in enumerate(frozen.state):
                frozen.state[k] = getattr(self, f"_{tag}_{i}")

    def front_activation(self, x: torch.Tensor) -> torch.Tensor:
        self._sync()
        with torch.no_grad():
            return self._front.capture(x)

    def end_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The unstitched end model's output (the reference for relative accuracy and agreement)."""
        self._sync()
        with torch.no_grad():
            return self._end.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.front_activation(x)
        return self._end.substitute(x, lambda _o: self.layer(a))

    def extra_repr(self) -> str:
        return f"front_layer={self.front_layer!r}, end_layer={self.end_layer!r}, kind={self.kind!r}, init={self.init!r}"


# --- data and moments ------------------------------------------------------------------------------

def _batches(data, batch_size: int, *, shuffle: torch.Generator | None = None):
    """(x, y-or-None) batches; moments, training epochs and metrics each take a full pass."""
    require_reiterable(data)
    return batches(data, batch_size=batch_size, shuffle=shuffle)


def _stream(front: _Frozen, end: _Frozen, data, channel_dim: int | None, batch_size: int):
    m = None
    with torch.no_grad():
        for x, _ in _batches(data, batch_size):
            a, b = front.capture(x), end.capture(x)
            if channel_dim is None:
                channel_dim = channel_dim_of(front.model, a.dim())
            if m is None:
                m = PairMoments(a.shape[channel_dim], b.shape[channel_dim], device=a.device)
            m.update(a, b, channel_dim=channel_dim)
    if m is None:
        raise ValueError("data yielded no batches")
    return m, channel_dim


def layer_moments(model_front: nn.Module, model_end: nn.Module, front_layer: str, end_layer: str | None = None,
                  data=None, *, channel_dim: int | None = None, batch_size: int = 512) -> tuple[PairMoments, int]:
    """Streamed `PairMoments` of (front activation at front_layer, end activation at end_layer) over
    `data`, and the channel dim used. Feeds the least-squares/Procrustes/matching inits, R² and CKA."""
    end_layer = front_layer if end_layer is None else end_layer
    return _stream(_Frozen(model_front, front_layer, "front_layer", copy=False),
                   _Frozen(model_end, end_layer, "end_layer", copy=False), data, channel_dim, batch_size)


def stitch(model_front: nn.Module, model_end: nn.Module, front_layer: str, end_layer: str | None = None, *,
           data, kind: str = "affine", init: str = "least_squares", rank: int | None = None,
           channel_dim: int | None = None, ridge: float | None = None, seed: int = 0,
           moments: PairMoments | None = None, batch_size: int = 512) -> Stitched:
    """Stitch model_front (up to `front_layer`'s output) into model_end (from `end_layer`'s output on,
    default: the same path) through a new stitching layer; neither model is changed or trained.

    kind: "affine" (Linear / 1×1 conv with bias), "low_rank" (rank `rank`), "orthogonal" (scale·Q + b),
    "permutation" (one-to-one matching by LAP on the correlation, per-unit scale and bias) or
    "semi_match" (each end unit reads its most correlated front unit).
    init: "random" (seeded), "identity", "permutation" (the LAP matching), "least_squares" (closed
    form from streamed XᵀX, XᵀY and means; see `similarity.linear_fit`) or "procrustes" (SVD of the
    centred XᵀY, with a global scale). `data` (tensor x, (x, y), or a re-iterable of batches such as
    a DataLoader) probes the shapes and feeds the moments; pass precomputed `moments` (from `layer_moments`) to reuse them.
    channel_dim defaults to 1 for conv maps, -1 for [B, C] features and transformer tokens.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown stitching kind {kind!r}; expected one of {KINDS}")
    if init not in INITS:
        raise ValueError(f"unknown stitching init {init!r}; expected one of {INITS}")
    end_layer = front_layer if end_layer is None else end_layer
    front, end = _Frozen(model_front, front_layer, "front_layer"), _Frozen(model_end, end_layer, "end_layer")
    x0, _ = next(iter(_batches(data, batch_size)), (None, None))
    if x0 is None or len(x0) == 0:
        raise ValueError("stitch: data is empty (it yielded no samples)")
    with torch.no_grad():
        a, b = front.capture(x0[:2]), end.capture(x0[:2])
    if a.dim() != b.dim():
        raise ValueError(f"front activation {list(a.shape)} and end activation {list(b.shape)} differ in rank")
    if channel_dim is None:
        channel_dim = channel_dim_of(model_front, a.dim())
    rest = lambda t: t.shape[:channel_dim % t.dim()] + t.shape[channel_dim % t.dim() + 1:]  # noqa: E731
    if rest(a) != rest(b):
        raise ValueError(f"front activation {list(a.shape)} and end activation {list(b.shape)} must agree "
                         f"on every dim but the channel dim {channel_dim} (positions are the samples)")
    layer = StitchLayer(a.shape[channel_dim], b.shape[channel_dim], kind=kind, rank=rank, channel_dim=channel_dim)
    if moments is None:  # one streamed pass; it also gives the least-squares R² whatever the init
        moments, _ = _stream(front, end, data, channel_dim, batch_size)
    if moments.xy.sum_xy.shape != (layer.c_in, layer.c_out):
        raise ValueError(f"moments are {list(moments.xy.sum_xy.shape)} but the layers have "
                         f"{layer.c_in} -> {layer.c_out} channels")
    fit = linear_fit(moments, ridge=ridge)
    with torch.no_grad():
        initialise(layer, init, moments, fit, seed)
    return Stitched(front, end, layer.to(a.device, a.dtype), kind=kind, init=init, fit=fit)


# --- training and metrics ------------------------------------------------------------------------------

def train_stitch_(stitched: Stitched, data, *, targets: str = "hard", epochs: int = 3, lr: float = 1e-3,
                  batch_size: int = 128, temperature: float = 1.0, seed: int = 0,
                  progress: bool = True) -> list[float]:
    """Train the stitching layer in place on the task loss with Adam (seeded batch order); returns the
    mean loss per epoch. targets="hard": cross-entropy on labels y (data = (x, y)); "soft": KL from the
    end model's softmax(logits / temperature) (labels unused)."""
    if targets not in ("hard", "soft"):
        raise ValueError(f"targets={targets!r}; expected 'hard' (labels) or 'soft' (end model's logits)")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(stitched.layer.parameters(), lr=lr)
    history, was = [], stitched.training
    stitched.train()
    for _ in tqdm(range(epochs), desc=f"stitch {stitched.front_layer}", disable=not progress, leave=False):
        total, count = 0.0, 0
        for x, y in _batches(data, batch_size, shuffle=gen):
            out = stitched(x)
            if targets == "hard":
                if y is None:
                    raise ValueError("targets='hard' needs labels: pass data=(x, y)")
                loss = F.cross_entropy(out, y)
            else:
                p = F.log_softmax(stitched.end_logits(x) / temperature, -1)
                loss = F.kl_div(F.log_softmax(out / temperature, -1), p, log_target=True,
                                reduction="batchmean") * temperature**2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(x), count + len(x)
        history.append(total / max(count, 1))
    stitched.train(was)
    return history


@dataclass
class StitchMetrics:
    accuracy: float            # stitched model, top-1 on the labels
    end_accuracy: float        # the end model alone
    relative_accuracy: float   # accuracy / end_accuracy
    agreement: float           # top-1 agreement of stitched and end model
    soft_cross_entropy: float  # −Σ softmax(end) · log softmax(stitched), mean over samples (nats)
    cross_entropy: float       # on the labels
    r2: float | None           # R² of the least-squares fit at the stitch (from the init data)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate_stitch(stitched: Stitched, data, *, batch_size: int = 1024) -> StitchMetrics:
    """Metrics of a stitched model on labelled data (x, y) against its end model."""
    n = correct = correct_end = agree = 0
    soft = hard = 0.0
    for x, y in _batches(data, batch_size):
        if y is None:
            raise ValueError("evaluate_stitch needs labelled data (x, y)")
        out, ref = stitched(x), stitched.end_logits(x)
        pred, pred_end = out.argmax(-1), ref.argmax(-1)
        n += len(y)
        correct += int((pred == y).sum())
        correct_end += int((pred_end == y).sum())
        agree += int((pred == pred_end).sum())
        soft += float(-(ref.softmax(-1) * out.log_softmax(-1)).sum())
        hard += float(F.cross_entropy(out, y, reduction="sum"))
    if n == 0:
        raise ValueError("data yielded no batches")
    acc, acc_end = correct / n, correct_end / n
    return StitchMetrics(acc, acc_end, acc / acc_end if acc_end > 0 else float("nan"), agree / n,
                         soft / n, hard / n, None if stitched.fit is None else stitched.fit.r2)


# --- where to stitch ----------------------------------------------------------------------------------

_ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU)


def candidate_layers(model: nn.Module) -> list[str]:
    """Module paths where `model` can be stitched, input side first.

    A `Stitchable` model names its own (every zoo model does: they call torch.relu functionally, so
    their points are module outputs such as MLP `norms.i`); any other model: its activation modules
    (nn.ReLU, nn.GELU, ...). Front and end must use the same kind of point; any module called once
    per forward works.
    """
    if isinstance(model, Stitchable):
        points = list(model.stitch_points())
        if not points or not all(isinstance(p, str) for p in points):
            raise ValueError(f"{type(model).__name__}.stitch_points() must return module paths (str), got {points!r}")
        return points
    names = [n for n, m in model.named_modules() if isinstance(m, _ACTIVATIONS)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no activation modules; pass layer paths explicitly")
    return names
