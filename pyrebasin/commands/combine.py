"""`pyrebasin combine`: the mode combinability studies on trained zoo models; writes JSON, Markdown, PNG."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import _common

STUDIES = ("combinability", "transitivity", "robustness", "similarity")


def run(args: argparse.Namespace) -> int:
    import importlib

    import torch

    # pyrebasin.experiments re-exports functions named like these modules: import the modules themselves.
    comb, rob, sim, trans = (importlib.import_module(f"pyrebasin.experiments.{m}")
                             for m in ("combinability", "robustness", "similarity_study", "transitivity"))

    from ..fileio import atomic_write_text
    from ..io import parse_kwargs

    out = Path(args.out)
    _common.check_outputs({"--out": out / "combine.json", "--out (md)": out / "combine.md"}, {})
    if args.threads:
        torch.set_num_threads(args.threads)
    arch_kwargs = parse_kwargs(args.arch_kwargs)
    if args.arch == "mlp":
        arch_kwargs = {"width": args.width, "depth": args.depth, **arch_kwargs}
    studies = args.studies or list(STUDIES)
    n_models = 3 if "transitivity" in studies else 2
    model, spec, states, (x, y) = comb.zoo_models(args.arch, n_models, dataset=args.dataset, epochs=args.epochs,
                                                  progress=not args.no_progress, **arch_kwargs)
    if args.examples:
        x, y = x[:args.examples], y[:args.examples]
    data = (x, y)
    out.mkdir(parents=True, exist_ok=True)
    perms = comb.align(spec, states[0], states[1], seed=args.seed)
    n = 8 if args.quick else args.n
    dists = args.distributions or (["uniform", "bernoulli(0.5)"] if args.quick else list(comb.DEFAULT_DISTRIBUTIONS))
    sections, report, pngs = [], {"args": vars(args) | {"func": None}}, []
    for name in studies:
        if name == "combinability":
            md, d, p = comb.combinability_section(model, spec, states[0], states[1], data, out, perms=perms, n=n,
                                                  distributions=dists, seed=args.seed, eps=args.eps,
                                                  progress=not args.no_progress,
                                                  **({"granularities": args.granularities} if args.granularities else {}))
        elif name == "transitivity":
            md, d, p = trans.transitivity_section(model, spec, *states[:3], data, out, seed=args.seed)
        elif name == "robustness":
            md, d, p = rob.robustness_section(model, spec, states[0], states[1], data, out, perms=perms, n=n,
                                              seed=args.seed)
        else:
            md, d, p = sim.similarity_section(model, spec, states[0], states[1], data, out, perms=perms,
                                              n=max(2, min(n, 16)), seed=args.seed)
        sections.append(md)
        report[name] = d
        pngs += p
        print(md)
    atomic_write_text(out / "combine.json", json.dumps(report, indent=1, default=str))
    atomic_write_text(out / "combine.md", "# Mode combinability\n\n" + "\n".join(sections))
    print(f"wrote {out / 'combine.json'}, {out / 'combine.md'}, " + ", ".join(str(p) for p in pngs))
    return 0


def register(sub) -> None:
    p = sub.add_parser("combine", help="mode combinability studies: combinations λ⊙θ_A+(1−λ)⊙θ_B, naive vs aligned",
                       description="Train zoo models (cached), align them by weight matching, and run the "
                                   "combinability, transitivity, robustness and similarity studies.")
    p.add_argument("--studies", nargs="+", choices=STUDIES, help="default: all four")
    p.add_argument("--arch", default="mlp", choices=["mlp", "vgg", "resnet20", "transformer"])
    p.add_argument("--width", type=_common.int_at_least(1), default=128, help="MLP hidden width")
    p.add_argument("--depth", type=_common.int_at_least(1), default=3, help="MLP hidden layers")
    p.add_argument("--arch-kwargs", default="", help="extra zoo kwargs as JSON")
    p.add_argument("--dataset", default="mnist1d", choices=["mnist1d", "digits"])
    p.add_argument("--epochs", type=_common.int_at_least(1), default=10, help="training epochs (cached)")
    p.add_argument("--examples", type=_common.int_at_least(0), default=0, help="evaluate on the first N test examples (0: all)")
    p.add_argument("--n", type=_common.int_at_least(1), default=32, help="combinations per distribution x granularity")
    p.add_argument("--distributions", nargs="+", help="e.g. uniform 'uniform(-0.25,1.25)' bernoulli(0.5) beta(0.5,0.5)")
    p.add_argument("--granularities", nargs="+", choices=["element", "neuron", "layer", "global"])
    p.add_argument("--eps", type=_common.finite_float(0), default=0.05, help="'within ε of the endpoints' mean' threshold")
    p.add_argument("--seed", type=_common.SEED, default=0, help="coefficient and matching seed")
    p.add_argument("--threads", type=_common.int_at_least(0), default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="8 combinations, two distributions")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="out/combine", help="output folder")
    p.set_defaults(func=run)
