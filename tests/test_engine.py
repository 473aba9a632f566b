"""The real llama.cpp engine on the real default model."""

import os
import subprocess
import sys
import threading
import time

import pytest

from alpaca_chat.conversation import Message, SamplingParams
from alpaca_chat.engine import Engine, physical_cores
from alpaca_chat.errors import EngineError
from alpaca_chat.templates import resolve_template

GREEDY = SamplingParams(temperature=0, max_tokens=24)


def prompt_for(engine, *messages):
    template = resolve_template("auto", engine.chat_template, engine.bos_token, engine.eos_token)
    return template.render(list(messages))


def test_metadata_and_model_facts(engine):
    assert engine.metadata["general.architecture"] == "llama"
    assert "<|im_start|>" in engine.chat_template
    assert engine.eos_token == "<|im_end|>"
    assert engine.n_ctx == 2048
    assert 1 <= engine.n_threads <= physical_cores()


def test_streams_deltas_as_they_are_generated(engine):
    generation = engine.generate(prompt_for(engine, Message("user", "Count from one to ten.")),
                                 SamplingParams(temperature=0, max_tokens=40))
    arrivals = []
    for delta in generation:
        arrivals.append((time.perf_counter(), delta))
    assert len(arrivals) >= 5, "expected many small deltas, not one block"
    assert "".join(d for _, d in arrivals) == generation.text
    assert arrivals[-1][0] - arrivals[0][0] > 0  # spread over time, not delivered at once
    stats = generation.stats
    assert stats.generated_tokens >= len(arrivals) - 1
    assert stats.prompt_tokens == len(engine.tokenize(prompt_for(engine, Message("user", "Count from one to ten."))))
    assert stats.time_to_first_token_s > 0 and stats.generation_tokens_per_s > 0
    assert stats.stop_reason in ("eos", "length")


def test_same_seed_same_bytes_different_seed_differs(engine):
    prompt = prompt_for(engine, Message("user", "Invent a name for a cat."))
    hot = SamplingParams(temperature=1.2, top_k=0, top_p=1.0, min_p=0.0, max_tokens=32)
    runs = {}
    for seed in (1, 1, 2, 3):
        engine.reset()
        runs.setdefault(seed, []).append("".join(engine.generate(prompt, hot.with_changes(seed=seed))))
    assert runs[1][0] == runs[1][1]
    assert len({runs[1][0], runs[2][0], runs[3][0]}) > 1, "different seeds should not all agree"


def test_same_seed_same_output_with_warm_cache(engine):
    prompt = prompt_for(engine, Message("user", "Give me a color."))
    params = SamplingParams(temperature=0.9, seed=1234, max_tokens=24)
    engine.reset()
    cold = "".join(engine.generate(prompt, params))
    warm = engine.generate(prompt, params)
    assert "".join(warm) == cold
    assert warm.stats.cached_tokens == warm.stats.prompt_tokens - 1


def test_multi_turn_reuses_kv_prefix(engine):
    engine.reset()
    history = [Message("user", "Name a fruit.")]
    first = engine.generate(prompt_for(engine, *history), GREEDY)
    reply = "".join(first)
    assert first.stats.cached_tokens == 0
    history += [Message("assistant", reply), Message("user", "And a vegetable?")]
    second = engine.generate(prompt_for(engine, *history), GREEDY)
    "".join(second)
    # Turn 2 re-evaluates only what is new: the earlier prompt is reused from the cache.
    assert second.stats.cached_tokens >= first.stats.prompt_tokens
    new_tokens = second.stats.prompt_tokens - second.stats.cached_tokens
    assert new_tokens < second.stats.prompt_tokens / 2


def test_cancel_between_tokens(engine):
    cancel = threading.Event()
    generation = engine.generate(prompt_for(engine, Message("user", "Write a long story.")),
                                 SamplingParams(temperature=0, max_tokens=200), cancel=cancel)
    for i, _ in enumerate(generation):
        if i == 3:
            cancel.set()
    assert generation.stats.stop_reason == "cancelled"
    assert generation.stats.generated_tokens <= 5
    # The engine is still usable afterwards.
    assert "".join(engine.generate(prompt_for(engine, Message("user", "hi")), GREEDY))


def test_max_tokens_stops_with_length(engine):
    generation = engine.generate(prompt_for(engine, Message("user", "Write a long story.")),
                                 SamplingParams(temperature=0, max_tokens=5))
    "".join(generation)
    assert generation.stats.generated_tokens == 5
    assert generation.stats.stop_reason == "length"


def test_prompt_longer_than_context_is_refused(default_model_path):
    with Engine(default_model_path, n_ctx=64) as small:
        assert small.n_ctx < 1024  # llama.cpp may round the size up a little
        with pytest.raises(EngineError, match=f"context holds {small.n_ctx}"):
            small.generate("word " * (small.n_ctx + 10), GREEDY)


def test_stop_strings_end_the_reply(engine):
    prompt = prompt_for(engine, Message("user", "Count from 1 to 20, separated by commas."))
    full = "".join(engine.generate(prompt, SamplingParams(temperature=0, max_tokens=60)))
    assert "5" in full, full
    stop = full[full.index("5"):][:2]
    cut = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=60), stop_strings=(stop,))
    text = "".join(cut)
    assert stop not in text and full.startswith(text)
    assert cut.stats.stop_reason == "stop_string"


@pytest.mark.parametrize("preset, expected", [(None, "1000"), ("50000", "50000")])
def test_openmp_waits_briefly_unless_the_user_says_otherwise(preset, expected):
    # libgomp reads GOMP_SPINCOUNT when llama_cpp loads it: it must be set by then.
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if preset is not None:
        env["GOMP_SPINCOUNT"] = preset
    code = (
        "import os; before = 'libgomp' in open('/proc/self/maps').read(); import alpaca_chat.engine; "
        "after = 'libgomp' in open('/proc/self/maps').read(); print(before, after, os.environ['GOMP_SPINCOUNT'])"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True", expected]
