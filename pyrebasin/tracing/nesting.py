"""Which traced groups may be *nested* under another (`PermutationSpec.nested`): per-KV-head query
heads and value dims in GQA, per-head within-head dims, each stacked expert's hidden units.

The rules make every op equivariant under an independent permutation of each class. A class g may
instead be permuted independently within each unit of another class Q (a block-following perm of
the product Q x g) when, in the traced graph:

1. every tensor that holds g also holds Q exactly once (graph values and state alike); a tensor
   gathered by an index tensor whose values point into Q (`w[ids]`, the experts a router picked)
   holds Q through the index axes, when it holds all of them;
2. no op mixes along Q while keeping g apart: no op drops Q from its inputs to its outputs while
   g survives (a contraction, a reduction, a gather over Q), and no op that mixes internally
   (softmax, norms, contractions; `Engine.mixing`) mixes along Q but not along g;
3. nothing points into g (top-k over g), and on every state tensor Q comes before g (the spec
   states the inner slot after its outer one).

Then every op maps a block-following perm of its inputs to the same perm of its outputs: pointwise
ops and reshapes act per (Q, g) pair, and every contraction over g happens per unit of Q. The outer
class must not be nested itself (one level); among several candidates the first is taken.
"""
from __future__ import annotations

from collections import Counter

from .engine import Engine, Multi, hashable


def nested_groups(E: Engine, names: dict[int, str]) -> dict[str, str]:
    """nested[name of g] = name of Q for every group class g that may be nested (rules above)."""
    A = E.A
    groups = list(names)
    gset = set(groups)

    def leaves(axes) -> list[int]:
        return [A.find(lf) for atoms in axes if atoms is not None for a in atoms
                for lf in A.leaves(a) if A.size[lf] > 1]

    carriers = []
    for ids, target in E.carriers:
        t, i = set(leaves([target])), set(leaves(ids))
        if len(t) == 1 and i:
            carriers.append((i, next(iter(t))))

    def counted(axes) -> Counter:
        n = Counter(leaves(axes))
        for idx, q in carriers:
            if q not in n and all(x in n for x in idx):
                n[q] = 1
        return n

    def values(v) -> list:
        got = E.vals.get(v) if hashable(v) else None
        if isinstance(got, Multi):
            return [x for x in got if x is not None]
        return [got] if got is not None else []

    cand: dict[int, set[int]] = {}
    bad: set[tuple[int, int]] = set()

    def holds(n: Counter) -> None:
        once = {q for q, k in n.items() if k == 1 and q in gset}
        for g in n:
            if g in gset:
                cand[g] = (cand[g] & once if g in cand else once) - {g}

    for axes in list(E.vals.values()) + list(E.params.values()):
        for item in (axes if isinstance(axes, Multi) else [axes]):
            if item is not None:
                holds(counted(item))
    for key, axes in E.params.items():      # 3: Q before g on every state tensor
        order = leaves(axes)
        for g in set(order) & gset:
            for q in list(cand.get(g, ())):
                if order.index(q) > order.index(g):
                    bad.add((g, q))
    for target in E.pointers.values():      # 3: nothing points into g
        for g in leaves([target]):
            cand[g] = set()
    for c in E.g.calls:                      # 2: ops dropping Q while g survives
        try:
            ins = [counted(a) for a in E.tensor_args(c)]
        except Exception:                    # an input no rule described: no nesting through it
            return {}
        outs = [counted(a) for a in values(c.out)]
        have_in = set().union(*ins) if ins else set()
        have_out = set().union(*outs) if outs else set()
        for q in (have_in - have_out) & gset:
            bad.update((g, q) for g in have_out)
    for out, axes in E.mixes:                # 2: ops mixing along Q but not along g
        mixed = set(counted(axes))
        present = set().union(*[set(counted(a)) for a in values(out)], mixed)
        bad.update((g, q) for q in mixed & gset for g in present - mixed)
    nested: dict[str, str] = {}
    outers: set[int] = set()
    for g in groups:
        ok = [q for q in groups if q in cand.get(g, ()) and (g, q) not in bad]
        ok = [q for q in ok if names[q] not in nested]
        if not ok or g in outers:
            continue
        roots = [q for q in ok if not cand.get(q)]
        q = (roots or ok)[0]
        nested[names[g]] = names[q]
        outers.add(q)
    return nested
