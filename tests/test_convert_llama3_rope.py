"""Llama 3.1/3.2's rope scaling at the released settings: `rope_freqs` byte-identical to llama.cpp's converter.

The tiny Llama case in arch_cases uses a short original context; here the released
configurations' rope parameters (rope_theta 500000, llama3 scaling with factor 32,
original context 8192) and head sizes (64 for Llama 3.2 1B, 128 for 3B) are exported by
us and by llama.cpp's converter, and the factor tensors compared bit for bit: the
float32 arithmetic must follow the converter's order, not only its formula.
"""

import pytest

from convert_helpers import (
    TinyCase,
    build_tiny_model,
    gguf_tensors,
    reference_converter_or_fail,
    run_reference_converter,
    same_bytes,
)

pytestmark = pytest.mark.slow

LLAMA32_ROPE = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
}
# The released head sizes (1B: 2048 / 32 heads, 3B: 3072 / 24 heads) on a tiny body.
RELEASED_HEADS = {"llama3.2-1b": 64, "llama3.2-3b": 128}


@pytest.mark.parametrize("name", RELEASED_HEADS)
def test_rope_freqs_identical_to_llama_cpp_converter(request, tmp_path_factory, tmp_path, name):
    from convert.export import export

    head_dim = RELEASED_HEADS[name]
    case = TinyCase(
        name, "LlamaForCausalLM", "llama-bpe",
        {
            "hidden_size": 2 * head_dim, "num_attention_heads": 2, "num_key_value_heads": 1,
            "head_dim": head_dim, "num_hidden_layers": 1, "tie_word_embeddings": True,
            "max_position_embeddings": 131072, "rope_parameters": dict(LLAMA32_ROPE),
        },
    )
    checkpoint = build_tiny_model(tmp_path / name, case)
    ours = export(checkpoint, tmp_path / "ours.gguf", "f32").path
    theirs = tmp_path / "theirs.gguf"
    oracle = reference_converter_or_fail(request, tmp_path_factory)
    done = run_reference_converter(oracle, checkpoint, theirs, "f32", pre_tokenizer="llama-bpe")
    assert done.returncode == 0, done.stderr[-3000:]

    our_tensors, their_tensors = gguf_tensors(ours), gguf_tensors(theirs)
    kind, shape, factors = our_tensors["rope_freqs.weight"]
    assert (kind, shape) == ("F32", (head_dim // 2,))
    assert factors[0] == 1.0 and factors[-1] == 32.0  # short wavelengths kept, long ones slowed 32x
    assert any(1.0 < f < 32.0 for f in factors)  # the smooth band between them
    assert same_bytes(factors, their_tensors["rope_freqs.weight"][2]), (
        f"rope_freqs differs from llama.cpp's converter: {factors.tolist()} vs "
        f"{their_tensors['rope_freqs.weight'][2].tolist()}"
    )
    for tensor_name, (their_kind, their_shape, data) in their_tensors.items():
        assert our_tensors[tensor_name][:2] == (their_kind, their_shape), tensor_name
        assert same_bytes(our_tensors[tensor_name][2], data), f"{tensor_name}: bytes differ"
