"""No import cycles among the modules of the ``minillm_fast`` package.

Every ``.py`` file under ``minillm_fast/`` is parsed (``ast``, nothing is imported or run) and every import statement
in it becomes an edge of a module graph: ``import a.b``, ``from a.b import c`` and relative imports (``from . import
x``, ``from ..ops.sampling import f``), wherever they stand: at module level, inside functions, under ``if`` or
``try``. Only edges between modules of the package are kept.

Imports inside functions (lazy imports) count as much as top-level ones. A lazy import hides a cycle from the
interpreter, not from the reader: the two modules still depend on each other, neither can be understood, tested or
moved without the other, and the cycle comes back as an ``ImportError`` the day someone hoists the import. So the
test makes no exception for them. ``if TYPE_CHECKING:`` blocks are skipped: they never run, and exist precisely to
name a type without depending on its module.

How an import names a module: ``from pkg import name`` is an edge to ``pkg.name`` when that is a module of the
package (a submodule import), and to ``pkg`` otherwise (a name defined in ``pkg/__init__.py``). The implicit import
of a module's parent packages (Python runs ``pkg/__init__.py`` before ``pkg.mod``) is not an edge: it holds for every
module, so counting it would make every ``__init__.py`` that re-exports a submodule a "cycle".

On failure the message lists every cycle found (each strongly connected component of the graph, with one concrete
cycle through it and the file and line of each import on it).
"""
from __future__ import annotations

import ast
import os
from typing import Optional

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "minillm_fast")
PACKAGE = "minillm_fast"


def _modules(root: str = ROOT, package: str = PACKAGE) -> dict[str, str]:
    """Dotted module name -> file path, for every ``.py`` file of the package (packages under their own name)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and os.path.isfile(os.path.join(folder, d,
                                                                                                 "__init__.py")))
        rel = os.path.relpath(folder, os.path.dirname(root)).replace(os.sep, ".")
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            mod = rel if name == "__init__.py" else f"{rel}.{name[:-3]}"
            out[mod] = os.path.join(folder, name)
    assert package in out, f"{root} is not the {package} package"
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve_base(module: str, is_package: bool, node: ast.ImportFrom) -> Optional[str]:
    """The absolute module an ImportFrom reads from (``None`` when a relative import climbs out of the tree)."""
    if not node.level:
        return node.module
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if node.level - 1 > len(parts) - 1:
        return None
    parts = parts[:len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def import_graph(root: str = ROOT, package: str = PACKAGE) -> dict[str, dict[str, tuple[str, int]]]:
    """module -> {imported module of the package: (file, line) of the first such import}."""
    mods = _modules(root, package)
    graph: dict[str, dict[str, tuple[str, int]]] = {m: {} for m in mods}

    def add(src: str, target: str, path: str, line: int) -> None:
        # ``import a.b.c`` needs a.b.c; keep the longest prefix that is a module of the package
        while target and target not in mods:
            target = target.rpartition(".")[0]
        if target and target != src:
            graph[src].setdefault(target, (path, line))

    for mod, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        is_package = os.path.basename(path) == "__init__.py"
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == package or alias.name.startswith(package + "."):
                        add(mod, alias.name, path, node.lineno)
                continue
            base = _resolve_base(mod, is_package, node)
            if base is None or not (base == package or base.startswith(package + ".")):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(mod, sub if sub in mods else base, path, node.lineno)
    return graph


def strongly_connected(graph: dict[str, dict]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components with more than one module (a module never imports itself here)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        comp.append(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def one_cycle(graph: dict[str, dict], component: list[str]) -> list[str]:
    """A concrete cycle through the first module of ``component`` (breadth-first, so a shortest one)."""
    members, start = set(component), component[0]
    parent = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node]):
            if child == start:
                path = [node]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return path[::-1] + [start]
            if child in members and child not in parent:
                parent[child] = node
                queue.append(child)
    raise AssertionError(f"no cycle through {start}")   # impossible for a strongly connected component


def describe(graph: dict[str, dict], components: list[list[str]]) -> str:
    lines = []
    for comp in components:
        cycle = one_cycle(graph, comp)
        lines.append(f"cycle among {len(comp)} modules ({', '.join(comp)}):")
        lines.append("    " + " -> ".join(cycle))
        for a, b in zip(cycle, cycle[1:]):
            path, line = graph[a][b]
            lines.append(f"      {a} imports {b} at {os.path.relpath(path, os.path.dirname(ROOT))}:{line}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
def test_no_import_cycle_in_the_package():
    graph = import_graph()
    components = strongly_connected(graph)
    assert not components, "import cycles in minillm_fast:\n" + describe(graph, components)


def test_no_import_cycle_in_distill():
    """The distillation trainer on its own (a narrower failure message when the cycle is there)."""
    graph = import_graph()
    sub = {m: {t: v for t, v in e.items() if t.startswith(f"{PACKAGE}.distill")}
           for m, e in graph.items() if m.startswith(f"{PACKAGE}.distill")}
    components = strongly_connected(sub)
    assert not components, "import cycles in minillm_fast.distill:\n" + describe(sub, components)


def test_the_trainer_base_imports_no_method():
    """The base (distill/base.py) knows methods only through its registry; the methods import it, never the
    reverse, directly or through another module."""
    graph = import_graph()
    base = f"{PACKAGE}.distill.base"
    assert base in graph
    seen, todo = set(), [base]
    while todo:
        for t in graph[todo.pop()]:
            if t not in seen:
                seen.add(t)
                todo.append(t)
    methods = sorted(m for m in seen if m.startswith(f"{PACKAGE}.distill.methods"))
    assert not methods, f"{base} reaches the method modules {methods}"


# ---- the checker itself, on a small fake package -------------------------------------------------------------------
def _write(root, files: dict[str, str]) -> str:
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return os.path.join(root, "pkg")


@pytest.mark.parametrize("files, cycle", [
    ({"pkg/__init__.py": "", "pkg/a.py": "from . import b\n", "pkg/b.py": "from .a import f\n"},
     {"pkg.a", "pkg.b"}),
    ({"pkg/__init__.py": "", "pkg/a.py": "def f():\n    from pkg.sub import c\n",
      "pkg/sub/__init__.py": "", "pkg/sub/c.py": "import pkg.a\n"},
     {"pkg.a", "pkg.sub.c"}),                                           # a lazy import is an edge
    ({"pkg/__init__.py": "from .a import f\n", "pkg/a.py": "from .. import pkg\nfrom pkg import VERSION\n"},
     {"pkg", "pkg.a"}),                                                 # a name of __init__.py: edge to the package
    ({"pkg/__init__.py": "", "pkg/x/__init__.py": "", "pkg/x/a.py": "from ..y import b\n",
      "pkg/y/__init__.py": "", "pkg/y/b.py": "from ..x.a import g\n"},
     {"pkg.x.a", "pkg.y.b"}),
])
def test_the_checker_finds_cycles(tmp_path, files, cycle):
    graph = import_graph(_write(str(tmp_path), files), "pkg")
    comps = strongly_connected(graph)
    assert [set(c) for c in comps] == [cycle]
    text = describe(graph, comps)
    assert " -> ".join([sorted(cycle)[0]]) in text and "imports" in text


def test_the_checker_accepts_acyclic_code(tmp_path):
    files = {"pkg/__init__.py": "from .a import f\nfrom . import b\n",
             "pkg/a.py": "import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import g\n",
             "pkg/b.py": "from . import a\nfrom .a import f\n"}
    graph = import_graph(_write(str(tmp_path), files), "pkg")
    assert graph["pkg.b"].keys() == {"pkg.a"} and "pkg.b" not in graph["pkg.a"]
    assert strongly_connected(graph) == []
