"""The app's shape: ChatApp only wires widgets, workers and messages, and the objects it wires
talk through their interfaces, never through each other's private attributes."""

import ast
import inspect
from pathlib import Path

from alpaca_chat.tui.app import ChatApp

MAX_APP_METHODS = 32
FRONT_END = sorted((Path(__file__).parent.parent / "alpaca_chat" / "tui").glob("*.py")) + [
    Path(__file__).parent.parent / "alpaca_chat" / "repl.py",
]


def own_classes(cls):
    """cls and its bases defined in alpaca_chat (mixins), not Textual's."""
    return [c for c in cls.__mro__ if c.__module__.startswith("alpaca_chat")]


def test_chat_app_has_at_most_32_methods():
    methods = [
        f"{c.__name__}.{name}"
        for c in own_classes(ChatApp)
        for name, value in vars(c).items()
        if inspect.isfunction(value) or isinstance(value, (property, staticmethod, classmethod))
    ]
    assert 0 < len(methods) <= MAX_APP_METHODS, methods


def foreign_private_reads(source: str) -> list[str]:
    """`x._name` where x is not self, cls or super(): reading another object's private attribute."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
            continue  # overriding a Textual hook
        found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_the_check_sees_a_foreign_private_read():
    assert foreign_private_reads("def f(self, app):\n    return app._cancel, self._mine, super()._on_key") \
        == ["line 2: app._cancel"]


def test_no_front_end_object_reads_another_ones_private_attributes():
    found = {path.name: foreign_private_reads(path.read_text()) for path in FRONT_END}
    assert {name: reads for name, reads in found.items() if reads} == {}
