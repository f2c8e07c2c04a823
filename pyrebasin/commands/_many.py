"""Options and loaders shared by the commands over N checkpoints (`merge`, `connectivity`): --models
with at least two files of one architecture, each checked against the model with one-line errors."""
from __future__ import annotations

import argparse

import torch

from ..fileio import same_file
from ..io import load_state
from ..module_state import check_state
from . import _common


def add_models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", required=True, help="zoo name (mlp, vgg, resnet20, transformer) or module:factory")
    p.add_argument("--arch-kwargs", default=None, help="JSON object of arguments for the architecture")
    p.add_argument("--models", required=True, nargs="+", metavar="CKPT",
                   help="two or more checkpoints of that architecture (.safetensors or .pt)")


def model_inputs(args) -> dict[str, str | None]:
    """Every input file (for `_common.check_outputs`): the checkpoints and a --data file."""
    return {**{f"--models[{i}]": p for i, p in enumerate(args.models)}, "--data": _common.data_file(args.data)}


def check_models(args) -> None:
    """Before any work: at least two checkpoints, none named twice."""
    if len(args.models) < 2:
        raise ValueError(f"--models needs at least 2 checkpoints, got {len(args.models)}")
    for j, path in enumerate(args.models):
        for i in range(j):
            if same_file(path, args.models[i]):
                raise ValueError(f"--models[{j}] {path} is also --models[{i}]; give each model once")


def load_models(args) -> tuple[torch.nn.Module, list[dict]]:
    model = _common.build_model(args.arch, args.arch_kwargs)
    states = []
    for i, path in enumerate(args.models):
        state = load_state(path)
        check_state(model, state, f"--models[{i}] {path}")
        states.append(state)
    return model, states
