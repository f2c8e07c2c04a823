"""Shape rules of `trace_spec`: reshape/view (atoms split into common factors), transpose/permute,
expand/repeat, split/chunk and cat/stack (equal pieces become a frozen block factor), slicing and
indexing (frozen where they pick part of an axis)."""
from __future__ import annotations

from collections.abc import Hashable

from .engine import Axes, Call, Engine, Multi
from .registry import rule, rule_for
from .rules import unary


# --- shape ops -----------------------------------------------------------------------------------
@rule("view", "_unsafe_view", "reshape", "view_as", "reshape_as", "flatten", "unflatten",
      "squeeze", "squeeze_", "unsqueeze", "unsqueeze_", "ravel", "view_copy", "atleast_2d")
def reshape(E: Engine, c: Call) -> None:
    """Row-major regrouping: output axes are products of the input's factors (splitting atoms into
    finer factors where needed: (B, T, D) -> (B, T, heads, head_dim) refines D)."""
    x = E.ax(c.arg(0, "self"))
    shape = E.out_shape(c)
    out = [[E.A.new(s)] for s in shape]
    flat_in = [a for atoms in x for a in atoms]
    if not E.A.unify_seq(flat_in, [o[0] for o in out]):
        why = f"{c.where()} regroups axes {[E.size(a) for a in x]} -> {list(shape)} across factors"
        E.freeze(x, why)
        E.freeze(out, why)
    E.set_out(c, out)


@rule("transpose", "transpose_", "swapaxes", "swapdims", "t", "numpy_T", "mT", "permute",
      "movedim", "moveaxis", "adjoint")
def transpose(E: Engine, c: Call) -> None:
    x = E.ax(c.arg(0, "self"))
    nd = len(x)
    order = list(range(nd))
    if c.name == "permute":
        dims = c.arg(1, "dims")
        order = [d % nd for d in dims]
    elif c.name in ("movedim", "moveaxis"):
        src, dst = c.arg(1, "source"), c.arg(2, "destination")
        src, dst = ([src], [dst]) if isinstance(src, int) else (list(src), list(dst))
        src, dst = [s % nd for s in src], [d % nd for d in dst]
        rest = [i for i in range(nd) if i not in src]
        order = [None] * nd
        for s, d in zip(src, dst):
            order[d] = s
        it = iter(rest)
        order = [o if o is not None else next(it) for o in order]
    elif nd >= 2:
        if c.name in ("t", "numpy_T") and nd == 2:
            d0, d1 = 0, 1
        elif c.name in ("mT", "adjoint"):
            d0, d1 = nd - 2, nd - 1
        else:
            d0, d1 = c.arg(1, "dim0") % nd, c.arg(2, "dim1") % nd
        order[d0], order[d1] = order[d1], order[d0]
    E.set_out(c, [x[i] for i in order])


@rule("expand", "expand_as", "broadcast_to", "expand_copy")
def expand(E: Engine, c: Call) -> None:
    """Expanded axes hold identical copies: any permutation of them is harmless (fresh atoms)."""
    x = E.ax(c.arg(0, "self"))
    shape = E.out_shape(c)
    off = len(shape) - len(x)
    out = [[E.A.new(s)] for s in shape[:off]]
    for i, atoms in enumerate(x):
        out.append(atoms if E.size(atoms) == shape[off + i] else [E.A.new(shape[off + i])])
    E.set_out(c, out)


@rule("repeat", "tile")
def repeat(E: Engine, c: Call) -> None:
    """repeat(r) along an axis of atoms A gives (r, A) row-major: a copy factor, then A."""
    x = E.ax(c.arg(0, "self"))
    shape = E.out_shape(c)
    off = len(shape) - len(x)
    out = [[E.A.new(s)] for s in shape[:off]]
    for i, atoms in enumerate(x):
        r = shape[off + i] // max(E.size(atoms), 1)
        out.append(atoms if r == 1 else [E.A.new(r)] + atoms)
    E.set_out(c, out)


@rule("repeat_interleave")
def repeat_interleave(E: Engine, c: Call) -> None:
    x, reps, dim = E.ax(c.arg(0, "self")), c.arg(1, "repeats"), c.arg(2, "dim")
    if x is None or not isinstance(reps, int) or dim is None:
        return E.unmodelled(c)
    dim %= len(x)
    out = list(x)
    out[dim] = x[dim] + [E.A.new(reps)]  # (A, r) row-major: each unit repeated in place
    E.set_out(c, out)


def _split_axis(E: Engine, atoms: list[int], k: int, why: str) -> list[int]:
    """View an axis as (k, n/k): the k chunks are distinct roles (frozen), the rest is shared."""
    chunk, m = E.A.new(k, why), E.A.new(E.size(atoms) // k)
    E.tie(atoms, [chunk, m], why)
    return [m]


@rule("split", "split_with_sizes", "chunk", "unsafe_split", "tensor_split", "unbind", "unsafe_chunk")
def split(E: Engine, c: Call) -> None:
    """Equal chunks share one atom (the axis refines to (chunks, size), chunk index frozen);
    unequal chunks cannot be expressed: that axis is frozen."""
    x = E.ax(c.arg(0, "self"))
    shapes = E.out_shape(c)
    dim = c.arg(1, "dim", 0) if c.name == "unbind" else c.arg(2, "dim", 0)
    dim %= len(x)
    why = f"chunks of {c.where()} play different roles"
    if c.name == "unbind":
        E.freeze(x[dim], why)
        return E.set_out(c, Multi([x[:dim] + x[dim + 1:] for _ in shapes]))
    sizes = {s[dim] for s in shapes}
    outs = []
    if len(sizes) == 1 and sizes.pop() * len(shapes) == E.size(x[dim]):
        piece = _split_axis(E, x[dim], len(shapes), why)
        outs = [x[:dim] + [piece] + x[dim + 1:] for _ in shapes]
    else:
        E.freeze(x[dim], f"unequal split in {c.where()}")
        outs = [x[:dim] + [[E.A.new(s[dim], why)]] + x[dim + 1:] for s in shapes]
    E.set_out(c, Multi(outs))


@rule("cat", "concat", "concatenate", "stack", "hstack", "vstack")
def cat(E: Engine, c: Call) -> None:
    """cat of equal-size pieces is (pieces, size) row-major with a frozen piece index; unequal
    pieces are frozen along the cat axis. Other axes are shared by all pieces."""
    ts = [E.ax(t) for t in c.arg(0, "tensors")]
    shape = E.out_shape(c)
    if any(t is None for t in ts):
        return E.unmodelled(c)
    ts = [t for t in ts if not (len(t) == 1 and E.size(t[0]) == 0)]  # legacy empty tensors
    dim = c.arg(1, "dim", 0) % len(shape)
    why = f"pieces of {c.where()} play different roles"
    stack = c.name == "stack"
    base = ts[0]
    for t in ts[1:]:
        for i in range(len(base)):
            if stack or i != dim:
                E.tie(base[i], t[i], f"pieces of {c.where()}")
    if stack:
        out = base[:dim] + [[E.A.new(len(ts), why)]] + base[dim:]
    else:
        sizes = {E.size(t[dim]) for t in ts}
        if len(sizes) == 1:
            for t in ts[1:]:
                E.tie(base[dim], t[dim], f"pieces of {c.where()}")
            out = base[:dim] + [[E.A.new(len(ts), why)] + base[dim]] + base[dim + 1:]
        else:
            for t in ts:
                E.freeze(t[dim], f"unequal pieces of {c.where()}")
            out = base[:dim] + [[E.A.new(shape[dim], why)]] + base[dim + 1:]
    E.set_out(c, out)


@rule("select", "select_copy")
def select(E: Engine, c: Call) -> None:
    x = E.ax(c.arg(0, "self"))
    dim = c.arg(1, "dim") % len(x)
    E.freeze(x[dim], f"{c.where()} picks one index of the axis")
    E.set_out(c, x[:dim] + x[dim + 1:])


def _aligned_piece(E: Engine, atoms: list[int], start, stop, step, why: str) -> list[int] | None:
    """atoms[start:stop] when it is one of k equal pieces of the axis (its start a multiple of its
    size; a fused q|k|v projection sliced apart): the axis is viewed as (k, size) with the piece
    index frozen and one atom shared by all pieces, as split/chunk do. None otherwise."""
    if step not in (None, 1) or not all(v is None or isinstance(v, int) for v in (start, stop)):
        return None
    n = E.size(atoms)
    start, stop, _ = slice(start, stop).indices(n)
    m = stop - start
    if m <= 0 or n % m or start % m:
        return None
    return _split_axis(E, atoms, n // m, why)


@rule("slice", "narrow", "slice_copy")
def slice_(E: Engine, c: Call) -> None:
    """A full slice is the identity; an aligned equal piece shares one atom with the other pieces
    (`_aligned_piece`); any other sub-range freezes the axis."""
    x = E.ax(c.arg(0, "self"))
    shape = E.out_shape(c)
    dim = c.arg(1, "dim", 0) % len(x)
    if shape[dim] == E.size(x[dim]) and (c.name != "slice" or c.arg(4, "step", 1) in (None, 1)):
        return E.set_out(c, list(x))  # full slice: the identity
    if c.name == "narrow":
        start, length = c.arg(2, "start"), c.arg(3, "length")
        bounds = (start, start + length if isinstance(start, int) and isinstance(length, int) else None, 1)
    else:
        bounds = (c.arg(2, "start"), c.arg(3, "end"), c.arg(4, "step", 1))
    piece = _aligned_piece(E, x[dim], *bounds, f"pieces of {c.where()} play different roles")
    if piece is not None and E.size(piece) == shape[dim]:
        return E.set_out(c, x[:dim] + [piece] + x[dim + 1:])
    why = f"{c.where()} keeps a sub-range of the axis"
    E.freeze(x[dim], why)
    E.set_out(c, x[:dim] + [[E.A.new(shape[dim], why)]] + x[dim + 1:])


@rule("flip", "roll", "fliplr", "flipud")
def flip(E: Engine, c: Call) -> None:
    x = E.ax(c.arg(0, "self"))
    E.freeze(x, f"{c.where()} reorders positions")
    E.set_out(c, list(x))


@rule("constant_pad_nd", "pad")
def pad(E: Engine, c: Call) -> None:
    x = E.ax(c.arg(0, "self"))
    padding = list(c.arg(1, "pad"))
    k = len(padding) // 2
    why = f"{c.where()} pads the axis"
    for d in range(len(x) - k, len(x)):
        E.freeze(x[d], why)
    E.set_out(c, x[:len(x) - k] + E.fresh(E.out_shape(c)[len(x) - k:], why))


@rule("index", "index_select", "gather", "take", "take_along_dim", "masked_select", "nonzero",
      "index_put", "index_put_", "scatter", "scatter_", "scatter_add", "index_add", "index_copy")
def indexing(E: Engine, c: Call) -> None:
    """Data-dependent indexing: the indexed tensor and the result are frozen (conservative), except
    `w[ids]` with `ids` an index tensor into a permutable axis (`Engine.pointers`, e.g. the experts a
    router picked): w's first axis is that axis, the rest passes (permuting both keeps w[ids])."""
    if c.name == "index" and _pointer_index(E, c):
        return None
    for p in _flat(c.arg(1, "indices")):  # index tensors read some other way: their axis is frozen
        if isinstance(p, Hashable) and p in E.pointers:
            E.freeze([E.pointers[p]], f"indices into the axis are used by {c.where()}")
    for axes in E.tensor_args(c):
        E.freeze(axes, f"indexed by {c.where()}")
    E.fresh_out(c, f"indexed by {c.where()}")


def _flat(x) -> list:
    return [z for y in x for z in _flat(y)] if isinstance(x, (list, tuple)) else [x]


def _pointer_index(E: Engine, c: Call) -> bool:
    """`w[ids]` (aten.index(w, [ids]), or fx getitem(w, ids)) with `ids` an index tensor."""
    x, idx = E.ax(c.arg(0, "self")), c.arg(1, "indices")
    if isinstance(idx, (list, tuple)) and len(idx) == 1:
        idx = idx[0]
    if x is None or isinstance(idx, (list, tuple)):
        return False
    p = idx
    target = E.pointers.get(p) if isinstance(p, Hashable) else None
    shape = E.out_shape(c)
    if target is None or E.size(target) != E.size(x[0]) or not isinstance(shape, tuple):
        return False
    ids = E.ax(p)
    if shape != tuple(E.size(a) for a in list(ids) + x[1:]):
        return False
    E.tie(x[0], target, f"units picked by index in {c.where()}")
    E.carriers.append((list(ids), x[0]))
    for a in x[0]:  # names: the experts, and (weakly: a residual axis keeps its own) their units
        E.A.hint(a, c.path if c.path.rpartition(".")[2] == "experts" else f"{c.path}.experts", 3)
    for atoms in x[1:]:
        for a in atoms:
            E.A.hint(a, f"{c.path}.hidden", 0.75)
    E.set_out(c, list(ids) + x[1:])
    return True


@rule("getitem")
def getitem(E: Engine, c: Call) -> None:
    src, idx = c.args[0], c.args[1]
    multi = E.vals.get(src) if not isinstance(src, str) else None
    if isinstance(multi, Multi):
        if multi[idx] is not None:
            E.vals[c.out] = multi[idx]
        return
    x = E.ax(src)
    if x is None:
        return None if not E.tensor_args(c) else E.unmodelled(c)
    if _pointer_index(E, c):
        return None
    _tensor_getitem(E, c, x, idx)


def _tensor_getitem(E: Engine, c: Call, x: Axes, idx) -> None:
    """x[idx] as written in Python (fx graphs): ints select, slices narrow, None adds an axis."""
    shape = E.out_shape(c)
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in idx):
        return indexing(E, c)
    n_real = sum(1 for i in idx if isinstance(i, (int, slice)))
    out, p = [], 0
    why = f"{c.where()} selects part of the axis"
    for i in idx:
        if i is None:
            out.append([E.A.new(1)])
        elif i is Ellipsis:
            k = len(x) - n_real
            out.extend(x[p:p + k])
            p += k
        elif isinstance(i, int):
            E.freeze(x[p], why)
            p += 1
        else:
            n = E.size(x[p])
            static = all(v is None or isinstance(v, int) for v in (i.start, i.stop, i.step))
            full = i == slice(None) or (static and slice(*i.indices(n)) == slice(0, n, 1))
            piece = None  # bounds computed in the graph (fx proxies) are unknown here: frozen
            if static and not full:
                piece = _aligned_piece(E, x[p], i.start, i.stop, i.step,
                                       f"pieces of {c.where()} play different roles")
            if full:
                out.append(x[p])
            elif piece is not None:
                out.append(piece)
            else:
                E.freeze(x[p], why)
                out.append(None)
            p += 1
    out.extend(x[p:])
    if len(out) != len(shape):
        return indexing(E, c)
    E.set_out(c, [o if o is not None else [E.A.new(s, why)] for o, s in zip(out, shape)])


@rule("glu")
def glu(E: Engine, c: Call) -> None:
    """glu(x, dim) = a * sigmoid(b) for the two halves: (2, n/2) blocked, the half index frozen."""
    x = E.ax(c.arg(0, "self"))
    dim = c.arg(1, "dim", -1) % len(x)
    half = _split_axis(E, x[dim], 2, f"halves of {c.where()} play different roles")
    E.set_out(c, x[:dim] + [half] + x[dim + 1:])


_METADATA = ("shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout", "is_sparse",
             "names", "grad_fn", "is_leaf")


@rule("getattr")
def getattr_(E: Engine, c: Call) -> None:
    """fx records `x.shape` / `x.T` as getattr calls: metadata needs nothing, views get rules."""
    attr = c.args[1] if len(c.args) > 1 else None
    src = E.vals.get(c.args[0]) if isinstance(c.args[0], Hashable) else None
    if isinstance(src, Multi) and attr in ("values", "indices"):  # torch.max(x, dim) fields
        E.vals[c.out] = src[0 if attr == "values" else 1]
        return None
    if attr in _METADATA or E.ax(c.args[0]) is None:
        return None
    if attr in ("T", "mT", "mH", "H"):
        return rule_for("numpy_T" if attr == "T" else "mT")(E, c)
    if attr in ("real", "data"):
        return unary(E, c)
    return E.unmodelled(c)


@rule("tuple")
def tuple_(E: Engine, c: Call) -> None:
    """The outputs of an inlined region (no_grad / autocast), read back by getitem."""
    E.vals[c.out] = Multi(E.ax(v) for v in c.args[0])
