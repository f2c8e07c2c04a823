"""A small deterministic trainer for the zoo models (seed -> identical weights), with a cache of
trained checkpoints so tests and the demo train each configuration once per machine.

It builds zoo models by name, so it stands in the zoo's layer: the core never imports it.
"""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from . import data as data_mod
from .fileio import atomic_save_safetensors
from . import zoo
from .module_state import mode_view

__all__ = ["TrainConfig", "train_", "train_zoo", "evaluate", "LMConfig", "train_lm_", "train_lm", "lm_loss"]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    optimizer: str = "adam"          # "adam" (AdamW) or "sgd" (momentum 0.9)
    label_smoothing: float = 0.0
    seed: int = 0


def train_(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig = TrainConfig(),
          *, progress: bool = True) -> nn.Module:
    """Train `model` in place (one-cycle LR schedule, seeded batch order); returns it in eval mode."""
    g = torch.Generator().manual_seed(config.seed)
    if config.optimizer == "adam":
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    elif config.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    else:
        raise ValueError(f"TrainConfig.optimizer={config.optimizer!r}; expected 'adam' or 'sgd'")
    steps_per_epoch = max(1, len(y) // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    model.train()
    for _ in tqdm(range(config.epochs), desc=f"train seed={config.seed}", disable=not progress, leave=False):
        order = torch.randperm(len(y), generator=g)
        for s in range(steps_per_epoch):
            idx = order[s * config.batch_size:(s + 1) * config.batch_size]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    model.eval()
    return model


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of a model in eval mode (a private view: the caller's flags stay)."""
    view = mode_view(model, training=False)
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        out = view(x[i:i + batch_size])
        loss += nn.functional.cross_entropy(out, y[i:i + batch_size], reduction="sum").item()
        correct += (out.argmax(-1) == y[i:i + batch_size]).sum().item()
    return loss / len(y), correct / len(y)


def _cached_training(arch: str, key: str, seed: int, arch_kwargs: dict, fit, cache: bool):
    """Build zoo `arch` under `torch.manual_seed(seed)`; load its weights from the cache entry of `key`,
    else `fit(model)` at one intra-op thread (reductions split across threads round differently, so
    weights trained at 1 and 2 threads differ: a cached model must not depend on who trained it
    first) and cache them. Returns (model in eval mode, a copy of its state dict)."""
    path = data_mod.cache_dir() / "models" / f"{arch}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.safetensors"
    with torch.random.fork_rng():  # seed the initialisation without changing the caller's global RNG
        torch.manual_seed(seed)
        model = zoo.build(arch, **arch_kwargs)
    if cache and path.exists():
        try:
            model.load_state_dict(load_file(path))
            model.eval()
            return model, {k: v.clone() for k, v in model.state_dict().items()}
        except Exception:
            path.unlink(missing_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            fit(model)
    finally:
        torch.set_num_threads(threads)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if cache:
        atomic_save_safetensors(state, path, metadata={"config": key})
    return model, state


def train_zoo(arch: str, *, dataset: str = "mnist1d", seed: int = 0, config: TrainConfig | None = None,
              cache: bool = True, progress: bool = True, **arch_kwargs) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Build zoo model `arch` with `torch.manual_seed(seed)`, train it on `dataset` (cached on disk),
    and return (model in eval mode, its state dict). Same arguments -> identical weights on one CPU
    instruction set (training runs at one intra-op thread whatever the caller's setting)."""
    config = config or TrainConfig(seed=seed)
    config = TrainConfig(**{**asdict(config), "seed": seed})
    key = json.dumps({"arch": arch, "dataset": dataset, "kw": arch_kwargs, "cfg": asdict(config),
                      "torch": torch.__version__.split("+")[0], "v": 2}, sort_keys=True)
    def fit(model):
        x, y, _, _ = data_mod.load(dataset)
        train_(model, x, y, config, progress=progress)

    return _cached_training(arch, key, seed, arch_kwargs, fit, cache)


@dataclass(frozen=True)
class LMConfig:
    """Next-token training of a causal LM on random windows of a token stream (AdamW, one-cycle LR)."""
    steps: int = 600
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.01
    seed: int = 0


def lm_loss(logits: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of logits [B, T, V] against windows [B, T + 1] (targets w[:, 1:])."""
    return nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())


def train_lm_(model: nn.Module, stream: torch.Tensor, config: LMConfig = LMConfig(), *,
              progress: bool = True) -> nn.Module:
    """Train a causal LM in place on `config.steps` batches of seeded random windows of `stream`."""
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps, pct_start=0.1)
    windows = data_mod.lm_windows(stream, config.seq_len, config.steps * config.batch_size, seed=config.seed)
    model.train()
    for s in tqdm(range(config.steps), desc=f"train LM seed={config.seed}", disable=not progress, leave=False):
        w = windows[s * config.batch_size:(s + 1) * config.batch_size]
        opt.zero_grad(set_to_none=True)
        lm_loss(model(w[:, :-1]), w).backward()
        opt.step()
        sched.step()
    model.eval()
    return model


def train_lm(*, seed: int = 0, config: LMConfig | None = None, cache: bool = True, progress: bool = True,
             **arch_kwargs) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The zoo GPT (`arch_kwargs`; seq_len from the config) built with `torch.manual_seed(seed)` and
    trained on the standard-library corpus (`data.pystdlib`), cached on disk per configuration, torch
    and Python version. Same arguments -> identical weights on one CPU instruction set (one intra-op
    thread, whatever the caller's setting)."""
    config = LMConfig(**{**asdict(config or LMConfig()), "seed": seed})
    if arch_kwargs.get("seq_len", config.seq_len) != config.seq_len:
        raise ValueError(f"train_lm: seq_len={arch_kwargs['seq_len']} differs from config.seq_len={config.seq_len}")
    arch_kwargs = {**arch_kwargs, "seq_len": config.seq_len}
    key = json.dumps({"arch": "gpt", "dataset": "pystdlib", "kw": arch_kwargs, "cfg": asdict(config),
                      "torch": torch.__version__.split("+")[0], "python": platform.python_version(), "v": 1},
                     sort_keys=True)
    def fit(model):
        stream, _ = data_mod.pystdlib()
        train_lm_(model, stream, config, progress=progress)

    return _cached_training("gpt", key, seed, arch_kwargs, fit, cache)
