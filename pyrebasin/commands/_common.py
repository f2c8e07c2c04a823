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
from ..lm import check_token_ids, is_token_batch, logits_of, model_kwargs, vocabulary_size
from ..matching.activation_stats import model_forward
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


def hf_from_config(path: str | os.PathLike) -> torch.nn.Module:
    """A Hugging Face causal LM with random weights from a local config (a config.json, or a directory
    holding one); the hub is never contacted. Load its weights with --a/--b checkpoints."""
    import json

    from ..io import call_factory

    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(f"--hf-config {path}: no config file at {file}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--hf-config {file}: not a JSON config ({first_line(exc)})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"--hf-config {file}: a Hugging Face config needs a 'model_type' entry")
    from transformers import AutoConfig, AutoModelForCausalLM

    def factory():
        kind = config["model_type"]
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **{k: v for k, v in config.items()
                                                                              if k != "model_type"}))
    return call_factory(f"--hf-config {file}", factory, {})


def model_of(args) -> torch.nn.Module:
    """The model of a pair command: --hf-config when given, else --arch (zoo name or module:factory)."""
    if getattr(args, "hf_config", None):
        return hf_from_config(args.hf_config)
    if not args.arch:
        raise ValueError("give --arch (zoo name or module:factory) or --hf-config (a Hugging Face config)")
    return build_model(args.arch, args.arch_kwargs)


def add_pair_args(p: argparse.ArgumentParser, *, directories: bool = False) -> None:
    """--arch/--arch-kwargs/--hf-config/--a/--b (`model_of` needs --arch or --hf-config); with
    `directories`, --a/--b may be Hugging Face model directories (then the model comes from their config)."""
    p.add_argument("--arch", default=None,
                   help="zoo name (mlp, vgg, resnet20, transformer) or module:factory (or give --hf-config)"
                   + ("; not used with model directories" if directories else ""))
    p.add_argument("--arch-kwargs", default=None, help="JSON object of arguments for the architecture")
    p.add_argument("--hf-config", default=None,
                   help="a Hugging Face causal LM config (config.json or its directory, read locally) "
                        "instead of --arch")
    what = "checkpoint (.safetensors or .pt)" + (" or Hugging Face model directory" if directories else "")
    p.add_argument("--a", required=True, help=f"model A: {what}")
    p.add_argument("--b", required=True, help=f"model B: {what}")


def add_data_args(p: argparse.ArgumentParser, default: str | None = "mnist1d") -> None:
    p.add_argument("--data", default=default,
                   help="mnist1d, digits, a .pt/.safetensors file with x_train, y_train[, x_test, y_test], or "
                        "language-model tokens: a .pt/.safetensors file of ids ([N, T], or a 1-D stream) or a "
                        "UTF-8 text file (byte-level ids 0..255 unless --tokenizer)")
    p.add_argument("--samples", type=int_at_least(1), default=2000,
                   help="train rows (token sequences) used for statistics and curves")
    p.add_argument("--seq-len", type=int_at_least(2), default=128,
                   help="tokens per sequence when --data is a text file or a 1-D stream of ids")
    p.add_argument("--tokenizer", default=None, help="a local Hugging Face tokenizer directory for a text --data")


def directory_pair(a, b) -> tuple[torch.nn.Module, dict, dict] | None:
    """(model with A's weights, state A, state B) when --a and --b are Hugging Face model directories (the
    model class and config from A's directory, read locally); None for checkpoint files."""
    from .. import hf

    dirs = [hf.is_hf_directory(a), hf.is_hf_directory(b)]
    if not any(dirs):
        return None
    if not all(dirs):
        raise ValueError(f"--a {a} and --b {b}: give two model directories or two checkpoint files, not one of each")
    model = hf.load_hf_model(a)
    state_a = {k: v.detach() for k, v in model.state_dict().items()}
    state_b = {k: v.detach() for k, v in hf.load_hf_model(b).state_dict().items()}
    check_state(model, state_b, f"--b {b}")
    return model, state_a, state_b


def load_pair(args) -> tuple[torch.nn.Module, dict, dict]:
    pair = directory_pair(args.a, args.b)
    if pair is not None:
        return pair
    model = model_of(args)
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


def load_splits(name: str, samples: int, *, seq_len: int = 128, tokenizer: str | None = None) -> dict:
    """{"train": first `samples` rows, "test": all} of a named dataset or a .pt/.safetensors file;
    labels as stored (`check_data` refuses float or one-hot labels instead of casting them). A token
    file (`tokens.is_token_file`) gives {"train": ids [N, T] (or a dict with attention_mask)}: its first
    `samples` sequences, their next tokens the targets."""
    from .. import data
    from ..tokens import is_token_file, load_tokens

    if samples < 1:
        raise ValueError(f"--samples={samples} must be >= 1")
    if name in data.DATASETS:
        x, y, xt, yt = data.load(name)
        return {"train": (x[:samples], y[:samples]), "test": (xt, yt)}
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"--data {name!r}: no such file (or dataset: {sorted(data.DATASETS)})")
    if is_token_file(path):
        tok = None
        if tokenizer:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        ids = load_tokens(path, seq_len=seq_len, tokenizer=tok)
        return {"train": {k: v[:samples] for k, v in ids.items()} if isinstance(ids, dict) else ids[:samples]}
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


def is_token_split(data) -> bool:
    """A split of language-model tokens (ids [N, T] or a dict with input_ids), not an (x, y) pair."""
    return not isinstance(data, tuple) and is_token_batch(data)


def inputs_of(data):
    """The inputs of a split: x of an (x, y) pair, the token ids (or their dict) of a token split."""
    return data if is_token_split(data) else data[0]


def _first_rows(x, n: int = 2):
    return {k: v[:n] for k, v in x.items()} if isinstance(x, dict) else x[:n]


def check_tokens(model: torch.nn.Module, state: dict, splits: dict, what: str) -> dict:
    """Token splits for a causal LM: ids inside the model's vocabulary, and one forward on two
    sequences giving [batch, tokens, vocab] logits (a one-line error otherwise)."""
    vocab = vocabulary_size(model)
    for split, data in splits.items():
        check_token_ids(data, vocab, f"{what} {split}")
    x = _first_rows(splits["train"])
    try:
        with torch.no_grad():
            out = model_forward(mode_view(model), state, x, model_kwargs(model))
        logits = logits_of(out)
    except (RuntimeError, TypeError, IndexError) as exc:
        raise ValueError(f"the model cannot run on {what} token ids: {first_line(exc)}") from None
    if logits.dim() != 3:
        raise ValueError(f"the model's output on {what} tokens has shape {list(logits.shape)}; a language model "
                         "returns [batch, tokens, vocab] logits")
    return splits


def check_data(model: torch.nn.Module, state: dict, splits: dict, what: str) -> dict:
    """The API's data checks on every split (empty, non-finite inputs, labels of another length:
    the errors `prb.interpolate` gives), then class-index labels for the model's outputs (float
    labels refused, not truncated; one-hot labels get a hint). Integer labels come back as int64.
    Token splits (`load_splits` of a token file) are checked by `check_tokens` instead."""
    if all(is_token_split(d) for d in splits.values()):
        return check_tokens(model, state, splits, what)
    for split, data in splits.items():
        for _ in batches(data, labels="required", name=f"{what} {split}"):
            pass
    classes = probe(model, state, splits["train"][0], what)
    out = {}
    for split, (x, y) in splits.items():
        check_labels(y, classes, f"{what} {split}")
        out[split] = (x, y.long())
    return out


def spec_of(model: torch.nn.Module, example):
    """The model's own `permutation_spec()`, else a traced one (`prb.trace_spec`; token ids are traced
    as keyword inputs with the model's `lm.model_kwargs`, e.g. use_cache=False)."""
    if hasattr(model, "permutation_spec"):
        return model.permutation_spec()
    import pyrebasin as prb

    if hasattr(prb, "trace_spec") and example is not None:
        if is_token_split(example):
            rows = _first_rows(example)
            return prb.trace_spec(model, {**(rows if isinstance(rows, dict) else {"input_ids": rows}),
                                          **model_kwargs(model)})
        return prb.trace_spec(model, (example[:2],))
    raise ValueError(f"{type(model).__name__} has no permutation_spec() (and no traced spec is available)")


def align(model, spec, state_a, state_b, method: str, x, *, seed: int = 0,
          max_iter: int = 100, progress: bool = False, choose_on=None):
    """MatchResult aligning B to A by "weight" or "activation" matching (token ids: batches of about
    8192 tokens, so a language model's activations per batch stay bounded). `choose_on`: data for weight
    matching's data-aware choice between group orders (its midpoint loss there decides)."""
    from .. import matching

    if method == "weight":
        select = {} if choose_on is None else dict(model=model, data=choose_on)
        return matching.weight_matching(spec, state_a, state_b, seed=seed, max_iter=max_iter, progress=progress,
                                        **select)
    if x is None:
        raise ValueError("activation matching needs --data")
    batch_size = 512
    ids = x["input_ids"] if isinstance(x, dict) else x
    if is_token_split(x):
        batch_size = max(1, 8192 // ids.shape[1])
    rows = shard_range(len(ids))   # under torchrun each rank reads its share; the statistics are summed
    share = {k: v[rows.start:rows.stop] for k, v in x.items()} if isinstance(x, dict) else x[rows.start:rows.stop]
    return matching.activation_matching(model, model, spec, share, state_a=state_a, state_b=state_b,
                                        batch_size=batch_size, max_iter=max_iter, progress=progress)
