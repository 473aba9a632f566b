"""Phi-3 / Phi-3.5 / Phi-4-mini and GLM-4 beyond the shared architecture tests.

- Phi-3: qkv_proj and gate_up_proj stay fused (llama.cpp's attn_qkv and double-height
  ffn_up); LongRoPE becomes short/long factor tensors and the attention factor, and at a
  context past the original one llama.cpp (long factors) still gives transformers' logits;
  partial rotary sets the rope dimension count; <|end|> ends a turn; Phi-4-mini's chat
  markers tokenize as in transformers;
- GLM-4: partial rotary, the glm4 post-norms, llama.cpp's "glm4" pre-tokenizer name,
  <|user|>, <|observation|> and <|endoftext|> end a turn; GlmForCausalLM's context
  length and RMS epsilon come from its config;
- bad input (LongRoPE factors of the wrong length, a GLM tokenizer without GLM's chat
  tokens, a chatglm head size llama.cpp cannot run) fails with one line, writing nothing.

The tiny checkpoints are the cases of tests/arch_cases/phi3.py and glm.py.
"""

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest

from convert_helpers import (
    CASES,
    build_tiny_model,
    edit_config,
    end_of_generation_tokens,
    gguf_fields,
    gguf_last_logits,
    gguf_tensors,
    hf_last_logits,
    read_config,
    run_convert,
)


pytestmark = pytest.mark.slow

PHI_CASES = ["phi3-spm-fused", "phi3.5-spm-longrope", "phi4-mini-bpe-partial-rotary"]
LONGROPE_CASES = ["phi3.5-spm-longrope", "phi4-mini-bpe-partial-rotary"]
GLM_CASES = ["glm4-0414-bpe", "glm-4-chat-hf-bpe"]


def _export_fails(capsys, tmp_path, checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    code, error = run_convert(capsys, "export", checkpoint, "-o", out / "m.gguf")
    assert code == 1
    assert list(out.iterdir()) == []
    return error


def _token_id(fields, text):
    return fields["tokenizer.ggml.tokens"].index(text)


def _tokenize_both(checkpoint, gguf_path, text):
    import transformers

    from convert.evaluate import LogitsModel

    expected = transformers.AutoTokenizer.from_pretrained(checkpoint).encode(text)
    with LogitsModel(gguf_path, n_ctx=256) as model:
        return model.tokenize(text, add_special=True, parse_special=True), expected


# -- Phi-3 -----------------------------------------------------------------------------


def test_phi3_projections_stay_fused(tiny_builds):
    checkpoint, _, f16 = tiny_builds.get("phi3-spm-fused")
    config = read_config(checkpoint)
    hidden, head_dim = config["hidden_size"], config["hidden_size"] // config["num_attention_heads"]
    tensors = gguf_tensors(f16)
    for bid in range(config["num_hidden_layers"]):
        assert f"blk.{bid}.attn_q.weight" not in tensors and f"blk.{bid}.ffn_gate.weight" not in tensors
        # gguf shapes are columns first
        qkv_rows = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * head_dim
        assert tensors[f"blk.{bid}.attn_qkv.weight"][1] == (hidden, qkv_rows)
        assert tensors[f"blk.{bid}.ffn_up.weight"][1] == (hidden, 2 * config["intermediate_size"])


@pytest.mark.parametrize("name", PHI_CASES)
def test_phi_end_of_turn_stops_generation(tiny_builds, name):
    _, _, f16 = tiny_builds.get(name)
    assert {"<|end|>", "<|endoftext|>"} <= end_of_generation_tokens(f16)
    assert "<|user|>" not in end_of_generation_tokens(f16)


@pytest.mark.parametrize("name", PHI_CASES)
def test_phi_hyperparameters(tiny_builds, name):
    checkpoint, _, f16 = tiny_builds.get(name)
    config = read_config(checkpoint)
    fields = gguf_fields(f16)
    rope = config["rope_parameters"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    assert fields["phi3.rope.dimension_count"] == int(head_dim * rope.get("partial_rotary_factor", 1.0))
    assert fields["phi3.rope.scaling.original_context_length"] == config["original_max_position_embeddings"]
    assert fields["phi3.context_length"] == config["max_position_embeddings"]
    assert fields["phi3.attention.sliding_window"] == config["sliding_window"]
    assert "phi3.rope.scaling.type" not in fields  # llama.cpp's phi3 picks the factors itself


@pytest.mark.parametrize("name", LONGROPE_CASES)
def test_longrope_factors_and_attention_factor(tiny_builds, name):
    checkpoint, _, f16 = tiny_builds.get(name)
    config = read_config(checkpoint)
    rope = config["rope_parameters"]
    tensors = gguf_tensors(f16)
    n_rot = gguf_fields(f16)["phi3.rope.dimension_count"]
    for key, tensor in (("short_factor", "rope_factors_short.weight"), ("long_factor", "rope_factors_long.weight")):
        kind, shape, data = tensors[tensor]
        assert kind == "F32" and shape == (n_rot // 2,)
        np.testing.assert_array_equal(data, np.asarray(rope[key], dtype=np.float32))
    original = config["original_max_position_embeddings"]
    scale = config["max_position_embeddings"] / original
    expected = math.sqrt(1 + math.log(scale) / math.log(original))
    assert gguf_fields(f16)["phi3.rope.scaling.attn_factor"] == pytest.approx(expected, rel=1e-6)


def test_phi3_without_longrope_has_no_factor_tensors(tiny_builds):
    _, _, f16 = tiny_builds.get("phi3-spm-fused")
    assert not any(name.startswith("rope_factors") for name in gguf_tensors(f16))
    assert "phi3.rope.scaling.attn_factor" not in gguf_fields(f16)


@pytest.mark.parametrize("name", LONGROPE_CASES)
def test_long_context_uses_the_long_factors_like_transformers(tiny_builds, name):
    """Past the original context transformers switches to the long factors; llama.cpp does
    when its context is larger than the original one. The logits must still agree."""
    checkpoint, f32, _ = tiny_builds.get(name)
    config = read_config(checkpoint)
    original = config["original_max_position_embeddings"]
    rng = np.random.default_rng(7)
    sequence = [int(t) for t in rng.integers(3, config["vocab_size"], size=original + 40)]
    expected = hf_last_logits(checkpoint, [sequence])[0]
    got = gguf_last_logits(f32, [sequence], n_ctx=2 * original)[0]
    assert np.abs(got - expected).max() < 1e-4


def test_phi4_mini_uses_the_gpt4o_pre_tokenizer_and_tied_embeddings(tiny_builds):
    _, _, f16 = tiny_builds.get("phi4-mini-bpe-partial-rotary")
    fields = gguf_fields(f16)
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-4o"
    assert "output.weight" not in gguf_tensors(f16)


def test_phi4_chat_turn_tokenizes_like_transformers(tiny_builds):
    """Phi-3's SentencePiece turns are not compared: llama.cpp's SentencePiece tokenizer puts
    a space before the text after every special token, transformers' (legacy=False, as
    Phi-3 ships) does not; both converters' files behave so."""
    checkpoint, _, f16 = tiny_builds.get("phi4-mini-bpe-partial-rotary")
    turn = "<|system|>\nBe brief.<|end|>\n<|user|>\nhello there<|end|>\n<|assistant|>\n"
    got, expected = _tokenize_both(checkpoint, f16, turn)
    assert got == expected


@pytest.mark.parametrize("name", PHI_CASES + GLM_CASES)
def test_chat_template_is_carried(tiny_builds, name):
    import transformers

    checkpoint, _, f16 = tiny_builds.get(name)
    expected = transformers.AutoTokenizer.from_pretrained(checkpoint).chat_template
    assert gguf_fields(f16)["tokenizer.chat_template"] == expected


def test_wrong_number_of_longrope_factors_fails(tiny_builds, tmp_path, capsys):
    checkpoint = shutil.copytree(tiny_builds.get("phi3.5-spm-longrope")[0], tmp_path / "phi3.5")
    rope = read_config(checkpoint)["rope_parameters"]
    edit_config(checkpoint, rope_parameters={**rope, "long_factor": rope["long_factor"][:-1]})
    error = _export_fails(capsys, tmp_path, checkpoint)
    assert "long_factor has 7" in error and "8 entries" in error



def test_phi3_fused_qkv_that_disagrees_with_the_config_fails(tiny_builds, tmp_path, capsys):
    checkpoint = shutil.copytree(tiny_builds.get("phi3-spm-fused")[0], tmp_path / "phi3")
    edit_config(checkpoint, num_key_value_heads=1)
    error = _export_fails(capsys, tmp_path, checkpoint)
    assert "model.layers.0.self_attn.qkv_proj.weight" in error and "[96, 64]" in error

# -- GLM-4 -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", GLM_CASES)
def test_glm_end_of_turn_tokens(tiny_builds, name):
    _, _, f16 = tiny_builds.get(name)
    fields = gguf_fields(f16)
    assert {"<|endoftext|>", "<|user|>", "<|observation|>"} <= end_of_generation_tokens(f16)
    assert fields["tokenizer.ggml.eos_token_id"] == _token_id(fields, "<|endoftext|>")
    assert fields["tokenizer.ggml.eot_token_id"] == _token_id(fields, "<|user|>")
    assert fields["tokenizer.ggml.eom_token_id"] == _token_id(fields, "<|observation|>")
    assert "<|assistant|>" not in end_of_generation_tokens(f16)


@pytest.mark.parametrize("name", GLM_CASES)
def test_glm_partial_rotary_and_pre_tokenizer(tiny_builds, name):
    checkpoint, _, f16 = tiny_builds.get(name)
    config = read_config(checkpoint)
    fields = gguf_fields(f16)
    arch = fields["general.architecture"]
    assert arch == {"Glm4ForCausalLM": "glm4", "GlmForCausalLM": "chatglm"}[config["architectures"][0]]
    partial = config["rope_parameters"]["partial_rotary_factor"]
    assert fields[f"{arch}.rope.dimension_count"] == int(config["head_dim"] * partial)
    assert fields["tokenizer.ggml.pre"] == "glm4"
    assert fields["tokenizer.ggml.add_bos_token"] is False
    tensors = gguf_tensors(f16)
    assert tensors["blk.0.ffn_up.weight"][1] == (config["hidden_size"], 2 * config["intermediate_size"])
    assert "blk.0.ffn_gate.weight" not in tensors


def test_glm4_has_post_norms_and_endoftext_bos(tiny_builds):
    _, _, f16 = tiny_builds.get("glm4-0414-bpe")
    tensors, fields = gguf_tensors(f16), gguf_fields(f16)
    for bid in range(fields["glm4.block_count"]):
        assert tensors[f"blk.{bid}.post_attention_norm.weight"][0] == "F32"
        assert tensors[f"blk.{bid}.post_ffw_norm.weight"][0] == "F32"
    assert fields["tokenizer.ggml.bos_token_id"] == _token_id(fields, "<|endoftext|>")  # as llama.cpp's converter


def test_glm_hf_context_length_and_epsilon_come_from_its_config(tiny_builds):
    checkpoint, _, f16 = tiny_builds.get("glm-4-chat-hf-bpe")
    config, fields = read_config(checkpoint), gguf_fields(f16)
    assert fields["chatglm.context_length"] == config["max_position_embeddings"]
    assert fields["chatglm.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"], rel=1e-6)
    assert "tokenizer.ggml.bos_token_id" not in fields  # llama.cpp's chatglm converter sets none


@pytest.mark.parametrize("name", GLM_CASES)
def test_glm_chat_turn_tokenizes_like_transformers(tiny_builds, name):
    checkpoint, _, f16 = tiny_builds.get(name)
    turn = "[gMASK]<sop><|user|>\nhello 12345<|assistant|>\nhi<|observation|>\n"
    got, expected = _tokenize_both(checkpoint, f16, turn)
    assert got == expected


def test_glm_tokenizer_without_glm_chat_tokens_fails(tiny_builds, tmp_path, capsys):
    checkpoint = shutil.copytree(tiny_builds.get("glm4-0414-bpe")[0], tmp_path / "glm4")
    tokenizer_file = checkpoint / "tokenizer.json"
    tokenizer = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    for entry in tokenizer["added_tokens"]:
        if entry["content"] == "<|observation|>":
            entry["content"] = "<|tool|>"
    tokenizer_file.write_text(json.dumps(tokenizer), encoding="utf-8")
    error = _export_fails(capsys, tmp_path, checkpoint)
    assert "Glm4ForCausalLM" in error and "<|observation|>" in error


def test_glm_hf_head_size_llama_cpp_cannot_run_fails(tmp_path, capsys):
    """transformers' glm allows head_dim × heads != hidden_size; llama.cpp's chatglm does not."""
    case = CASES["glm-4-chat-hf-bpe"]
    checkpoint = build_tiny_model(tmp_path / "glm", dataclasses.replace(case, config={**case.config, "head_dim": 8}))
    error = _export_fails(capsys, tmp_path, checkpoint)
    assert "head_dim 8" in error and "chatglm" in error
