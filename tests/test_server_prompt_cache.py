"""The prompt cache across restarts: a real server saves its idle sequences' KV states, is stopped,
and a new server process on the same data directory restores the longest saved prefix (bundled
model, loopback, the real `openai` client). A damaged state file is refused, never loaded."""

import contextlib
import os
import stat

import openai

from test_server import _health, _serve, assert_same_greedy_reply, greedy_chat

# About 400 prompt tokens: above the prompt cache's minimum, small enough for CI.
LONG = " ".join(f"Fact {i}: the {w} is a kind of thing people talk about." for i, w in
                enumerate(["river", "mountain", "valley", "forest", "desert", "ocean", "island", "lake"] * 4))


@contextlib.contextmanager
def _server(model, tmp_path_factory, home):
    gen = _serve(model, tmp_path_factory, "--parallel", "2", "--ctx", "2048", env={"ALPACA_CHAT_HOME": str(home)})
    base = next(gen)
    try:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        client.model_id = _health(base)["model"]
        yield base, client
    finally:
        gen.close()  # SIGTERM: a graceful stop, which saves what is not saved yet


def _ask(client, messages):
    return greedy_chat(client, messages, max_tokens=12)


def _same_reply(a, b) -> None:
    assert_same_greedy_reply(a.choices[0].logprobs.content, b.choices[0].logprobs.content)


def test_a_restarted_server_restores_the_saved_prefix(default_model_path, tmp_path_factory):
    home = tmp_path_factory.mktemp("prompt-cache-home")
    history = [{"role": "system", "content": "You answer briefly."},
               {"role": "user", "content": LONG + "\nWhich facts mention water?"}]
    with _server(default_model_path, tmp_path_factory, home) as (base, client):
        first = _ask(client, history)
        history += [{"role": "assistant", "content": first.choices[0].message.content},
                    {"role": "user", "content": "And which mention land?"}]
        second = _ask(client, history)  # the in-memory cache: turn 1 is not evaluated again
        assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
        assert _health(base)["restored_states"] == 0

    files = list((home / "data" / "kv" / "serve").glob("*.kv"))
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)

    with _server(default_model_path, tmp_path_factory, home) as (base, client):
        again = _ask(client, history)  # a new process: from the saved state, not evaluated again
        assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
        _same_reply(again, second)
        health = _health(base)
        assert health["restored_states"] == 1 and health["saved_states"] == len(files)

    for path in files:  # damaged: each payload's last byte
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
        os.chmod(path, 0o600)
    with _server(default_model_path, tmp_path_factory, home) as (base, client):
        cold = _ask(client, history)
        assert cold.usage.prompt_tokens_details.cached_tokens == 0  # refused by its checksum: evaluated
        _same_reply(cold, second)
        assert _health(base)["restored_states"] == 0
