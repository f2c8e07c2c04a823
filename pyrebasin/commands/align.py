"""`pyrebasin align`: permute checkpoint B onto checkpoint A (weight or activation matching) and write
the aligned B (.safetensors or .pt, atomically), optionally with the permutations as JSON; Hugging Face
model directories in give an aligned model directory out (weights streamed from the shards, and for
activation matching both models run as streamed forwards: see pyrebasin.hf)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..io import STATE_SUFFIXES, atomic_write_text, save_state, state_suffix
from . import _common


def _moved(perms) -> int:
    import torch

    return sum(int((v != torch.arange(len(v))).sum()) for v in perms.values())


def _directory_tokens(args: argparse.Namespace):
    """The --data token batches of an activation run on model directories, ids checked against A's vocabulary."""
    from .. import hf
    from ..distributed import shard_range
    from ..lm import check_token_ids, is_token_batch

    splits = _common.load_splits(args.data, args.samples, seq_len=args.seq_len, tokenizer=args.tokenizer)
    ids = splits["train"]
    if isinstance(ids, tuple) or not is_token_batch(ids):
        raise ValueError(f"--data {args.data}: model directories are language models; give token data (a text "
                         "file, or a .pt/.safetensors of token ids)")
    vocab = getattr(hf.hf_config(args.a), "vocab_size", None)
    if vocab is not None:
        check_token_ids(ids, vocab, f"--data {args.data}")
    rows = ids["input_ids"] if isinstance(ids, dict) else ids
    share = shard_range(len(rows))   # under torchrun each rank reads its share; the statistics are summed
    cut = slice(share.start, share.stop)
    ids = {k: v[cut] for k, v in ids.items()} if isinstance(ids, dict) else ids[cut]
    return ids, max(1, args.batch_tokens // rows.shape[1])


def run_directories(args: argparse.Namespace) -> int:
    import torch

    from .. import hf
    from ..shards import parse_size

    for flag in ("--a", "--b"):
        path = getattr(args, flag[2:])
        if not Path(path).is_dir():
            raise ValueError(f"{flag} {path} is not a directory, but the other model is one: give two model "
                             "directories or two checkpoint files")
    if args.arch is not None:
        raise ValueError("--arch is not used with model directories (the model comes from their config.json)")
    if args.method == "weight" and args.data is not None:
        raise ValueError("--data is not used by weight matching of model directories (add --method activation)")
    if args.choose_by_data:
        raise ValueError("--choose-by-data is for checkpoint files (model directories are weight-matched from "
                         "their shards)")
    if args.method == "activation" and args.data is None:
        raise ValueError("--method activation needs --data (token ids or a text file)")
    _common.check_outputs({"--perms": args.perms}, {"--a": args.a, "--b": args.b,
                                                    "--data": _common.data_file(args.data)})
    options = dict(seed=args.seed, max_iter=args.max_iter)
    if args.method == "activation":
        try:
            budget = parse_size(args.max_memory)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"--max-memory {args.max_memory!r}: {str(exc).split(': ', 1)[-1]}") from None
        ids, batch_size = _directory_tokens(args)
        options = dict(data=ids, batch_size=batch_size, max_memory=budget, max_iter=args.max_iter,
                       dtype=getattr(torch, args.moments),
                       forward_dtype=None if args.forward_dtype is None else getattr(torch, args.forward_dtype))
    t0 = time.perf_counter()
    result = hf.align_hf(args.a, args.b, args.out, matching=args.method, max_shard_size=args.max_shard_size,
                         overwrite=args.overwrite, progress=not args.no_progress, **options)
    seconds = time.perf_counter() - t0
    if args.perms:
        atomic_write_text(args.perms, json.dumps({p: v.tolist() for p, v in result.perms.items()}))
    print(f"{args.method} matching in {seconds:.2f} s ({_moved(result.perms)} units moved, objective "
          f"{result.objective[0]:.6g} -> {result.objective[-1]:.6g}); wrote {args.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    import torch  # noqa: F401  (the checkpoint path below needs it loaded)

    from ..similarity import weight_l2
    from ..spec import apply_permutation

    if Path(args.a).is_dir() or Path(args.b).is_dir():
        return run_directories(args)
    if args.arch is None and not getattr(args, "hf_config", None):
        raise ValueError("--arch (or --hf-config) is required for checkpoint files (model directories need none)")
    # a bad output name, a directory in its place or an input as output fail before any work
    state_suffix(Path(args.out))
    _common.check_outputs({"--out": args.out, "--perms": args.perms},
                          {"--a": args.a, "--b": args.b, "--data": _common.data_file(args.data)})
    if args.choose_by_data and (args.method != "weight" or args.data is None):
        raise ValueError("--choose-by-data needs --method weight and --data (the group orders' midpoints are "
                         "compared on that data)")
    model, state_a, state_b = _common.load_pair(args)
    x, choose_on = None, None
    if args.method == "activation" or args.data is not None:
        name = args.data or "mnist1d"
        splits = _common.check_data(model, state_a, _common.load_splits(name, args.samples, seq_len=args.seq_len,
                                                                        tokenizer=args.tokenizer), f"--data {name}")
        x = _common.inputs_of(splits["train"])   # token ids (or their dict) of an LM, x of an (x, y) pair
        choose_on = splits["train"] if args.choose_by_data else None
    spec = _common.spec_of(model, x)
    spec.perm_sizes(state_a)  # names any key the spec and checkpoint disagree on
    t0 = time.perf_counter()
    result = _common.align(model, spec, state_a, state_b, args.method, x, seed=args.seed,
                           max_iter=args.max_iter, progress=not args.no_progress, choose_on=choose_on)
    seconds = time.perf_counter() - t0
    aligned = apply_permutation(spec, result.perms, state_b)
    before, after = weight_l2(state_a, state_b), weight_l2(state_a, aligned)
    save_state(aligned, args.out)
    if args.perms:
        atomic_write_text(args.perms, json.dumps({p: v.tolist() for p, v in result.perms.items()}))
    print(f"{args.method} matching in {seconds:.2f} s ({_moved(result.perms)} units moved): ||A - B|| "
          f"{before:.4g} -> {after:.4g}; wrote {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("align", help="permute checkpoint B onto A and write the aligned B")
    _common.add_pair_args(p, directories=True)
    p.add_argument("--out", required=True,
                   help=f"aligned B: a checkpoint ({', '.join(STATE_SUFFIXES)}), or a directory for model directories")
    p.add_argument("--method", choices=("weight", "activation"), default="weight")
    _common.add_data_args(p, default=None)
    p.add_argument("--perms", default=None, help="also write the permutations as JSON here")
    p.add_argument("--seed", type=_common.SEED, default=0, help="weight matching's sweep order")
    p.add_argument("--choose-by-data", action="store_true",
                   help="weight matching: run several group orders and keep the one whose midpoint has the lowest "
                        "loss on --data (a data-aware choice; docs/matchers.md)")
    p.add_argument("--max-iter", type=_common.int_at_least(1), default=100)
    p.add_argument("--max-shard-size", default=None,
                   help="model directories: cut the output into shards of at most this size ('5GB', '500MB'); "
                        "default: B's shard layout")
    p.add_argument("--overwrite", action="store_true", help="model directories: replace a non-empty --out")
    p.add_argument("--batch-tokens", type=_common.int_at_least(1), default=2048,
                   help="model directories, --method activation: tokens per batch (batch_tokens // seq-len sequences)")
    p.add_argument("--max-memory", default="1GiB",
                   help="model directories, --method activation: budget of activation moments alive at once "
                        "('1GiB', '500MB'); more passes over the data when they do not fit")
    p.add_argument("--moments", choices=("float32", "float64"), default="float32",
                   help="model directories, --method activation: moment accumulator (float32: shifted sums)")
    p.add_argument("--forward-dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="model directories, --method activation: compute dtype of the forwards (default: the "
                        "checkpoint's)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
