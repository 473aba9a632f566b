"""Qwen3, Qwen3 MoE and Mixtral beyond the shared architecture tests.

- Qwen3: the explicit head_dim reaches the GGUF, q/k norms are per head, and <|im_end|>
  ends a turn even when the tokenizer's EOS is <|endoftext|> (a base model's);
- experts are stacked into llama.cpp's 3-D tensors, expert by expert, and checkpoints
  holding them fused (gate_up_proj / down_proj, as transformers 5 keeps them in memory)
  give the same file;
- bad input: an expert count in config.json that the tensors do not have, and a Qwen3
  attention output bias, fail with one line naming the layer and tensor, writing nothing.

The tiny checkpoints are the cases of tests/arch_cases/qwen3.py and moe.py.
"""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert_helpers import (
    edit_config,
    end_of_generation_tokens,
    gguf_fields,
    gguf_tensors,
    hf_last_logits,
    random_sequences,
    read_config,
    run_convert,
    same_bytes,
)

from convert.export import export

pytestmark = pytest.mark.slow

MOE_CASES = ["qwen3moe-bpe", "mixtral-spm"]
# The checkpoint's names for one expert's projections: (gate, up, down).
PROJECTIONS = {"qwen3moe-bpe": ("gate_proj", "up_proj", "down_proj"), "mixtral-spm": ("w1", "w3", "w2")}
MOE_MODULE = {"qwen3moe-bpe": "mlp", "mixtral-spm": "block_sparse_moe"}


def _expert_count(config):
    return config.get("num_local_experts") or config["num_experts"]


def _copy(checkpoint, tmp_path):
    return shutil.copytree(checkpoint, tmp_path / checkpoint.name)


def _fused_copy(checkpoint, out, case):
    """The checkpoint with each layer's experts fused as transformers 5 holds them:
    mlp.experts.gate_up_proj [experts, 2 * ff, hidden] (gate rows, then up) and
    mlp.experts.down_proj [experts, hidden, ff]; the router becomes mlp.gate."""
    out = shutil.copytree(checkpoint, out)
    tensors = load_file(out / "model.safetensors")
    config = read_config(out)
    gate, up, down = PROJECTIONS[case]
    module = MOE_MODULE[case]
    for bid in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{bid}.{module}"

        def take(proj, prefix=prefix):
            return [tensors.pop(f"{prefix}.experts.{x}.{proj}.weight") for x in range(_expert_count(config))]

        gates, ups = take(gate), take(up)
        fused = f"model.layers.{bid}.mlp.experts"
        tensors[f"{fused}.gate_up_proj"] = np.stack([np.concatenate([g, u]) for g, u in zip(gates, ups)])
        tensors[f"{fused}.down_proj"] = np.stack(take(down))
        tensors[f"model.layers.{bid}.mlp.gate.weight"] = tensors.pop(f"{prefix}.gate.weight")
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


# -- Qwen3 ------------------------------------------------------------------------------


def test_qwen3_explicit_head_dim_and_per_head_norms(tiny_builds):
    checkpoint, _, f16 = tiny_builds.get("qwen3-tied-head-dim")
    config = read_config(checkpoint)
    head_dim = config["head_dim"]
    assert head_dim != config["hidden_size"] // config["num_attention_heads"]  # the case tests what it claims
    fields, tensors = gguf_fields(f16), gguf_tensors(f16)
    assert fields["general.architecture"] == "qwen3"
    assert fields["qwen3.attention.key_length"] == fields["qwen3.attention.value_length"] == head_dim
    for bid in range(config["num_hidden_layers"]):
        assert tensors[f"blk.{bid}.attn_q_norm.weight"][:2] == ("F32", (head_dim,))
        assert tensors[f"blk.{bid}.attn_k_norm.weight"][:2] == ("F32", (head_dim,))
        # GGUF shapes are (columns, rows): q projects hidden -> heads * head_dim.
        q_shape = (config["hidden_size"], config["num_attention_heads"] * head_dim)
        assert tensors[f"blk.{bid}.attn_q.weight"][1] == q_shape
    assert "output.weight" not in tensors  # tied to the embeddings


@pytest.mark.parametrize("name", ["qwen3-tied-head-dim", "qwen3moe-bpe"])
def test_qwen3_turn_ends_at_im_end(tiny_builds, name):
    checkpoint, _, f16 = tiny_builds.get(name)
    eog = end_of_generation_tokens(f16)
    assert "<|im_end|>" in eog
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    if name == "qwen3-tied-head-dim":
        assert tokenizer_config["eos_token"] == "<|endoftext|>"  # found by its text, not as the EOS


def test_qwen3_attention_output_bias_is_refused(tiny_builds, tmp_path, capsys):
    checkpoint = _copy(tiny_builds.get("qwen3-tied-head-dim")[0], tmp_path)
    config = read_config(checkpoint)
    tensors = load_file(checkpoint / "model.safetensors")
    head_dim, hidden = config["head_dim"], config["hidden_size"]
    for bid in range(config["num_hidden_layers"]):
        attn = f"model.layers.{bid}.self_attn"
        tensors[f"{attn}.q_proj.bias"] = np.zeros(config["num_attention_heads"] * head_dim, np.float32)
        tensors[f"{attn}.k_proj.bias"] = np.zeros(config["num_key_value_heads"] * head_dim, np.float32)
        tensors[f"{attn}.v_proj.bias"] = np.zeros(config["num_key_value_heads"] * head_dim, np.float32)
        tensors[f"{attn}.o_proj.bias"] = np.zeros(hidden, np.float32)
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    edit_config(checkpoint, attention_bias=True)
    out = tmp_path / "out"
    out.mkdir()
    code, error = run_convert(capsys, "export", checkpoint, "-o", out / "m.gguf")
    assert code == 1
    assert "layer 0 has an attention output bias" in error and "qwen3" in error
    assert list(out.iterdir()) == []


# -- experts ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MOE_CASES)
def test_experts_are_stacked_in_order(tiny_builds, name):
    checkpoint, f32, f16 = tiny_builds.get(name)
    config = read_config(checkpoint)
    n_expert = _expert_count(config)
    fields = gguf_fields(f16)
    arch = fields["general.architecture"]
    assert arch == {"qwen3moe-bpe": "qwen3moe", "mixtral-spm": "llama"}[name]
    assert fields[f"{arch}.expert_count"] == n_expert
    assert fields[f"{arch}.expert_used_count"] == config["num_experts_per_tok"]
    ff = config.get("moe_intermediate_size") or config["intermediate_size"]
    if name == "qwen3moe-bpe":
        assert fields[f"{arch}.expert_feed_forward_length"] == ff
    else:  # Mixtral's experts are intermediate_size wide: no key of their own (as llama.cpp's converter)
        assert f"{arch}.expert_feed_forward_length" not in fields

    weights = load_file(checkpoint / "model.safetensors")
    hidden = config["hidden_size"]
    f16_tensors, f32_tensors = gguf_tensors(f16), gguf_tensors(f32)
    prefix = MOE_MODULE[name]
    for bid in range(config["num_hidden_layers"]):
        assert f16_tensors[f"blk.{bid}.ffn_gate_inp.weight"][:2] == ("F32", (hidden, n_expert))  # the router stays F32
        for kind, proj in zip(("gate", "up", "down"), PROJECTIONS[name]):
            gguf_name = f"blk.{bid}.ffn_{kind}_exps.weight"
            shape = (ff, hidden, n_expert) if kind == "down" else (hidden, ff, n_expert)
            assert f16_tensors[gguf_name][:2] == ("F16", shape)
            stacked = np.asarray(f32_tensors[gguf_name][2])
            for x in range(n_expert):
                expert = weights[f"model.layers.{bid}.{prefix}.experts.{x}.{proj}.weight"]
                assert np.array_equal(stacked[x], expert), f"{gguf_name}: expert {x} is not in its place"


@pytest.mark.parametrize("name", MOE_CASES)
def test_fused_experts_give_the_same_file(tiny_builds, tmp_path, name):
    checkpoint, _, f16 = tiny_builds.get(name)
    fused = _fused_copy(checkpoint, tmp_path / "fused", name)
    # transformers reads the fused layout as the same model: gate rows come first.
    sequences = random_sequences(read_config(checkpoint)["vocab_size"], count=2)
    for want, have in zip(hf_last_logits(checkpoint, sequences), hf_last_logits(fused, sequences)):
        assert np.array_equal(want, have)
    ours = export(fused, tmp_path / "fused.F16.gguf", "f16").path
    expected, got = gguf_tensors(f16), gguf_tensors(ours)
    assert sorted(got) == sorted(expected)
    for tensor_name, (kind, shape, data) in expected.items():
        assert got[tensor_name][:2] == (kind, shape), tensor_name
        assert same_bytes(got[tensor_name][2], data), f"{tensor_name}: bytes differ"


@pytest.mark.parametrize("name", MOE_CASES)
@pytest.mark.parametrize("delta", [1, -1])
def test_expert_count_that_does_not_match_the_tensors(tiny_builds, tmp_path, capsys, name, delta):
    checkpoint = _copy(tiny_builds.get(name)[0], tmp_path)
    config = read_config(checkpoint)
    key = "num_local_experts" if "num_local_experts" in config else "num_experts"
    n_expert = config[key]
    edit_config(checkpoint, **{key: n_expert + delta})
    out = tmp_path / "out"
    out.mkdir()
    code, error = run_convert(capsys, "export", checkpoint, "-o", out / "m.gguf")
    assert code == 1
    assert f"config.json's {key} is {n_expert + delta}" in error and "layer 0" in error
    # The tensor is named: the first missing expert, or the first one beyond the count.
    assert f"model.layers.0.{MOE_MODULE[name]}.experts.{n_expert + min(delta, 0)}." in error
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("name", MOE_CASES)
def test_fused_expert_count_that_does_not_match_the_tensors(tiny_builds, tmp_path, capsys, name):
    checkpoint = _fused_copy(tiny_builds.get(name)[0], tmp_path / "fused", name)
    config = read_config(checkpoint)
    key = "num_local_experts" if "num_local_experts" in config else "num_experts"
    edit_config(checkpoint, **{key: config[key] * 2})
    out = tmp_path / "out"
    out.mkdir()
    code, error = run_convert(capsys, "export", checkpoint, "-o", out / "m.gguf")
    assert code == 1
    assert "layer 0: tensor model.layers.0.mlp.experts." in error
    assert f"config.json's {key} is {config[key] * 2}" in error
    assert list(out.iterdir()) == []

