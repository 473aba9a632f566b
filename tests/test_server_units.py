"""`alpaca-chat serve`'s pure parts: request checking, the bind-address rule, lazy imports."""

import json
import subprocess
import sys

import pytest

from alpaca_chat.server import is_loopback
from alpaca_chat.server.schemas import ApiError, parse_chat, parse_completion, parse_json


def test_chat_fields_become_sampling_and_messages():
    parsed = parse_chat({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None}],
        "temperature": 0, "top_p": 0.5, "seed": 7, "max_completion_tokens": 9, "stop": "END",
        "stream": True, "stream_options": {"include_usage": True}}, 100)
    assert [(m.role, m.content) for m in parsed.messages] == [("system", "be brief"), ("user", "ab"),
                                                               ("assistant", "")]
    assert (parsed.sampling.temperature, parsed.sampling.top_p, parsed.sampling.seed) == (0.0, 0.5, 7)
    assert parsed.max_tokens == 9 and parsed.stop == ("END",) and parsed.stream and parsed.include_usage


@pytest.mark.parametrize("body, param", [
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 101}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": True}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 2}, "top_p"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", ""]}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}}, "response_format"),
])
def test_bad_chat_fields_name_their_param(body, param):
    with pytest.raises(ApiError) as caught:
        parse_chat(body, 100)
    assert caught.value.status == 400 and caught.value.param == param


def test_completion_prompt_and_json_body():
    assert parse_completion({"prompt": ["once"]}, 10).prompt == "once"
    with pytest.raises(ApiError):
        parse_completion({"prompt": 5}, 10)
    for raw in (b"{", b"[]", b"\xff"):
        with pytest.raises(ApiError):
            parse_json(raw)


def test_loopback_addresses():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.com")


def test_non_loopback_bind_needs_a_key_or_no_auth():
    result = subprocess.run([sys.executable, "-m", "alpaca_chat", "serve", "--host", "0.0.0.0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "--api-key" in result.stderr


def test_prompt_path_does_not_import_the_server_stack():
    code = ("import sys; import alpaca_chat.cli as c; c.build_parser().parse_args(['--prompt', 'x']); "
            "print(any(m.split('.')[0] in ('starlette', 'uvicorn') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_tool_calls_are_parsed_out_of_the_reply():
    from alpaca_chat.server.tools import parse_calls

    content, calls = parse_calls('Sure.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
                                 '<tool_call>not json</tool_call>')
    assert content == "Sure.\n\n<tool_call>not json</tool_call>"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [("f", {"x": 1})]
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert parse_calls("plain text") == ("plain text", [])


@pytest.mark.parametrize("body, param", [
    ({"tools": [], "tool_choice": "auto"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"function": {"name": "g"}}},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_bad_tools_name_their_param(body, param):
    with pytest.raises(ApiError) as caught:
        parse_chat({"messages": [{"role": "user", "content": "x"}], **body}, 100)
    assert caught.value.status == 400 and caught.value.param == param


def test_tool_messages_render_as_hermes_turns():
    parsed = parse_chat({"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 2}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}]}, 100)
    assert parsed.messages[1].content == '<tool_call>\n{"name": "f", "arguments": {"a": 2}}\n</tool_call>'
    assert (parsed.messages[2].role, parsed.messages[2].content) == ("user", "<tool_response>\n42\n</tool_response>")


def test_the_server_stack_stays_torch_free():
    code = ("import sys; import alpaca_chat.server.app, alpaca_chat.engine.batching, alpaca_chat.engine.grammar, "
            "alpaca_chat.loading, uvicorn; print([m for m in ('torch', 'transformers', 'convert', 'textual') "
            "if m in sys.modules])")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_saved_prefixes_files_replacement_and_checks(tmp_path):
    """The prompt cache's files (no llama.cpp: payloads are plain bytes): 0600 files, the longest
    shared prefix chosen, a state replaced by one that extends it, a reopened cache finding them,
    a damaged file or one for another key refused."""
    import stat

    from alpaca_chat import kvcache
    from alpaca_chat.server.prompt_cache import SavedPrefixes

    key = kvcache.StateKey(1, "m" * 64, 2048, "f16", "t" * 64)
    cache = kvcache.KVCache(tmp_path / "serve")
    saved = SavedPrefixes(cache, key, min_tokens=4)
    short, long, other = list(range(200)), list(range(300)), [7] * 250
    for tokens in (short, long, other):
        saved.save(tokens, bytes(range(256)) * 4)
    saved.close()
    files = sorted(cache.directory.glob("*.kv"))
    assert len(files) == 2  # `short` was a prefix of `long`: replaced
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)

    again = SavedPrefixes(cache, key)
    assert sorted(map(len, again.held.values())) == [250, 300]
    sid, n = again.best(list(range(260)) + [1, 2])
    assert n == 260 and again.held[sid] == long and again.has(list(range(100)))
    state = again.load(sid)
    assert state.tokens == long and bytes(state.payload) == bytes(range(256)) * 4 and again.restored == 1
    (sid_other, n), = [(s, len(t)) for s, t in again.held.items() if t == other]
    path = cache.path_for(sid_other)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert again.load(sid_other) is None and sid_other not in again.held  # damaged: refused, forgotten
    again.close()
    foreign = SavedPrefixes(cache, kvcache.StateKey(1, "m" * 64, 4096, "f16", "t" * 64))
    assert foreign.load(sid) is None  # another context size
    foreign.close()
