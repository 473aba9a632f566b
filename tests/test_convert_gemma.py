"""Gemma 2 and Gemma 3 beyond the shared architecture tests.

- norm weights are stored as an offset from 1: the GGUF holds 1 + w;
- soft-capping, sliding window, rope bases and rope scaling reach the GGUF with the config's
  values; which layers slide is written only when llama.cpp's default would be wrong;
- Gemma3ForConditionalGeneration: only the language model is written, from text_config,
  whose released form leaves most settings (and the 4.x rope keys) to transformers' defaults;
- <start_of_turn>/<end_of_turn> are control tokens, llama.cpp stops at <end_of_turn>, and a
  chat turn tokenizes as transformers does;
- bad input: a query scale llama.cpp cannot reproduce, or a Gemma 2 with its own lm_head,
  fails naming the setting, writing nothing.

The tiny checkpoints are the cases of tests/arch_cases/gemma.py.
"""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert_helpers import end_of_generation_tokens, gguf_fields, gguf_tensors

from alpaca_chat.errors import ConversionError
from convert.export import export

pytestmark = pytest.mark.slow

CASES = ["gemma2-softcap-swa", "gemma3-text-swa", "gemma3-vision-text-tower"]
CONTROL = 3  # gguf.TokenType.CONTROL


def _text_config(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    return config.get("text_config", config)


def _weights(checkpoint):
    weights = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        weights.update(load_file(file))
    return weights


@pytest.mark.parametrize("name", CASES)
def test_norm_weights_are_offset_from_one(tiny_builds, name):
    checkpoint, f32, _ = tiny_builds.get(name)
    weights = _weights(checkpoint)
    tensors = gguf_tensors(f32)
    prefix = "language_model." if name == "gemma3-vision-text-tower" else ""
    pairs = {
        "output_norm.weight": f"{prefix}model.norm.weight",
        "blk.1.attn_norm.weight": f"{prefix}model.layers.1.input_layernorm.weight",
        "blk.1.post_attention_norm.weight": f"{prefix}model.layers.1.post_attention_layernorm.weight",
        "blk.1.ffn_norm.weight": f"{prefix}model.layers.1.pre_feedforward_layernorm.weight",
        "blk.1.post_ffw_norm.weight": f"{prefix}model.layers.1.post_feedforward_layernorm.weight",
    }
    if name.startswith("gemma3"):
        pairs["blk.1.attn_q_norm.weight"] = f"{prefix}model.layers.1.self_attn.q_norm.weight"
        pairs["blk.1.attn_k_norm.weight"] = f"{prefix}model.layers.1.self_attn.k_norm.weight"
    for gguf_name, hf_name in pairs.items():
        kind, _, data = tensors[gguf_name]
        assert kind == "F32"
        np.testing.assert_array_equal(np.asarray(data), weights[hf_name] + np.float32(1), err_msg=gguf_name)
    # Not a norm: copied as is.
    np.testing.assert_array_equal(
        np.asarray(tensors["token_embd.weight"][2]), weights[f"{prefix}model.embed_tokens.weight"]
    )


def test_gemma2_soft_capping_and_window(tiny_builds):
    checkpoint, _, f16 = tiny_builds.get("gemma2-softcap-swa")
    config = _text_config(checkpoint)
    fields = gguf_fields(f16)
    assert fields["gemma2.attn_logit_softcapping"] == config["attn_logit_softcapping"]
    assert fields["gemma2.final_logit_softcapping"] == config["final_logit_softcapping"]
    assert fields["gemma2.attention.sliding_window"] == config["sliding_window"]
    # layer_types (sliding, full) are llama.cpp's gemma2 default: no pattern key, as its converter.
    assert config["layer_types"] == ["sliding_attention", "full_attention"]
    assert "gemma2.attention.sliding_window_pattern" not in fields
    # rope_theta 10000 is llama.cpp's default: no rope keys, as its converter.
    assert not [key for key in fields if key.startswith("gemma2.rope.")]
    assert "output.weight" not in gguf_tensors(f16)  # the embeddings are the output


def test_gemma3_local_and_global_rope(tiny_builds):
    checkpoint, _, f16 = tiny_builds.get("gemma3-text-swa")
    config = _text_config(checkpoint)
    fields = gguf_fields(f16)
    rope = config["rope_parameters"]
    assert fields["gemma3.rope.freq_base"] == rope["full_attention"]["rope_theta"]
    assert fields["gemma3.rope.freq_base_swa"] == rope["sliding_attention"]["rope_theta"]
    assert fields["gemma3.rope.freq_base"] != fields["gemma3.rope.freq_base_swa"]
    assert "gemma3.rope.scaling.type" not in fields
    assert fields["gemma3.final_logit_softcapping"] == config["final_logit_softcapping"]
    assert fields["gemma3.attention.sliding_window"] == config["sliding_window"]
    assert fields["gemma3.attention.key_length"] == config["head_dim"] != config["hidden_size"] // 4
    # Five sliding layers, then a global one: llama.cpp's default pattern, so no pattern key.
    assert config["layer_types"][-1] == "full_attention" and config["layer_types"].count("full_attention") == 1
    assert "gemma3.attention.sliding_window_pattern" not in fields


def test_conditional_generation_writes_the_text_tower_only(tiny_builds):
    checkpoint, _, f16 = tiny_builds.get("gemma3-vision-text-tower")
    config = json.loads((checkpoint / "config.json").read_text())
    text = config["text_config"]
    assert config["architectures"] == ["Gemma3ForConditionalGeneration"] and "vision_config" in config
    assert any(name.startswith("vision_tower.") for name in _weights(checkpoint))

    fields = gguf_fields(f16)
    assert fields["general.architecture"] == "gemma3"
    assert fields["gemma3.block_count"] == text["num_hidden_layers"]
    assert fields["gemma3.embedding_length"] == text["hidden_size"]
    tensors = gguf_tensors(f16)
    assert all(name.startswith(("token_embd.", "output_norm.", "blk.")) for name in tensors)
    assert len([n for n in tensors if n.startswith("blk.0.")]) == 13

    # The global layer's linear rope scaling; the sliding layers keep theirs unscaled.
    full = text["rope_parameters"]["full_attention"]
    assert fields["gemma3.rope.scaling.type"] == full["rope_type"] == "linear"
    assert fields["gemma3.rope.scaling.factor"] == full["factor"]
    # Layer 0 slides, layer 1 is global: not llama.cpp's default (every 6th), so it is written.
    assert fields["gemma3.attention.sliding_window_pattern"] == [
        layer == "sliding_attention" for layer in text["layer_types"]
    ]
    assert "gemma3.final_logit_softcapping" not in fields


def _released_style(src, dst, text_config):
    """A copy of a checkpoint whose config.json carries `text_config` instead of its own."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["text_config"] = text_config
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def test_released_4b_config_layout(tiny_builds, tmp_path):
    """google/gemma-3-4b-it's text_config names a few sizes and 4.x's rope_scaling and
    sliding_window_pattern: the rest is transformers' defaults, which the export fills alike."""
    import transformers

    checkpoint, _, f16 = tiny_builds.get("gemma3-vision-text-tower")
    text = _text_config(checkpoint)
    sparse = {
        key: text[key]
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "vocab_size", "sliding_window")
    }
    sparse.update(
        model_type="gemma3_text",
        rope_scaling={"factor": 8.0, "rope_type": "linear"},
        sliding_window_pattern=2,
    )
    released = _released_style(checkpoint, tmp_path / "released", sparse)
    out = export(released, tmp_path / "released.gguf", "f16").path

    expected = transformers.AutoConfig.from_pretrained(released).text_config  # transformers' reading
    fields, before = gguf_fields(out), gguf_fields(f16)
    assert fields["gemma3.context_length"] == expected.max_position_embeddings != text["max_position_embeddings"]
    assert fields["gemma3.attention.layer_norm_rms_epsilon"] == pytest.approx(expected.rms_norm_eps)
    assert fields["gemma3.rope.freq_base"] == expected.rope_parameters["full_attention"]["rope_theta"]
    assert fields["gemma3.rope.freq_base_swa"] == expected.rope_parameters["sliding_attention"]["rope_theta"]
    assert expected.layer_types == text["layer_types"]
    for key in ("gemma3.rope.scaling.type", "gemma3.rope.scaling.factor", "gemma3.attention.sliding_window_pattern",
                "gemma3.attention.sliding_window", "gemma3.attention.key_length", "gemma3.attention.head_count_kv"):
        assert fields[key] == before[key], key
    assert "gemma3.final_logit_softcapping" not in fields
    ours, theirs = gguf_tensors(out), gguf_tensors(f16)
    assert sorted(ours) == sorted(theirs)


def test_conditional_generation_under_transformers_5_names(tiny_builds, tmp_path):
    """transformers 5 names the towers model.language_model.* / model.vision_tower.* in memory
    (its save_pretrained writes the released names): either layout gives the same file."""
    checkpoint, _, f16 = tiny_builds.get("gemma3-vision-text-tower")
    renamed = shutil.copytree(checkpoint, tmp_path / "renamed")
    weights = {}
    for name, data in _weights(renamed).items():
        if name.startswith("language_model.model."):
            name = "model.language_model." + name.removeprefix("language_model.model.")
        else:
            name = "model." + name
        weights[name] = data
    save_file(weights, renamed / "model.safetensors")
    out = export(renamed, tmp_path / "renamed.gguf", "f16").path
    ours, before = gguf_tensors(out), gguf_tensors(f16)
    assert sorted(ours) == sorted(before)
    for name, (kind, shape, data) in before.items():
        assert ours[name][:2] == (kind, shape) and np.array_equal(np.asarray(ours[name][2]), np.asarray(data)), name


@pytest.mark.parametrize("name", CASES)
def test_turn_markers_are_control_and_end_generation(tiny_builds, name):
    import transformers

    from convert.evaluate import LogitsModel

    checkpoint, _, f16 = tiny_builds.get(name)
    fields = gguf_fields(f16)
    tokens = fields["tokenizer.ggml.tokens"]
    for marker in ("<start_of_turn>", "<end_of_turn>"):
        assert fields["tokenizer.ggml.token_type"][tokens.index(marker)] == CONTROL, marker
    eog = end_of_generation_tokens(f16)
    assert "<end_of_turn>" in eog and "<start_of_turn>" not in eog

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    chat = [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello."}]
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<bos><start_of_turn>user\n") and prompt.endswith("<start_of_turn>model\n")
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_space_prefix"] is False
    with LogitsModel(f16, n_ctx=128) as model:
        assert model.tokenize(prompt, add_special=False, parse_special=True) == tokenizer.encode(
            prompt, add_special_tokens=False
        )


def test_query_scale_llama_cpp_cannot_reproduce_is_refused(tiny_builds, tmp_path):
    checkpoint, _, _ = tiny_builds.get("gemma3-text-swa")
    text = _text_config(checkpoint)
    broken = _released_style(checkpoint, tmp_path / "scaled", {**text, "query_pre_attn_scalar": 256})
    out = tmp_path / "out.gguf"
    with pytest.raises(ConversionError, match=r"query_pre_attn_scalar is 256.*1/sqrt\(head_dim\) = 1/sqrt\(32\)"):
        export(broken, out, "f16")
    assert list(tmp_path.glob("out*")) == []


def test_gemma2_with_its_own_lm_head_is_refused(tiny_builds, tmp_path):
    checkpoint, _, _ = tiny_builds.get("gemma2-softcap-swa")
    untied = shutil.copytree(checkpoint, tmp_path / "untied")
    config = json.loads((untied / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (untied / "config.json").write_text(json.dumps(config))
    weights = _weights(untied)
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"] * np.float32(0.5)
    save_file(weights, untied / "model.safetensors")
    out = tmp_path / "out.gguf"
    with pytest.raises(ConversionError, match="own lm_head"):
        export(untied, out, "f16")
    assert list(tmp_path.glob("out*")) == []
