"""Tool-call formats against real chat templates (llama.cpp's models/templates/, from the
llama-cpp-python sdist): the format detected from each template, a conversation with tools, a call
and its result rendered by the template itself, and what the template writes for a call parsed
back into the same OpenAI call. Pure: no model (test_server_tools_real.py runs them on one)."""

import json

import pytest

from alpaca_chat.engine.grammar import json_schema_grammar
from alpaca_chat.server import tool_formats
from alpaca_chat.server.schemas import parse_chat
from alpaca_chat.templates import ChatTemplate
from test_template_corpus import _corpus_dir

BOS, EOS = "<s>", "</s>"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a zone.",
                                         "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}}
# template -> the format it writes calls in
EXPECTED = {
    "meta-llama-Llama-3.1-8B-Instruct": "llama3",
    "meta-llama-Llama-3.2-3B-Instruct": "llama3",
    "meta-llama-Llama-3.3-70B-Instruct": "llama3",
    "mistralai-Mistral-Nemo-Instruct-2407": "mistral",
    "Mistral-Small-3.2-24B-Instruct-2506": "mistral-args",
    "unsloth-mistral-Devstral-Small-2507": "mistral-args",
    "Qwen-Qwen2.5-7B-Instruct": "hermes",
    "Qwen-Qwen3-0.6B": "hermes",
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": "hermes",
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": "hermes",
}


@pytest.fixture(scope="module")
def corpus(request, tmp_path_factory) -> dict[str, str]:
    out = _corpus_dir(request, tmp_path_factory)
    return {name: (out / f"{name}.jinja").read_text(encoding="utf-8") for name in EXPECTED}


def _request(messages, **extra):
    return parse_chat({"messages": messages, "tools": [WEATHER, TIME], **extra}, 100)


def _render(source: str, parsed, *, generation: bool = True) -> str:
    fmt, native = tool_formats.detect(source)
    assert native
    messages = tool_formats.template_messages(parsed.raw_messages, fmt)
    template = ChatTemplate("t", source, BOS, EOS)
    if generation:
        return tool_formats.render(template, messages, parsed.tools.tools)
    return template.render_with_tools(messages, parsed.tools.tools, add_generation_prompt=False)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_format_is_read_from_the_template(corpus, name):
    fmt, native = tool_formats.detect(corpus[name])
    assert (fmt.name, native) == (EXPECTED[name], True)


def test_templates_without_a_format_get_the_described_hermes_one():
    from alpaca_chat.templates import ALPACA_JINJA, CHATML_JINJA

    for source in (ALPACA_JINJA, CHATML_JINJA):
        assert tool_formats.detect(source) == (tool_formats.HERMES, False)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_call_the_template_writes_parses_back(corpus, name):
    """The template renders the tools, the assistant's call and the tool's result; the text it
    writes for the call, given to the format's parser as a reply, is the same call again."""
    source = corpus[name]
    fmt, _ = tool_formats.detect(source)
    user = {"role": "user", "content": "Weather in Paris?"}
    call = {"id": "call_0123456789abcdef", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}
    assistant = {"role": "assistant", "content": None, "tool_calls": [call]}
    result = {"role": "tool", "tool_call_id": call["id"], "content": '{"celsius": 21}'}

    whole = _render(source, _request([{"role": "system", "content": "Be brief."}, user, assistant, result]))
    assert "get_time" in whole and "The time in a zone." in whole  # the tools are described
    assert '"celsius": 21' in whole and "Paris" in whole
    if fmt.name.startswith("mistral"):  # ids of 9 letters or digits, the same for the call and its result
        mapped = fmt.call_id(call["id"])
        assert len(mapped) == 9 and mapped.isalnum()
        assert whole.count(mapped) == (2 if "tool_call_id" in source else 0)

    prompt = _render(source, _request([user]))
    with_call = _render(source, _request([user, assistant]), generation=False)
    assert with_call.startswith(prompt), (prompt, with_call)
    written = with_call[len(prompt):]
    for end in (EOS, "<|eot_id|>", "<|eom_id|>", "<|im_end|>"):
        written = written.replace(end, "")
    content, calls = fmt.parse(written, ["get_weather", "get_time"])
    assert content is None, written
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"})]


@pytest.mark.parametrize("fmt, reply", [
    (tool_formats.LLAMA3, '<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}'),
    (tool_formats.LLAMA3, '{"name": "get_time", "parameters": {"zone": "UTC"}}; '
                          '{"name": "get_weather", "parameters": {"city": "Oslo"}}'),
    (tool_formats.MISTRAL, '[TOOL_CALLS][{"name": "get_time", "arguments": {"zone": "UTC"}}, '
                           '{"name": "get_weather", "arguments": {"city": "Oslo"}}]'),
    (tool_formats.MISTRAL, '[{"name": "get_time", "arguments": {"zone": "UTC"}}, '  # marker detokenized away
                           '{"name": "get_weather", "arguments": {"city": "Oslo"}}]'),
    (tool_formats.MISTRAL_ARGS, '[TOOL_CALLS]get_time[ARGS]{"zone": "UTC"}'
                                '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}'),
    (tool_formats.MISTRAL_ARGS, 'get_time{"zone": "UTC"}get_weather{"city": "Oslo"}'),  # markers detokenized away
    (tool_formats.MISTRAL_ARGS, '[TOOL_CALLS]get_time[CALL_ID]a1b2c3d4e[ARGS]{"zone": "UTC"}'
                                'get_weather[ARGS]{"city": "Oslo"}'),
])
def test_replies_parse_into_openai_calls(fmt, reply):
    content, calls = fmt.parse(reply, ["get_weather", "get_time"])
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    assert content is None and got == [("get_time", {"zone": "UTC"}), ("get_weather", {"city": "Oslo"})][:len(got)]
    assert len(got) == (1 if "CALL_ID" not in reply and reply.count("get_") == 1 else 2)
    assert all(c["type"] == "function" and c["id"] for c in calls)
    if fmt.name.startswith("mistral"):
        assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in calls)


@pytest.mark.parametrize("fmt, reply", [
    (tool_formats.LLAMA3, '{"answer": 42}'),  # JSON the user asked for, no tool named
    (tool_formats.LLAMA3, '{"name": "rm_rf", "parameters": {}}'),  # not a tool of the request
    (tool_formats.LLAMA3, 'The weather is fine.'),
    (tool_formats.MISTRAL, '[1, 2, 3]'),
    (tool_formats.MISTRAL_ARGS, 'Paris is sunny {"really": true}'),
])
def test_text_that_is_no_call_stays_content(fmt, reply):
    assert fmt.parse(reply, ["get_weather", "get_time"]) == (reply, [])


@pytest.mark.parametrize("fmt", [tool_formats.HERMES, tool_formats.LLAMA3, tool_formats.MISTRAL,
                                 tool_formats.MISTRAL_ARGS])
def test_forced_call_grammars_are_well_formed(fmt):
    """Every rule the grammar uses is defined once; the converter's rules were renamed apart."""
    import re

    spec = _request([{"role": "user", "content": "x"}], tool_choice="required").tools
    grammar = fmt.grammar(spec, json_schema_grammar)
    defined = re.findall(r"^([A-Za-z0-9-]+) ::=", grammar, flags=re.M)
    assert len(defined) == len(set(defined)) and defined[0] == "root"
    used = {t for t in tool_formats._GBNF_TOKEN.findall(grammar) if t[0] not in '"['}
    assert used <= set(defined), used - set(defined)
