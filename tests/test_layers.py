"""The package's import graph, read from the source (module- and function-level imports): no cycle,
no import from a lower layer into a higher one, no private name taken from another module, no module over 400 lines."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "pyrebasin"
MAX_LINES = 400

# The layer of each module, lowest first (DEVELOPERS.md, "Layers"); a module not named here is core.
# A module may import its own layer and the ones below it, never one above.
NATIVE = {"pyrebasin._C"}
LAYERS = ("native", "ops", "core", "zoo", "experiments", "commands")
LAYER_OF = {"pyrebasin._C": "native", "pyrebasin._backend": "ops", "pyrebasin.ops": "ops", "pyrebasin.reference": "ops", "pyrebasin.rng": "ops",
         "pyrebasin.zoo": "zoo", "pyrebasin.train": "zoo",
         "pyrebasin.experiments": "experiments",
         "pyrebasin.commands": "commands", "pyrebasin.cli": "commands"}

# Violations in modules still being reworked on other branches, each by its exact message. The test
# fails on any violation not listed AND on any listed one that is gone (then delete its line).
KNOWN: set[str] = set()


def layer_of(module: str) -> str:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in LAYER_OF:
            return LAYER_OF[".".join(parts[:i])]
    return "core"


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_module(name: str, known: dict[str, Path]) -> bool:
    """A source module or package of the tree, or the native extension (built or not)."""
    return name in known or name in NATIVE


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class _Reader(ast.NodeVisitor):
    """Import edges of one module, and the private names it takes from other modules of the package."""

    def __init__(self, name: str, is_package: bool, known: dict[str, Path]):
        self.name, self.known = name, known
        self.package = name if is_package else name.rpartition(".")[0]
        self.edges: dict[str, int] = {}          # imported module -> first line
        self.private: list[str] = []
        self.bound: dict[str, str] = {}          # local name -> package module it stands for

    def _edge(self, module: str, line: int) -> None:
        if module != self.name and (module == "pyrebasin" or module.startswith("pyrebasin.")):
            self.edges.setdefault(module, line)

    def _absolute(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = self.package.split(".")
        base = base[:len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._edge(alias.name, node.lineno)
            if alias.asname:
                self.bound[alias.asname] = alias.name
            else:
                self.bound[alias.name.split(".")[0]] = alias.name.split(".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        source = self._absolute(node)
        for alias in node.names:
            full = f"{source}.{alias.name}"
            if _is_module(full, self.known):
                self._edge(full, node.lineno)
                self.bound[alias.asname or alias.name] = full
            else:
                self._edge(source, node.lineno)
                if _private(alias.name) and source.startswith("pyrebasin"):
                    self.private.append(f"{self.name} imports the private name {source}.{alias.name}")

    def visit_Call(self, node: ast.Call) -> None:
        # importlib.import_module("pyrebasin.x"): a literal name is an import like any other
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            self._edge(node.args[0].value, node.lineno)
        self.generic_visit(node)

    def _resolve(self, node: ast.expr) -> str | None:
        if isinstance(node, ast.Name):
            return self.bound.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self._resolve(node.value)
            if base and _is_module(f"{base}.{node.attr}", self.known):
                return f"{base}.{node.attr}"
        return None

    def visit_Attribute(self, node: ast.Attribute) -> None:
        base = self._resolve(node.value)
        if base and base.startswith("pyrebasin") and base != self.name and _private(node.attr) \
                and not _is_module(f"{base}.{node.attr}", self.known):
            self.private.append(f"{self.name} uses the private name {base}.{node.attr}")
        self.generic_visit(node)


def read_graph() -> tuple[dict[str, dict[str, int]], list[str]]:
    known = modules()
    graph, private = {}, []
    for name, path in known.items():
        reader = _Reader(name, path.name == "__init__.py", known)
        reader.visit(ast.parse(path.read_text(), filename=str(path)))
        # an attribute of a package that is not a module of it is a name its __init__ hands on
        graph[name] = {m if _is_module(m, known) else m.rpartition(".")[0]: line for m, line in reader.edges.items()}
        graph[name].pop(name, None)
        private += reader.private
    return graph, private


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(graph[w])))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return sorted(out)


def violations() -> dict[str, str]:
    """Every violation: a short key without line numbers (what KNOWN lists) -> the key with its evidence."""
    graph, private = read_graph()
    found = {v: v for v in private}
    for comp in cycles(graph):
        ties = "; ".join(f"{a} -> {b} (line {graph[a][b]})" for a in comp for b in sorted(graph[a]) if b in comp)
        key = f"cycle of {', '.join(comp)}"
        found[key] = f"{key}: {ties}"
    for a, targets in graph.items():
        for b, line in targets.items():
            if LAYERS.index(layer_of(b)) > LAYERS.index(layer_of(a)):
                key = f"{a} ({layer_of(a)}) imports {b} ({layer_of(b)})"
                found[key] = f"{key} at line {line}"
    for path in modules().values():
        n = len(path.read_text().splitlines())
        if n > MAX_LINES:
            key = f"{path.relative_to(ROOT)} has more than {MAX_LINES} lines"
            found[key] = f"{key} ({n})"
    return found


def test_import_graph():
    found = violations()
    new, gone = sorted(set(found) - KNOWN), sorted(KNOWN - set(found))
    assert not new and not gone, "\n".join(
        ([f"{len(new)} layering violation(s):"] + [f"  {found[v]}" for v in new] if new else [])
        + ([f"{len(gone)} KNOWN entries no longer found (delete them):"] + [f"  {v}" for v in gone] if gone else []))


def test_the_reader_sees_what_it_must():
    # the checks above mean nothing if the reader misses imports: a small graph with every kind
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert cycles(graph) == [["a", "b", "c"]]
    known = modules()
    src = ("from . import ops\nfrom ..lmc import _hidden\nimport pyrebasin.spec as s\n"
           "def f():\n    from ..zoo import MLP\n    import importlib\n    importlib.import_module('pyrebasin.cli')\n"
           "    return s._private, s.__name__, ops.matching\n")
    reader = _Reader("pyrebasin.matching.weight", False, known)
    reader.visit(ast.parse(src))
    assert set(reader.edges) == {"pyrebasin.matching", "pyrebasin.lmc", "pyrebasin.spec", "pyrebasin.zoo",
                                 "pyrebasin.cli"}
    assert reader.private == ["pyrebasin.matching.weight imports the private name pyrebasin.lmc._hidden",
                              "pyrebasin.matching.weight uses the private name pyrebasin.spec._private"]
    assert layer_of("pyrebasin.zoo.mlp") == "zoo" and layer_of("pyrebasin.tracing.rules") == "core"


def test_import_is_quiet():
    # a fresh interpreter: `import pyrebasin` loads no plotting library, no experiment, no zoo or CLI
    code = ("import sys, pyrebasin\n"
            "bad = [m for m in sys.modules if m.split('.')[0] == 'matplotlib' or m.startswith(("
            "'pyrebasin.experiments', 'pyrebasin.zoo', 'pyrebasin.commands', 'pyrebasin.cli', 'pyrebasin.train'))]\n"
            "assert not bad, bad\n"
            "import pyrebasin.experiments, pyrebasin.experiments.demo\n"
            "assert 'matplotlib' not in sys.modules, 'experiments import matplotlib before plotting'\n"
            # plotting draws on its own canvas: the backend a user chose stays, pyplot stays unloaded
            "import matplotlib, tempfile, os\n"
            "matplotlib.use('svg')\n"
            "from pyrebasin.experiments.plots import plot_bars\n"
            "path = plot_bars({'a': {'x': 1.0}}, os.path.join(tempfile.mkdtemp(), 'bars.png'))\n"
            "assert open(path, 'rb').read(8) == bytes([137, 80, 78, 71, 13, 10, 26, 10]), 'not a PNG'\n"
            "assert matplotlib.get_backend() == 'svg' and 'matplotlib.pyplot' not in sys.modules\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    assert run.returncode == 0, run.stderr[-2000:]


def test_the_face_lists_the_core_and_reaches_every_submodule():
    import pyrebasin as prb

    assert all(hasattr(prb, n) for n in prb.__all__)
    assert not [n for n in prb.__all__ if n in prb._SUBMODULES]  # submodules are attributes, not API
    for name in prb._SUBMODULES:
        assert getattr(prb, name).__name__ == f"pyrebasin.{name}"
    assert prb.zoo.MLP and prb.experiments.stitching and prb.train.train_zoo and "zoo" in dir(prb)
