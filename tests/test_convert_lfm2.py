"""What is particular to LFM2 and LFM2 MoE exports (short convolutions beside attention).

The generic checks (logits, tokenization, byte parity with llama.cpp's converter, the
adapter, the template) run for the case in the shared suites; here: how each layer's kind
lands in the GGUF, the FFN width as transformers computes it (including a null multiplier,
where llama.cpp's converter computes another one), configs as LiquidAI released them
(transformers 4.x keys), and what llama.cpp cannot run, refused before anything is written.
LFM2 MoE: the expert bias (which only chooses experts) with values that change the choice, and
without use_expert_bias; router settings llama.cpp does not have, refused.
"""


import numpy as np
import pytest

from convert_helpers import (
    copy_checkpoint,
    gguf_fields,
    gguf_last_logits,
    gguf_tensors,
    hf_last_logits,
    random_sequences,
    read_config,
    run_convert,
    same_bytes,
    with_config,
)

from alpaca_chat.errors import ConversionError
from convert.export import export
from convert.export.lfm2 import feed_forward_length

pytestmark = pytest.mark.slow
CASE = "lfm2-conv-attention"
MOE_CASE = "lfm2-moe"


def test_each_layer_is_written_as_its_kind(tiny_builds):
    """Convolution layers: no KV heads, the three shortconv tensors, the kernel as (hidden, L) with
    the checkpoint's values; attention layers: q/k/v/output and per-head q/k norms. The final norm
    is token_embd_norm (llama.cpp's name for LFM2's embedding_norm), with no output matrix (tied)."""
    from safetensors.numpy import load_file

    checkpoint, f32, _ = tiny_builds.get(CASE)
    config, fields, tensors = read_config(checkpoint), gguf_fields(f32), gguf_tensors(f32)
    weights = load_file(checkpoint / "model.safetensors")
    hidden, l_cache = config["hidden_size"], config["conv_L_cache"]
    head_dim = hidden // config["num_attention_heads"]
    assert "conv" in config["layer_types"] and "full_attention" in config["layer_types"]
    assert fields["lfm2.attention.head_count_kv"] == [
        config["num_key_value_heads"] if kind == "full_attention" else 0 for kind in config["layer_types"]
    ]
    assert fields["lfm2.shortconv.l_cache"] == l_cache
    for bid, kind in enumerate(config["layer_types"]):
        block = {name.split(".", 2)[2]: value for name, value in tensors.items() if name.startswith(f"blk.{bid}.")}
        if kind == "conv":
            assert not [name for name in block if name.startswith("attn_") and name != "attn_norm.weight"]
            assert block["shortconv.in_proj.weight"][2].shape == (3 * hidden, hidden)
            kind_name, _, kernel = block["shortconv.conv.weight"]
            assert kind_name == "F32" and kernel.shape == (hidden, l_cache)
            assert np.array_equal(kernel, weights[f"model.layers.{bid}.conv.conv.weight"][:, 0, :])
        else:
            assert not [name for name in block if name.startswith("shortconv.")]
            assert block["attn_q_norm.weight"][2].shape == block["attn_k_norm.weight"][2].shape == (head_dim,)
            assert block["attn_output.weight"][2].shape == (hidden, hidden)
    assert "output_norm.weight" not in tensors and "output.weight" not in tensors
    assert np.array_equal(tensors["token_embd_norm.weight"][2], weights["model.embedding_norm.weight"])
    assert fields["tokenizer.ggml.pre"] == "lfm2"  # llama.cpp's name for LFM2's Llama 3 split


# (block_ff_dim or intermediate_size, auto adjust, multiplier, multiple of): LFM2-1.2B's, the case's
# (every step moves it), no multiplier (transformers then skips the rounding), no adjustment.
FFN_SETTINGS = [(12288, True, 1.0, 256), (192, True, 1.3, 48), (192, True, None, 48), (200, False, 1.0, 256)]


@pytest.mark.parametrize("width,adjust,multiplier,multiple", FFN_SETTINGS)
@pytest.mark.parametrize("key", ["intermediate_size", "block_ff_dim"])
def test_ffn_width_is_what_transformers_builds(key, width, adjust, multiplier, multiple):
    """Against transformers' own Lfm2MLP. It reads only these attributes, so a plain namespace stands
    in for the config: transformers 5's Lfm2Config refuses a null multiplier, which 4.x accepted."""
    from types import SimpleNamespace

    from transformers.models.lfm2.modeling_lfm2 import Lfm2MLP

    settings = {
        key: width, "block_auto_adjust_ff_dim": adjust, "block_ffn_dim_multiplier": multiplier,
        "block_multiple_of": multiple,
    }
    config = SimpleNamespace(
        hidden_size=8, intermediate_size=width, block_auto_adjust_ff_dim=adjust,
        block_ffn_dim_multiplier=multiplier, block_multiple_of=multiple,
    )
    assert feed_forward_length(settings) == Lfm2MLP(config).w1.out_features


def test_released_config_keys_give_the_same_file(tiny_builds, tmp_path):
    """LiquidAI's config.json (transformers 4.x) says block_ff_dim, full_attn_idxs and tie_embedding
    where transformers 5 writes intermediate_size, layer_types and tie_word_embeddings."""
    checkpoint, _, f16 = tiny_builds.get(CASE)
    config = read_config(checkpoint)
    attention = [i for i, kind in enumerate(config["layer_types"]) if kind == "full_attention"]
    released = with_config(
        checkpoint, tmp_path, layer_types=None, full_attn_idxs=attention, intermediate_size=None,
        block_ff_dim=config["intermediate_size"], tie_word_embeddings=None, tie_embedding=True,
    )
    ours = export(released, tmp_path / "released.gguf").path
    assert gguf_fields(ours) == gguf_fields(f16)
    want, have = gguf_tensors(f16), gguf_tensors(ours)
    assert sorted(have) == sorted(want)
    assert all(same_bytes(have[name][2], want[name][2]) for name in want)


def _swapped(config):
    return {"layer_types": ["full_attention" if kind == "conv" else "conv" for kind in config["layer_types"]]}


# config.json changes llama.cpp cannot run (or that disagree with the weights) -> the one-line reason.
REFUSED = {
    "conv-bias": (lambda c: {"conv_bias": True}, "convolution biases"),
    "sliding-layer": (lambda c: {"layer_types": ["sliding_attention", *c["layer_types"][1:]]}, "'sliding_attention'"),
    "short-layer-types": (lambda c: {"layer_types": c["layer_types"][:-1]}, "3 entries for 4 layers"),
    "head-dim": (lambda c: {"head_dim": 32}, r"head_dim × num_attention_heads is 32 × 4"),
    "l-cache": (lambda c: {"conv_L_cache": 4}, r"conv_L_cache\): the config and the weights disagree"),
    "ffn-width": (
        lambda c: {"block_multiple_of": 256}, r"feed_forward\.w\d\.weight has shape .*, but config.json implies .*256"
    ),
    # LFM2's default is tied; an untied config (the released key) needs the output matrix it lacks.
    "untied-without-head": (lambda c: {"tie_word_embeddings": None, "tie_embedding": False}, "output.weight"),
    "swapped-kinds": (_swapped, "layer 0 is a full_attention layer in config.json's layer_types, but the checkpoint"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_what_llama_cpp_cannot_run_is_refused(tiny_builds, tmp_path, name):
    checkpoint, _, _ = tiny_builds.get(CASE)
    change, message = REFUSED[name]
    broken = with_config(checkpoint, tmp_path, **change(read_config(checkpoint)))
    out = tmp_path / "out.gguf"
    with pytest.raises(ConversionError, match=message):
        export(broken, out, "f16")
    assert not out.exists()


def test_refusal_is_one_line_from_the_cli(tiny_builds, tmp_path, capsys):
    checkpoint, _, _ = tiny_builds.get(CASE)
    broken = with_config(checkpoint, tmp_path, conv_bias=True)
    out = tmp_path / "out"
    out.mkdir()
    code, error = run_convert(capsys, "export", broken, "-o", out / "m.gguf")
    assert code == 1 and error == (
        "alpaca-convert: error: this LFM2 checkpoint has convolution biases (conv_bias: true), which llama.cpp's "
        "lfm2 cannot run"
    )
    assert list(out.iterdir()) == []


# -- LFM2 MoE --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def biased_moe(tiny_builds, tmp_path_factory):
    """The MoE case with a random expert bias large enough to change which experts are chosen
    (sigmoid scores lie in (0, 1)); the tiny builder leaves that buffer at zero."""
    from safetensors.numpy import load_file, save_file

    checkpoint, _, _ = tiny_builds.get(MOE_CASE)
    copy = copy_checkpoint(checkpoint, tmp_path_factory.mktemp("biased") / checkpoint.name)
    weights = load_file(copy / "model.safetensors")
    rng = np.random.default_rng(7)
    biases = [name for name in weights if name.endswith(".feed_forward.expert_bias")]
    assert biases, "the MoE case has no expert bias"
    for name in biases:
        weights[name] = rng.normal(0.0, 0.5, weights[name].shape).astype(np.float32)
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    return checkpoint, copy


def _logits_agree(checkpoint, gguf):
    sequences = random_sequences(read_config(checkpoint)["vocab_size"], count=3)
    want = hf_last_logits(checkpoint, sequences)
    for expected, got in zip(want, gguf_last_logits(gguf, sequences)):
        assert np.abs(got - expected).max() < 1e-4
    return sequences, want


def test_moe_expert_bias_chooses_experts_as_in_transformers(biased_moe, tmp_path):
    original, biased = biased_moe
    gguf = export(biased, tmp_path / "biased.F32.gguf", "f32").path
    fields, tensors = gguf_fields(gguf), gguf_tensors(gguf)
    config = read_config(biased)
    assert fields["lfm2moe.leading_dense_block_count"] == config["num_dense_layers"]
    assert fields["lfm2moe.expert_gating_func"] == 2  # sigmoid
    for bid in range(config["num_dense_layers"], config["num_hidden_layers"]):
        assert tensors[f"blk.{bid}.exp_probs_b.bias"][0] == "F32"
        assert tensors[f"blk.{bid}.ffn_gate_exps.weight"][2].shape == (
            config["num_experts"], config["moe_intermediate_size"], config["hidden_size"]
        )
    sequences, with_bias = _logits_agree(biased, gguf)
    # The bias changed the model (else this test could not fail on a bias llama.cpp ignores).
    without = hf_last_logits(original, sequences)
    assert max(np.abs(a - b).max() for a, b in zip(with_bias, without)) > 1e-2


def test_moe_without_expert_bias_chooses_by_score_alone(biased_moe, tmp_path):
    """use_expert_bias: false: transformers ignores the stored bias; the GGUF gets zeros in its place."""
    _, biased = biased_moe
    unbiased = with_config(biased, tmp_path, use_expert_bias=False)
    gguf = export(unbiased, tmp_path / "unbiased.F32.gguf", "f32").path
    tensors = gguf_tensors(gguf)
    biases = [name for name in tensors if name.endswith("exp_probs_b.bias")]
    assert len(biases) == 2 and all(not tensors[name][2].any() for name in biases)
    _logits_agree(unbiased, gguf)


MOE_REFUSED = {
    "no-renormalization": ({"norm_topk_prob": False}, "norm_topk_prob is false"),
    "scaled-weights": ({"routed_scaling_factor": 2.5}, "routed_scaling_factor is 2.5"),
    "experts-in-a-dense-layer": ({"num_dense_layers": 3}, "layer 2 has experts .* makes it a dense layer"),
    "expert-count": ({"num_experts": 3}, "4 experts' w\\d in the checkpoint, but config.json's num_experts is 3"),
    "experts-used": ({"num_experts_per_tok": 5}, "num_experts_per_tok is 5, for 4 experts"),
    "expert-width": ({"moe_intermediate_size": 16}, r"experts\.\d\.w\d\.weight has shape"),
}


@pytest.mark.parametrize("name", MOE_REFUSED)
def test_moe_what_llama_cpp_cannot_run_is_refused(tiny_builds, tmp_path, name):
    checkpoint, _, _ = tiny_builds.get(MOE_CASE)
    changes, message = MOE_REFUSED[name]
    out = tmp_path / "out.gguf"
    with pytest.raises(ConversionError, match=message):
        export(with_config(checkpoint, tmp_path, **changes), out, "f16")
    assert not out.exists()
