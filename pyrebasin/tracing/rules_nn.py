"""Layer rules of `trace_spec`: linear/matmul/einsum, convolutions (groups, depthwise), norms,
embeddings, pooling and scaled-dot-product attention (heads, within-head dims, GQA)."""
from __future__ import annotations

import re

from .engine import Call, Engine, Multi
from .registry import rule, rule_pattern
from .rules import UNIFORM_MAKERS

OUT_HINT, HEAD_HINT = 1, 3  # name priorities: attention roles beat "output of layer X"


def _hint_out(E: Engine, atoms: list[int], path: str, role: str = "out", prio: int = OUT_HINT):
    for i, a in enumerate(atoms):
        E.A.hint(a, f"{path}.{role}" if len(atoms) == 1 else f"{path}.{role}{i}", prio)


@rule("linear")
def linear(E: Engine, c: Call) -> None:
    """y = x W^T + b: x's last axis is W's input axis, y's last axis W's output axis (= b)."""
    x, w, b = E.ax(c.arg(0, "input")), E.ax(c.arg(1, "weight")), E.ax(c.arg(2, "bias"))
    if len(w) != 2:
        return E.unmodelled(c)
    E.tie(x[-1], w[1], f"input features of {c.where()}")
    E.mixing(c, [x[-1]])
    if b is not None:
        E.tie(w[0], b[0], f"bias of {c.where()}")
    _hint_out(E, w[0], c.path)
    E.set_out(c, x[:-1] + [w[0]])


@rule("matmul", "mm", "bmm", "addmm", "baddbmm", "addbmm", "dot", "mv", "addmv", "vdot", "inner")
def matmul(E: Engine, c: Call) -> None:
    """Contracted axes share a permutation; batch axes broadcast; addmm/baddbmm add a bias."""
    off = 1 if c.name in ("addmm", "baddbmm", "addmv") else 0
    a, b = E.ax(c.arg(off, "self" if not off else "mat1")), E.ax(c.arg(off + 1, "mat2"))
    if a is None or b is None:
        return E.unmodelled(c)
    a1, b1 = len(a) == 1, len(b) == 1
    a2 = [[E.A.new(1)]] + a if a1 else a
    b2 = b + [[E.A.new(1)]] if b1 else b
    E.tie(a2[-1], b2[-2], f"contracted axis of {c.where()}")
    E.mixing(c, [a2[-1]])
    shape = E.g.shape(c.out)
    nb = len(shape) - (0 if a1 else 1) - (0 if b1 else 1)
    batch: list = [None] * nb
    for ops in (a2[:-2], b2[:-2]):
        for i, atoms in enumerate(ops):
            j = nb - len(ops) + i
            if j < 0 or E.size(atoms) != shape[j]:
                continue
            if batch[j] is None:
                batch[j] = atoms
            else:
                E.tie(batch[j], atoms, f"batch axis of {c.where()}")
    batch = [x if x is not None else [E.A.new(s)] for x, s in zip(batch, shape[:nb])]
    out = batch + ([] if a1 else [a2[-2]]) + ([] if b1 else [b2[-1]])
    if off:  # bias added to the product (broadcast from the right)
        bias = E.ax(c.arg(0, "self"))
        for i, atoms in enumerate(bias):
            j = len(out) - len(bias) + i
            if E.size(atoms) == E.size(out[j]):
                E.tie(out[j], atoms, f"bias of {c.where()}")
    if not b1:  # addmm is how some layers (HF Conv1D) apply their weight
        _hint_out(E, out[-1], c.path, prio=OUT_HINT if off else 0)
    if not off and not a1 and not b1 and len(out) >= 4 and not any(
            _is_state(E, c.arg(i, n)) for i, n in ((0, "self"), (1, "mat2"))):
        # attention written by hand: the module's 1st activation matmul is q k^T, the 2nd is a v
        n = E.counters.get(c.path, 0)
        E.counters[c.path] = n + 1
        if n == 0:
            _hint_heads(E, out[-3], c.path, HEAD_HINT - 1)
            _hint_out(E, a2[-1], c.path, "qk", HEAD_HINT - 1)
        elif n == 1:
            _hint_out(E, out[-1], c.path, "vo", HEAD_HINT - 1)
    E.set_out(c, out)


def _is_state(E: Engine, v) -> bool:
    try:
        return isinstance(v, str) or v in E.g.refs
    except TypeError:
        return False


def _hint_heads(E: Engine, atoms: list[int], path: str, prio: int) -> None:
    heads = [lf for a in atoms for lf in E.A.leaves(a)]
    for i, lf in enumerate(heads):  # GQA: (kv heads, query heads within a group)
        E.A.hint(lf, f"{path}.{'heads' if i == 0 else 'group_heads'}", prio)


@rule("einsum")
def einsum(E: Engine, c: Call) -> None:
    """Equal letters share a permutation; '...' is a run of broadcast batch axes."""
    eq = c.arg(0, "equation").replace(" ", "")
    ops = c.arg(1, "tensors")
    ops = list(ops) if isinstance(ops, (list, tuple)) else list(c.args[1:])
    axes = [E.ax(t) for t in ops]
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if "->" not in eq or any(t is None for t in axes) or len(terms) != len(axes):
        return E.unmodelled(c)
    letters: dict[str, list[int]] = {}
    ell_n = max((len(ax) - len(t.replace("...", "")) for t, ax in zip(terms, axes) if "..." in t),
                default=0)
    for term, ax in zip(terms, axes):
        k = len(ax) - len(term.replace("...", ""))
        names = term.replace("...", "".join(f"#{ell_n - k + i}" for i in range(k)))
        toks = re.findall(r"#\d+|[a-zA-Z]", names)
        for tok, atoms in zip(toks, ax):
            if tok in letters and E.size(letters[tok]) == E.size(atoms):
                E.tie(letters[tok], atoms, f"index {tok!r} of {c.where()}")
            elif tok not in letters or E.size(letters[tok]) == 1:
                letters[tok] = atoms
    out_toks = re.findall(r"#\d+|[a-zA-Z]", rhs.replace("...", "".join(f"#{i}" for i in range(ell_n))))
    E.mixing(c, [atoms for t, atoms in letters.items() if t not in out_toks])
    E.set_out(c, [letters[t] for t in out_toks])


def _conv_groups(c: Call) -> tuple[int, bool]:
    if c.name == "convolution" or c.name == "_convolution":
        return int(c.arg(8, "groups", 1)), bool(c.arg(6, "transposed", False))
    if c.name.startswith("conv_transpose"):
        return int(c.arg(6, "groups", 1)), True
    return int(c.arg(6, "groups", 1)), False


@rule("conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
      "conv_transpose2d", "conv_transpose3d")
def conv(E: Engine, c: Call) -> None:
    """Channels like linear; with groups G the channel axes are (G, per-group) and the group factor
    is shared by input and output channels (depthwise: per-group size 1). Kernel windows and the
    positions they slide over are frozen."""
    x, w, b = E.ax(c.arg(0, "input")), E.ax(c.arg(1, "weight")), E.ax(c.arg(2, "bias"))
    groups, transposed = _conv_groups(c)
    k = len(w) - 2
    ch = len(x) - k - 1  # channel axis (0 when unbatched)
    shape = E.g.shape(c.out)
    w_in, w_out = (w[0], w[1]) if transposed else (w[1], w[0])
    why = f"kernel window of {c.where()}"
    E.freeze(w[2:], why)
    E.freeze(x[ch + 1:], f"positions mixed by {c.where()}")
    if groups == 1:
        E.tie(x[ch], w_in, f"input channels of {c.where()}")
        out_ch = w_out
    else:
        g = E.A.new(groups)
        E.tie(x[ch], [g] + (w_in if not transposed else [E.A.new(E.size(w_in) // groups)]),
              f"grouped input channels of {c.where()}")
        if transposed:  # weight [C_in, C_out/G, ...]: C_in = (G, C_in/G)
            E.tie(w_in, x[ch], f"grouped input channels of {c.where()}")
            out_ch = [g] + w_out
        else:
            per = E.A.new(E.size(w_out) // groups)
            E.tie(w_out, [g, per], f"grouped output channels of {c.where()}")
            out_ch = [g, per]
    if b is not None:
        E.tie(out_ch, b[0], f"bias of {c.where()}")
    if groups == 1:
        _hint_out(E, out_ch, c.path)
    else:  # (groups, per-group units)
        E.A.hint(out_ch[0], f"{c.path}.groups", OUT_HINT)
        _hint_out(E, out_ch[1:], c.path)
    E.set_out(c, x[:ch] + [out_ch] + E.fresh(shape[ch + 1:], f"positions of {c.where()}"))


def spatial(E: Engine, c: Call, k: int) -> None:
    """Pooling / upsampling / padding over the last k axes: positions frozen, channels pass."""
    x = E.ax(c.arg(0, "self"))
    shapes = E.g.shape(c.out)
    E.freeze(x[len(x) - k:], f"positions mixed by {c.where()}")
    outs = [x[:len(x) - k] + E.fresh(s[len(x) - k:], f"positions of {c.where()}")
            for s in (shapes if isinstance(shapes, list) else [shapes])]
    E.set_out(c, Multi(outs) if isinstance(shapes, list) else outs[0])


@rule_pattern(r"^(max_pool|avg_pool|adaptive_avg_pool|adaptive_max_pool|lp_pool|fractional_max_pool|max_unpool|"
              r"upsample_\w+|reflection_pad|replication_pad|_upsample_\w+)(\d)d(_with_indices)?$")
def _spatial_family(m):
    k = int(m.group(2))
    return lambda E, c: spatial(E, c, k)


BN = {"batch_norm": (1, 2, 3, 4), "_native_batch_norm_legit_no_training": (1, 2, 3, 4),
      "_native_batch_norm_legit": (1, 2, 3, 4), "native_batch_norm": (1, 2, 3, 4),
      "_native_batch_norm_legit_functional": (1, 2, 3, 4), "instance_norm": (1, 2, 3, 4),
      "cudnn_batch_norm": (1, 2, 3, 4), "_batch_norm_with_update": (1, 2, 3, 4),
      "_batch_norm_no_update": (1, 2, 3, 4)}


@rule(*BN)
def batch_norm(E: Engine, c: Call) -> None:
    """Per-channel statistics and affine: weight, bias and running stats follow the channel."""
    x = E.ax(c.arg(0, "input"))
    ch = x[1] if len(x) > 1 else x[0]
    names = ("weight", "bias", "running_mean", "running_var")
    E.mixing(c, [a for i, a in enumerate(x) if a is not ch])
    for i, name in zip(BN[c.name], names):
        p = E.ax(c.arg(i, name))
        if p is not None and len(p) == 1 and E.size(p[0]) == E.size(ch):
            E.tie(ch, p[0], f"{name} of {c.where()}")
    _norm_out(E, c, x, ch)


def _norm_out(E: Engine, c: Call, x, ch) -> None:
    shapes = E.g.shape(c.out)
    if not isinstance(shapes, list):
        return E.set_out(c, list(x))
    outs = [list(x)]
    for s in shapes[1:]:  # saved mean / rstd: per channel or per row, or empty
        if s is not None and len(s) == 1 and s[0] == E.size(ch):
            outs.append([ch])
        elif s is not None and len(s) == len(x) and all(a == E.size(b) or a == 1 for a, b in zip(s, x)):
            outs.append([b if a == E.size(b) else [E.A.new(1)] for a, b in zip(s, x)])
        else:
            outs.append(E.fresh(s, "norm statistics") if s is not None else None)
    E.set_out(c, Multi(outs))


@rule("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm")
def layer_norm(E: Engine, c: Call) -> None:
    """Normalising over the last axes is equivariant to permuting them with the elementwise affine."""
    x = E.ax(c.arg(0, "input"))
    k = len(c.arg(1, "normalized_shape"))
    for i, name in ((2, "weight"), (3, "bias")):
        if c.name in ("rms_norm", "_fused_rms_norm") and name == "bias":
            continue
        p = E.ax(c.arg(i, name))
        if p is not None:
            for d in range(k):
                E.tie(x[len(x) - k + d], p[d], f"{name} of {c.where()}")
    E.mixing(c, x[len(x) - k:])
    _norm_out(E, c, x, x[-1])


@rule("group_norm", "native_group_norm")
def group_norm(E: Engine, c: Call) -> None:
    """GroupNorm(G, C): 1 < G < C splits channels into (groups, per-group); whole groups and
    (the same) within-group permutation are both symmetries, so both factors stay permutable."""
    x = E.ax(c.arg(0, "input"))
    native = c.name == "native_group_norm"
    groups = int(c.arg(6 if native else 1, "group" if native else "num_groups"))
    ch = x[1]
    n = E.size(ch)
    if 1 < groups < n:
        atoms = [E.A.new(groups), E.A.new(n // groups)]
        E.tie(ch, atoms, f"channel groups of {c.where()}")
    E.mixing(c, x[2:] + ([[atoms[1]]] if 1 < groups < n else [ch]))
    for i, name in (((1, "weight"), (2, "bias")) if native else ((2, "weight"), (3, "bias"))):
        p = E.ax(c.arg(i, name))
        if p is not None:
            E.tie(ch, p[0], f"{name} of {c.where()}")
    _norm_out(E, c, x, ch)


@rule("embedding")
def embedding(E: Engine, c: Call) -> None:
    """Rows are looked up by index (frozen); the feature axis permutes like any unit axis."""
    w, idx = E.ax(c.arg(0, "weight")), E.ax(c.arg(1, "indices"))
    E.freeze(w[0], f"rows looked up by index in {c.where()}")
    _hint_out(E, w[1], c.path)
    E.set_out(c, list(idx) + [w[1]])


@rule("scaled_dot_product_attention", "_scaled_dot_product_attention_math",
      "_scaled_dot_product_flash_attention_for_cpu")
def sdpa(E: Engine, c: Call) -> None:
    """softmax(q k^T) v per head: q and k share the within-head axis, v and the output share
    another, heads (and batch) are shared; GQA (enable_gqa) splits q heads into (kv heads, group)."""
    q, k, v = (E.ax(c.arg(i, n)) for i, n in enumerate(("query", "key", "value")))
    mask = E.ax(c.arg(3, "attn_mask"))
    shape = E.g.shape(c.out)
    shape = shape[0] if isinstance(shape, list) else shape
    where = c.where()
    E.tie(q[-1], k[-1], f"query/key dims of {where}")
    E.tie(k[-2], v[-2], f"key/value positions of {where}")
    E.mixing(c, [k[-2], q[-1]])
    nb = len(q) - 2
    for i in range(nb):
        qi, ki, vi = q[i], k[len(k) - len(q) + i], v[len(v) - len(q) + i]
        E.tie(ki, vi, f"key/value batch axes of {where}")
        if E.size(qi) == E.size(ki):
            E.tie(qi, ki, f"batch/head axes of {where}")
        elif E.size(ki) > 1 and E.size(qi) % E.size(ki) == 0:  # GQA: q heads = (kv heads, group)
            E.tie(qi, ki + [E.A.new(E.size(qi) // E.size(ki))], f"grouped query heads of {where}")
    if nb >= 1 and len(q) >= 4:
        _hint_heads(E, q[-3], c.path, HEAD_HINT)
    _hint_out(E, q[-1], c.path, "qk", HEAD_HINT)
    _hint_out(E, v[-1], c.path, "vo", HEAD_HINT)
    if c.arg(5, "is_causal", False):
        E.freeze([q[-2], k[-2]], f"causal mask of {where} orders positions")
    if mask is not None:
        scores = q[:-1] + [k[-2]]
        for i, atoms in enumerate(mask):
            j = len(scores) - len(mask) + i
            if E.size(atoms) == E.size(scores[j]):
                E.tie(scores[j], atoms, f"attention mask of {where}")
    out = q[:-1] + [v[-1]]
    shapes = E.g.shape(c.out)
    if isinstance(shapes, list):
        return E.set_out(c, Multi([out] + [E.fresh(s, "attention statistics") if s else None
                                           for s in shapes[1:]]))
    E.set_out(c, out)



_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


@rule(*_GATES)
def rnn(E: Engine, c: Call) -> None:
    """LSTM/GRU/RNN (aten.<op>.input): each layer's hidden units are one group (both directions
    share it: the next layer reads them concatenated), gate rows are (gates, hidden) blocked with
    the gate index frozen; timesteps are ordered (frozen). h_n/c_n hold every layer's units in one
    axis, so when they are used (or h0/c0 given) with several layers, the layers share one group."""
    x, hx = E.ax(c.arg(0, "input")), c.arg(1, "hx")
    params = [E.ax(p) for p in c.arg(2, "params")]
    has_b, layers = bool(c.arg(3, "has_biases")), int(c.arg(4, "num_layers"))
    dirs = 2 if c.arg(7, "bidirectional") else 1
    batch_first = bool(c.arg(8, "batch_first"))
    per = 4 if has_b else 2
    if x is None or len(params) != layers * dirs * per or any(len(p[0]) != 1 for p in params):
        return E.unmodelled(c)  # projections (proj_size) or packed sequences: not modelled
    gates, hidden = _GATES[c.name], E.size(params[1][1])
    t_ax = (1 if batch_first else 0) if len(x) == 3 else 0
    E.freeze(x[t_ax], f"timesteps of {c.where()} are ordered")
    why = f"gates of {c.where()} play different roles"
    users = getattr(c.out, "users", {})
    states_used = any(u.args[1] > 0 and len(u.users) > 0 for u in users
                      if len(getattr(u, "args", ())) > 1 and isinstance(u.args[1], int))
    hx = [hx] if not isinstance(hx, (list, tuple)) else list(hx)
    hx_axes = [E.ax(h) for h in hx if E.ax(h) is not None and not _uniform(h)]
    shared = layers > 1 and (states_used or bool(hx_axes))
    prev, units = x[-1], []
    for layer in range(layers):
        unit = units[0] if (shared and units) else E.A.new(hidden)
        E.A.hint(unit, f"{c.path}.l{layer}", OUT_HINT)
        for d in range(dirs):
            p = params[(layer * dirs + d) * per:(layer * dirs + d + 1) * per]
            for rows in [p[0][0], p[1][0]] + ([p[2][0], p[3][0]] if has_b else []):
                E.tie(rows, [E.A.new(gates, why), unit], f"gate rows of {c.where()}")
            E.tie(p[1][1], [unit], f"recurrent weights of {c.where()}")
            E.tie(p[0][1], prev, f"input weights of {c.where()}")
        prev = ([E.A.new(2, f"directions of {c.where()}")] if dirs == 2 else []) + [unit]
        units.append(unit)
    out = [x[i] if i != len(x) - 1 else prev for i in range(len(x))]
    batch = [x[1 - t_ax]] if len(x) == 3 else []
    states = [[E.A.new(layers * dirs, f"layers of {c.where()}")]] + batch + [
        [units[0]] if layers == 1 or shared else [E.A.new(hidden, f"unused states of {c.where()}")]]
    for h in hx_axes:
        for a, b in zip(h, states):
            E.tie(a, b, f"initial state of {c.where()}")
    E.set_out(c, Multi([out] + [states] * (len(E.g.shape(c.out)) - 1)))


def _uniform(v) -> bool:
    """Made by zeros/ones/full (the default h0 of nn.LSTM/GRU): invariant, nothing to tie."""
    target = getattr(v, "target", None)
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet, "__name__", None) in UNIFORM_MAKERS
