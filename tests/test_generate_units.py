"""Self-instruct's pure parts: the request, the parser on messy teacher output, each filter,
the ROUGE-L index against rouge-score itself, and the byte-preserving output file."""

import json
import random

import pytest
from rouge_score import rouge_scorer

from alpaca_chat.errors import DataError, UsageError
from convert.generate import (
    BLACKLIST,
    GenerateOptions,
    OutputFile,
    RougeIndex,
    Task,
    build_request,
    load_seed_tasks,
    normalize,
    parse_tasks,
    rejection,
)

SEED = Task("Give three tips for staying healthy.", "", "Eat well, sleep, move.")


def test_request_numbers_the_examples_and_starts_the_next_task():
    examples = [SEED, Task("Translate the sentence into French.", "I like tea.", "J'aime le thé.")]
    message, reply_start = build_request(examples, 4)
    assert "1. Instruction: Give three tips" in message and "1. Input: <noinput>" in message
    assert "2. Input: I like tea." in message
    assert "numbered 3 to 6" in message
    assert reply_start == "3. Instruction:"


def test_parses_a_numbered_list_with_chatter_around_it():
    text = (
        "Sure! Here are some new tasks:\n\n"
        "3. Instruction: Name the capital of the given country.\n3. Input: Peru\n3. Output: Lima\n###\n"
        "4. Instruction: Write a haiku about autumn leaves falling.\n4. Input: <noinput>\n"
        "4. Output: Red leaves drift down slow\n###\n"
        "I hope these help!"
    )
    tasks, cut = parse_tasks(text)
    assert cut == 0
    assert tasks == [
        Task("Name the capital of the given country.", "Peru", "Lima"),
        Task("Write a haiku about autumn leaves falling.", "", "Red leaves drift down slow"),
    ]


def test_parses_unnumbered_bold_fields_and_missing_inputs():
    text = (
        "**Instruction:** Explain why the sky is blue in one sentence.\n**Output:** Air scatters blue light most.\n\n"
        "Instruction: Sort the numbers in ascending order.\nInput: N/A\nOutput: 1, 2, 3"
    )
    tasks, _ = parse_tasks(text)
    assert [t.instruction for t in tasks] == [
        "Explain why the sky is blue in one sentence.", "Sort the numbers in ascending order."
    ]
    assert [t.input for t in tasks] == ["", ""]
    assert tasks[0].output == "Air scatters blue light most."


def test_a_task_without_output_parses_with_an_empty_output():
    tasks, _ = parse_tasks("5. Instruction: Describe a sunset over the sea.\n5. Input: <noinput>\n")
    assert tasks == [Task("Describe a sunset over the sea.", "", "")]


def test_the_last_task_is_dropped_when_the_answer_was_cut_off():
    text = "1. Instruction: Count the vowels in the word.\n1. Input: banana\n1. Output: 3\n###\n" \
           "2. Instruction: Summarize the paragraph below.\n2. Input: The cat sat on the mat and"
    tasks, cut = parse_tasks(text, truncated=True)
    assert cut == 1 and [t.instruction for t in tasks] == ["Count the vowels in the word."]


def test_text_without_tasks_parses_to_nothing():
    assert parse_tasks("I'm sorry, I can't help with that.") == ([], 0)


@pytest.mark.parametrize(
    ("instruction", "output", "reason"),
    [
        ("Say hi.", "Hi", "length"),
        (" ".join(["word"] * 151), "ok", "length"),
        ("- List three fruits that are red.", "apple", "punctuation"),
        ("Draw a cat sitting on a chair please.", "ok", "blacklist"),
        ("Describe the graph shown in the report.", "ok", "blacklist"),
        ("Tell me how to go to the station from here.", "ok", "blacklist"),
        ("give three tips for   staying healthy.", "ok", "seed copy"),
        ("Name three animals that live in the sea.", "  ", "empty output"),
        ("Name three animals that live in the sea.", "Whale, shark, octopus.", None),
    ],
)
def test_each_filter(instruction, output, reason):
    assert rejection(Task(instruction, "", output), {normalize(SEED.instruction)}) == reason


def test_blacklist_is_stanfords():
    assert {"image", "graph", "picture", "file", "map", "draw", "plot", "go to", "video", "audio", "music",
            "flowchart", "diagram"} <= set(BLACKLIST)


def _random_instructions(n, seed=0):
    rng = random.Random(seed)
    words = "the a give list name write explain three tips for healthy food water city river sea tell how why " \
            "best simple short story poem about summer winter code python sort numbers".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def test_rouge_index_agrees_with_rouge_score_on_every_pair():
    """The token-count bound may skip a pair only when rouge-score would not reject it."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    kept = _random_instructions(60, seed=1)
    index = RougeIndex()
    for text in kept:
        index.add(text)
    for candidate in _random_instructions(80, seed=2) + [kept[3], kept[10] + " now"]:
        expected = any(scorer.score(k, candidate)["rougeL"].fmeasure > 0.7 for k in kept)
        assert index.too_similar(candidate) is expected, candidate


def test_output_file_appends_without_touching_earlier_bytes(tmp_path):
    out = tmp_path / "out.json"
    earlier = [{"instruction": "Ünïcode row", "input": "", "output": "x"}, {"instruction": "B", "output": "y"}]
    out.write_text(json.dumps(earlier, indent=4, ensure_ascii=True) + "\n\n", encoding="utf-8")
    before = out.read_text(encoding="utf-8")
    head = before[: before.rindex("]")].rstrip()
    file = OutputFile(out)
    file.append([Task("New task here please.", "", "ok")])
    file.append([Task("Another new task here.", "in", "ok")])
    after = out.read_text(encoding="utf-8")
    assert after.startswith(head)
    rows = json.loads(after)
    assert rows[:2] == earlier and [r["instruction"] for r in rows[2:]] == ["New task here please.",
                                                                            "Another new task here."]
    assert not list(tmp_path.glob(".*partial"))


def test_output_file_starts_a_new_list(tmp_path):
    file = OutputFile(tmp_path / "new.json")
    file.append([SEED])
    assert json.loads((tmp_path / "new.json").read_text()) == [SEED.to_row()]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"instruction": "x"}', "not a JSON list"),
        ("[1, 2]", "row 1 is not an Alpaca row"),
        ('[{"instruction": "x", "output": "y"}, {"output": 3}]', "row 2 is not an Alpaca row"),
        ("[{", "invalid JSON"),
    ],
)
def test_output_file_that_is_not_an_alpaca_list_is_refused_untouched(tmp_path, content, message):
    out = tmp_path / "out.json"
    out.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        OutputFile(out)
    assert out.read_text(encoding="utf-8") == content


def test_builtin_seed_tasks_load_by_name():
    seeds = load_seed_tasks("alpaca-seed")
    assert len(seeds) == 150 and all(t.instruction and t.output for t in seeds)


def test_seed_rows_are_validated_with_the_row_named(tmp_path):
    bad = tmp_path / "seeds.json"
    bad.write_text(json.dumps([{"instruction": "ok", "output": "fine"}, {"instruction": "no output"}]))
    with pytest.raises(DataError, match="row 2: missing 'output'"):
        load_seed_tasks(str(bad))


@pytest.mark.parametrize("field", ["n", "parallel", "tasks_per_request", "max_tokens"])
def test_options_below_one_are_usage_errors(tmp_path, field):
    values = dict(teacher=None, seed_tasks="alpaca-seed", n=3, output=tmp_path / "o.json")
    values[field] = 0
    with pytest.raises(UsageError):
        GenerateOptions(**values).checked()


def test_no_grammar_reaches_the_options(monkeypatch, tmp_path):
    """`--no-grammar` turns the task grammar off; by default the teacher is held to the format."""
    from convert import cli, generate

    seen = []

    def fake_run(options, **kwargs):
        seen.append(options.grammar)
        raise KeyboardInterrupt  # stop before any model is loaded

    monkeypatch.setattr(generate, "run", fake_run)
    for extra, wanted in (([], True), (["--no-grammar"], False)):
        try:
            cli.main(["generate", "-n", "1", "-o", str(tmp_path / "x.json"), *extra])
        except (KeyboardInterrupt, SystemExit):
            pass
        assert seen[-1] is wanted
