"""LoRA adapters in the chat: `--lora`, the config's `lora`, `/lora` in both front ends, the adapter set a
conversation records (and `-c` restores), KV states keyed by it. The CLI runs on the real model with real
adapter GGUFs; the app's tests drive it over the scripted engine."""

import json
import subprocess
import sys

import pytest

from adapter_helpers import random_pairs, write_adapter
from alpaca_chat import kvcache
from alpaca_chat.config import build_settings, lora_specs, parse_config
from alpaca_chat.engine import BaseLayout
from alpaca_chat.errors import EngineError, InvalidModelFileError, UsageError
from alpaca_chat.loading import new_session
from alpaca_chat.lora_spec import AdapterSpec, parse_lora_arg, plan_lora
from alpaca_chat.session import ChatSession
from alpaca_chat.store import Store
from conftest import make_app, until
from fake_engine import FakeEngine, fake_loaded

TARGETS = ("blk.28.ffn_down.weight", "blk.29.ffn_down.weight")
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="session")
def cli_adapters(default_model_path, tmp_path_factory):
    layout = BaseLayout.of_model(default_model_path)
    root = tmp_path_factory.mktemp("cli-lora")
    made = {name: write_adapter(root / f"{name}.gguf", layout.architecture,
                                random_pairs(layout, TARGETS, rank=4, std=0.3, seed=seed), alpha=8.0)
            for name, seed in (("first", 3), ("second", 4))}
    made["bad"] = write_adapter(root / "bad.gguf", "qwen2", random_pairs(layout, TARGETS[:1]), alpha=8.0)
    return made


def alpaca_chat(*args, stdin=""):
    return subprocess.run([sys.executable, "-m", "alpaca_chat", "--temp", "0", "-n", "10", *args],
                          input=stdin, capture_output=True, text=True, timeout=300)


# -- the real thing: CLI, line mode, -c ----------------------------------------------------------------


def _chunks(stdout: str) -> list[str]:
    """Line mode's output: each command's line, and each reply (its lines joined) between them."""
    chunks, reply = [], []
    for line in stdout.splitlines():
        if line.startswith(("(", "error:", "prompt:", "LoRA adapters:", "  on ", "  off ")):
            chunks += ["\n".join(reply)] if reply else []
            chunks.append(line)
            reply = []
        else:
            reply.append(line)
    return chunks + (["\n".join(reply)] if reply else [])


def test_line_mode_toggles_an_adapter_mid_conversation(isolated_home, cli_adapters):
    lines = [QUESTION, "/lora off first", "Thanks.", "/new", QUESTION, f"/lora add {cli_adapters['bad']}", "/new",
             QUESTION, "/lora on first", "/stats", "/new", QUESTION, "/lora"]
    run = alpaca_chat("--plain", "--verbose", "--lora", str(cli_adapters["first"]), stdin="\n".join(lines) + "\n")
    assert run.returncode == 0, run.stderr[-2000:]
    out = _chunks(run.stdout)
    adapted, base, still_base, adapted_again = out[0], out[4], out[7], out[11]
    assert out[1] == "(LoRA first off)" and out[3] == "(new conversation)"
    # The state saved after the first reply was computed with the adapter: not reused without it.
    assert "saved KV state ignored" in run.stderr and "another set of LoRA adapters" in run.stderr
    assert adapted != base  # the adapter changes the greedy reply; off, it is the base model's
    assert out[5].startswith("error: ") and "bad.gguf is an adapter for architecture 'qwen2'" in out[5]
    assert still_base == base  # the bad adapter left the set as it was: the chat goes on
    assert out[8] == "(LoRA first on)" and out[9].endswith("| LoRA: first")
    assert adapted_again == adapted  # back on: the adapter's reply again, loaded once
    assert out[12:] == ["LoRA adapters:", f"  on   {'first':<24} scale {1:<6g} {cli_adapters['first']}"]
    assert "Traceback" not in run.stderr


def test_a_bad_adapter_at_startup_is_one_line_and_exit_1(isolated_home, cli_adapters, tmp_path):
    for bad, message in ((cli_adapters["bad"], "is an adapter for architecture 'qwen2'"),
                         (tmp_path / "missing.gguf", "LoRA adapter not found")):
        run = alpaca_chat("-p", "hi", "--lora", str(bad))
        assert run.returncode == 1
        assert run.stderr.count("\n") == 1 and message in run.stderr and "Traceback" not in run.stderr
    run = alpaca_chat("-p", "hi", "--lora", f"{cli_adapters['first']}:nan")
    assert run.returncode == 2 and "finite number" in run.stderr


def test_continue_restores_the_adapter_set_and_never_a_state_of_another(isolated_home, cli_adapters, tmp_path):
    first = alpaca_chat("-p", QUESTION, "--json", "--lora", f"{cli_adapters['first']}:0.8")
    assert first.returncode == 0, first.stderr
    conversation = json.loads(first.stdout)["conversation_id"]
    assert json.loads(first.stdout)["lora"] == [f"{cli_adapters['first']}:0.8"]
    with Store() as store:
        assert store.get_conversation(conversation).adapters == (
            {"path": str(cli_adapters["first"].resolve()), "scale": 0.8},)
    # -c: the recorded adapter again, so the saved state is valid and restored
    resumed = json.loads(alpaca_chat("-c", "-p", "And of Italy?", "--json").stdout)
    assert resumed["kv_restored_tokens"] > 0
    # --lora beats the recorded set; the state was computed under the other one: evaluated, not restored
    other = alpaca_chat("-c", "-p", "And of Spain?", "--json", "--verbose", "--lora", str(cli_adapters["second"]))
    assert json.loads(other.stdout)["kv_restored_tokens"] == 0
    assert "another set of LoRA adapters" in other.stderr
    with Store() as store:
        assert [a["path"] for a in store.get_conversation(conversation).adapters] == [
            str(cli_adapters["second"].resolve())]
    # the recorded file is gone: one warning, and the conversation goes on with the base model
    moved = tmp_path / "moved.gguf"
    cli_adapters["second"].rename(moved)
    try:
        gone = alpaca_chat("-c", "-p", "And of Germany?", "--json")
    finally:
        moved.rename(cli_adapters["second"])
    assert gone.returncode == 0, gone.stderr
    warnings = [line for line in gone.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "second.gguf" in warnings[0] and "is gone; continuing without it" in warnings[0]
    assert json.loads(gone.stdout)["kv_restored_tokens"] == 0


# -- parsing, config, store, state keys -----------------------------------------------------------------


def test_lora_arguments_and_the_config_key(tmp_path):
    assert parse_lora_arg("a.gguf") == AdapterSpec("a.gguf", 1.0)
    assert parse_lora_arg("a.gguf:0.5") == AdapterSpec("a.gguf", 0.5)
    assert parse_lora_arg("C:/x/a.gguf") == AdapterSpec("C:/x/a.gguf", 1.0)  # not a number after the colon
    assert parse_lora_arg("d:a.gguf:-1") == AdapterSpec("d:a.gguf", -1.0)
    with pytest.raises(UsageError, match="finite"):
        parse_lora_arg("a.gguf:inf")
    config = tmp_path / "config.toml"
    layer = parse_config('lora = ["style.gguf:0.5", "/abs/b.gguf"]', str(config))
    assert build_settings(layer).lora == (AdapterSpec(tmp_path / "style.gguf", 0.5), AdapterSpec("/abs/b.gguf"))
    assert parse_config('lora = "one.gguf"', str(config))["lora"] == (AdapterSpec(tmp_path / "one.gguf"),)
    for text, message in (("lora = [1]", "lora must be a list of strings"), ('lora = [""]', "lora must be a list"),
                          ('lora = ["a.gguf:nan"]', "finite")):
        with pytest.raises(UsageError, match=message):
            parse_config(text, str(config))
    assert lora_specs(["x.gguf:2"], None) == (AdapterSpec("x.gguf", 2.0),)


def test_the_lora_command_plans_the_set():
    a, b = AdapterSpec("/m/a.gguf"), AdapterSpec("/m/b.gguf", 0.5)
    assert plan_lora("", (a,), ()) is None and plan_lora("list", (), ()) is None
    off = plan_lora("off a", (a, b), ())
    assert off.active == (b,) and off.off == (a,)
    assert plan_lora("on all", off.active, off.off).active == (b, a)
    assert plan_lora("scale b 2", (a, b), ()).active == (a, AdapterSpec("/m/b.gguf", 2.0))
    assert plan_lora("scale a 0.3", (b,), (a,)).active == (b, AdapterSpec("/m/a.gguf", 0.3))
    assert plan_lora("add /m/a.gguf:3", (a, b), ()).active == (b, AdapterSpec("/m/a.gguf", 3.0))
    for args, message in (("off zz", "no LoRA adapter 'zz' is on"), ("frob", "usage: /lora"),
                          ("scale a x", "not a number"), ("on all", "no LoRA adapter is off")):
        with pytest.raises(UsageError, match=message):
            plan_lora(args, (a,), ())


def test_the_migration_keeps_old_conversations_and_adds_no_adapters(tmp_path):
    import sqlite3

    from alpaca_chat.store import MIGRATIONS, migrate

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate(conn, MIGRATIONS[:1])  # a database from before adapters
    conn.execute("INSERT INTO conversations (title, created_at, updated_at, model, template, sampling) "
                 "VALUES ('kept', '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00', 'm', 'chatml', '{}')")
    conn.close()
    with Store(path) as store:
        (old,) = store.list_conversations()
        assert old.title == "kept" and old.adapters == ()
        store.update_conversation_settings(old.id, adapters=[{"path": "/m/a.gguf", "scale": 0.5}])
        assert store.get_conversation(old.id).adapters == ({"path": "/m/a.gguf", "scale": 0.5},)


def test_a_state_saved_under_one_adapter_set_is_never_restored_under_another(tmp_path, store):
    adapter = tmp_path / "a.gguf"
    adapter.write_bytes(b"scripted")
    model = tmp_path / "model.gguf"
    model.write_bytes(b"a model file to hash")
    engine = FakeEngine(model_path=model, stateful=True)
    notes = []
    cache = kvcache.KVCache(tmp_path / "kv")
    loaded = fake_loaded(engine)
    session = ChatSession(engine, loaded.template, model_label="m", store=store, kv_cache=cache, notice=notes.append)
    session.set_adapters([AdapterSpec(adapter)])
    long_message = " ".join(["word"] * 60)
    list(session.send(long_message))
    assert session.save_state() > 0
    saved_under = kvcache.decode(open(cache.path_for(session.conversation_id), "rb"),
                                 cache.path_for(session.conversation_id).stat().st_size).header["adapters"]
    assert saved_under == engine.adapter_key != ""
    session.set_adapters([])  # the fake, like the engine, forgets its cache when the set changes
    list(session.send("again"))
    assert engine.restores == [] and any("another set of LoRA adapters" in n for n in notes)
    session.set_adapters([AdapterSpec(adapter)])
    engine.reset()
    assert session.restore_state() > 0 and engine.restores  # the same set: restored


# -- the app over the scripted engine --------------------------------------------------------------


class AdapterEcho(FakeEngine):
    """Replies with the adapters it runs with: a reply that changes as the set does."""

    def generate(self, prompt, sampling, *, stop_strings=(), cancel=None):
        self.enqueue([f"with {self.adapter_key or 'the base'}"])
        return super().generate(prompt, sampling, stop_strings=stop_strings, cancel=cancel)


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def _send(app, pilot, text, count):
    app.prompt.load_text(text)
    await pilot.press("enter")
    await until(pilot, lambda: app.state == "ready" and len(app.transcript.messages) == count, what=text)


@pytest.mark.anyio
async def test_the_app_toggles_an_adapter_mid_conversation(store, tmp_path):
    adapter = tmp_path / "style.gguf"
    adapter.write_bytes(b"scripted")
    engine = AdapterEcho()
    engine.adapter_errors["broken"] = InvalidModelFileError("broken.gguf: tensor 'x' has lora_a [1, 2]")
    (tmp_path / "broken.gguf").write_bytes(b"scripted")
    app = make_app(engine, store)
    async with app.run_test(size=(110, 32)) as pilot:
        await until(pilot, lambda: app.state == "ready", what="the model")
        await _send(app, pilot, "hello", 2)
        assert app.session.messages[-1].content == "with the base"
        await _send(app, pilot, f"/lora add {adapter}:0.5", 2)
        assert "LoRA style×0.5" in str(app.status.render())
        await _send(app, pilot, "hello", 4)
        assert app.session.messages[-1].content == "with style*0.5"
        await _send(app, pilot, f"/lora add {tmp_path / 'broken.gguf'}", 4)
        errors = [n.message for n in app._notifications if n.severity == "error"]
        assert len(errors) == 1 and "broken.gguf" in errors[0] and "\n" not in errors[0]
        assert [s.name for s in engine.adapters] == ["style"]  # the previous set stays
        await _send(app, pilot, "/lora off style", 4)
        assert "LoRA" not in str(app.status.render())
        await _send(app, pilot, "hello", 6)
        assert app.session.messages[-1].content == "with the base"
        assert store.get_conversation(app.session.conversation_id).adapters == ()


@pytest.mark.anyio
async def test_opening_a_conversation_restores_its_adapters(store, tmp_path):
    adapter = tmp_path / "style.gguf"
    adapter.write_bytes(b"scripted")
    saved = store.create_conversation(model="fake-model", template="chatml",
                                      adapters=[{"path": str(adapter), "scale": 2.0},
                                                {"path": str(tmp_path / "gone.gguf"), "scale": 1.0}])
    store.add_message(saved.id, "user", "hi")
    engine = AdapterEcho()
    app = make_app(engine, store, saved=saved)
    async with app.run_test(size=(110, 32)) as pilot:
        await until(pilot, lambda: app.state == "ready", what="the model")
        assert [(s.name, s.scale) for s in engine.adapters] == [("style", 2.0)]
        assert "LoRA style×2" in str(app.status.render())
        warnings = [n.message for n in app._notifications if n.severity == "warning"]
        assert any("gone.gguf" in w and "is gone" in w for w in warnings)


def test_new_session_leaves_the_set_when_restoring_fails(store, tmp_path):
    adapter = tmp_path / "style.gguf"
    adapter.write_bytes(b"scripted")
    saved = store.create_conversation(model="m", template="chatml", adapters=[{"path": str(adapter), "scale": 1.0}])
    engine = FakeEngine()
    engine.adapter_errors["style"] = EngineError("llama.cpp could not load the LoRA adapter style.gguf")
    warned = []
    new_session(fake_loaded(engine), build_settings(), store, saved, warn=warned.append)
    assert engine.adapters == () and len(warned) == 1 and "continuing on the base model" in warned[0]


def test_state_files_carry_the_adapter_set_and_older_files_read_as_none(tmp_path):
    import io

    from alpaca_chat.kvcache_format import check_key, decode, encode

    key = kvcache.StateKey(10, "m" * 64, 512, "f16", "t" * 64, adapters="abc*1.0")
    data = encode(7, key, [1, 2, 3], b"payload")
    header = decode(io.BytesIO(data), len(data)).header
    assert header["adapters"] == "abc*1.0"
    check_key(header, key)
    with pytest.raises(kvcache.StateRejected, match="another set of LoRA adapters"):
        check_key(header, kvcache.StateKey(10, "m" * 64, 512, "f16", "t" * 64))
    older = encode(7, kvcache.StateKey(10, "m" * 64, 512, "f16", "t" * 64), [1, 2, 3], b"payload")
    older = older.replace(b'"adapters": "", ', b"")  # as written before adapters existed
    older = older[:12] + (int.from_bytes(older[12:16], "little") - len(b'"adapters": "", ')).to_bytes(4, "little") \
        + older[16:]
    assert b"adapters" not in older and decode(io.BytesIO(older), len(older)).header["adapters"] == ""
