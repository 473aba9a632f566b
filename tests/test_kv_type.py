"""The q8_0 KV cache (`--kv-type`, config `kv_type`) on the real model.

q8_0 must take effect (its saved state is about half of f16's), stay close to
f16 (teacher-forced logits over a fixed text), and never be mixed with f16
states: a state saved with one type is ignored by a session of the other.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alpaca_chat import kvcache, paths
from alpaca_chat.config import Settings
from alpaca_chat.conversation import Message, SamplingParams
from alpaca_chat.engine import Engine
from alpaca_chat.errors import EngineError, UsageError
from alpaca_chat.kvcache import KVCache
from alpaca_chat.loading import load_model
from alpaca_chat.store import Store
from test_kvcache_resume import reply_of, session_on  # the same greedy session helpers

GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
CTX = 2048  # the shared f16 `engine` fixture's: only the cache type differs
SAMPLE = Path(__file__).resolve().parents[1] / "convert" / "eval_sample.txt"
QUALITY_TOKENS = 500


@pytest.fixture(scope="module")
def engine_q8(default_model_path):
    with Engine(default_model_path, n_ctx=CTX, kv_type="q8_0") as loaded:
        yield loaded


def facts(n: int) -> str:
    return " ".join(f"Fact {i}: the llama called Nube{i} lives in valley {i * 7 % 13}." for i in range(n))


def state_bytes_per_token(engine, text: str) -> float:
    engine.reset()
    assert "".join(engine.generate(engine.tokenize(text), GREEDY))  # it generates
    payload, held = engine.state()
    return len(payload) / len(held)


def kl_and_top1(reference: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """Mean KL(reference || logits) in nats and top-1 agreement, over rows of next-token logits."""

    def log_softmax(x):
        x = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    ref, other = log_softmax(reference), log_softmax(logits)
    kl = np.sum(np.exp(ref) * (ref - other), axis=-1)
    return float(kl.mean()), float((ref.argmax(-1) == other.argmax(-1)).mean())


# -- the engine ------------------------------------------------------------------------


def test_the_engine_reports_its_cache_type_and_checks_it(engine, engine_q8, default_model_path):
    assert (engine.kv_type, engine_q8.kv_type) == ("f16", "q8_0")
    with pytest.raises(UsageError, match="kv_type must be f16 or q8_0, not 'q4_0'"):
        Engine(default_model_path, kv_type="q4_0")
    with Engine(default_model_path, n_ctx=64, exact=True, kv_type="q8_0") as exact:
        assert exact.kv_type == "f32"  # exact comparisons keep their F32 cache


@pytest.mark.parametrize("kv_type, expected", [("f16", "disabled"), ("q8_0", "enabled")])
def test_flash_attention_is_off_for_f16_and_on_for_q8_0_in_the_context_llama_cpp_builds(
        default_model_path, kv_type, expected):
    from alpaca_chat.engine import log_listener

    logged = []
    with log_listener(lambda level, text: logged.append(text)):
        with Engine(default_model_path, n_ctx=256, kv_type=kv_type):
            pass
    said = [line.split("=")[-1].strip() for line in logged if line.startswith("llama_context: flash_attn ")]
    assert said == [expected]  # llama.cpp's own account ("auto" would be its default)


def test_q8_0_state_is_about_half_of_f16(engine, engine_q8):
    text = facts(20)
    f16, q8 = state_bytes_per_token(engine, text), state_bytes_per_token(engine_q8, text)
    print(f"\nstate bytes/token: f16 {f16:.0f}, q8_0 {q8:.0f} ({q8 / f16:.3f}x)")
    # q8_0 stores 32 values in 34 bytes where f16 takes 64.
    assert 0.45 < q8 / f16 < 0.6


def test_q8_0_logits_stay_close_to_f16(engine, engine_q8):
    tokens = engine.tokenize(SAMPLE.read_text(encoding="utf-8"))[:QUALITY_TOKENS]
    assert len(tokens) == QUALITY_TOKENS
    kl, top1 = kl_and_top1(engine.sequence_logits(tokens), engine_q8.sequence_logits(tokens))
    print(f"\nq8_0 vs f16 over {len(tokens)} tokens: mean KL {kl:.5f}, top-1 {top1:.1%}")
    # Measured: KL 0.0036, top-1 96.2%. A cache that silently stayed f16 would give KL 0.
    assert 0 < kl < 0.02
    assert top1 >= 0.9


def test_a_model_llama_cpp_cannot_quantize_the_cache_of_is_one_clear_error(tmp_path):
    from test_gguf_hparams import write_llama  # heads of 16 values: q8_0 blocks are 32

    path = write_llama(tmp_path / "tiny.gguf")
    with pytest.raises(EngineError, match="q8_0 KV cache.*does not divide n_embd_head_k=16"):
        Engine(path, n_ctx=64, kv_type="q8_0")
    done = subprocess.run([sys.executable, "-m", "alpaca_chat", "-m", str(path), "--kv-type", "q8_0", "--prompt", "hi"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and "does not divide" in done.stderr, done.stderr


def test_every_front_end_loads_with_the_configured_type():
    """The TUI, line mode (and their /model) and --prompt all load through load_model."""
    loaded = load_model(None, Settings(kv_type="q8_0", n_ctx=256))
    try:
        assert loaded.engine.kv_type == "q8_0"
    finally:
        loaded.engine.close()


# -- saved states -----------------------------------------------------------------------


def saved_with(engine, store):
    conversation = store.create_conversation(model="smollm2", template="auto", sampling=GREEDY.to_dict())
    store.add_message(conversation.id, "user", "Remember these facts. " + facts(20))
    store.add_message(conversation.id, "assistant", "I will remember them.")
    engine.reset()
    history = [Message(m.role, m.content) for m in store.messages(conversation.id)]
    session = session_on(engine, store, KVCache(), history, conversation_id=conversation.id)
    reply_of(session, "Where does Nube3 live?")
    assert session.save_state() > 0
    return conversation.id


def resume(engine, store, cid, notes):
    engine.reset()
    history = [Message(m.role, m.content) for m in store.messages(cid)]
    return reply_of(session_on(engine, store, KVCache(), history, conversation_id=cid, notes=notes), "And Nube5?")


def test_an_f16_state_is_not_used_by_a_q8_0_session(isolated_home, engine, engine_q8):
    with Store() as store:
        cid = saved_with(engine, store)
        notes = []
        reply = resume(engine_q8, store, cid, notes)
        history = [Message(m.role, m.content) for m in store.messages(cid)][:-2]  # before "And Nube5?"
    assert reply.stats.cached_tokens == 0 and reply.text  # a full evaluation, and an answer
    assert any("saved KV state ignored" in n and "another KV cache type" in n for n in notes), notes
    engine_q8.reset()
    assert reply.text == reply_of(session_on(engine_q8, history=history), "And Nube5?").text


def test_a_q8_0_state_is_restored_by_a_q8_0_session(isolated_home, engine_q8):
    with Store() as store:
        cid = saved_with(engine_q8, store)
        notes = []
        reply = resume(engine_q8, store, cid, notes)
    assert reply.stats.cached_tokens > 0.9 * reply.stats.prompt_tokens
    assert any("restored KV state" in n for n in notes), notes


# -- the command line and config.toml -----------------------------------------------------


def ask(*args):
    proc = subprocess.run(
        [sys.executable, "-m", "alpaca_chat", "--ctx", "1024", "--temp", "0", "-n", "8", "--json", "--verbose",
         "-c", "--prompt", *args],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def saved_kv_type(cid: int) -> str:
    path = KVCache().path_for(cid)
    with open(path, "rb") as f:
        return kvcache.decode(f, path.stat().st_size).header["kv_type"]


def test_config_and_flag_choose_the_cache_type_of_saved_states(isolated_home, default_model_path):
    with Store() as store:
        cid = store.create_conversation(model=str(default_model_path), template="auto").id
        store.add_message(cid, "user", "Remember these facts. " + facts(5))
        store.add_message(cid, "assistant", "I will remember them.")
    paths.config_file_path().parent.mkdir(parents=True)
    paths.config_file_path().write_text('kv_type = "q8_0"\n')
    ask("Where does Nube3 live?")
    assert saved_kv_type(cid) == "q8_0"
    again, err = ask("And Nube4?", "--kv-type", "f16")  # the flag beats the file
    assert again["stats"]["cached_tokens"] == 0 and "another KV cache type" in err, err
    assert saved_kv_type(cid) == "f16"
