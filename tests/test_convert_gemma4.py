"""Gemma 4 beyond the shared architecture tests (tests/test_convert_architectures.py).

- released checkpoints spell the full-attention layers' head size and KV heads as
  `global_head_dim` / `num_global_key_value_heads`, transformers 5 saves them as
  `per_layer_config`: both layouts mean the same to transformers and give the same GGUF;
- what the config means reaches the GGUF: the proportional rope's frozen dimensions, the
  per-kind head sizes, the KV-shared layers (no k/v of their own) and their double-wide MLPs;
- the turn markers are control tokens and llama.cpp stops at <turn|>, the chat parser's
  markers are printed (user-defined), and a rendered chat tokenizes as transformers does;
- what llama.cpp's gemma4 cannot run is refused naming the setting, writing nothing.

The tiny checkpoints are the cases of tests/arch_cases/gemma4.py.
"""

import json
import shutil

import numpy as np
import pytest

from convert_helpers import end_of_generation_tokens, gguf_fields, gguf_tensors, write_bpe_tokenizer

from alpaca_chat.errors import ConversionError
from convert.export import export

pytestmark = pytest.mark.slow

PLE = "gemma4-text-ple-kv-shared"
MOE = "gemma4-vision-text-tower-moe"
CONTROL, USER_DEFINED = 3, 4  # gguf.TokenType


def _edit_config(checkpoint, out, edit):
    """A copy of `checkpoint` whose language-model config went through `edit(config)`."""
    shutil.copytree(checkpoint, out)
    config = json.loads((out / "config.json").read_text())
    edit(config.get("text_config", config))
    (out / "config.json").write_text(json.dumps(config))
    return out


def _released_layout(text):
    """per_layer_config -> global_head_dim (+ num_global_key_value_heads), as Gemma 4 was released."""
    per_layer = text.pop("per_layer_config")
    full = next(iter(per_layer.values()))
    text["global_head_dim"] = full["head_dim"]
    text["num_global_key_value_heads"] = full.get("num_key_value_heads")


@pytest.mark.parametrize("name", [PLE, MOE])
def test_released_config_layout_gives_the_same_file(tiny_builds, tmp_path, name):
    import transformers

    checkpoint, _, f16 = tiny_builds.get(name)
    released = _edit_config(checkpoint, tmp_path / "released", _released_layout)
    # transformers reads both layouts as the same per-layer settings...
    def layers(path):
        config = transformers.AutoConfig.from_pretrained(path).get_text_config()
        return [(c.head_dim, c.num_key_value_heads) for c in config.per_layer_config]

    assert layers(released) == layers(checkpoint)
    # ...and so do we.
    out = export(released, tmp_path / "released.gguf", "f16").path
    fields, expected = gguf_fields(out), gguf_fields(f16)
    assert {k: v for k, v in fields.items() if not k.startswith("general.")} == {
        k: v for k, v in expected.items() if not k.startswith("general.")  # names come from the directory
    }
    assert gguf_tensors(out).keys() == gguf_tensors(f16).keys()


def test_layer_settings_reach_the_gguf(tiny_builds):
    checkpoint, _, f16 = tiny_builds.get(PLE)
    config = json.loads((checkpoint / "config.json").read_text())
    fields, tensors = gguf_fields(f16), gguf_tensors(f16)
    head_swa, head_full = config["head_dim"], config["per_layer_config"]["1"]["head_dim"]
    assert (fields["gemma4.attention.key_length_swa"], fields["gemma4.attention.key_length"]) == (head_swa, head_full)
    assert fields["gemma4.attention.sliding_window_pattern"] == [True, False, True, False]
    # proportional rope: a quarter of each full-attention half-head rotates, the rest is frozen
    kind, shape, factors = tensors["rope_freqs.weight"]
    rotated = int(0.25 * head_full // 2)
    assert kind == "F32" and shape == (head_full // 2,)
    assert list(factors[:rotated]) == [1.0] * rotated and (np.asarray(factors[rotated:]) == np.float32(1e30)).all()
    # the last two layers reuse the first two's KV and have double-wide MLPs
    assert fields["gemma4.attention.shared_kv_layers"] == 2
    n_ff = config["intermediate_size"]
    assert fields["gemma4.feed_forward_length"] == [n_ff, n_ff, 2 * n_ff, 2 * n_ff]
    assert "blk.1.attn_k.weight" in tensors and "blk.2.attn_k.weight" not in tensors
    n_ple = 4 * config["hidden_size_per_layer_input"]  # four layers' inputs side by side
    assert tensors["per_layer_token_embd.weight"][1] == (n_ple, config["vocab_size"])  # ggml order
    assert fields["gemma4.final_logit_softcapping"] == config["final_logit_softcapping"]


def test_markers_types_end_of_generation_and_chat_tokenization(tiny_builds):
    import transformers

    from convert.evaluate import LogitsModel

    checkpoint, _, f16 = tiny_builds.get(PLE)
    fields = gguf_fields(f16)
    assert fields["tokenizer.ggml.model"] == "gemma4" and "tokenizer.ggml.pre" not in fields
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    kind = dict(zip(tokens, types))
    assert kind["<|turn>"] == kind["<turn|>"] == kind["<|think|>"] == CONTROL
    assert kind["<|channel>"] == kind["<tool_call|>"] == kind['<|"|>'] == USER_DEFINED  # printed for the parser
    assert {"<turn|>", "<eos>"} <= end_of_generation_tokens(f16)

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Café?  Yes — 日本語 42"},
            {"role": "assistant", "content": "Oui."}, {"role": "user", "content": "\tAgain\n\n"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    with LogitsModel(f16, n_ctx=256) as model:
        assert model.tokenize(text, add_special=False, parse_special=True) == tokenizer.encode(
            text, add_special_tokens=False
        )


def _with(**settings):
    return lambda text: text.update(settings)


def _full_rope(**rope):
    def edit(text):
        text["rope_parameters"]["full_attention"].update(rope)

    return edit


def _per_layer(**extra):
    def edit(text):
        text["per_layer_config"]["1"].update(extra)

    return edit


REFUSED = {
    "attention-bias": (_with(attention_bias=True), "attention_bias"),
    "bidirectional": (_with(use_bidirectional_attention="all"), "use_bidirectional_attention"),
    "activation": (_with(hidden_activation="gelu"), "hidden_activation"),
    "kv-sharing-pattern": (_with(num_kv_shared_layers=3), "num_kv_shared_layers is 3"),
    "rope-scaled": (_full_rope(rope_type="linear", factor=2.0), "rope type 'linear'"),
    "per-layer-window": (_per_layer(sliding_window=8), "per_layer_config sets sliding_window"),
    "per-layer-ple-vocab": (_with(vocab_size_per_layer_input=300), "vocab_size_per_layer_input"),
}


@pytest.mark.parametrize("kind", REFUSED)
def test_what_llama_cpp_cannot_run_is_refused(tiny_builds, tmp_path, kind):
    edit, message = REFUSED[kind]
    checkpoint = _edit_config(tiny_builds.get(PLE)[0], tmp_path / "ckpt", edit)
    out = tmp_path / "out.gguf"
    with pytest.raises(ConversionError, match=message):
        export(checkpoint, out, "f16")
    assert not out.exists()


def test_another_familys_tokenizer_is_refused(tiny_builds, tmp_path):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_builds.get(PLE)[0], checkpoint)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (checkpoint / name).unlink()
    write_bpe_tokenizer(checkpoint)  # a byte-level BPE (GPT-2 style)
    out = tmp_path / "out.gguf"
    with pytest.raises(ConversionError, match="not Gemma 4's tokenizer"):
        export(checkpoint, out, "f16")
    assert not out.exists()
