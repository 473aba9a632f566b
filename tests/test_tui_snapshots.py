"""Snapshot tests of the app's main screens (pytest-textual-snapshot).

Update after a deliberate change with `python -m pytest tests/test_tui_snapshots.py --snapshot-update`
and look at the SVGs in tests/__snapshots__/ before committing them.
"""

import time

from conftest import make_app
from fake_engine import FakeEngine

SIZE = (100, 30)

REPLY = """Use a **list comprehension**:

```python
squares = [n * n for n in range(10)]
print(squares)
```

It reads as *"n squared for each n"*."""


def seed(store):
    first = store.create_conversation(model="fake-model", template="chatml", sampling={})
    store.add_message(first.id, "user", "What is a GGUF file?")
    store.add_message(first.id, "assistant", "A single-file format for quantized models.")
    second = store.create_conversation(model="fake-model", template="chatml", sampling={})
    store.add_message(second.id, "user", "How do I square numbers in Python?")
    store.add_message(second.id, "assistant", REPLY)
    store.add_message(second.id, "user", "And cubes?")
    store.add_message(second.id, "assistant", "Same idea: `n ** 3`, and", status="stopped")
    return store.get_conversation(second.id)


async def settled(pilot):
    deadline = time.monotonic() + 10
    while pilot.app.state != "ready" and time.monotonic() < deadline:
        await pilot.pause(0.02)
    await pilot.pause(0.1)


def test_empty_main_screen(snap_compare, store):
    assert snap_compare(make_app(FakeEngine(), store), terminal_size=SIZE, run_before=settled)


def test_mid_conversation(snap_compare, store):
    assert snap_compare(make_app(FakeEngine(), store, seed(store)), terminal_size=SIZE, run_before=settled)


def test_with_sidebar(snap_compare, store):
    saved = seed(store)

    async def open_sidebar(pilot):
        await settled(pilot)
        await pilot.press("ctrl+b")
        await pilot.pause(0.1)

    assert snap_compare(make_app(FakeEngine(), store, saved), terminal_size=SIZE, run_before=open_sidebar)


def test_help(snap_compare, store):
    async def open_help(pilot):
        await settled(pilot)
        await pilot.press("f1")
        await pilot.pause(0.1)

    assert snap_compare(make_app(FakeEngine(), store), terminal_size=SIZE, run_before=open_help)
