"""Helpers shared by the subcommands: checked numeric options, output paths that can neither clobber an
input nor fail after the work, checkpoints and data splits with one-line errors, any model's spec."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

from ..batches import batches, check_labels
from ..distributed import shard_range
from ..fileio import check_target, same_file
from ..io import first_line, load_state, parse_kwargs
from ..module_state import check_state, mode_view
from ..zoo import resolve_arch


def int_at_least(low: int, high: int | None = None):
    """An argparse type: an int >= `low` (and <= `high`): `--n 0`, `--examples -5` are refused, not clipped."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
        return value
    parse.__name__ = f"int >= {low}"
    return parse


# A seed every generator takes (torch.Generator, the native counter-based RNG): [0, 2**63).
SEED = int_at_least(0, 2**63 - 1)


def finite_float(low: float | None = None, high: float | None = None, *, open_low: bool = False):
    """An argparse type: a finite float (NaN and ±inf refused) in [low, high] (`open_low`: > low)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        if low is not None and (value <= low if open_low else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if open_low else '>='} {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
        return value
    parse.__name__ = "finite float"
    return parse


def check_outputs(outputs: dict[str, os.PathLike | str | None],
                  inputs: dict[str, os.PathLike | str | None]) -> None:
    """Before any work: every output can be written (no directory in its place, no file as a
    parent), none is an input (it would be replaced) and no two outputs are one file."""
    outs = {flag: Path(p) for flag, p in outputs.items() if p is not None}
    ins = {flag: Path(p) for flag, p in inputs.items() if p is not None}
    for flag, path in outs.items():
        check_target(path, flag)
        for in_flag, source in ins.items():
            if same_file(path, source):
                raise ValueError(f"{flag} {path} is the {in_flag} input: writing it would replace that "
                                 "file; choose another path")
    flags = list(outs)
    for i, f in enumerate(flags):
        for g in flags[i + 1:]:
            if same_file(outs[f], outs[g]):
                raise ValueError(f"{f} and {g} are the same file ({outs[f]}); one would replace the other")


def build_model(arch: str, arch_kwargs: str | None) -> torch.nn.Module:
    return resolve_arch(arch, parse_kwargs(arch_kwargs))


def add_pair_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", required=True, help="zoo name (mlp, vgg, resnet20, transformer) or module:factory")
    p.add_argument("--arch-kwargs", default=None, help="JSON object of arguments for the architecture")
    p.add_argument("--a", required=True, help="checkpoint of model A (.safetensors or .pt)")
    p.add_argument("--b", required=True, help="checkpoint of model B (.safetensors or .pt)")


def add_data_args(p: argparse.ArgumentParser, default: str | None = "mnist1d") -> None:
    p.add_argument("--data", default=default,
                   help="mnist1d, digits, or a .pt/.safetensors file with x_train, y_train[, x_test, y_test]")
    p.add_argument("--samples", type=int_at_least(1), default=2000, help="train rows used for statistics and curves")


def load_pair(args) -> tuple[torch.nn.Module, dict, dict]:
    model = build_model(args.arch, args.arch_kwargs)
    states = []
    for flag, path in (("--a", args.a), ("--b", args.b)):
        state = load_state(path)
        check_state(model, state, f"{flag} {path}")
        states.append(state)
    return model, states[0], states[1]


def data_file(name: str | None) -> str | None:
    """The --data value when it names a file (an input that no output may replace)."""
    from .. import data

    return None if name is None or name in data.DATASETS else name


def load_splits(name: str, samples: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train": first `samples` rows, "test": all} of a named dataset or a .pt/.safetensors file;
    labels as stored (`check_data` refuses float or one-hot labels instead of casting them)."""
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
    meta = [k for k, v in t.items() if v.is_meta]
    if meta:
        raise ValueError(f"--data {name}: {meta[:4]} are meta tensors (no data)")
    splits = {"train": (t["x_train"][:samples], t["y_train"][:samples])}
    if "x_test" in t and "y_test" in t:
        splits["test"] = (t["x_test"], t["y_test"])
    return splits


def probe(model: torch.nn.Module, state: dict, x: torch.Tensor, what: str) -> int:
    """One forward on two rows, so a data/model mismatch is a one-line error, not a deep traceback;
    returns the number of classes (the logits' width)."""
    try:
        with torch.no_grad():
            out = torch.func.functional_call(mode_view(model), state, (x[:2],))
    except RuntimeError as exc:
        raise ValueError(f"the model cannot run on {what} inputs of shape {list(x.shape[1:])}: "
                         f"{first_line(exc)}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ValueError(f"the model's output on {what} is not [batch, classes] logits")
    return out.shape[1]


def check_data(model: torch.nn.Module, state: dict, splits: dict, what: str) -> dict:
    """The API's data checks on every split (empty, non-finite inputs, labels of another length:
    the errors `prb.interpolate` gives), then class-index labels for the model's outputs (float
    labels refused, not truncated; one-hot labels get a hint). Integer labels come back as int64."""
    for split, data in splits.items():
        for _ in batches(data, labels="required", name=f"{what} {split}"):
            pass
    classes = probe(model, state, splits["train"][0], what)
    out = {}
    for split, (x, y) in splits.items():
        check_labels(y, classes, f"{what} {split}")
        out[split] = (x, y.long())
    return out


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
    rows = shard_range(len(x))   # under torchrun each rank reads its share; the statistics are summed
    return matching.activation_matching(model, model, spec, x[rows.start:rows.stop], state_a=state_a,
                                        state_b=state_b, max_iter=max_iter, progress=progress)
