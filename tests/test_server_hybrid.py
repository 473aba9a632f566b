"""`alpaca-chat serve` on hybrid models (tiny Qwen3.5 and Granite 4 exports of our own): a recurrent
state cannot be cut back to a shared prefix, so a prompt that shares only part of a cached one must
be evaluated afresh and give what a fresh server gives; parallel requests give what each gives alone.
A real server process on a loopback port and the openai client, as in test_server.py."""

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from test_server import _health, _serve, assert_same_greedy_reply, greedy_chat

pytestmark = pytest.mark.slow
CASES = ["qwen35-hybrid-tied", "granite-hybrid-moe"]
LLAMAS = [{"role": "user", "content": "Tell me about llamas and alpacas please"}]
VICUNAS = [{"role": "user", "content": "Tell me about llamas and vicunas"}]  # shares the start of LLAMAS


@pytest.fixture(scope="module", params=CASES)
def hybrid_client(request, tiny_builds, tmp_path_factory):
    _, f32, _ = tiny_builds.get(request.param)
    for base in _serve(f32, tmp_path_factory, "--parallel", "2", "--ctx", "512"):
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        client.model_id = _health(base)["model"]
        yield client


def _ask(client, messages):
    """The reply's tokens with their log-probabilities: compared by the near-tie rule (test_server)."""
    return greedy_chat(client, messages, max_tokens=12).choices[0].logprobs.content


def test_a_partly_shared_cached_prompt_is_evaluated_afresh(hybrid_client):
    fresh = _ask(hybrid_client, VICUNAS)  # the server's first request: nothing cached
    _ask(hybrid_client, LLAMAS)
    assert _ask(hybrid_client, LLAMAS + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "More"}])
    assert_same_greedy_reply(_ask(hybrid_client, VICUNAS), fresh)
    assert_same_greedy_reply(_ask(hybrid_client, VICUNAS), fresh)  # and again, from whatever is cached now


def test_parallel_requests_give_what_each_gives_alone(hybrid_client):
    prompts = [[{"role": "user", "content": f"Question {i} about llamas"}] for i in range(4)]
    alone = [_ask(hybrid_client, p) for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: _ask(hybrid_client, p), prompts))
    for each, one in zip(together, alone):
        assert_same_greedy_reply(each, one)
