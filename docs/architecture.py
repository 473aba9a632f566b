"""The import graph of `alpaca_chat` and `convert`, drawn as a Mermaid diagram, with its cycles.

    python docs/architecture.py            # writes docs/architecture.md, prints the cycles
    python docs/architecture.py --stdout   # prints the Markdown instead

Each module's imports are read from its source with `ast` (nothing is imported). An import is:

- `module`: run when the module is imported (top level, or under a top-level `if`, `try`, `with`
  or class body). These edges make the diagram and are checked for cycles.
- `typing`: under a module-level `if TYPE_CHECKING:`. Never run, but still a dependency of the
  design: drawn dashed, and checked for cycles with the others (two modules that need each
  other's types are one module, or miss a third).
- `function`: inside a function body (a lazy import). Listed apart: they cannot deadlock the
  import of a module, and they are how a module keeps a heavy dependency off its import path.

`import a.b.c` and `from a.b import c` point at the module `a.b.c` when it exists, else at the
package `a.b`. The parent packages Python runs on the way (`a`, `a.b`) are not drawn: a module
importing its own package's sibling is not a cycle with the package's `__init__`.

Exit status 1 when the module-level imports have a cycle. `tests/test_architecture.py` runs the
same analysis and holds the boundaries (no cycle, `alpaca_chat` never imports `convert`, only the
engine imports llama_cpp, no file over 500 lines).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("alpaca_chat", "convert")
OUTPUT = ROOT / "docs" / "architecture.md"
MODULE_LEVEL = ("module", "typing")  # the kinds checked for cycles
# Third-party dependencies worth seeing per module: each is a side effect, a cost or a boundary.
NOTABLE = ("llama_cpp", "sqlite3", "huggingface_hub", "textual", "prompt_toolkit", "torch", "transformers", "peft")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, e.g. "alpaca_chat.loading"
    target: str  # a module of the packages ("alpaca_chat.models") or a top-level name ("llama_cpp")
    kind: str  # "module", "function" or "typing"
    line: int


@dataclass
class Analysis:
    root: Path
    modules: dict[str, Path]  # dotted name -> file
    imports: list[Import] = field(default_factory=list)

    def internal(self, *kinds: str) -> dict[str, set[str]]:
        """The edges between the packages' own modules, of the given kinds (default: module level)."""
        kinds = kinds or MODULE_LEVEL
        graph: dict[str, set[str]] = {name: set() for name in self.modules}
        for imp in self.imports:
            if imp.kind in kinds and imp.target in self.modules and imp.target != imp.source:
                graph[imp.source].add(imp.target)
        return graph

    def importers(self, top_level: str, kinds: tuple[str, ...] = ("module", "function")) -> set[str]:
        """Modules that import `top_level` (a package name such as "llama_cpp"), at the given kinds."""
        return {
            imp.source
            for imp in self.imports
            if imp.kind in kinds and (imp.target == top_level or imp.target.startswith(top_level + "."))
        }

    def cycles(self) -> list[list[str]]:
        """One cycle per strongly connected component of the module-level graph (TYPE_CHECKING
        imports included), as a closed path."""
        graph = self.internal(*MODULE_LEVEL)
        return [_cycle_in(component, graph) for component in _strongly_connected(graph) if len(component) > 1]

    def line_counts(self) -> dict[str, int]:
        return {name: _count_lines(path) for name, path in self.modules.items()}


def analyse(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> Analysis:
    """Read every module of `packages` under `root` and its imports."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    analysis = Analysis(root, modules)
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node, kind in _import_nodes(tree):
            for target in _targets(node, name, is_package, modules):
                analysis.imports.append(Import(name, target, kind, node.lineno))
    return analysis


def _import_nodes(tree: ast.Module):
    """(node, kind) for every import statement, kind as in the module docstring."""

    def walk(node: ast.AST, kind: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, kind
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(child, "function")
            elif isinstance(child, ast.If) and kind == "module" and _is_type_checking(child.test):
                for statement in child.body:
                    yield from walk_statement(statement, "typing")
                for statement in child.orelse:
                    yield from walk_statement(statement, kind)
            else:
                yield from walk(child, kind)

    def walk_statement(statement: ast.AST, kind: str):
        if isinstance(statement, (ast.Import, ast.ImportFrom)):
            yield statement, kind
        else:
            yield from walk(statement, kind)

    yield from walk(tree, "module")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    """What an import statement points at: the packages' modules by dotted name, others by top-level name."""
    if isinstance(node, ast.Import):
        return [_resolve(alias.name, modules) for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    targets = []
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        targets.append(submodule if submodule in modules else _resolve(base, modules))
    return targets


def _resolve(dotted: str, modules: dict[str, Path]) -> str:
    """The longest prefix of `dotted` that is one of our modules, else the top-level name."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return parts[0]


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components with their members sorted, in a stable order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
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
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return sorted(components)


def _cycle_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A closed path a -> ... -> a through the component (shortest back to its first member)."""
    members = set(component)
    start = component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    return [*component, component[0]]


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


# --- the picture -------------------------------------------------------------------------------


def _node_id(module: str) -> str:
    return module.replace(".", "_")


def mermaid(analysis: Analysis) -> str:
    """The module-level import graph, one subgraph per package, subpackages nested in theirs."""
    members: dict[str, list[str]] = defaultdict(list)  # package -> its modules (its __init__ included)
    for name, path in analysis.modules.items():
        members[name if path.name == "__init__.py" else name.rpartition(".")[0]].append(name)
    lines = ["graph LR"]

    def subgraph(package: str, depth: int) -> None:
        pad = "  " * depth
        lines.append(f'{pad}subgraph {_node_id(package)}_package["{package.replace(".", "/")}/"]')
        for name in sorted(members[package]):
            label = "__init__" if name == package else name.rpartition(".")[2]
            lines.append(f'{pad}  {_node_id(name)}["{label}"]')
        for child in sorted(p for p in members if p.rpartition(".")[0] == package):
            subgraph(child, depth + 1)
        lines.append(f"{pad}end")

    for package in sorted(p for p in members if "." not in p):
        subgraph(package, 1)
    for source, targets in sorted(analysis.internal("module").items()):
        for target in sorted(targets):
            lines.append(f"  {_node_id(source)} --> {_node_id(target)}")
    for source, targets in sorted(analysis.internal("typing").items()):
        for target in sorted(targets - analysis.internal("module")[source]):
            lines.append(f"  {_node_id(source)} -.->|types| {_node_id(target)}")
    return "\n".join(lines)


def _purpose(path: Path) -> str:
    """The first line of a module's docstring: what it is for."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    return doc.strip().splitlines()[0].replace("|", "\\|") if doc.strip() else "-"


def module_map(analysis: Analysis) -> list[str]:
    """A table of every module and what it is for (its docstring's first line)."""
    out = ["| module | what it is for |", "|---|---|"]
    for path in analysis.modules.values():
        out.append(f"| `{path.relative_to(analysis.root).as_posix()}` | {_purpose(path)} |")
    return out


def markdown(analysis: Analysis) -> str:
    cycles = analysis.cycles()
    lazy = analysis.internal("function")
    module_level = analysis.internal(*MODULE_LEVEL)
    out = [
        "# Architecture: the import graph",
        "",
        "Generated by `python docs/architecture.py` from the source (`ast`, nothing imported); do not edit by hand.",
        "An arrow A --> B: module A imports B when A is imported; a dashed one, only its types (under",
        "`if TYPE_CHECKING:`). Imports inside functions (lazy) are not drawn: they are listed below.",
        "",
        "## Module-level imports",
        "",
        "```mermaid",
        mermaid(analysis),
        "```",
        "",
        "## Import cycles (module level, TYPE_CHECKING imports included)",
        "",
    ]
    if cycles:
        out += [f"- {' -> '.join(cycle)}" for cycle in cycles]
    else:
        out.append("None.")
    out += ["", "## Imports inside functions (lazy)", "", "| module | imports, when a function runs |", "|---|---|"]
    for source in sorted(lazy):
        extra = sorted(lazy[source] - module_level[source])
        if extra:
            out.append(f"| `{source}` | {', '.join(f'`{t}`' for t in extra)} |")
    out += ["", "## Every module", ""] + module_map(analysis)
    out += ["", "## Notable third-party imports", "", "| dependency | module level | inside functions |", "|---|---|---|"]
    for dependency in NOTABLE:
        at_import = sorted(analysis.importers(dependency, ("module",)))
        lazily = sorted(analysis.importers(dependency, ("function",)) - set(at_import))
        out.append(f"| `{dependency}` | {', '.join(f'`{m}`' for m in at_import) or '-'} | "
                   f"{', '.join(f'`{m}`' for m in lazily) or '-'} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stdout", action="store_true", help="print the Markdown instead of writing it")
    args = parser.parse_args(argv)
    analysis = analyse()
    text = markdown(analysis)
    if args.stdout:
        sys.stdout.write(text)
    else:
        OUTPUT.write_text(text, encoding="utf-8")
        print(f"wrote {OUTPUT.relative_to(ROOT)}: {len(analysis.modules)} modules, "
              f"{sum(len(t) for t in analysis.internal('module').values())} module-level imports between them")
    cycles = analysis.cycles()
    for cycle in cycles:
        print("import cycle: " + " -> ".join(cycle), file=sys.stderr)
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
