import pytest

from alpaca_chat.conversation import Message
from alpaca_chat.errors import TemplateError
from alpaca_chat.templates import (
    ALPACA_JINJA,
    ALPACA_PREAMBLE,
    ALPACA_PREAMBLE_WITH_INPUT,
    CHATML_JINJA,
    ChatTemplate,
    alpaca_prompt,
    alpaca_template,
    resolve_template,
)

# Stanford Alpaca's PROMPT_DICT, copied from tatsu-lab/stanford_alpaca train.py:
# an independent oracle for our Jinja rendering.
STANFORD_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
STANFORD_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def test_alpaca_prompt_matches_stanford_exactly():
    assert alpaca_prompt("List three colors.") == STANFORD_PROMPT_NO_INPUT.format(instruction="List three colors.")
    assert alpaca_prompt("Summarize.", "Some text") == STANFORD_PROMPT_INPUT.format(
        instruction="Summarize.", input="Some text"
    )


def test_alpaca_multi_turn_ends_each_reply_with_eos():
    t = alpaca_template("</s>")
    text = t.render([Message("user", "a"), Message("assistant", "b"), Message("user", "c")])
    assert text.startswith(ALPACA_PREAMBLE)
    assert "### Response:b</s>\n\n### Instruction:\nc\n\n### Response:" in text
    assert text.endswith("### Response:")


def test_alpaca_system_prompt_replaces_preamble():
    text = alpaca_template("").render([Message("system", "You are terse."), Message("user", "hi")])
    assert text.startswith("You are terse.\n\n### Instruction:\nhi")
    assert ALPACA_PREAMBLE not in text and ALPACA_PREAMBLE_WITH_INPUT not in text


def test_chatml_flattens_input_into_content():
    t = resolve_template("chatml", None)
    text = t.render([Message("user", "Summarize", input="notes")])
    assert text == "<|im_start|>user\nSummarize\n\nnotes<|im_end|>\n<|im_start|>assistant\n"


def test_auto_prefers_gguf_template_then_chatml():
    own = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    assert resolve_template("auto", own).render([Message("user", "x")]) == "[user]x"
    assert resolve_template("auto", None).name == "chatml"
    assert resolve_template("auto", ALPACA_JINJA, eos_token="</s>").name == "alpaca"


def test_template_from_file(tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    assert resolve_template(str(path), None).render([Message("user", "q")]) == "<q>"


@pytest.mark.parametrize(
    "choice, message",
    [("nope", "unknown template 'nope'"), ("missing.jinja", "template file not found")],
)
def test_bad_template_choice(tmp_path, choice, message):
    with pytest.raises(TemplateError, match=message):
        resolve_template(str(tmp_path / choice) if choice.endswith(".jinja") else choice, None)


def test_template_file_syntax_error(tmp_path):
    path = tmp_path / "broken.jinja"
    path.write_text("line one\n{% for m in messages %}")
    with pytest.raises(TemplateError, match="syntax error on line 2"):
        resolve_template(str(path), None)


@pytest.mark.parametrize(
    "payload",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os.popen('echo pwned').read() }}",
        "{% set x = messages.append({'role': 'user', 'content': 'injected'}) %}{{ messages }}",
    ],
)
def test_malicious_template_fails_safely(payload):
    template = ChatTemplate("evil", payload)
    with pytest.raises(TemplateError) as info:
        template.render([Message("user", "hi")])
    assert "\n" not in str(info.value)


def test_raise_exception_in_template_becomes_template_error():
    template = ChatTemplate("strict", "{{ raise_exception('only user/assistant roles') }}")
    with pytest.raises(TemplateError, match="only user/assistant roles"):
        template.render([Message("user", "hi")])


# --- polyfills ------------------------------------------------------------------------------------

GEMMA_LIKE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<turn>{{ m['role'] }}\n{{ m['content'] }}</turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<turn>assistant\n{% endif %}"
)


def test_system_folded_into_first_user_message_when_rejected():
    template = ChatTemplate("gemma-like", GEMMA_LIKE)
    text = template.render([Message("system", "Be brief."), Message("user", "Hi")])
    assert text == "<turn>user\nBe brief.\n\nHi</turn>\n<turn>assistant\n"


def test_consecutive_user_messages_merged_when_rejected():
    template = ChatTemplate("gemma-like", GEMMA_LIKE)
    messages = [Message("user", "one"), Message("assistant", "1"), Message("user", "two"), Message("user", "three")]
    assert template.render(messages).endswith("<turn>user\ntwo\n\nthree</turn>\n<turn>assistant\n")


def test_consecutive_messages_kept_when_the_template_accepts_them():
    template = ChatTemplate("chatml-like", CHATML_JINJA.replace("'<|im_start|>'", "'<|x|>'"))
    text = template.render([Message("user", "a"), Message("user", "b")])
    assert "<|x|>user\na<|im_end|>\n<|x|>user\nb<|im_end|>" in text


def test_typed_content_given_to_templates_that_read_only_parts():
    source = (
        "{% for m in messages %}{{ m['role'] }}:{% for part in m['content'] %}"
        "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %};{% endfor %}"
    )
    assert ChatTemplate("typed", source).render([Message("user", "hello")]) == "user:hello;"


def test_generation_tag_and_strftime_now():
    source = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
        "{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}|{% endfor %}{{ strftime_now('%Y') > '2000' }}"
    )
    text = ChatTemplate("smollm3-like", source).render([Message("user", "q"), Message("assistant", "a")])
    assert text == "q|a|True"


def test_a_template_that_still_fails_names_itself_and_suggests_chatml():
    template = ChatTemplate("broken.jinja", "{{ messages[0]['content'] | no_such_filter }}")
    with pytest.raises(TemplateError) as excinfo:
        template.render([Message("user", "hi")])
    message = str(excinfo.value)
    assert "\n" not in message and "broken.jinja" in message and "--template chatml" in message
