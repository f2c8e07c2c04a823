"""`pyrebasin combine`: the mode combinability studies on trained zoo models, or on two checkpoints (any
model, causal LMs on token data included); writes JSON, Markdown, PNG."""
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
    _common.check_outputs({"--out": out / "combine.json", "--out (md)": out / "combine.md"},
                          {"--a": args.a, "--b": args.b, "--data": args.data})
    if args.threads:
        torch.set_num_threads(args.threads)
    studies = args.studies or list(STUDIES)
    if args.a or args.b:
        model, spec, states, data = _checkpoint_pair(args, studies)
    else:
        arch_kwargs = parse_kwargs(args.arch_kwargs)
        if args.arch == "mlp":
            arch_kwargs = {"width": args.width, "depth": args.depth, **arch_kwargs}
        n_models = 3 if "transitivity" in studies else 2
        model, spec, states, data = comb.zoo_models(args.arch, n_models, dataset=args.dataset, epochs=args.epochs,
                                                    progress=not args.no_progress, **arch_kwargs)
    if args.examples:
        data = {k: v[:args.examples] for k, v in data.items()} if isinstance(data, dict) else \
            data[:args.examples] if _common.is_token_split(data) else (data[0][:args.examples], data[1][:args.examples])
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
    if _common.is_token_split(data):   # a causal LM: next-token loss, so perplexity = exp(loss)
        from ..combine import evaluate_combinations
        from ..lm import perplexity

        ends = evaluate_combinations(model, states[0], states[1], [1.0, 0.0], data)
        report["lm"] = {"objective": "next-token", "perplexity_a": perplexity(float(ends.loss[0])),
                        "perplexity_b": perplexity(float(ends.loss[1]))}
        print(f"perplexity A {report['lm']['perplexity_a']:.3f}, B {report['lm']['perplexity_b']:.3f} "
              "(combinations: loss = mean next-token cross-entropy, perplexity = exp(loss))")
    atomic_write_text(out / "combine.json", json.dumps(report, indent=1, default=str))
    atomic_write_text(out / "combine.md", "# Mode combinability\n\n" + "\n".join(sections))
    print(f"wrote {out / 'combine.json'}, {out / 'combine.md'}, " + ", ".join(str(p) for p in pngs))
    return 0


def _checkpoint_pair(args, studies):
    """(model, spec, [state_a, state_b], data) of --a/--b checkpoints: the model from --hf-config or
    --factory, the data from --data (a token file for a causal LM, or an x/y file), the spec traced."""
    from ..io import load_state, model_from_factory, parse_kwargs
    from ..module_state import check_state

    if not (args.a and args.b):
        raise ValueError("give both --a and --b (two checkpoints), or neither (train zoo models)")
    if "transitivity" in studies:
        raise ValueError("the transitivity study needs three models; with --a/--b choose among "
                         "combinability, robustness, similarity (--studies)")
    if not args.data:
        raise ValueError("--a/--b need --data (a token file for a language model, or a .pt with x_train/y_train)")
    pair = _common.directory_pair(args.a, args.b)
    if pair is not None:   # Hugging Face model directories: the model comes from A's config
        model, states = pair[0], [pair[1], pair[2]]
    else:
        if bool(args.hf_config) == bool(args.factory):
            raise ValueError("with --a/--b give exactly one of --hf-config (a Hugging Face config) or --factory "
                             "(module:factory), or two model directories")
        model = _common.hf_from_config(args.hf_config) if args.hf_config else \
            model_from_factory(args.factory, parse_kwargs(args.arch_kwargs))
        states = []
        for flag, path in (("--a", args.a), ("--b", args.b)):
            state = load_state(path)
            check_state(model, state, f"{flag} {path}")
            states.append(state)
    splits = _common.check_data(model, states[0], _common.load_splits(args.data, args.samples, seq_len=args.seq_len),
                                f"--data {args.data}")
    data = splits.get("test", splits["train"])
    return model, _common.spec_of(model, _common.inputs_of(data)), states, data


def register(sub) -> None:
    p = sub.add_parser("combine", help="mode combinability studies: combinations λ⊙θ_A+(1−λ)⊙θ_B, naive vs aligned",
                       description="Train zoo models (cached), align them by weight matching, and run the "
                                   "combinability, transitivity, robustness and similarity studies.")
    p.add_argument("--studies", nargs="+", choices=STUDIES, help="default: all four (three with --a/--b)")
    p.add_argument("--a", default=None, help="checkpoint or Hugging Face model directory of model A (with --b: "
                   "study these instead of zoo models)")
    p.add_argument("--b", default=None, help="checkpoint or model directory of model B")
    p.add_argument("--hf-config", default=None, help="with --a/--b: a Hugging Face causal LM config (read locally)")
    p.add_argument("--factory", default=None, help="with --a/--b: module:factory building the model")
    p.add_argument("--data", default=None,
                   help="with --a/--b: token file (.pt/.safetensors ids or UTF-8 text, byte-level) or a "
                        ".pt/.safetensors with x_train, y_train[, x_test, y_test]")
    p.add_argument("--seq-len", type=_common.int_at_least(2), default=128, help="tokens per sequence of a text --data")
    p.add_argument("--samples", type=_common.int_at_least(1), default=2000, help="train rows / token sequences used")
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
