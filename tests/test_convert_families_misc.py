"""What is particular to SmolLM3, Granite 3.x, OLMo 2 and Mistral-Nemo (tekken) exports.

The generic checks (logits, tokenization, byte parity with llama.cpp's
converter) run for these cases in test_convert_architectures.py; here: how
each family's quirks land in the GGUF, and the checkpoints llama.cpp could not
run faithfully, which are refused before anything is written.
"""


import numpy as np
import pytest

from convert_helpers import (
    end_of_generation_tokens,
    gguf_fields,
    gguf_last_logits,
    gguf_tensors,
    hf_last_logits,
    random_sequences,
    read_config,
    with_config,
)

from alpaca_chat.errors import ConversionError
from convert.export import export

pytestmark = pytest.mark.slow


# -- SmolLM3 ---------------------------------------------------------------------------


def test_smollm3_case_has_a_layer_without_rope(tiny_builds):
    """Otherwise the logits tests would not see where llama.cpp skips RoPE."""
    checkpoint, _, _ = tiny_builds.get("smollm3-nope")
    config = read_config(checkpoint)
    assert 0 in config["no_rope_layers"][: config["num_hidden_layers"]]


def test_smollm3_no_rope_layers_are_implied_by_the_architecture(tiny_builds):
    """llama.cpp's smollm3 skips RoPE in every 4th layer without a key saying so; neither
    converter writes one, and the architecture is smollm3, not llama."""
    _, _, f16 = tiny_builds.get("smollm3-nope")
    fields = gguf_fields(f16)
    assert fields["general.architecture"] == "smollm3"
    assert not [key for key in fields if "no_rope" in key or "nope" in key or "rope.pattern" in key]
    assert fields["tokenizer.ggml.pre"] == "llama-bpe"


def test_smollm3_other_no_rope_pattern_is_refused(tiny_builds, tmp_path):
    checkpoint, _, _ = tiny_builds.get("smollm3-nope")
    n_layer = read_config(checkpoint)["num_hidden_layers"]
    broken = with_config(checkpoint, tmp_path, no_rope_layers=[1] * n_layer)  # RoPE everywhere
    out = tmp_path / "out.gguf"
    with pytest.raises(ConversionError, match=r"layer 3 uses RoPE .*no_rope_layers"):
        export(broken, out, "f16")
    assert not out.exists()


# -- Granite ---------------------------------------------------------------------------

GRANITE_KEYS = {
    "embedding_multiplier": "granite.embedding_scale",
    "residual_multiplier": "granite.residual_scale",
    "attention_multiplier": "granite.attention.scale",
    "logits_scaling": "granite.logit_scale",
}


def test_granite_multipliers_in_metadata(tiny_builds):
    checkpoint, _, f16 = tiny_builds.get("granite-multipliers")
    config, fields = read_config(checkpoint), gguf_fields(f16)
    for hf_key, gguf_key in GRANITE_KEYS.items():
        assert config[hf_key] != 1.0, f"the case should set {hf_key} away from the default"
        assert fields[gguf_key] == pytest.approx(config[hf_key]), gguf_key
    assert fields["tokenizer.ggml.pre"] == "refact"  # llama.cpp's name for Granite 3's split


def test_granite_missing_multiplier_gets_transformers_default(tiny_builds, tmp_path):
    """transformers runs a config without attention_multiplier at scale 1.0; llama.cpp would use
    1/sqrt(head size) if the key were left out."""
    checkpoint, _, _ = tiny_builds.get("granite-multipliers")
    without = with_config(checkpoint, tmp_path, attention_multiplier=None)
    f32 = export(without, tmp_path / "g.gguf", "f32").path
    assert gguf_fields(f32)["granite.attention.scale"] == 1.0
    sequences = random_sequences(read_config(without)["vocab_size"], count=2)
    for want, have in zip(hf_last_logits(without, sequences), gguf_last_logits(f32, sequences)):
        assert np.abs(have - want).max() < 1e-4


def test_granite_head_dim_that_agrees_is_dropped(tiny_builds, tmp_path):
    checkpoint, _, _ = tiny_builds.get("granite-multipliers")
    config = read_config(checkpoint)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    fields = gguf_fields(export(with_config(checkpoint, tmp_path, head_dim=head_dim), tmp_path / "g.gguf").path)
    assert "granite.attention.key_length" not in fields
    assert fields["granite.rope.dimension_count"] == head_dim


def test_granite_head_dim_that_disagrees_is_refused(tiny_builds, tmp_path):
    checkpoint, _, _ = tiny_builds.get("granite-multipliers")
    config = read_config(checkpoint)
    head_dim = 2 * config["hidden_size"] // config["num_attention_heads"]
    out = tmp_path / "g.gguf"
    with pytest.raises(ConversionError, match="head_dim"):
        export(with_config(checkpoint, tmp_path, head_dim=head_dim), out)
    assert not out.exists()


def test_granite_pre_tokenizer_given_is_kept(tiny_builds, tmp_path):
    """--pre-tokenizer is taken as given: the family's own name replaces only a detected one."""
    checkpoint, _, _ = tiny_builds.get("granite-multipliers")
    fields = gguf_fields(export(checkpoint, tmp_path / "g.gguf", pre_tokenizer="smollm").path)
    assert fields["tokenizer.ggml.pre"] == "smollm"


# -- OLMo 2 ----------------------------------------------------------------------------


def test_olmo2_norms_after_attention_and_mlp(tiny_builds):
    checkpoint, _, f16 = tiny_builds.get("olmo2-postnorm")
    config, tensors = read_config(checkpoint), gguf_tensors(f16)
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    for bid in range(config["num_hidden_layers"]):
        block = {name.split(".", 2)[2]: value for name, value in tensors.items() if name.startswith(f"blk.{bid}.")}
        assert "attn_norm.weight" not in block and "ffn_norm.weight" not in block
        assert block["post_attention_norm.weight"][1] == (config["hidden_size"],)
        assert block["post_ffw_norm.weight"][1] == (config["hidden_size"],)
        # q/k norms span the whole projection, not one head.
        assert block["attn_q_norm.weight"][1] == (config["num_attention_heads"] * head_dim,)
        assert block["attn_k_norm.weight"][1] == (config["num_key_value_heads"] * head_dim,)
    assert gguf_fields(f16)["tokenizer.ggml.pre"] == "dbrx"  # llama.cpp's name for OLMo 2's cl100k split


def test_olmo2_tied_embeddings_are_refused(tiny_builds, tmp_path):
    checkpoint, _, _ = tiny_builds.get("olmo2-postnorm")
    out = tmp_path / "o.gguf"
    with pytest.raises(ConversionError, match="separate output matrix"):
        export(with_config(checkpoint, tmp_path, tie_word_embeddings=True), out)
    assert not out.exists()


# -- Mistral-Nemo (tekken) ---------------------------------------------------------------


def test_tekken_tokenizer_and_explicit_head_dim(tiny_builds):
    checkpoint, _, f16 = tiny_builds.get("mistral-nemo-tekken")
    config, fields = read_config(checkpoint), gguf_fields(f16)
    assert config["head_dim"] != config["hidden_size"] // config["num_attention_heads"]
    assert fields["llama.attention.key_length"] == config["head_dim"]
    assert fields["llama.rope.dimension_count"] == config["head_dim"]
    assert fields["tokenizer.ggml.pre"] == "tekken"
    assert fields["tokenizer.ggml.add_bos_token"] is True


# -- end of generation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "end_of_turn"),
    [
        ("smollm3-nope", "<|im_end|>"),
        ("granite-multipliers", "<|end_of_text|>"),
        ("olmo2-postnorm", "<|endoftext|>"),
        ("mistral-nemo-tekken", "</s>"),
    ],
)
def test_end_of_turn_stops_generation(tiny_builds, name, end_of_turn):
    _, _, f16 = tiny_builds.get(name)
    assert end_of_turn in end_of_generation_tokens(f16)
