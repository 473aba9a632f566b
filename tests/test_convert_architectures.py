"""Each supported architecture, on a tiny random model: the exported GGUF is the same model.

For every case a 2-layer random checkpoint is built with transformers (with a
real tokenizer trained on the spot), exported, loaded in llama.cpp and its
last-token logits compared with transformers' on several inputs: within
1e-4 at F32 (llama.cpp run with an F32 KV cache and no flash attention, which
round to F16), and the same top-1 token at F16. Where llama.cpp's own
converter can read the checkpoint, its output is compared key by key and
byte by byte with ours.
"""

import json

import numpy as np
import pytest

pytest.importorskip("transformers", reason="needs the convert extra")

from convert_helpers import (  # noqa: E402
    MIXED_TEXT,
    TINY_CASES,
    build_tiny_model,
    gguf_fields,
    gguf_last_logits,
    gguf_tensors,
    hf_last_logits,
    random_sequences,
    reference_converter_or_skip,
    run_reference_converter,
    same_bytes,
)

from convert.export import export  # noqa: E402

pytestmark = pytest.mark.slow
CASES = {case.name: case for case in TINY_CASES}
# Keys only we write: provenance, and add_eos (llama.cpp's converter leaves it to the loader's default).
OUR_EXTRA_KEYS = {"general.converter", "general.source.checkpoint", "general.quant_type", "tokenizer.ggml.add_eos_token"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """case name -> (checkpoint dir, F32 GGUF, F16 GGUF), built once per module."""
    root = tmp_path_factory.mktemp("tiny-models")
    built = {}
    for case in TINY_CASES:
        checkpoint = build_tiny_model(root / case.name, case)
        f32 = export(checkpoint, root / f"{case.name}.F32.gguf", "f32").path
        f16 = export(checkpoint, root / f"{case.name}.F16.gguf", "f16").path
        built[case.name] = (checkpoint, f32, f16)
    return built


def _sequences(checkpoint):
    n_vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    return random_sequences(n_vocab)


@pytest.mark.parametrize("name", CASES)
def test_f32_logits_match_transformers(tiny, name):
    checkpoint, f32, _ = tiny[name]
    sequences = _sequences(checkpoint)
    expected = hf_last_logits(checkpoint, sequences)
    got = gguf_last_logits(f32, sequences)
    for ids, want, have in zip(sequences, expected, got):
        assert have.shape == want.shape
        assert np.abs(have - want).max() < 1e-4, f"{name}: logits differ after {len(ids)} tokens"


@pytest.mark.parametrize("name", CASES)
def test_f16_top1_agrees_with_transformers(tiny, name):
    checkpoint, _, f16 = tiny[name]
    sequences = _sequences(checkpoint)
    expected = hf_last_logits(checkpoint, sequences)
    got = gguf_last_logits(f16, sequences)
    agree = [int(want.argmax() == have.argmax()) for want, have in zip(expected, got)]
    assert agree == [1] * len(sequences)


@pytest.mark.parametrize("name", CASES)
def test_architecture_metadata(tiny, name):
    case = CASES[name]
    checkpoint, _, f16 = tiny[name]
    fields = gguf_fields(f16)
    arch = "qwen2" if case.architecture.startswith("Qwen2") else "llama"
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.attention.head_count"] == 4
    assert fields[f"{arch}.attention.head_count_kv"] == 2  # GQA
    assert fields["general.quant_type"] == "F16"
    assert fields["general.source.checkpoint"] == checkpoint.name
    assert fields["general.converter"].startswith("alpaca-convert ")
    tensors = gguf_tensors(f16)
    tied = case.config.get("tie_word_embeddings", False)
    assert ("output.weight" in tensors) is not tied
    assert tensors["blk.0.attn_norm.weight"][0] == "F32"
    assert tensors["blk.0.attn_q.weight"][0] == "F16"
    if arch == "qwen2":
        assert tensors["blk.0.attn_q.bias"][0] == "F32"
    if case.tokenizer == "spm":
        assert fields["tokenizer.ggml.model"] == "llama"
        assert fields["tokenizer.ggml.add_bos_token"] is True
    else:
        assert fields["tokenizer.ggml.model"] == "gpt2"
        assert fields["tokenizer.ggml.pre"] == case.tokenizer
        assert fields["tokenizer.ggml.add_bos_token"] is False


def test_llama3_rope_scaling_becomes_rope_freqs(tiny):
    _, _, f16 = tiny["llama3-bpe-tied"]
    tensors = gguf_tensors(f16)
    kind, shape, factors = tensors["rope_freqs.weight"]
    assert kind == "F32" and shape == (8,)  # head_dim / 2
    assert factors[0] == 1.0 and factors[-1] == 8.0  # short wavelengths kept, long ones slowed 8x


def test_linear_rope_scaling_in_metadata(tiny):
    fields = gguf_fields(tiny["mistral-spm-linear-rope"][2])
    assert fields["llama.rope.scaling.type"] == "linear"
    assert fields["llama.rope.scaling.factor"] == 2.0


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.tokenizer != "spm"])
def test_bpe_tokenizer_parity(tiny, name):
    """The pre-tokenizer we named splits text exactly as the HF tokenizer does."""
    import transformers

    from convert.evaluate import LogitsModel

    checkpoint, _, f16 = tiny[name]
    expected = transformers.AutoTokenizer.from_pretrained(checkpoint).encode(MIXED_TEXT)
    with LogitsModel(f16, n_ctx=64) as model:
        assert model.tokenize(MIXED_TEXT, add_special=True, parse_special=True) == expected


def test_sentencepiece_tokenizer_parity(tiny):
    import sentencepiece

    from convert.evaluate import LogitsModel

    checkpoint, _, f16 = tiny["llama-spm-gqa"]
    processor = sentencepiece.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
    text = MIXED_TEXT.replace("<|im_start|>", "").replace("<|im_end|>", "")
    with LogitsModel(f16, n_ctx=64) as model:
        assert model.tokenize(text, add_special=True) == [1, *processor.encode(text)]


@pytest.fixture(scope="module")
def oracle(request, tmp_path_factory):
    return reference_converter_or_skip(request, tmp_path_factory)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.oracle])
def test_same_file_as_llama_cpp_converter(tiny, oracle, tmp_path, name):
    checkpoint, _, ours = tiny[name]
    theirs = tmp_path / "reference.gguf"
    done = run_reference_converter(oracle, checkpoint, theirs)
    assert done.returncode == 0, done.stderr[-2000:]

    our_fields, their_fields = gguf_fields(ours), gguf_fields(theirs)
    assert set(our_fields) - set(their_fields) <= OUR_EXTRA_KEYS
    assert set(their_fields) <= set(our_fields)
    for key, value in their_fields.items():
        assert our_fields[key] == value, key

    our_tensors, their_tensors = gguf_tensors(ours), gguf_tensors(theirs)
    assert list(our_tensors) == list(their_tensors)
    for tensor_name, (kind, shape, data) in their_tensors.items():
        assert our_tensors[tensor_name][:2] == (kind, shape), tensor_name
        assert same_bytes(our_tensors[tensor_name][2], data), f"{tensor_name}: bytes differ"
