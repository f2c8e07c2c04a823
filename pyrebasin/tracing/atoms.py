"""Union-find over tensor-axis "atoms" with refinement: the bookkeeping behind `trace_spec`.

An atom is a factor of a tensor axis; axes that must share one permutation are unioned, an axis
reshaped into (heads, head_dim) is *refined* into child atoms, and atoms that no permutation may
touch (model inputs/outputs, conv kernels, positions) are frozen with a reason.
"""
from __future__ import annotations

from collections import deque


class Atoms:
    """Union-find whose classes may be refined into an ordered product of child classes.

    Invariants: a refined class stands for the row-major product of its children; a frozen class
    has all of its descendants frozen (a frozen axis cannot be permuted in any of its factors).
    """

    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.frozen: dict[int, str] = {}      # root -> why
        self.children: dict[int, list[int]] = {}  # root -> refinement
        self.hints: dict[int, list[tuple[int, str]]] = {}  # root -> [(priority, name)]

    def new(self, size: int, frozen: str | None = None) -> int:
        a = len(self.parent)
        self.parent.append(a)
        self.size.append(int(size))
        if frozen is not None:
            self.frozen[a] = frozen
        return a

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:  # path compression
            self.parent[a], a = root, self.parent[a]
        return root

    def leaves(self, a: int) -> list[int]:
        """The unrefined classes (roots) whose product this atom is, in row-major order."""
        r = self.find(a)
        kids = self.children.get(r)
        if not kids:
            return [r]
        return [leaf for k in kids for leaf in self.leaves(k)]

    def is_frozen(self, a: int) -> bool:
        return self.find(a) in self.frozen

    def why_frozen(self, a: int) -> str | None:
        return self.frozen.get(self.find(a))

    def hint(self, a: int, name: str, priority: int = 1) -> None:
        self.hints.setdefault(self.find(a), []).append((priority, name))

    def freeze(self, a: int, reason: str) -> None:
        r = self.find(a)
        self.frozen.setdefault(r, reason)
        for k in self.children.get(r, ()):
            self.freeze(k, reason)

    def _refine(self, leaf: int, sizes: list[int]) -> list[int]:
        """Split an unrefined root into children of the given sizes (product = its size)."""
        r = self.find(leaf)
        assert r not in self.children and _prod(sizes) == self.size[r], (self.size[r], sizes)
        why = self.frozen.get(r)
        kids = [self.new(s, why) for s in sizes]
        self.children[r] = kids
        for i, k in enumerate(kids):  # factors inherit the parent's names, weaker, indexed
            self.hints[k] = [(p - 0.5, f"{n}.{i}") for p, n in self.hints.get(r, []) if p >= 1]
        return kids

    def unify_seq(self, xs: list[int], ys: list[int]) -> bool:
        """Make two atom sequences (equal total size) the same product of classes, splitting atoms
        into common factors as needed. Returns False when no common factorisation exists (e.g.
        (6, 4) against (4, 6)); the caller then freezes what it touched."""
        a, b = deque(xs), deque(ys)
        while True:
            x = self._pop_leaf(a)
            y = self._pop_leaf(b)
            if x is None or y is None:
                return x is None and y is None
            sx, sy = self.size[x], self.size[y]
            if sx == sy:
                self._link(x, y)
            elif sx > sy and sx % sy == 0:
                x1, x2 = self._refine(x, [sy, sx // sy])
                self._link(x1, y)
                a.appendleft(x2)
            elif sy > sx and sy % sx == 0:
                y1, y2 = self._refine(y, [sx, sy // sx])
                self._link(x, y1)
                b.appendleft(y2)
            else:
                return False

    def _pop_leaf(self, q: deque) -> int | None:
        """Next unrefined, non-trivial (size > 1) class of a queue of atoms."""
        while q:
            r = self.find(q.popleft())
            if r in self.children:
                q.extendleft(reversed(self.children[r]))
            elif self.size[r] != 1:
                return r
        return None

    def union(self, x: int, y: int) -> bool:
        rx, ry = self.find(x), self.find(y)
        if rx == ry:
            return True
        if self.size[rx] != self.size[ry]:
            raise AssertionError(f"union of atoms of sizes {self.size[rx]} and {self.size[ry]}")
        if rx in self.children or ry in self.children:
            if not self.unify_seq([rx], [ry]):
                self.freeze(rx, "incompatible factorisations of one axis")
                self.freeze(ry, "incompatible factorisations of one axis")
            rx, ry = self.find(rx), self.find(ry)
            if rx == ry:
                return True
        self._link(rx, ry)
        return True

    def _link(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx == ry:
            return
        if rx in self.children or ry in self.children:  # both now share one leaf structure
            kids = self.children.pop(ry, None)
            if rx not in self.children and kids is not None:
                self.children[rx] = kids
        self.parent[ry] = rx
        self.hints.setdefault(rx, []).extend(self.hints.pop(ry, []))
        why = self.frozen.pop(ry, None) or self.frozen.get(rx)
        if why is not None:
            self.freeze(rx, why)

    def union_seq(self, xs: list[int], ys: list[int], reason: str) -> None:
        """Unify two atom sequences; when impossible, freeze both with `reason`."""
        if not self.unify_seq(xs, ys):
            for z in list(xs) + list(ys):
                self.freeze(z, reason)


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out
