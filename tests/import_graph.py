"""The import graph of a package, read from its source with `ast`, and the circles in it.

Every import counts wherever it is written: at the top, inside a function (an import moved
into a function still runs, only later) or under `if TYPE_CHECKING:`. A string constant that
is exactly the dotted name of one of the package's submodules counts too: that is how lazy
exports (`importlib.import_module(name)` from a table) name what they load (the bare package
name is a word, `~/.cache/kvlab`, not a lazy import). An edge goes to the module
imported, not to the packages above it: `from a.b import c` is an edge to `a.b.c` when that is
a module, else to `a.b` (whose `__init__` then defines `c`).

    graph = import_graph(Path("src"), "kvlab.fusion")   # or "kvlab": the whole package
    assert not import_circles(graph)
"""

from __future__ import annotations

import ast
from pathlib import Path


def module_files(src: Path, package: str) -> dict[str, Path]:
    """Every module of `package` under the source root `src`, by dotted name."""
    root = src.joinpath(*package.split("."))
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(path: Path, module: str, modules: set[str]) -> set[str]:
    """The modules among `modules` that the module at `path` (named `module`) imports."""
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: module.count(".") + 1 - node.level + is_package]
                base = ".".join([*anchor, base] if base else anchor)
            names.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names)
        elif isinstance(node, ast.Constant) and node.value in modules and "." in node.value:
            names.add(node.value)
    targets = set()
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module:
            targets.add(name)
    return targets


def import_graph(src: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of `package` it imports (read from the files under `src`)."""
    modules = module_files(src, package)
    return {module: imports_of(path, module, set(modules)) for module, path in modules.items()}


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or round a circle (Tarjan's SCCs)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph.get(module, ())):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return circles
