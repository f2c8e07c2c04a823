"""Trained mnist1d models for the real-data claim tests: several seed pairs per configuration, so a
claim is checked on more than one draw of training (weights differ between CPUs and thread counts)."""
import functools

import torch

import pyrebasin as prb
from pyrebasin.train import TrainConfig, train_zoo

# name -> (zoo arch, arch kwargs, epochs). mlp and vgg_bn at seeds (0, 1) are the demo's --quick pairs.
CONFIGS = {
    "mlp": ("mlp", {"width": 128, "depth": 3}, 10),
    "vgg_bn": ("vgg", {}, 10),
    "resnet20_ln": ("resnet20", {"norm": "ln"}, 5),
}
SEED_PAIRS = ((0, 1), (2, 3), (4, 5), (6, 7))


@functools.cache
def _trained_state(name: str, seed: int) -> dict:
    arch, kw, epochs = CONFIGS[name]
    threads = torch.get_num_threads()
    # Trained weights depend on the intra-op thread count and the model cache does not key on it: every
    # caller trains at one thread (as the demo's subprocesses do), so whoever fills the cache first
    # leaves the same weights.
    torch.set_num_threads(1)
    try:
        _, state = train_zoo(arch, seed=seed, config=TrainConfig(epochs=epochs), progress=False, **kw)
    finally:
        torch.set_num_threads(threads)
    return state


def trained(name: str, seed: int):
    """(fresh model in eval mode holding the trained weights, a private copy of its state dict)."""
    arch, kw, _ = CONFIGS[name]
    state = {k: v.clone() for k, v in _trained_state(name, seed).items()}
    model = prb.zoo.build(arch, **kw)
    model.load_state_dict(state)
    return model.eval(), state


def trained_pair(name: str, seeds: tuple[int, int] = (0, 1)):
    """(model, state A, state B) of configuration `name` trained from the two seeds."""
    model, a = trained(name, seeds[0])
    return model, a, trained(name, seeds[1])[1]


def seed_pairs(n: int = len(SEED_PAIRS)) -> list[tuple[int, int]]:
    return list(SEED_PAIRS[:n])


def mnist1d_splits(n_train: int = 1000) -> dict:
    x, y, xt, yt = prb.data.mnist1d()
    return {"train": (x[:n_train], y[:n_train]), "test": (xt, yt)}


@torch.no_grad()
def midpoint_barriers(model, sa, sb, x, y) -> tuple[float, float]:
    """(loss barrier, accuracy barrier) of the midpoint against the mean of the endpoints."""
    def evaluate(state):
        out = torch.func.functional_call(model, state, (x,))
        return torch.nn.functional.cross_entropy(out, y).item(), (out.argmax(-1) == y).double().mean().item()

    mid = {k: torch.lerp(sa[k].double(), sb[k].double(), 0.5).to(sa[k].dtype) if sa[k].is_floating_point()
           else sa[k] for k in sa}
    (la, aa), (lb, ab), (lm, am) = evaluate(sa), evaluate(sb), evaluate(mid)
    return lm - (la + lb) / 2, (aa + ab) / 2 - am


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)
