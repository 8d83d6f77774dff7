"""The package's layering, read from the source with ast (nothing is imported).

Every import counts, those inside functions too: camelid imports heavy libraries lazily, and a
cycle through a lazy import is still two modules that each need the other. Importing `a.b.c`
also runs the package `a.b`, so that is an edge as well (unless the importer lives inside it).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "camelid"
CPU = "camelid.cpu"
ABOVE_CPU = ("camelid.train", "camelid.eval", "camelid.serve", "camelid.pipeline", "camelid.cli")
"""What the CPU kernels and passes must not import: they sit below every stage and the server."""


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `root` (packages by their __init__)."""
    out = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_package(name: str, mods: dict[str, Path]) -> bool:
    return mods[name].name == "__init__.py"


def _known(name: str, mods: dict[str, Path]) -> str | None:
    """`name`, or its longest prefix that is a module of the package (an imported attribute)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def imported(name: str, mods: dict[str, Path]) -> set[str]:
    """The package's modules that module `name` imports, anywhere in its file."""
    tree = ast.parse(mods[name].read_text(encoding="utf-8"))
    here = name if _is_package(name, mods) else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets.update(f"{base}.{a.name}" for a in node.names)
    found: set[str] = set()
    for target in targets:
        mod = _known(target, mods)
        while mod and mod != "camelid":
            if not name.startswith(mod + "."):  # a package the importer sits in is running already
                found.add(mod)
            mod = mod.rpartition(".")[0]
    found.discard(name)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    mods = modules(root)
    return {name: imported(name, mods) for name in mods}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_cycles_are_found():
    graph = {"camelid.a": {"camelid.b"}, "camelid.b": {"camelid.c"}, "camelid.c": {"camelid.a"}, "camelid.d": {"camelid.a"}}
    assert cycles(graph) == [["camelid.a", "camelid.b", "camelid.c"]]


def test_importing_a_submodule_imports_its_package(tmp_path):
    pkg = tmp_path / "camelid"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("from camelid.qa import load_split\n")
    (pkg / "data" / "output.py").write_text("from . import helpers\n")
    (pkg / "data" / "helpers.py").write_text("")
    (pkg / "qa.py").write_text("def load_split():\n    from camelid.data.output import SPLITS\n")
    graph = import_graph(pkg)
    assert graph["camelid.qa"] == {"camelid.data", "camelid.data.output"}
    assert graph["camelid.data.output"] == {"camelid.data.helpers"}
    assert cycles(graph) == [["camelid.data", "camelid.qa"]]


def test_cpu_kernels_import_no_stage_server_or_cli():
    graph = import_graph()
    wrong = {name: sorted(d for d in deps if any(_under(d, top) for top in ABOVE_CPU))
             for name, deps in graph.items() if _under(name, CPU)}
    assert {name: deps for name, deps in wrong.items() if deps} == {}
