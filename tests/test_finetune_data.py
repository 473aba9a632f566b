"""Training data: loading, validation messages, prompt rendering, label masking."""

import json

import pytest

from finetune_helpers import SEED_DATA, seed_rows, write_json, write_jsonl

pytest.importorskip("transformers", reason="needs the convert extra")

from alpaca_chat.conversation import Message  # noqa: E402
from alpaca_chat.errors import DataError  # noqa: E402
from alpaca_chat.templates import alpaca_prompt, alpaca_template  # noqa: E402
from convert import data  # noqa: E402
from convert.data import IGNORE_INDEX  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(smollm2_checkpoint):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(smollm2_checkpoint)


# -- loading -----------------------------------------------------------------------------


def test_loads_the_shared_alpaca_seed_tasks():
    records = data.load_records(SEED_DATA)
    assert len(records) == 150
    assert all(not r.is_chat and r.instruction and r.output for r in records)
    assert sum(1 for r in records if r.input) == 100


def test_jsonl_with_blank_lines_and_optional_input(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "input": None, "output": "d"}])
    path.write_text(path.read_text() + "\n\n", encoding="utf-8")
    records = data.load_records(path)
    assert [(r.instruction, r.input, r.output) for r in records] == [("a", "", "b"), ("c", "", "d")]
    assert records[1].where == f"{path}: line 2"


def test_saved_datasets_directory(tmp_path):
    import datasets

    datasets.Dataset.from_list(seed_rows(5)).save_to_disk(str(tmp_path / "ds"))
    records = data.load_records(tmp_path / "ds")
    assert [r.instruction for r in records] == [row["instruction"] for row in seed_rows(5)]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"instruction": "a", "output": "b"}, {"output": "x"}], "row 2: missing 'instruction'"),
        ([{"instruction": "a", "input": "x"}], "row 1: missing 'output'"),
        ([{"instruction": "a", "output": 42}], "row 1: 'output' must be a string, not a number"),
        ([{"instruction": ["a"], "output": "b"}], "row 1: 'instruction' must be a string, not a list"),
        ([{"instruction": "a", "input": {"k": 1}, "output": "b"}], "row 1: 'input' must be a string, not an object"),
        ([{"instruction": "  ", "output": "b"}], "row 1: 'instruction' is empty"),
        ([{"instruction": "a", "output": "b"}, "just text"], "row 2: expected an object"),
        ([], "holds no examples"),
    ],
)
def test_bad_json_rows_name_the_file_and_row(tmp_path, rows, message):
    path = write_json(tmp_path / "bad.json", rows)
    with pytest.raises(DataError) as caught:
        data.load_records(path)
    assert str(path) in str(caught.value) and message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 3: missing 'output'"):
        data.load_records(path)


def test_invalid_json_at_line_n_of_jsonl(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n{"instruction": "e", \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl: invalid JSON at line 3, column \d+"):
        data.load_records(path)


def test_invalid_json_list_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json: invalid JSON at line 3"):
        data.load_records(path)


@pytest.mark.parametrize("content", ["", "   \n\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.json is empty"):
        data.load_records(path)


def test_missing_data_and_offline_hub_dataset(tmp_path):
    with pytest.raises(DataError, match="data not found"):
        data.load_records(tmp_path / "nope.json")
    with pytest.raises(DataError, match="someone/alpaca-data is not a local file or directory, and HF_HUB_OFFLINE is set"):
        data.load_records("someone/alpaca-data")  # HF_HUB_OFFLINE=1 in the tests


def test_mixing_chat_and_alpaca_rows_is_refused(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    with pytest.raises(DataError, match="row 2: a chat row"):
        data.load_records(write_json(tmp_path / "mixed.json", rows))


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "user", "content": "hi"}], "no 'assistant' message"),
        ([{"role": "robot", "content": "hi"}], "message 1 has role 'robot'"),
        ([{"role": "user", "content": 3}], "message 1: 'content' must be a string"),
        ("hello", "'messages' must be a non-empty list"),
    ],
)
def test_bad_chat_rows(tmp_path, messages, message):
    with pytest.raises(DataError, match=f"row 1: {message}"):
        data.load_records(write_json(tmp_path / "chat.json", [{"messages": messages}]))


# -- the split ---------------------------------------------------------------------------------


def test_split_is_seeded_and_disjoint():
    records = data.load_records(SEED_DATA)
    train, val = data.split(records, 0.1, seed=7)
    again_train, again_val = data.split(records, 0.1, seed=7)
    assert (len(train), len(val)) == (135, 15)
    assert val == again_val and train == again_train
    assert not {r.where for r in train} & {r.where for r in val}
    assert data.split(records, 0.1, seed=8)[1] != val
    assert len(data.split(records, 4, seed=7)[1]) == 4
    assert data.split(records, 0, seed=7)[1] == []


# -- rendering and masking ---------------------------------------------------------------------


def test_alpaca_example_masks_the_prompt_and_ends_with_eos(tokenizer):
    record = data.Record("x", "Name a color.", "", "Blue.")
    (example,), report = data.tokenize([record], tokenizer, max_length=512)
    prompt = tokenizer(alpaca_prompt("Name a color."))["input_ids"]
    assert list(example.input_ids[: len(prompt)]) == prompt
    assert list(example.labels[: len(prompt)]) == [IGNORE_INDEX] * len(prompt)
    response = example.labels[len(prompt) :]
    assert list(response) == list(example.input_ids[len(prompt) :])
    assert response[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(response[:-1]) == "Blue."
    assert report.trained_tokens == len(response)


def test_train_on_inputs_takes_loss_everywhere(tokenizer):
    record = data.Record("x", "Name a color.", "in", "Blue.")
    (example,), _ = data.tokenize([record], tokenizer, max_length=512, train_on_inputs=True)
    assert example.labels == example.input_ids


def test_training_prompt_is_what_alpaca_chat_sends(tokenizer, engine):
    """The prompt tokens trained on are exactly those llama.cpp sees when chatting."""
    record = data.Record("x", "Summarize the text.", "CPUs run code.", "They execute instructions.")
    (example,), _ = data.tokenize([record], tokenizer, max_length=512)
    chat_prompt = alpaca_template(engine.eos_token).render([Message("user", record.instruction, input=record.input)])
    chat_tokens = engine.tokenize(chat_prompt)
    assert list(example.input_ids[: len(chat_tokens)]) == chat_tokens
    assert example.labels[len(chat_tokens) - 1] == IGNORE_INDEX and example.labels[len(chat_tokens)] != IGNORE_INDEX


def test_truncation_is_counted_and_prompt_only_examples_dropped(tokenizer):
    short = data.Record("a", "Say hi.", "", "Hi!")
    long_answer = data.Record("b", "Count.", "", " ".join(str(i) for i in range(200)))
    long_prompt = data.Record("c", "Read: " + "word " * 300, "", "ok")
    examples, report = data.tokenize([short, long_answer, long_prompt], tokenizer, max_length=64)
    assert (report.examples, report.truncated, report.dropped) == (2, 1, 1)
    assert max(len(e) for e in examples) == 64


def test_every_example_too_long_is_an_error(tokenizer, tmp_path):
    records = data.load_records(SEED_DATA)[:5]
    with pytest.raises(DataError, match=r"seed\.json: every example is longer than --max-length 8 tokens \(the shortest has \d+\)"):
        data.tokenize(records, tokenizer, max_length=8, source="seed.json")


def test_chat_rows_use_the_base_template_and_train_only_replies(tokenizer):
    messages = (
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "A pear."},
    )
    record = data.Record("x", messages=messages)
    (example,), _ = data.tokenize([record], tokenizer, max_length=512)
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(list(messages), tokenize=False)
    trained = tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])
    assert "Hello! How can I help?" in trained and "A pear." in trained
    assert "Hi there" not in trained and "Name a fruit" not in trained
    assert trained.count("<|im_end|>") == 2  # each reply ends with the template's end of turn
    assert data.template_source([record], tokenizer) == tokenizer.chat_template


def test_records_round_trip_through_jsonl(tmp_path):
    records = data.load_records(SEED_DATA)[:3]
    path = tmp_path / "held.jsonl"
    path.write_text(data.to_jsonl(records), encoding="utf-8")
    assert [r.to_json() for r in data.load_records(path)] == [r.to_json() for r in records]
    assert json.loads(path.read_text().splitlines()[0])["instruction"] == records[0].instruction
