"""Instant resume on the real model: llama.cpp's KV state saved and restored, real files, real processes.

Tiny 4-bit models are sensitive to how a prompt is split into batches, so a
resumed turn is compared with the same turn in a live session (which reuses
its cache the same way), and an ignored state with today's cold evaluation.
"""

import json
import os
import subprocess
import sys
import threading

import pytest

from alpaca_chat import kvcache
from alpaca_chat.conversation import Message, SamplingParams
from alpaca_chat.engine import Engine
from alpaca_chat.kvcache import KVCache
from alpaca_chat.session import ChatSession
from alpaca_chat.store import Store
from alpaca_chat.templates import resolve_template

GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
CTX = 4096


def long_text(facts: int) -> str:
    foods = ["grass", "hay", "clover", "leaves", "barley"]
    return " ".join(
        f"Fact {i}: the llama called Nube{i} lives in valley {i * 7 % 13} and eats {foods[i % 5]} every morning."
        for i in range(facts)
    )


@pytest.fixture(scope="module")
def engine4k(default_model_path):
    with Engine(default_model_path, n_ctx=CTX) as loaded:
        yield loaded


def template_for(engine):
    return resolve_template("auto", engine.chat_template, engine.bos_token, engine.eos_token)


def session_on(engine, store=None, cache=None, history=(), system=None, conversation_id=None, notes=None):
    return ChatSession(engine, template_for(engine), model_label="smollm2", sampling=GREEDY, system_prompt=system,
                       store=store, conversation_id=conversation_id, history=list(history), kv_cache=cache,
                       notice=(notes.append if notes is not None else None))


def reply_of(session, text):
    reply = session.send(text)
    for _ in reply:
        pass
    return reply


def test_engine_state_round_trip_gives_the_same_logits_and_continuation(engine, default_model_path):
    tokens = engine.tokenize(long_text(12))
    engine.reset()
    first = "".join(engine.generate(tokens, GREEDY))
    payload, held = engine.state()
    assert held == engine.cached_tokens and len(held) > len(tokens)
    follow = held + engine.tokenize(" And then?")[1:]  # without a second BOS
    live = engine.generate(follow, GREEDY)
    live_text = "".join(live)
    live_logits = engine.logits_at(-1)
    with Engine(default_model_path, n_ctx=engine.n_ctx) as fresh:
        fresh.restore(payload, held)
        assert fresh.cached_tokens == held
        resumed = fresh.generate(follow, GREEDY)
        assert "".join(resumed) == live_text and first
        assert resumed.stats.cached_tokens == live.stats.cached_tokens == len(held)
        assert fresh.logits_at(-1) == live_logits  # bit for bit: the same cache, the same kernels


def test_llama_cpp_refuses_a_state_of_another_shape(engine, default_model_path):
    engine.reset()
    "".join(engine.generate(engine.tokenize("Hello there."), GREEDY))
    payload, held = engine.state()
    with Engine(default_model_path, n_ctx=512) as small:
        small.restore(payload, held)  # same model: fine at another n_ctx
        assert small.cached_tokens == held


def test_a_snapshot_frees_the_engine_and_keeps_its_buffer_until_released(engine):
    engine.reset()
    "".join(engine.generate(engine.tokenize("Hello there."), GREEDY))
    payload, held = engine.state()
    snap = engine.snapshot()
    assert bytes(snap.data) == payload and snap.tokens == held
    # The engine is free while a file is written from the snapshot, and a turn leaves it alone.
    "".join(engine.generate(held + engine.tokenize(" Tell me more.")[1:], GREEDY))
    assert bytes(snap.data) == payload
    # The next snapshot would overwrite the buffer: it waits until this one is released.
    taken = []
    waiting = threading.Thread(target=lambda: taken.append(engine.snapshot()))
    waiting.start()
    waiting.join(0.5)
    assert waiting.is_alive() and not taken
    snap.release()
    waiting.join()
    with pytest.raises(ValueError):
        bytes(snap.data)  # released: no stale read of the next state
    with taken[0] as second:
        assert second.tokens == engine.cached_tokens and len(second.data) > len(payload)
    with Engine(engine.model_path, n_ctx=engine.n_ctx) as fresh:
        with engine.snapshot() as third:
            fresh.restore(third.data, third.tokens)  # read-only: llama.cpp gets a copy
        assert fresh.cached_tokens == engine.cached_tokens


def test_a_background_save_leaves_a_whole_state_and_both_times_in_its_notice(isolated_home, engine,
                                                                              default_model_path):
    store, notes = Store(), []
    cid = seed_conversation(store, default_model_path, 10)
    engine.reset()
    session = session_on(engine, store, KVCache(), history_of(store, cid), conversation_id=cid, notes=notes)
    reply_of(session, "Where does Nube3 live?")
    first = engine.cached_tokens
    assert session.save_state(wait=False) > 0
    assert session.save_state(wait=False) == 0  # taken once, not twice
    reply_of(session, "And Nube4?")  # the engine is not held by the write
    assert session.save_state() > 0  # waits for the first write's buffer, then saves this turn
    session.finish_saving()
    assert KVCache().load(cid, session._state_key()).tokens == engine.cached_tokens != first
    saves = [n for n in notes if n.startswith("saved KV state")]
    assert len(saves) == 2 and "in the background" in saves[0] and "in the background" not in saves[1]
    assert all("engine held" in n for n in saves)
    # A live chat's next turn does not read its own file (it holds nothing the engine lacks).
    assert not [n for n in notes if "ignored" in n or "restored" in n], notes
    store.close()


def test_line_mode_exits_after_its_last_state_is_written(isolated_home, default_model_path):
    proc = subprocess.run([sys.executable, "-m", "alpaca_chat", "--plain", "-m", str(default_model_path), "--ctx",
                           str(CTX), "--temp", "0", "-n", "8"], input="Hello.\n", capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    [entry] = KVCache().entries()  # written by a thread while the prompt waited: whole before the exit
    with open(entry.path, "rb") as f:
        saved = kvcache.decode(f, entry.size)  # sizes and checksums
    with Engine(default_model_path, n_ctx=CTX) as fresh:
        fresh.restore(saved.payload, saved.tokens)
        assert fresh.cached_tokens == saved.tokens


def seed_conversation(store, model_path, facts):
    conversation = store.create_conversation(model=str(model_path), template="auto", sampling=GREEDY.to_dict())
    store.add_message(conversation.id, "user", "Remember these facts. " + long_text(facts))
    store.add_message(conversation.id, "assistant", "I will remember them.")
    return conversation.id


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "alpaca_chat", *args], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return proc


def ask(*args):
    proc = run_cli("--ctx", str(CTX), "--temp", "0", "-n", "16", "--json", *args)
    return json.loads(proc.stdout), proc.stderr


def test_a_long_conversation_resumes_in_a_new_process(isolated_home, default_model_path, engine4k):
    with Store() as store:
        cid = seed_conversation(store, default_model_path, 105)
    first, _ = ask("-c", "--prompt", "Where does Nube12 live?")
    assert first["stats"]["cached_tokens"] == 0 and first["stats"]["prompt_tokens"] > 2000  # cold: as today
    assert KVCache().path_for(cid).is_file()
    second, err = ask("-c", "--prompt", "And what does Nube40 eat?", "--verbose")
    stats = second["stats"]
    assert stats["cached_tokens"] >= 0.9 * stats["prompt_tokens"], err
    assert second["kv_restored_tokens"] == stats["cached_tokens"]
    assert "restored KV state" in err

    # The same two turns in one live session that never closed.
    with Store(isolated_home / "live.db") as live_store:
        history = [Message(m.role, m.content) for m in Store().messages(cid)[:2]]
        live = session_on(engine4k, history=history)
        engine4k.reset()
        assert reply_of(live, "Where does Nube12 live?").text == first["text"]
        live_second = reply_of(live, "And what does Nube40 eat?")
    assert live_second.text == second["text"]
    assert live_second.stats.cached_tokens == stats["cached_tokens"]
    print(f"\nTTFT cold {first['stats']['time_to_first_token_s'] * 1000:.0f} ms "
          f"({first['stats']['prompt_tokens']} tokens); resumed {stats['time_to_first_token_s'] * 1000:.0f} ms "
          f"+ restore {second['kv_restore_s'] * 1000:.0f} ms ({stats['cached_tokens']} cached); "
          f"live {live_second.stats.time_to_first_token_s * 1000:.0f} ms")


def test_no_kv_cache_flag_and_config(isolated_home, default_model_path):
    with Store() as store:
        seed_conversation(store, default_model_path, 5)
    ask("-c", "--prompt", "Hi.", "--no-kv-cache")
    assert KVCache().entries() == []
    ask("-c", "--prompt", "Hi again.")
    assert len(KVCache().entries()) == 1
    result, _ = ask("-c", "--prompt", "Once more.", "--no-kv-cache")
    assert result["stats"]["cached_tokens"] == 0
    (isolated_home / "config").mkdir(parents=True)
    (isolated_home / "config" / "config.toml").write_text("kv_cache = false\n")
    result, _ = ask("-c", "--prompt", "And again.")
    assert result["stats"]["cached_tokens"] == 0


# -- the session never trusts a state file ---------------------------------------------


@pytest.fixture
def saved(isolated_home, engine, default_model_path):
    """A conversation with a saved state, and what a fresh engine makes of its next turn without one."""
    store = Store()
    store.on_delete.append(kvcache.delete_conversation_state)
    cid = seed_conversation(store, default_model_path, 20)
    history = [Message(m.role, m.content) for m in store.messages(cid)]
    engine.reset()
    session = session_on(engine, store, KVCache(), history, conversation_id=cid)
    reply_of(session, "Where does Nube3 live?")
    assert session.save_state() > 0
    yield store, cid
    store.close()


def resumed_session(engine, store, cid, notes, system=None):
    """A new process, as far as the engine knows: nothing in its cache."""
    engine.reset()
    history = [Message(m.role, m.content) for m in store.messages(cid)]
    return session_on(engine, store, KVCache(), history, system=system, conversation_id=cid, notes=notes)


def cold_reply(engine, history, text, system=None):
    engine.reset()
    return reply_of(session_on(engine, history=history, system=system), text)


def history_of(store, cid):
    return [Message(m.role, m.content) for m in store.messages(cid)]


def test_a_matching_state_is_restored_in_the_session(engine, saved):
    store, cid = saved
    notes = []
    session = resumed_session(engine, store, cid, notes)
    reply = reply_of(session, "And Nube5?")
    assert reply.stats.cached_tokens > 0.9 * reply.stats.prompt_tokens
    assert session.restored_tokens == reply.stats.cached_tokens
    assert any("restored KV state" in n for n in notes)


def _rewrite(path, **changes):
    with open(path, "rb") as f:
        decoded = kvcache.decode(f, os.path.getsize(path))
    header = decoded.header
    key = kvcache.StateKey(**{k: changes.get(k, header[k]) for k in kvcache.StateKey.__dataclass_fields__})
    path.write_bytes(kvcache.encode(decoded.conversation_id, key, decoded.tokens, decoded.payload))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: _rewrite(p, model_sha256="0" * 64), "another model"),
        (lambda p: _rewrite(p, model_size=123), "another model"),
        (lambda p: _rewrite(p, n_ctx=4096), "another context size"),
        (lambda p: _rewrite(p, kv_type="q8_0"), "another KV cache type"),
        (lambda p: _rewrite(p, template_sha256="0" * 64), "another chat template"),
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "promises"),
        (lambda p: p.write_bytes(p.read_bytes()[:-1] + b"\0"), "checksum"),
        (lambda p: p.write_bytes(os.urandom(100_000)), "not an alpaca-chat KV state"),
    ],
    ids=["model-hash", "model-size", "n_ctx", "kv-type", "template", "truncated", "corrupt", "foreign"],
)
def test_a_state_that_does_not_match_is_ignored_before_llama_cpp(engine, saved, monkeypatch, damage, reason):
    store, cid = saved
    history = history_of(store, cid)
    damage(KVCache().path_for(cid))
    restored = []
    monkeypatch.setattr(engine, "restore", lambda data, tokens: restored.append(tokens))
    notes = []
    reply = reply_of(resumed_session(engine, store, cid, notes), "And Nube5?")
    assert restored == []  # llama.cpp never saw a byte of it
    assert reply.stats.cached_tokens == 0
    assert any("saved KV state ignored" in n and reason in n for n in notes), notes
    monkeypatch.undo()
    assert reply.text == cold_reply(engine, history, "And Nube5?").text


def test_another_context_size_for_real(engine, saved, default_model_path):
    store, cid = saved
    notes = []
    with Engine(default_model_path, n_ctx=1024) as other:
        reply = reply_of(resumed_session(other, store, cid, notes), "And Nube5?")
    assert reply.stats.cached_tokens == 0 and reply.text
    assert any("another context size" in n for n in notes)


def test_a_changed_system_prompt_ignores_the_state(engine, saved):
    store, cid = saved
    history, notes = history_of(store, cid), []
    session = resumed_session(engine, store, cid, notes, system="You are a pirate.")
    reply = reply_of(session, "And Nube5?")
    assert reply.stats.cached_tokens == 0 and session.restored_tokens == 0
    assert any("ignored" in n for n in notes)
    assert reply.text == cold_reply(engine, history, "And Nube5?", system="You are a pirate.").text


def test_an_edited_turn_reuses_nothing_from_that_turn_on(engine, saved):
    store, cid = saved
    notes = []
    session = resumed_session(engine, store, cid, notes)
    session.rewind()  # edit "Where does Nube3 live?"
    reply = reply_of(session, "Where does Nube4 live?")
    before_edit = session.template.render(session.messages[:2], add_generation_prompt=False)
    # Only the turns before the edited one come from the file (their tokens are identical).
    assert 0 < reply.stats.cached_tokens <= len(engine.tokenize(before_edit)) + 8
    # A regenerated turn in a new process: the prompt comes from the file, the old reply never does.
    session.save_state()
    session = resumed_session(engine, store, cid, notes)
    session.rewind()
    again = reply_of(session, "Where does Nube4 live?")
    assert session.restored_tokens == again.stats.cached_tokens == again.stats.prompt_tokens - 1


def test_deleting_the_conversation_deletes_the_state(saved):
    store, cid = saved
    assert KVCache().path_for(cid).exists()
    store.delete_conversation(cid)
    assert not KVCache().path_for(cid).exists()


def test_an_unwritable_kv_directory_is_one_notice_and_the_chat_goes_on(isolated_home, engine):
    (isolated_home / "data").mkdir(parents=True)
    (isolated_home / "data" / "kv").write_text("not a directory")
    store, notes = Store(), []
    engine.reset()
    session = session_on(engine, store, KVCache(), notes=notes)
    for text in ("Hello.", "Hello again."):
        assert reply_of(session, text).text
        assert session.save_state() == 0
    assert len([n for n in notes if "not saved" in n]) == 1
    store.close()
