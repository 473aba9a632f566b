"""The engine's public surface is written down (protocol.py), and its clients keep to it."""

import ast
import inspect
from pathlib import Path

import pytest

from alpaca_chat.engine import ChatEngine, Engine, EngineProtocol
from fake_engine import FakeEngine

ROOT = Path(__file__).resolve().parent.parent
ENGINE_FILES = ROOT / "alpaca_chat" / "engine"
# Clients whose engine calls must all be protocol names.
CLIENTS = {
    "alpaca_chat/session.py": ChatEngine,
    "alpaca_chat/engine/parallel.py": EngineProtocol,
    "alpaca_chat/engine/batching.py": EngineProtocol,
    "alpaca_chat/engine/step.py": EngineProtocol,
    "convert/evaluate.py": EngineProtocol,
}


def _members(protocol) -> set[str]:
    names = set()
    for klass in protocol.__mro__:
        if klass in (object,) or not getattr(klass, "_is_protocol", False):
            continue
        names |= {n for n in vars(klass) if not n.startswith("_")}
        names |= set(getattr(klass, "__annotations__", {}))
    return names - {"_is_protocol"}


def _engine_attributes(path: Path) -> set[str]:
    """Attributes read off anything named like an engine (`engine.x`, `self.engine.x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            base = node.value
            name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else ""
            if name in ("engine", "parallel_engine", "fresh") or name.endswith("_engine"):
                found.add(node.attr)
    return found


@pytest.mark.parametrize("protocol, implementation", [(EngineProtocol, Engine), (ChatEngine, FakeEngine)])
def test_implementations_have_every_protocol_member(protocol, implementation):
    instance_attributes = {"model_path", "n_ctx", "kv_type", "supports_state", "n_vocab", "n_batch", "n_seq_max",
                           "n_threads", "metadata"}
    for name in _members(protocol):
        assert hasattr(implementation, name) or name in instance_attributes, f"{implementation.__name__} lacks {name}"
        ours, theirs = getattr(protocol, name, None), getattr(implementation, name, None)
        if inspect.isfunction(ours) and callable(theirs):
            wanted = [p for p in inspect.signature(ours).parameters if p != "self"]
            given = [p for p in inspect.signature(theirs).parameters if p != "self"]
            assert given == wanted, f"{implementation.__name__}.{name}{given} is not the protocol's {wanted}"


def test_the_fake_sets_what_the_protocol_declares():
    assert isinstance(FakeEngine(), ChatEngine)


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_clients_use_only_protocol_names(client):
    used = _engine_attributes(ROOT / client)
    assert used, f"{client}: no engine calls found (the scan is broken)"
    assert used <= _members(CLIENTS[client]), f"{client} uses {sorted(used - _members(CLIENTS[client]))}"


def test_nothing_outside_the_engine_calls_its_private_methods():
    offenders = []
    for folder in ("alpaca_chat", "convert", "tests", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            if ENGINE_FILES in path.parents:
                continue
            private = {a for a in _engine_attributes(path) if a.startswith("_") and not a.startswith("__")}
            offenders += [f"{path.relative_to(ROOT)}: engine.{a}" for a in sorted(private)]
    assert not offenders, offenders
