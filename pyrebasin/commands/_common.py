"""Helpers shared by the checkpoint subcommands (align, interpolate): model + checkpoint loading with
one-line errors, data splits by name or file, the permutation spec of any model."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..io import load_state, parse_kwargs, resolve_arch
from ..module_state import check_state


def add_pair_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", required=True, help="zoo name (mlp, vgg, resnet20, transformer) or module:factory")
    p.add_argument("--arch-kwargs", default=None, help="JSON object of arguments for the architecture")
    p.add_argument("--a", required=True, help="checkpoint of model A (.safetensors or .pt)")
    p.add_argument("--b", required=True, help="checkpoint of model B (.safetensors or .pt)")


def add_data_args(p: argparse.ArgumentParser, default: str | None = "mnist1d") -> None:
    p.add_argument("--data", default=default,
                   help="mnist1d, digits, or a .pt/.safetensors file with x_train, y_train[, x_test, y_test]")
    p.add_argument("--samples", type=int, default=2000, help="train rows used for statistics and curves")


def load_pair(args) -> tuple[torch.nn.Module, dict, dict]:
    model = resolve_arch(args.arch, parse_kwargs(args.arch_kwargs))
    states = []
    for flag, path in (("--a", args.a), ("--b", args.b)):
        state = load_state(path)
        check_state(model, state, f"{flag} {path}")
        states.append(state)
    return model, states[0], states[1]


def load_splits(name: str, samples: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from .. import data

    if samples < 1:
        raise ValueError(f"--samples={samples} must be >= 1")
    if name in data.DATASETS:
        x, y, xt, yt = data.load(name)
        return {"train": (x[:samples], y[:samples]), "test": (xt, yt)}
    path = Path(name)
    if path.suffix not in (".pt", ".pth", ".safetensors"):
        raise ValueError(f"--data {name!r}: expected {sorted(data.DATASETS)} or a .pt/.safetensors file")
    t = load_state(path)
    missing = [k for k in ("x_train", "y_train") if k not in t]
    if missing:
        raise ValueError(f"--data {name}: missing tensors {missing} (has {sorted(t)})")
    splits = {"train": (t["x_train"][:samples], t["y_train"][:samples].long())}
    if "x_test" in t and "y_test" in t:
        splits["test"] = (t["x_test"], t["y_test"].long())
    return splits


def probe(model: torch.nn.Module, state: dict, x: torch.Tensor, what: str) -> None:
    """One forward on two rows, so a data/model mismatch is a one-line error, not a deep traceback."""
    from ..module_state import mode_view

    try:
        with torch.no_grad():
            out = torch.func.functional_call(mode_view(model), state, (x[:2],))
    except RuntimeError as exc:
        raise ValueError(f"the model cannot run on {what} inputs of shape {list(x.shape[1:])}: "
                         f"{str(exc).splitlines()[0]}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"the model's output on {what} is not [batch, classes] logits")


def spec_of(model: torch.nn.Module, example: torch.Tensor | None):
    """The model's own `permutation_spec()`, else a traced one (`prb.trace_spec`, when available)."""
    if hasattr(model, "permutation_spec"):
        return model.permutation_spec()
    import pyrebasin as prb

    if hasattr(prb, "trace_spec") and example is not None:
        return prb.trace_spec(model, (example[:2],))
    raise ValueError(f"{type(model).__name__} has no permutation_spec() (and no traced spec is available)")


def align(model, spec, state_a, state_b, method: str, x: torch.Tensor | None, *, seed: int = 0,
          max_iter: int = 100, progress: bool = False):
    """MatchResult aligning B to A by "weight" or "activation" matching."""
    from .. import matching

    if method == "weight":
        return matching.weight_matching(spec, state_a, state_b, seed=seed, max_iter=max_iter, progress=progress)
    if x is None:
        raise ValueError("activation matching needs --data")
    return matching.activation_matching(model, model, spec, x, state_a=state_a, state_b=state_b,
                                        max_iter=max_iter, progress=progress)
