"""`pyrebasin trace`: the automatic permutation spec of a model (zoo name or module:factory), printed
group by group with the fixed keys and why; optionally checked (random permutations) and saved."""
from __future__ import annotations

import argparse

from . import _common


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated sizes, e.g. 2,40") from None
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be >= 1")
    return dims


def run(args: argparse.Namespace) -> int:
    import torch

    import pyrebasin as prb

    from ..fileio import atomic_write_text

    if args.out:
        _common.check_outputs({"--out": args.out}, {})
    model = _common.build_model(args.arch, args.arch_kwargs)
    gen = torch.Generator().manual_seed(args.seed)
    x = (torch.randint(0, args.vocab, args.input_shape, generator=gen) if args.vocab
         else torch.randn(args.input_shape, generator=gen))
    spec = prb.trace_spec(model, x, frontend=args.frontend, unknown=args.unknown)
    print(prb.describe_spec(spec, model.state_dict()))
    if args.out:
        atomic_write_text(args.out, spec.to_json())
        print(f"wrote {args.out}")
    if args.check:
        report = prb.check_spec(model, spec, x, seed=args.seed, raise_on_failure=False)
        print(report)
        return 0 if report.ok else 1
    return 0


def register(sub) -> None:
    p = sub.add_parser("trace", help="automatic permutation spec of a model (torch.fx / torch.export)",
                       description="Trace a model on a random example input and print its permutation "
                                   "groups and fixed parameters; --check verifies that random "
                                   "permutations leave its outputs unchanged (eval and train mode).")
    p.add_argument("--arch", required=True, help="zoo name (mlp, vgg, resnet20, transformer) or module:factory")
    p.add_argument("--arch-kwargs", default=None, help="JSON object of arguments for the architecture")
    p.add_argument("--input-shape", type=_shape, required=True, help="example input shape, e.g. 2,40")
    p.add_argument("--vocab", type=_common.int_at_least(0), default=0, help="integer inputs in [0, VOCAB) (token ids)")
    p.add_argument("--frontend", default="auto", choices=["auto", "fx", "export"])
    p.add_argument("--unknown", default="error", choices=["error", "freeze"],
                   help="ops without a rule on permutable axes: raise, or freeze what they touch")
    p.add_argument("--check", action="store_true", help="run the random-permutation invariance check")
    p.add_argument("--out", help="write the spec as JSON")
    p.add_argument("--seed", type=_common.SEED, default=0)
    p.set_defaults(func=run)
