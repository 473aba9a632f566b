"""SentencePiece families saved as transformers 5 saves them: tokenizer.json only, no tokenizer.model.

The tiny Gemma 3, Gemma 2, Llama 2, Mistral v0.1, Phi-3 and ERNIE 4.5 cases (tests/arch_cases/) are
copied without their tokenizer.model (one that has no tokenizer.json gets the one transformers
5's LlamaTokenizer writes for it) and exported. Each GGUF must tokenize the mixed text exactly as transformers does with that
directory, and exactly as the GGUF exported from tokenizer.model does (the original model).
Gemma 3 is also compared with llama.cpp's converter on the same directory, key by key and
byte by byte. Its converter refuses Gemma 2 and Phi-3 without tokenizer.model, and writes
Llama 2's with every score -1000 (see convert/export/vocab_spm_json.py), so those are checked
by tokenization only, plus, for Llama 2, every key but the scores.
"""

import dataclasses
import shutil

import pytest

from convert_helpers import (
    CASES,
    MIXED_TEXT,
    assert_same_file_as_reference,
    gguf_fields,
    reference_converter_or_fail,
)

pytestmark = pytest.mark.slow


def _without_tokenizer_model(tiny_builds, name, root):
    """The case's checkpoint as transformers 5 saves it: tokenizer.json, no tokenizer.model."""
    checkpoint, _, original = tiny_builds.get(name)
    out = root / name
    shutil.copytree(checkpoint, out)
    if not (out / "tokenizer.json").is_file():
        _write_llama_tokenizer_json(out)
    (out / "tokenizer.model").unlink()
    return out, original


def _write_llama_tokenizer_json(out):
    """What transformers 5's LlamaTokenizer saves for this SentencePiece model (the merges in the
    pieces' score order, as transformers derives them from a tokenizer.model)."""
    import sentencepiece
    import transformers
    from transformers.tokenization_utils_base import generate_merges

    processor = sentencepiece.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    vocab = {processor.IdToPiece(i): i for i in range(processor.GetPieceSize())}
    scores = {processor.IdToPiece(i): processor.GetScore(i) for i in range(processor.GetPieceSize())}
    tokenizer = transformers.LlamaTokenizer(
        vocab=vocab, merges=generate_merges(vocab, scores), add_bos_token=True, add_eos_token=False
    )
    tokenizer.save_pretrained(out)


@pytest.fixture(scope="module")
def exported(tiny_builds, tmp_path_factory):
    """name -> (tokenizer.json-only checkpoint, our F16 export of it, the tokenizer.model export)."""
    from convert.export import export

    root = tmp_path_factory.mktemp("spm-json")
    built = {}

    def get(name):
        if name not in built:
            checkpoint, original = _without_tokenizer_model(tiny_builds, name, root)
            ours = export(checkpoint, root / f"{name}.F16.gguf", "f16").path
            built[name] = (checkpoint, ours, original)
        return built[name]

    return get


def _mixed_text(tokenizer):
    text = MIXED_TEXT
    for token in ("<|im_start|>", "<|im_end|>"):  # a family without ChatML markers: leave them out
        if token not in tokenizer.get_vocab():
            text = text.replace(token, "")
    return text


@pytest.mark.parametrize(
    "name",
    ["gemma3-text-swa", "gemma2-softcap-swa", "llama-spm-gqa", "mistral-spm-linear-rope", "phi3-spm-fused", "ernie4_5-spm"],
)
def test_tokenizes_like_transformers_and_the_original(exported, name):
    import transformers

    from convert.evaluate import LogitsModel

    checkpoint, ours, original = exported(name)
    fields = gguf_fields(ours)
    if name.startswith("gemma"):
        assert fields["tokenizer.ggml.model"] == "gpt2" and "tokenizer.ggml.merges" in fields
    else:
        assert fields["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.scores" in fields
    if name.startswith("ernie"):  # no dummy prefix, and no BOS added: ERNIE's template starts each prompt
        assert fields["tokenizer.ggml.add_space_prefix"] is False
        assert fields["tokenizer.ggml.add_bos_token"] is False
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    text = _mixed_text(tokenizer)
    expected = tokenizer.encode(text)
    with LogitsModel(ours, n_ctx=256) as model:
        got = model.tokenize(text, add_special=True, parse_special=True)
    assert got == expected
    with LogitsModel(original, n_ctx=256) as model:
        assert model.tokenize(text, add_special=True, parse_special=True) == got


@pytest.fixture(scope="module")
def oracle(request, tmp_path_factory):
    return reference_converter_or_fail(request, tmp_path_factory)


@pytest.mark.parametrize(
    "name, differences",
    [
        ("gemma3-text-swa", {}),
        # llama.cpp's converter scores every token -1000 (gguf's LlamaHfVocab): llama.cpp then merges
        # left to right instead of in the BPE's order. Ours are minus the merge ranks.
        ("llama-spm-gqa", {"tokenizer.ggml.scores": "minus each token's merge rank, not -1000"}),
    ],
)
def test_same_file_as_llama_cpp_converter(exported, oracle, tmp_path, name, differences):
    checkpoint, ours, _ = exported(name)
    case = dataclasses.replace(CASES[name], metadata_differences=differences)
    assert_same_file_as_reference(oracle, checkpoint, ours, case, tmp_path / "reference.gguf")


def test_unsupported_space_handling_is_refused(exported, tmp_path):
    """A byte-fallback BPE whose text handling llama.cpp would not reproduce: one clear error."""
    import json

    from convert.export import export
    from convert.export.vocab import TokenizerError

    checkpoint, _, _ = exported("gemma3-text-swa")
    broken = tmp_path / "nfkc"
    shutil.copytree(checkpoint, broken)
    data = json.loads((broken / "tokenizer.json").read_text(encoding="utf-8"))
    data["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFKC"}, data["normalizer"]]}
    (broken / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(TokenizerError, match="NFKC"):
        export(broken, tmp_path / "out.gguf", "f16")
    assert not (tmp_path / "out.gguf").exists()
