"""The boundaries of the code, read from its imports (docs/architecture.py's analysis, nothing imported).

- no import cycle among module-level imports in alpaca_chat/ and convert/ (those under
  `if TYPE_CHECKING:` included: a cycle of types is a cycle of the design);
- alpaca_chat never imports convert (the chat install has no torch);
- only the engine's own files import llama_cpp on the chat side; in convert/, only the modules
  that drive llama.cpp's own tools (quantizer, importance matrix) do;
- no file in alpaca_chat/ or convert/ over 500 lines.
"""

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 500
# convert/ modules that call llama.cpp's C API directly (as of the redesign): a new one is a decision.
CONVERT_LLAMA_CPP = {"convert.quantize", "convert.imatrix", "convert.imatrix_ggml"}


def _load_architecture():
    spec = importlib.util.spec_from_file_location("docs_architecture", ROOT / "docs" / "architecture.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


architecture = _load_architecture()


@pytest.fixture(scope="module")
def analysis():
    return architecture.analyse()


def test_no_import_cycle_among_module_level_imports(analysis):
    cycles = analysis.cycles()
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


def test_alpaca_chat_never_imports_convert(analysis):
    found = sorted(
        f"{imp.source} (line {imp.line}, {imp.kind})"
        for imp in analysis.imports
        if imp.source.split(".")[0] == "alpaca_chat" and imp.target.split(".")[0] == "convert"
    )
    assert not found, f"alpaca_chat imports convert: {found}"


def test_only_the_engine_imports_llama_cpp(analysis):
    importers = analysis.importers("llama_cpp", ("module", "function", "typing"))
    chat_side = {m for m in importers if m.split(".")[0] == "alpaca_chat"}
    outside_engine = sorted(m for m in chat_side if not (m == "alpaca_chat.engine" or m.startswith("alpaca_chat.engine.")))
    assert not outside_engine, f"llama_cpp imported outside the engine: {outside_engine}"
    assert chat_side, "the analysis found no engine module importing llama_cpp: it is broken"
    convert_side = {m for m in importers if m.split(".")[0] == "convert"}
    assert convert_side <= CONVERT_LLAMA_CPP, f"new llama_cpp importers in convert/: {sorted(convert_side - CONVERT_LLAMA_CPP)}"


def test_no_file_over_500_lines(analysis):
    too_long = {name: n for name, n in analysis.line_counts().items() if n > MAX_LINES}
    assert not too_long, f"files over {MAX_LINES} lines: {too_long}"


# --- the analysis itself, on a package written here ---------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_the_analysis_finds_a_cycle_and_tells_the_kinds_apart(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": """
            from typing import TYPE_CHECKING
            from .c import helper
            if TYPE_CHECKING:
                from pkg.e import Thing
            def later():
                import pkg.a
                import llama_cpp
            """,
        "pkg/c.py": "import pkg.a as a\nhelper = 1\n",
        "pkg/sub/__init__.py": "from . import d\n",
        "pkg/sub/d.py": "from ..c import helper\nimport sqlite3\n",
        "pkg/e.py": "",
    })
    found = architecture.analyse(tmp_path, ("pkg",))
    assert found.internal("module") == {
        "pkg": set(),
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.c"},
        "pkg.c": {"pkg.a"},
        "pkg.sub": {"pkg.sub.d"},
        "pkg.sub.d": {"pkg.c"},
        "pkg.e": set(),
    }
    assert found.internal("function")["pkg.b"] == {"pkg.a"}
    assert found.internal("typing")["pkg.b"] == {"pkg.e"}
    assert found.cycles() == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    assert found.internal()["pkg.b"] == {"pkg.c", "pkg.e"}  # module level: run-time and types
    assert found.importers("llama_cpp") == {"pkg.b"}
    assert found.importers("llama_cpp", ("module",)) == set()
    assert found.importers("sqlite3", ("module",)) == {"pkg.sub.d"}
    assert "pkg_a --> pkg_b" in architecture.mermaid(found)
    assert "pkg.a -> pkg.b -> pkg.c -> pkg.a" in architecture.markdown(found)


def test_a_lazy_import_makes_no_cycle_a_type_only_one_does(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n" + "x = 1\n" * 600,
        "pkg/b.py": "def f():\n    from pkg import a\n",
        "pkg/c.py": "from pkg import d\n",
        "pkg/d.py": "import typing\nif typing.TYPE_CHECKING:\n    from pkg.c import Thing\n",
    })
    found = architecture.analyse(tmp_path, ("pkg",))
    assert found.cycles() == [["pkg.c", "pkg.d", "pkg.c"]]
    assert found.line_counts()["pkg.a"] == 601


def test_the_committed_picture_is_current():
    """docs/architecture.md (the import graph and the map of every module, which DEVELOPERS.md points
    to) is what the code says now: rerun `python docs/architecture.py` after moving code."""
    committed = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert committed == architecture.markdown(architecture.analyse()), "run: python docs/architecture.py"
