"""OLMo 3 and ERNIE 4.5 export beyond the shared per-case tests: checkpoints as other tools save
them, and the layouts llama.cpp cannot run, refused in one line before anything is written.

The tiny checkpoints are tests/arch_cases/olmo3.py's and ernie.py's, copied and edited.
"""

import json

import numpy as np
import pytest

from alpaca_chat.errors import ConversionError
from convert_helpers import copy_checkpoint, end_of_generation_tokens, gguf_fields, gguf_tensors, same_bytes

pytestmark = pytest.mark.slow

OLMO3, ERNIE, ERNIE_MOE = "olmo3-swa-yarn", "ernie4_5-spm", "ernie4_5-moe-spm"


def edited(tiny_builds, tmp_path, name, **changes):
    """A copy of case `name`'s checkpoint whose config.json has `changes` (None deletes a key)."""
    checkpoint = copy_checkpoint(tiny_builds.get(name)[0], tmp_path / "checkpoint")
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (checkpoint / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return checkpoint


def refused(checkpoint, tmp_path, match):
    from convert.export import export

    out = tmp_path / "out.gguf"
    with pytest.raises(ConversionError, match=match) as error:
        export(checkpoint, out, "f32")
    assert "\n" not in str(error.value)
    assert not out.exists()


def rope_keys(path):
    return {k: v for k, v in gguf_fields(path).items() if ".rope." in k or "sliding_window" in k}


# -- OLMo 3 ------------------------------------------------------------------------


def test_olmo3_saved_by_transformers_4_has_the_same_rope_and_windows(tiny_builds, tmp_path):
    """transformers 4.57 saved Olmo 3's YaRN as `rope_scaling` (full-attention layers) and one
    `rope_theta`; the exported hyperparameters are those of transformers 5's per-layer-type form."""
    from convert.export import export

    config = json.loads((tiny_builds.get(OLMO3)[0] / "config.json").read_text(encoding="utf-8"))
    full = config["rope_parameters"]["full_attention"]
    checkpoint = edited(
        tiny_builds, tmp_path, OLMO3, rope_parameters=None,
        rope_scaling={k: v for k, v in full.items() if k != "rope_theta"}, rope_theta=full["rope_theta"],
    )
    old = rope_keys(export(checkpoint, tmp_path / "old.gguf", "f32").path)
    new = rope_keys(tiny_builds.get(OLMO3)[1])
    assert old.pop("olmo2.rope.scaling.type") == "yarn"
    assert new.pop("olmo2.rope.freq_base_swa") == full["rope_theta"]  # written only when the config names it
    assert old == {k: v for k, v in new.items() if k != "olmo2.rope.scaling.type"}
    assert old["olmo2.attention.sliding_window_pattern"] == [True, True, True, False]


def test_olmo3_layer_types_give_the_window_pattern(tiny_builds, tmp_path):
    from convert.export import export

    types = ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]
    checkpoint = edited(tiny_builds, tmp_path, OLMO3, layer_types=types)
    fields = gguf_fields(export(checkpoint, tmp_path / "out.gguf", "f32").path)
    assert fields["olmo2.attention.sliding_window_pattern"] == [True, False, False, True]
    assert fields["olmo2.attention.sliding_window"] == 8


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"attention_bias": True}, "no attention biases"),
        ({"layer_types": ["sliding_attention"] * 3}, "for each of the 4 layers"),
        ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 500000.0},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
         "one base for both"),
        ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 500000.0},
                              "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}}},
         "plain rope there"),
        ({"sliding_window": None}, "scales every layer"),
    ],
    ids=["attention-bias", "short-layer-types", "sliding-rope-base", "sliding-rope-scaling", "yarn-without-window"],
)
def test_olmo3_llama_cpp_cannot_run_is_refused(tiny_builds, tmp_path, changes, match):
    refused(edited(tiny_builds, tmp_path, OLMO3, **changes), tmp_path, match)


# -- ERNIE 4.5 ------------------------------------------------------------------------


def add_tensors(checkpoint, tensors):
    """A second safetensors file beside the model's, as a sharded save without an index."""
    from safetensors.numpy import save_file

    save_file(tensors, str(checkpoint / "extra.safetensors"))


def test_ernie_moe_multi_token_prediction_layers_are_left_out(tiny_builds, tmp_path):
    from convert.export import export

    checkpoint = edited(tiny_builds, tmp_path, ERNIE_MOE)
    rng = np.random.default_rng(0)
    add_tensors(checkpoint, {
        "model.mtp_block.0.self_attn.q_proj.weight": rng.standard_normal((128, 64), dtype=np.float32),
        "model.mtp_emb_norm.0.weight": np.ones(64, dtype=np.float32),
    })
    ours = gguf_tensors(export(checkpoint, tmp_path / "out.gguf", "f32").path)
    reference = gguf_tensors(tiny_builds.get(ERNIE_MOE)[1])
    assert sorted(ours) == sorted(reference)
    assert all(same_bytes(ours[n][2], reference[n][2]) for n in reference)


def test_ernie_moe_writes_its_layer_layout(tiny_builds):
    fields = gguf_fields(tiny_builds.get(ERNIE_MOE)[1])
    assert fields["ernie4_5-moe.leading_dense_block_count"] == 1
    assert fields["ernie4_5-moe.interleave_moe_layer_step"] == 1
    assert fields["ernie4_5-moe.expert_shared_feed_forward_length"] == 32  # 1 shared expert × 32
    assert fields["tokenizer.ggml.add_space_prefix"] is False
    # ERNIE's template ends each assistant turn with it: llama.cpp must stop there.
    assert "<|end_of_sentence|>" in end_of_generation_tokens(tiny_builds.get(ERNIE_MOE)[1])


@pytest.mark.parametrize(
    ("name", "changes", "match"),
    [
        (ERNIE, {"use_bias": True}, "no biases in the MLP"),
        (ERNIE_MOE, {"moe_layer_interval": 2}, "every layer from the first MoE layer"),
        (ERNIE_MOE, {"moe_layer_end_index": 1}, "every layer from the first MoE layer"),
        (ERNIE_MOE, {"moe_layer_start_index": 2}, "layer 1 is incomplete: blk.1.ffn_gate.weight is missing"),
    ],
    ids=["use-bias", "moe-interval", "moe-end-index", "start-index-disagrees"],
)
def test_ernie_llama_cpp_cannot_run_is_refused(tiny_builds, tmp_path, name, changes, match):
    refused(edited(tiny_builds, tmp_path, name, **changes), tmp_path, match)


def test_ernie_fused_projections_are_refused(tiny_builds, tmp_path):
    checkpoint = edited(tiny_builds, tmp_path, ERNIE)
    add_tensors(checkpoint, {"model.layers.0.self_attn.qkv_proj.weight": np.zeros((192, 64), dtype=np.float32)})
    refused(checkpoint, tmp_path, "fused")


