"""Nested permutations in matching, measured in one run:

1. nested vs shared GQA spec on a noisy pair: a LLaMA with GQA built from a local config (random init),
   B = (A + noise x each tensor's std) with a planted *nested* perm (query heads and value dims drawn
   per KV group). Weight matching with the traced shared-head spec (one query-head perm and one value-
   dim perm for every group) and with the nested spec; reported: the final objective Σ<A, π(B)>, the
   objective at the planted perm, and the share of query heads / value dims (flat, over all groups)
   and of all perms matched as planted.
   `gain_share`: (objective - objective at the identity) / (objective at the planted perm - at the identity).
   The same pairs by activation matching (`gqa_noisy_activation`, 4096 random tokens).
2. The family solver's lazy bounds on MoE-sized families (E experts of m hidden units): inner LAPs
   solved and time against solving all E² inner LAPs, same optimum checked.

    PYTHONPATH=$PWD python benchmarks/nested_matching.py [--seeds 3] [--out benchmarks/results/nested_matching.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import pyrebasin as prb
from pyrebasin.fileio import atomic_write_text
from pyrebasin.matching.lap import solve_lap
from pyrebasin.matching.nested import solve_family
from pyrebasin.spec import PermutationSpec


def llama(hidden=64, heads=8, kv=2, layers=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                        max_position_embeddings=16)).eval()


def nested_form(spec: PermutationSpec) -> PermutationSpec:
    """The traced spec with `group_heads` and `vo` nested under `heads` (the trace's own map if it has one)."""
    if spec.nested:
        return spec
    names = set(spec.perm_names)
    nested = {p: p.rsplit(".", 1)[0] + ".heads" for p in names
              if p.endswith((".self_attn.group_heads", ".self_attn.vo")) and p.rsplit(".", 1)[0] + ".heads" in names}
    return PermutationSpec(spec.axes_to_perm, spec.fixed_reasons, nested)


def shared_form(spec: PermutationSpec) -> PermutationSpec:
    return PermutationSpec(spec.axes_to_perm, spec.fixed_reasons)


def flat(perms, outer: str, inner: str, k: int, nested: bool) -> torch.Tensor:
    """A per-group perm as one flat perm over K·m units (a shared perm applied to every group)."""
    p = perms[inner]
    if nested:   # already flat
        return p
    m = p.numel()
    return (perms[outer].view(k, 1) * m + p.view(1, m)).reshape(-1)


def noisy_planted(seed: int, noise: float, **model_kwargs):
    """A tiny LLaMA A, its nested and shared traced specs, and a nested plant of A + noise·std (B before
    permuting): (model, nested spec, shared spec, state A, noisy A, planted perms)."""
    model = llama(seed=seed, **model_kwargs)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
    traced = prb.trace_spec(model, ids)
    nspec, sspec = nested_form(traced), shared_form(traced)
    a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1000 + seed)
    noisy = {k: v + noise * v.std() * torch.randn(v.shape, generator=g) if v.numel() > 1 else v.clone()
             for k, v in a.items()}
    planted = prb.random_permutation(nspec, a, 7 + seed)
    return model, nspec, sspec, a, noisy, planted


def gqa_case(seed: int, noise: float, model_kwargs) -> dict:
    model, nspec, sspec, a, noisy, planted = noisy_planted(seed, noise, **model_kwargs)
    b = prb.apply_permutation(nspec, planted, noisy)
    truth = prb.invert_permutation(planted)
    k = model.config.num_key_value_heads
    permuted = [t for t in a if t not in set(nspec.fixed)]

    def objective(perms):
        aligned = prb.apply_permutation(nspec, perms, b)
        return sum(float((a[t].double() * aligned[t].double()).sum()) for t in permuted)
    out = {"seed": seed, "noise": noise, "objective_identity": objective(prb.identity_permutation(nspec, a)),
           "objective_planted": objective(truth)}
    for name, spec in (("shared", sspec), ("nested", nspec)):
        t = time.perf_counter()
        res = prb.weight_matching(spec, a, b)
        sec = time.perf_counter() - t
        hits = {"query_heads": [], "value_dims": []}
        for q, kind in [(p, "query_heads") for p in nspec.nested if p.endswith("group_heads")] + \
                       [(p, "value_dims") for p in nspec.nested if p.endswith(".vo")]:
            outer = nspec.nested[q]
            hits[kind].append(float((flat(res.perms, outer, q, k, name == "nested") == truth[q]).double().mean()))
        exact = [p for p in truth if p in res.perms and torch.equal(res.perms[p], truth[p])]
        out[name] = {"objective": res.objective[-1], "seconds": round(sec, 3),
                     "gain_share": (res.objective[-1] - out["objective_identity"])
                     / (out["objective_planted"] - out["objective_identity"]),
                     "query_heads_matched": sum(hits["query_heads"]) / len(hits["query_heads"]),
                     "value_dims_matched": sum(hits["value_dims"]) / len(hits["value_dims"]),
                     "perms_exact": f"{len(exact)}/{len(res.perms)}"}
    return out


def gqa_activation_case(seed: int, noise: float) -> dict:
    """As `gqa_case`, by activation matching on 4096 random tokens (objective: Σ matched correlations)."""
    model, nspec, sspec, a, noisy, planted = noisy_planted(seed, noise)
    model_b = llama(seed=seed)
    model_b.load_state_dict(prb.apply_permutation(nspec, planted, noisy))
    truth = prb.invert_permutation(planted)
    tokens = torch.randint(0, 64, (256, 16), generator=torch.Generator().manual_seed(seed))
    k = model.config.num_key_value_heads
    out = {"seed": seed, "noise": noise}
    for name, spec in (("shared", sspec), ("nested", nspec)):
        t = time.perf_counter()
        res = prb.activation_matching(model, model_b, spec, tokens, batch_size=64)
        sec = time.perf_counter() - t
        heads = [float((flat(res.perms, nspec.nested[q], q, k, name == "nested") == truth[q]).double().mean())
                 for q in nspec.nested if q.endswith("group_heads")]
        vdims = [float((flat(res.perms, nspec.nested[q], q, k, name == "nested") == truth[q]).double().mean())
                 for q in nspec.nested if q.endswith(".vo")]
        exact = [p for p in truth if p in res.perms and torch.equal(res.perms[p], truth[p])]
        out[name] = {"objective": res.objective[-1], "seconds": round(sec, 3),
                     "query_heads_matched": sum(heads) / len(heads), "value_dims_matched": sum(vdims) / len(vdims),
                     "perms_exact": f"{len(exact)}/{len(res.perms)}"}
    return out


def family_case(experts: int, m: int, signal: float, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(experts * m, 64, generator=g, dtype=torch.float64)
    spec = PermutationSpec({"w": (prb.Blocked((experts, m), ("E", "H")),)}, nested={"H": "E"})
    planted = prb.random_permutation(spec, {"w": torch.zeros(experts * m)}, seed)["H"]
    y = signal * x[planted] + torch.randn(x.shape, generator=g, dtype=torch.float64)
    cost = x @ y.T
    t = time.perf_counter()
    lazy = solve_family(None, {"H": cost}, experts)
    t_lazy = time.perf_counter() - t
    t = time.perf_counter()   # every block pair's inner LAP, then the outer LAP
    blocks = cost.view(experts, m, experts, m).permute(0, 2, 1, 3)
    val = torch.empty(experts, experts, dtype=torch.float64)
    for i in range(experts):
        for j in range(experts):
            blk = blocks[i, j].contiguous()
            val[i, j] = blk[torch.arange(m), solve_lap(blk)].sum()
    outer = solve_lap(val)
    full_value = float(val[torch.arange(experts), outer].sum())
    t_full = time.perf_counter() - t
    return {"experts": experts, "m": m, "signal": signal, "inner_solves": lazy.inner_solves,
            "inner_possible": lazy.inner_possible, "outer_solves": lazy.outer_solves,
            "seconds_lazy": round(t_lazy, 3), "seconds_all_pairs": round(t_full, 3),
            "same_optimum": abs(lazy.value - full_value) <= 1e-9 * abs(full_value),
            "recovered": bool(torch.equal(lazy.children["H"], torch.argsort(planted)))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--noise", default="0,0.3,1,2,4")
    ap.add_argument("--only", choices=["gqa", "family"], default=None)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "nested_matching.json"))
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    gqa = []
    for noise in [float(v) for v in args.noise.split(",")] if args.only != "family" else []:
        for seed in range(args.seeds):
            r = gqa_case(seed, noise, {})
            gqa.append(r)
            print(json.dumps(r))
    activation = []
    for noise in (0.0, 0.3, 1.0) if args.only != "family" else ():
        for seed in range(args.seeds):
            r = gqa_activation_case(seed, noise)
            activation.append(r)
            print(json.dumps(r))
    family = []
    for experts, m in ((8, 256), (8, 512), (16, 256)) if args.only != "gqa" else ():
        for signal in (1.0, 0.3, 0.0):
            r = family_case(experts, m, signal)
            family.append(r)
            print(json.dumps(r))
    load = os.getloadavg()[0]
    atomic_write_text(args.out, json.dumps({"load_1min": load, "threads": torch.get_num_threads(),
                                            "gqa_noisy": gqa, "gqa_noisy_activation": activation,
                                            "family_solver": family}, indent=1))
    print(f"wrote {args.out} (load {load:.1f})")


if __name__ == "__main__":
    main()
