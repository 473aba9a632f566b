"""Tool calls in the Llama 3.x and Mistral formats, end to end: a real server process runs the bundled
model under a real Llama 3.1 or Mistral Small 3.2 template (`--template PATH.jinja`,
from llama.cpp's models/templates/), and the real `openai` client asks for forced calls, gets them
as `tool_calls` that validate against the tool's schema, and sends the call and its result back."""

import json

import jsonschema
import openai
import pytest

from test_server import TIME, WEATHER, _serve
from test_template_corpus import _corpus_dir

# (Mistral Nemo's `[TOOL_CALLS][...]` form is covered against its template in test_server_tool_formats.py:
# a server per template costs a model load.)
TEMPLATES = ["meta-llama-Llama-3.1-8B-Instruct", "Mistral-Small-3.2-24B-Instruct-2506"]


@pytest.fixture(scope="module", params=TEMPLATES)
def templated(request, default_model_path, tmp_path_factory):
    template = _corpus_dir(request, tmp_path_factory) / f"{request.param}.jinja"
    for base in _serve(default_model_path, tmp_path_factory, "--parallel", "1", "--ctx", "1024",
                       "--template", str(template), "--prompt-cache-mb", "0"):
        yield openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)


def test_forced_calls_come_back_as_tool_calls_and_results_go_in(templated):
    client = templated
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER, TIME],
                                           tool_choice="required", max_tokens=40, temperature=0.7, seed=1)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1, choice
    call = choice.message.tool_calls[0]
    schema = WEATHER if call.function.name == "get_weather" else TIME
    jsonschema.validate(json.loads(call.function.arguments), schema["function"]["parameters"])

    chunks = list(client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER, TIME], stream=True, max_tokens=32, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_time"}}))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas] == ["get_time"] and deltas[0].id
    jsonschema.validate(json.loads(deltas[0].function.arguments), TIME["function"]["parameters"])

    # the call and its result, rendered by the template itself: an answer or another call, no error
    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 21}'}]
    answer = client.chat.completions.create(model=model, messages=messages, tools=[WEATHER, TIME],
                                            max_tokens=8, temperature=0)
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert message.content is not None or message.tool_calls
