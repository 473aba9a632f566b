"""The token step lives in one place: single and parallel generation end for the same reasons with
the same text (real model), and the step itself assembles UTF-8 and holds back stop strings."""

import pytest

from alpaca_chat.conversation import SamplingParams
from alpaca_chat.engine import Engine, ParallelRequest, SequenceStep

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "List three fruits:",
    "1, 2, 3, 4,",
]


@pytest.fixture(scope="module")
def engine(default_model_path):
    # One engine for both ways of running, so both run the same kernels. Replies are kept short:
    # a batch of other sequences rounds differently, and a greedy reply can drift after ~16 tokens.
    with Engine(default_model_path, n_ctx=1024, n_seq_max=4) as loaded:
        yield loaded


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, repeat_penalty=1.0)


def _single(engine, tokens, sampling, stops):
    generation = engine.generate(tokens, sampling, stop_strings=stops)
    text = "".join(generation)
    return text, generation.stats.stop_reason, generation.stats.generated_tokens


def _parallel(engine, requests):
    queue = iter(requests)
    results = {r.request.tag: r for r in engine.generate_parallel(lambda: next(queue, None))}
    return [(results[i].text, results[i].stats.stop_reason, results[i].stats.generated_tokens)
            for i in range(len(requests))]


@pytest.mark.slow
def test_single_and_parallel_generation_end_alike(engine):
    tokens = [engine.tokenize(p) for p in PROMPTS]
    free_text = [_single(engine, t, _greedy(12), ())[0] for t in tokens]
    cases = []  # (tokens, sampling, stop strings): a limit, a stop string, nothing to generate, the same free run
    for t, text in zip(tokens, free_text):
        cases.append((t, _greedy(3), ()))
        words = text.split()
        if len(words) >= 3:  # a stop string taken from what the model says: it must cut there
            cases.append((t, _greedy(12), (words[2],)))
        cases.append((t, _greedy(0), ()))
        cases.append((t, _greedy(12), ()))
    single = [_single(engine, t, s, stops) for t, s, stops in cases]
    parallel = _parallel(engine, [ParallelRequest(t, s, stops, tag=i) for i, (t, s, stops) in enumerate(cases)])
    assert parallel == single
    reasons = {reason for _, reason, _ in single}
    assert {"length", "stop_string"} <= reasons  # the cases exercised both
    for (t, s, stops), (text, reason, n) in zip(cases, single):
        if stops:
            assert reason == "stop_string" and stops[0] not in text
        if s.max_tokens == 0:
            assert (text, n) == ("", 0)


class _ScriptedTokens:
    """The engine calls a SequenceStep makes, over a script of (token, bytes) pairs; token 0 ends."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces
        self.next = 0
        self.freed = 0

    def new_sampler(self, sampling, history):
        return object()

    def free_sampler(self, sampler):
        self.freed += 1

    def sample(self, sampler, idx):
        self.next += 1
        return self.next if self.next <= len(self.pieces) else 0

    def is_end_of_generation(self, token):
        return token == 0

    def token_piece(self, token):
        return self.pieces[token - 1]


def _run(step: SequenceStep) -> list[str]:
    out = []
    while not step.finished:
        text, _ = step.advance(-1)
        out.append(text)
    return out


def test_a_character_split_across_tokens_comes_out_whole():
    snowman = "☃".encode()
    engine = _ScriptedTokens([b"a ", snowman[:1], snowman[1:], b" b"])
    step = SequenceStep(engine, SamplingParams(max_tokens=10), [1, 2, 3])
    out = _run(step)
    assert "".join(out) == "a ☃ b" and "\ufffd" not in "".join(out)
    assert step.stats.stop_reason == "eos" and step.stats.generated_tokens == 4
    assert engine.freed == 1


def test_a_stop_string_is_held_back_and_never_shown():
    engine = _ScriptedTokens([b"Hello", b" <|", b"end", b"|> more"])
    step = SequenceStep(engine, SamplingParams(max_tokens=10), [1], ("<|end|>",))
    out = _run(step)
    assert "".join(out) == "Hello "
    assert all("<|" not in part for part in out)
    assert step.stats.stop_reason == "stop_string" and engine.freed == 1


def test_the_limit_ends_a_step_and_end_is_idempotent():
    engine = _ScriptedTokens([b"x"] * 10)
    step = SequenceStep(engine, SamplingParams(max_tokens=3), [1])
    assert "".join(_run(step)) == "xxx"
    assert step.stats.stop_reason == "length" and step.stats.generated_tokens == 3
    assert step.end("cancelled") == "" and step.stats.stop_reason == "length"
    assert engine.freed == 1
