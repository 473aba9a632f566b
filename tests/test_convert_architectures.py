"""Each supported architecture, on a tiny random model: the exported GGUF is the same model.

For every case in `tests/arch_cases/` a 2-layer random checkpoint is built with
transformers (with a real tokenizer trained on the spot), exported, loaded in
llama.cpp and its last-token logits compared with transformers' on several
inputs: within 1e-4 at F32 (llama.cpp run with an F32 KV cache and no flash
attention, which round to F16; a case may allow more with a reason, see
TinyCase.f32_tolerance), and the same top-1 token at F16. llama.cpp's
own converter converts the same checkpoint, and its output is compared key by
key and byte by byte with ours.
"""

import json

import numpy as np
import pytest

from convert_helpers import (
    CASES,
    MIXED_TEXT,
    assert_same_file_as_reference,
    gguf_fields,
    gguf_last_logits,
    gguf_tensors,
    hf_last_logits,
    random_sequences,
    reference_converter_or_fail,
)

pytestmark = pytest.mark.slow


def _config(checkpoint):
    """config.json, with a multimodal checkpoint's text_config (its language model) on top."""
    config = json.loads((checkpoint / "config.json").read_text())
    return {**config, **config.get("text_config", {})}


def _sequences(checkpoint):
    return random_sequences(_config(checkpoint)["vocab_size"])


@pytest.mark.parametrize("name", CASES)
def test_f32_logits_match_transformers(tiny_builds, name):
    checkpoint, f32, _ = tiny_builds.get(name)
    sequences = _sequences(checkpoint)
    expected = hf_last_logits(checkpoint, sequences)
    got = gguf_last_logits(f32, sequences)
    for ids, want, have in zip(sequences, expected, got):
        assert have.shape == want.shape
        assert np.abs(have - want).max() < CASES[name].f32_tolerance, f"{name}: logits differ after {len(ids)} tokens"


@pytest.mark.parametrize("name", CASES)
def test_f16_top1_agrees_with_transformers(tiny_builds, name):
    checkpoint, _, f16 = tiny_builds.get(name)
    sequences = _sequences(checkpoint)
    expected = hf_last_logits(checkpoint, sequences)
    got = gguf_last_logits(f16, sequences)
    agree = [int(want.argmax() == have.argmax()) for want, have in zip(expected, got)]
    assert agree == [1] * len(sequences)


@pytest.mark.parametrize("name", CASES)
def test_common_metadata(tiny_builds, name):
    case = CASES[name]
    checkpoint, _, f16 = tiny_builds.get(name)
    config = _config(checkpoint)
    fields = gguf_fields(f16)
    arch = fields["general.architecture"]
    assert fields[f"{arch}.block_count"] == config["num_hidden_layers"]
    assert fields[f"{arch}.attention.head_count"] == config["num_attention_heads"]
    # Per layer in hybrids (0 on recurrent layers) and in Gemma 4, whose full-attention layers may have
    # their own KV head count (transformers 5's per_layer_config).
    kv_heads = fields[f"{arch}.attention.head_count_kv"]
    per_layer = config.get("per_layer_config") or {}
    allowed = {config["num_key_value_heads"], *(v["num_key_value_heads"] for v in per_layer.values()
                                                 if "num_key_value_heads" in v)}
    if isinstance(kv_heads, list):
        assert len(kv_heads) == config["num_hidden_layers"]
        assert config["num_key_value_heads"] in kv_heads and set(kv_heads) - {0} <= allowed
    else:
        assert kv_heads == config["num_key_value_heads"]
    assert fields["general.quant_type"] == "F16"
    assert fields["general.source.checkpoint"] == checkpoint.name
    assert fields["general.converter"].startswith("alpaca-convert ")
    tensors = gguf_tensors(f16)
    assert ("output.weight" in tensors) is not bool(config.get("tie_word_embeddings"))
    norms = [n for n in tensors if n.startswith("blk.0.") and n.endswith("_norm.weight")]  # OLMo 2: post-norms only
    assert norms and all(tensors[n][0] == "F32" for n in norms)
    if case.tokenizer == "spm":
        assert fields["tokenizer.ggml.model"] == "llama"
        assert fields["tokenizer.ggml.add_bos_token"] is True
    elif isinstance(case.tokenizer, str):
        assert fields["tokenizer.ggml.model"] == "gpt2"
        assert fields["tokenizer.ggml.pre"] == case.tokenizer
        assert fields["tokenizer.ggml.add_bos_token"] is False


def test_llama3_rope_scaling_becomes_rope_freqs(tiny_builds):
    _, _, f16 = tiny_builds.get("llama3-bpe-tied")
    tensors = gguf_tensors(f16)
    kind, shape, factors = tensors["rope_freqs.weight"]
    assert kind == "F32" and shape == (8,)  # head_dim / 2
    assert factors[0] == 1.0 and factors[-1] == 8.0  # short wavelengths kept, long ones slowed 8x


def test_linear_rope_scaling_in_metadata(tiny_builds):
    fields = gguf_fields(tiny_builds.get("mistral-spm-linear-rope")[2])
    assert fields["llama.rope.scaling.type"] == "linear"
    assert fields["llama.rope.scaling.factor"] == 2.0


@pytest.mark.parametrize("name", CASES)
def test_tokenizer_parity_with_transformers(tiny_builds, name):
    """llama.cpp splits a mixed text (code, digits, Unicode, CJK, emoji, whitespace runs,
    special tokens) into exactly the ids transformers' tokenizer gives."""
    import transformers

    from convert.evaluate import LogitsModel

    checkpoint, _, f16 = tiny_builds.get(name)
    if CASES[name].tokenizer == "spm":
        # A bare tokenizer.model (no tokenizer class in the files): SentencePiece itself, after BOS.
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor(model_file=str(checkpoint / "tokenizer.model"))
        text = MIXED_TEXT.replace("<|im_start|>", "").replace("<|im_end|>", "")
        expected = [1, *processor.encode(text)]
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
        text = MIXED_TEXT
        for token in ("<|im_start|>", "<|im_end|>"):  # a family without ChatML markers: leave them out
            if token not in tokenizer.get_vocab():
                text = text.replace(token, "")
        expected = tokenizer.encode(text)
    with LogitsModel(f16, n_ctx=256) as model:
        assert model.tokenize(text, add_special=True, parse_special=True) == expected


@pytest.fixture(scope="module")
def oracle(request, tmp_path_factory):
    return reference_converter_or_fail(request, tmp_path_factory)


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.oracle])
def test_same_file_as_llama_cpp_converter(tiny_builds, oracle, tmp_path, name):
    checkpoint, _, ours = tiny_builds.get(name)
    assert_same_file_as_reference(oracle, checkpoint, ours, CASES[name], tmp_path / "reference.gguf")
