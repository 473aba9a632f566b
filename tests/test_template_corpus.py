"""Real chat templates (llama.cpp's models/templates/, from the llama-cpp-python sdist) through our
renderer and its polyfills, against transformers' apply_chat_template.

For each template and each conversation shape the app produces, our render equals transformers'
render of the same conversation adapted by the polyfills (system folded into the first user message
where the system role is rejected, same-role messages merged where they are rejected, typed content
where only that is read). And a system prompt plus several turns renders on every template.
"""

import tarfile
from pathlib import Path

import pytest

from alpaca_chat.conversation import Message
from alpaca_chat.errors import TemplateError
from alpaca_chat.templates import ChatTemplate, _probe
from convert_helpers import reference_converter_or_fail

transformers = pytest.importorskip("transformers", reason="template parity needs the convert extra")

BOS, EOS = "<s>", "</s>"
SYSTEM = Message("system", "You are terse. Answer in French.")
U1, A1 = Message("user", "What is 2+2?"), Message("assistant", "4.")
U2, A2 = Message("user", "And 3+3, with émojis 🚀?"), Message("assistant", "6 🚀")
U3 = Message("user", "Thanks!\nBye.")
# (name, messages, add_generation_prompt): what the app renders.
SHAPES = [
    ("single", [U1], True),
    ("system", [SYSTEM, U1], True),
    ("multi-turn", [U1, A1, U2], True),
    ("system-multi-turn", [SYSTEM, U1, A1, U2, A2, U3], True),
    ("resume", [SYSTEM, U1, A1], False),  # the conversation so far, for the KV state
    ("two-users", [SYSTEM, U1, U2], True),  # an overflowed message or an empty stopped reply before
]
MIN_CORPUS = 20
# Templates that cannot express a plain conversation at all: they read variables only a
# tool-calling client passes. We must fail on them with one line suggesting --template chatml.
CANNOT_EXPRESS = {"fireworks-ai-llama-3-firefunction-v2": "reads `functions`, a tool-calling client's list"}


def _corpus_dir(request, tmp_path_factory) -> Path:
    script = reference_converter_or_fail(request, tmp_path_factory)  # downloads the sdist once
    cache_dir = script.parent.parent
    out = cache_dir / "llama.cpp" / "models" / "templates"
    if not any(out.glob("*.jinja")):
        sdist = next(cache_dir.glob("llama_cpp_python-*.tar.gz"), None)
        assert sdist is not None, f"the llama-cpp-python sdist is missing from {cache_dir}"
        prefix = f"{sdist.name[: -len('.tar.gz')]}/vendor/llama.cpp/models/templates/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.name.endswith(".jinja")]
            for member in members:
                member.name = "llama.cpp/models/templates/" + member.name[len(prefix):]
            tar.extractall(cache_dir, members=members, filter="data")
    return out


@pytest.fixture(scope="module")
def corpus(request, tmp_path_factory) -> dict[str, str]:
    out = _corpus_dir(request, tmp_path_factory)
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(out.glob("*.jinja"))}


@pytest.fixture(scope="module")
def hf_tokenizer():
    from tokenizers import Tokenizer, models

    vocab = {BOS: 0, EOS: 1, "<unk>": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token="<unk>")


def test_corpus_is_large_enough(corpus):
    assert len(corpus) >= MIN_CORPUS, sorted(corpus)


def _theirs(hf_tokenizer, source, messages, add_generation_prompt):
    """transformers' render; tool-use templates iterate `tools`, which it passes as None: then with no tools."""
    hf_tokenizer.chat_template = source
    kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt)
    try:
        return hf_tokenizer.apply_chat_template(messages, **kwargs)
    except TypeError as exc:
        if "'NoneType' object is not iterable" not in str(exc):
            raise
        return hf_tokenizer.apply_chat_template(messages, tools=[], **kwargs)


def _parity_failures(hf_tokenizer, name, source) -> list[str]:
    ours = ChatTemplate(name, source, BOS, EOS)
    support = _probe(source, BOS, EOS)
    failures = []
    for shape, messages, add_generation_prompt in SHAPES:
        adapted = support.adapt([{"role": m.role, "content": m.content} for m in messages])
        try:
            theirs = _theirs(hf_tokenizer, source, adapted, add_generation_prompt)
        except Exception:  # noqa: BLE001 - transformers cannot render it either: we must fail cleanly
            try:
                ours.render(messages, add_generation_prompt=add_generation_prompt)
            except TemplateError as exc:
                if "\n" in str(exc) or "--template chatml" not in str(exc):
                    failures.append(f"{name} [{shape}]: error is not one line suggesting chatml: {exc}")
            else:
                failures.append(f"{name} [{shape}]: transformers fails, we render")
            continue
        try:
            text = ours.render(messages, add_generation_prompt=add_generation_prompt)
        except TemplateError as exc:
            failures.append(f"{name} [{shape}]: we fail where transformers renders: {exc}")
            continue
        if text != theirs:
            failures.append(f"{name} [{shape}]: renders differ")
    return failures


def test_parity_with_transformers(corpus, hf_tokenizer):
    failures = [f for name, source in corpus.items() for f in _parity_failures(hf_tokenizer, name, source)]
    assert not failures, "\n".join(failures)


def test_system_prompt_and_several_turns_render(corpus):
    failures = []
    for name, source in corpus.items():
        template = ChatTemplate(name, source, BOS, EOS)
        try:
            text = template.render([SYSTEM, U1, A1, U2, A2, U3])
        except TemplateError as exc:
            if name not in CANNOT_EXPRESS:
                failures.append(f"{name}: {exc}")
            continue
        if name in CANNOT_EXPRESS:
            failures.append(f"{name}: renders, but is listed as one that cannot")
            continue
        missing = [m.content for m in (SYSTEM, U1, A1, U2, U3) if m.content not in text]
        if missing:
            failures.append(f"{name}: lost {missing}")
    assert not failures, "\n".join(failures)
