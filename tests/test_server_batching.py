"""engine.batching.ContinuousBatch on the real bundled model: requests join a running batch, the
prompt cache picks the right idle sequence, cancellation frees a sequence."""

import pytest

from alpaca_chat.conversation import SamplingParams
from alpaca_chat.engine import Engine
from alpaca_chat.engine.batching import ContinuousBatch, StreamRequest

GREEDY = SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=8)


@pytest.fixture(scope="module")
def batch(default_model_path):
    with Engine(default_model_path, n_ctx=1024, n_seq_max=3) as engine:
        yield ContinuousBatch(engine)


def _request(batch, text: str, sampling=GREEDY, log=None):
    out = {"text": "", "stats": None}
    request = StreamRequest(batch.engine.tokenize(text), sampling,
                            on_delta=lambda d: out.__setitem__("text", out["text"] + d),
                            on_done=lambda stats: out.__setitem__("stats", stats))
    return request, out


def _run(batch, *requests):
    for request in requests:
        batch.admit(request)
    while batch.busy:
        batch.step()


SYSTEM = "You are a helpful assistant. Answer every question in one short sentence, please. "


def test_a_request_joins_a_running_batch_and_both_complete(batch):
    first, first_out = _request(batch, SYSTEM + "Question: what is two plus two?", GREEDY.with_changes(max_tokens=12))
    batch.admit(first)
    batch.step()
    batch.step()
    assert batch.busy and first_out["stats"] is None
    second, second_out = _request(batch, "Name a fruit:")
    batch.admit(second)  # while the first is still generating
    assert len(batch.running) == 2
    while batch.busy:
        batch.step()
    for out, limit in ((first_out, 12), (second_out, 8)):
        assert out["text"] and 1 <= out["stats"].generated_tokens <= limit


def test_prompt_cache_takes_the_idle_sequence_with_the_longest_prefix(batch):
    batch.close()  # no idle sequences left from the other tests
    conversation = SYSTEM + "Question: what is the capital city of France, and which river runs through it? Answer:"
    request, out = _request(batch, conversation)
    _run(batch, request)
    stats = out["stats"]
    # every generated token but the last sampled one (cut by the limit; an end token is not counted) was evaluated
    held = len(request.tokens) + stats.generated_tokens - (stats.stop_reason == "length")
    assert any(len(tokens) == held and tokens[:len(request.tokens)] == request.tokens
               for tokens in batch.idle.values())

    # a prompt sharing only the system text takes an empty sequence: the conversation's cache stays
    other, other_out = _request(batch, SYSTEM + "Question: name a color.")
    _run(batch, other)
    assert other_out["stats"].cached_tokens == 0
    assert any(len(tokens) == held for tokens in batch.idle.values())

    follow_up, follow_out = _request(batch, conversation + out["text"] + " Question: and of Spain? Answer:")
    _run(batch, follow_up)
    assert follow_out["stats"].cached_tokens >= len(request.tokens)
    assert follow_out["text"]


def test_cancel_stops_a_request_at_the_next_step_and_frees_its_sequence(batch):
    request, out = _request(batch, "Count: 1, 2, 3,", GREEDY.with_changes(max_tokens=200))
    batch.admit(request)
    for _ in range(3):
        batch.step()
    request.cancel.set()
    batch.step()
    assert not batch.busy and out["stats"].stop_reason == "cancelled"
    assert out["stats"].generated_tokens <= 4
