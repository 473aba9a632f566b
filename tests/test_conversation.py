import pytest

from alpaca_chat.conversation import (
    ContextOverflowError,
    Message,
    SamplingParams,
    StopStringFilter,
    fit_to_context,
    split_turns,
)
from alpaca_chat.errors import UsageError


def word_count(messages):
    """A stand-in tokenizer: one token per word, plus one per message."""
    return sum(len(m.content.split()) + 1 for m in messages)


def conversation(turns):
    msgs = [Message("system", "be brief")]
    for i in range(turns):
        msgs += [Message("user", f"question {i} " + "w " * 10), Message("assistant", f"answer {i} " + "w " * 10)]
    return msgs + [Message("user", "last question")]


def test_split_turns_groups_user_and_following_replies():
    system, turns = split_turns(conversation(2))
    assert [m.role for m in system] == ["system"]
    assert [[m.role for m in t] for t in turns] == [["user", "assistant"], ["user", "assistant"], ["user"]]


def test_everything_fits_nothing_dropped():
    msgs = conversation(3)
    fit = fit_to_context(msgs, word_count, n_ctx=1000, reply_budget=100)
    assert fit.messages == msgs and fit.dropped == []
    assert fit.prompt_tokens == word_count(msgs)


def test_oldest_turns_dropped_system_kept():
    msgs = conversation(5)
    fit = fit_to_context(msgs, word_count, n_ctx=60, reply_budget=10)
    assert fit.messages[0] == msgs[0]
    assert fit.messages[-1] == msgs[-1]
    assert fit.dropped == msgs[1 : 1 + len(fit.dropped)]  # oldest first, contiguous
    assert len(fit.dropped) % 2 == 0 and fit.dropped
    assert fit.prompt_tokens + 10 <= 60
    # Dropping one turn fewer would not have fit.
    assert word_count(msgs[:1] + fit.dropped[-2:] + fit.messages[1:]) + 10 > 60


def test_single_prompt_too_long_is_an_error():
    msgs = [Message("system", "s"), Message("user", "w " * 500)]
    with pytest.raises(ContextOverflowError, match="does not fit in the 100-token context"):
        fit_to_context(msgs, word_count, n_ctx=100, reply_budget=10)


def test_prompt_that_fits_without_full_reply_budget_is_kept():
    msgs = [Message("user", "w " * 50)]
    fit = fit_to_context(msgs, word_count, n_ctx=60, reply_budget=500)
    assert fit.messages == msgs


def test_sampling_validation():
    assert SamplingParams(temperature=0).validated().temperature == 0
    for bad in [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=2), dict(max_tokens=0), dict(seed=-3)]:
        with pytest.raises(UsageError, match=next(iter(bad))):
            SamplingParams(**bad).validated()


def test_sampling_round_trip_ignores_unknown_keys():
    params = SamplingParams(temperature=0.3, seed=7)
    assert SamplingParams.from_dict({**params.to_dict(), "future_knob": 1}) == params


def test_message_input_flattening():
    assert Message("user", "Summarize", input="text").flattened_content() == "Summarize\n\ntext"
    assert Message("user", "plain").flattened_content() == "plain"


@pytest.mark.parametrize("chunks", [["Hello ###", " Instruction: more"], ["Hel", "lo #", "## Ins", "truction:x"]])
def test_stop_string_filter_never_leaks_the_stop(chunks):
    f = StopStringFilter(["### Instruction:"])
    out = "".join(f.feed(c) for c in chunks) + f.flush()
    assert out == "Hello "
    assert f.stopped


def test_stop_string_filter_releases_false_prefixes():
    f = StopStringFilter(["<|im_end|>"])
    out = f.feed("a <") + f.feed("b") + f.flush()
    assert out == "a <b" and not f.stopped
