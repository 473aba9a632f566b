"""What is particular to Granite 4 exports (Mamba-2 layers beside attention, experts or a dense MLP).

The generic checks (logits, tokenization, byte parity with llama.cpp's converter, the adapter,
the template) run for the cases in the shared suites; here: config.json as transformers 5
saves it (its own layer-type names, which llama.cpp's converter misreads), how each layer's
kind and each Mamba-2 tensor land in the GGUF, a Granite 4 with attention layers only (plain
granite in llama.cpp), and what llama.cpp cannot run, refused before anything is written.
"""

import math

import numpy as np
import pytest
import torch

from convert_helpers import (
    TinyCase,
    build_tiny_model,
    copy_checkpoint,
    gguf_fields,
    gguf_last_logits,
    gguf_tensors,
    hf_last_logits,
    random_sequences,
    read_config,
    reference_converter_or_fail,
    run_convert,
    run_reference_converter,
    same_bytes,
    with_config,
)

from alpaca_chat.errors import ConversionError
from arch_cases.granite_hybrid import HYBRID, ReleasedSpellingConfig, write_granite4_tokenizer
from convert.export import export

pytestmark = pytest.mark.slow
MOE, DENSE = "granite-hybrid-moe", "granite-hybrid-dense-rope"


@pytest.mark.parametrize("name", [MOE, DENSE])
def test_transformers5_layer_type_names_give_the_same_file(tiny_builds, tmp_path, name):
    """transformers 5 loads the released names ("mamba", "attention") and saves its own
    ("linear_attention", "full_attention"): a checkpoint saved either way exports to the same bytes."""
    import transformers

    checkpoint, _, f16 = tiny_builds.get(name)
    assert set(read_config(checkpoint)["layer_types"]) == {"mamba", "attention"}
    resaved = copy_checkpoint(checkpoint, tmp_path / checkpoint.name)
    transformers.AutoConfig.from_pretrained(checkpoint).save_pretrained(resaved)  # transformers' own config.json
    assert set(read_config(resaved)["layer_types"]) == {"linear_attention", "full_attention"}
    ours = export(resaved, tmp_path / "resaved.gguf", "f16").path
    assert ours.read_bytes() == f16.read_bytes()


def test_transformers5_in_memory_expert_names_give_the_same_file(tiny_builds, tmp_path):
    """A state dict saved as transformers 5 holds it in memory (experts.gate_up_proj, experts.down_proj,
    router.weight, not the checkpoint's input_linear, output_linear, router.layer) exports the same."""
    from safetensors.numpy import load_file, save_file

    checkpoint, _, f16 = tiny_builds.get(MOE)
    copy = copy_checkpoint(checkpoint, tmp_path / checkpoint.name)
    renames = {"input_linear.weight": "experts.gate_up_proj", "output_linear.weight": "experts.down_proj",
               "router.layer.weight": "router.weight"}
    renamed = {}
    for name, data in load_file(copy / "model.safetensors").items():
        for old, new in renames.items():
            if name.endswith(f"block_sparse_moe.{old}"):
                name = name.replace(old, new)
        renamed[name] = data
    assert any(name.endswith("experts.gate_up_proj") for name in renamed)
    save_file(renamed, copy / "model.safetensors", metadata={"format": "pt"})
    ours = export(copy, tmp_path / "renamed.gguf", "f16").path
    assert gguf_fields(ours) == gguf_fields(f16)
    want, have = gguf_tensors(f16), gguf_tensors(ours)
    assert sorted(have) == sorted(want) and all(same_bytes(have[n][2], want[n][2]) for n in want)


def test_each_layer_is_written_as_its_kind(tiny_builds):
    """Mamba layers: no KV heads and the seven ssm tensors, each from the checkpoint's values
    (A = -exp(A_log), per-head columns, the gated norm per group, the conv kernel without its
    channel axis); attention layers: q/k/v/output only. Experts are split from input_linear."""
    from safetensors.numpy import load_file

    checkpoint, f32, _ = tiny_builds.get(MOE)
    config, fields, tensors = read_config(checkpoint), gguf_fields(f32), gguf_tensors(f32)
    weights = load_file(checkpoint / "model.safetensors")
    groups, heads, d_state = config["mamba_n_groups"], config["mamba_n_heads"], config["mamba_d_state"]
    inner = heads * config["mamba_d_head"]
    assert fields["granitehybrid.attention.head_count_kv"] == [
        0 if kind == "mamba" else config["num_key_value_heads"] for kind in config["layer_types"]
    ]
    assert fields["granitehybrid.ssm.inner_size"] == inner and fields["granitehybrid.ssm.group_count"] == groups
    assert fields["granitehybrid.ssm.time_step_rank"] == heads and fields["granitehybrid.ssm.state_size"] == d_state
    assert fields["granitehybrid.rope.scaling.finetuned"] is False  # NoPE
    assert fields["granitehybrid.context_length"] == 2**20
    for bid, kind in enumerate(config["layer_types"]):
        prefix = f"blk.{bid}."
        block = {name[len(prefix):]: data for name, (_, _, data) in tensors.items() if name.startswith(prefix)}
        src = {name.split(".", 3)[3]: data for name, data in weights.items() if name.startswith(f"model.layers.{bid}.")}
        if kind == "mamba":
            assert not [name for name in block if name.startswith("attn_") and name != "attn_norm.weight"]
            a_log = src["mamba.A_log"]
            assert a_log.dtype == np.float32  # so A is torch's float32 exp, as llama.cpp's converter computes it
            expected = (-torch.exp(torch.from_numpy(np.ascontiguousarray(a_log)))).numpy()
            assert np.array_equal(block["ssm_a"], expected.reshape(heads, 1))
            assert np.array_equal(block["ssm_d"], src["mamba.D"].reshape(heads, 1))
            assert np.array_equal(block["ssm_dt.bias"], src["mamba.dt_bias"])
            assert np.array_equal(block["ssm_norm.weight"], src["mamba.norm.weight"].reshape(groups, inner // groups))
            assert np.array_equal(block["ssm_conv1d.weight"], src["mamba.conv1d.weight"][:, 0, :])
            assert block["ssm_in.weight"].shape == (2 * inner + 2 * groups * d_state + heads, config["hidden_size"])
        else:
            assert not [name for name in block if name.startswith("ssm_")]
            assert block["attn_output.weight"].shape == (config["hidden_size"], config["hidden_size"])
        ffn = config["intermediate_size"]
        fused = src["block_sparse_moe.input_linear.weight"]
        assert np.array_equal(block["ffn_gate_exps.weight"], fused[:, :ffn])
        assert np.array_equal(block["ffn_up_exps.weight"], fused[:, ffn:])
        shared = src["shared_mlp.input_linear.weight"]
        assert np.array_equal(block["ffn_up_shexp.weight"], shared[config["shared_intermediate_size"]:])


def test_dense_rope_checkpoint_keeps_rope(tiny_builds):
    checkpoint, f32, _ = tiny_builds.get(DENSE)
    fields, tensors = gguf_fields(f32), gguf_tensors(f32)
    assert fields["granitehybrid.rope.scaling.finetuned"] is True
    assert fields["granitehybrid.context_length"] == read_config(checkpoint)["max_position_embeddings"]
    assert fields["granitehybrid.expert_count"] == 0 and fields["granitehybrid.expert_used_count"] == 0
    assert "blk.0.ffn_gate.weight" in tensors and not [n for n in tensors if "shexp" in n or "exps" in n]


_ATTENTION_ONLY = {**HYBRID, "num_hidden_layers": 2, "layer_types": ["attention", "attention"],
                   "position_embedding_type": "rope"}
# Granite 4.0 Micro's layout (a dense MLP), and the same with experts beside the shared one.
ATTENTION_ONLY = {
    "granite": TinyCase(
        "granite4-attention-only", "GraniteMoeHybridForCausalLM", write_granite4_tokenizer,
        {**_ATTENTION_ONLY, "num_local_experts": 0, "num_experts_per_tok": 0, "intermediate_size": 96,
         "shared_intermediate_size": 96},
        config_class=ReleasedSpellingConfig,
    ),
    "granitemoe": TinyCase(
        "granite4-attention-only-moe", "GraniteMoeHybridForCausalLM", write_granite4_tokenizer,
        {**_ATTENTION_ONLY, "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32,
         "shared_intermediate_size": 48},
        config_class=ReleasedSpellingConfig,
    ),
}
# Keys llama.cpp's converter writes for an attention-only Granite 4 that plain granite never reads:
# the Mamba sizes, the hybrid's per-layer KV heads and its rope switch. Ours writes none of them.
ATTENTION_ONLY_EXTRA_KEYS = {
    "granite.ssm.conv_kernel", "granite.ssm.state_size", "granite.ssm.group_count", "granite.ssm.inner_size",
    "granite.ssm.time_step_rank", "granite.rope.scaling.finetuned",
}


@pytest.fixture(scope="module")
def oracle(request, tmp_path_factory):
    return reference_converter_or_fail(request, tmp_path_factory)


@pytest.mark.parametrize("arch", ATTENTION_ONLY)
def test_attention_only_granite4_is_plain_granite(tmp_path, oracle, arch):
    """Attention layers only, with rope: llama.cpp's granite (granitemoe with experts), the same
    logits as transformers at F32, and the same tensors as llama.cpp's converter writes."""
    case = ATTENTION_ONLY[arch]
    checkpoint = build_tiny_model(tmp_path / case.name, case)
    ours = export(checkpoint, tmp_path / "ours.gguf", "f32").path
    fields = gguf_fields(ours)
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.attention.head_count_kv"] == read_config(checkpoint)["num_key_value_heads"]
    sequences = random_sequences(read_config(checkpoint)["vocab_size"], count=2)
    for want, have in zip(hf_last_logits(checkpoint, sequences), gguf_last_logits(ours, sequences)):
        assert np.abs(have - want).max() < 1e-4

    theirs = tmp_path / "theirs.gguf"
    done = run_reference_converter(oracle, checkpoint, theirs, "f32", pre_tokenizer=fields["tokenizer.ggml.pre"])
    assert done.returncode == 0, done.stderr[-3000:]
    their_fields = gguf_fields(theirs)
    assert their_fields["general.architecture"] == arch
    extra = {key.replace("granite.", f"{arch}.") for key in ATTENTION_ONLY_EXTRA_KEYS}
    assert set(their_fields) - set(fields) == extra
    head_count_kv = f"{arch}.attention.head_count_kv"  # theirs per layer, all equal; ours one number
    assert their_fields[head_count_kv] == [fields[head_count_kv]] * 2
    for key in set(their_fields) - extra - {head_count_kv}:
        assert fields[key] == their_fields[key], key
    our_tensors, their_tensors = gguf_tensors(ours), gguf_tensors(theirs)
    assert sorted(our_tensors) == sorted(their_tensors)
    for name, (kind, shape, data) in their_tensors.items():
        assert our_tensors[name][:2] == (kind, shape) and same_bytes(our_tensors[name][2], data), name


def _swapped(config):
    return {"layer_types": ["attention" if kind == "mamba" else "mamba" for kind in config["layer_types"]]}


# config.json changes llama.cpp cannot run (or that disagree with the weights) -> the one-line reason.
REFUSED = {
    "unknown-layer-type": (lambda c: {"layer_types": ["sliding_attention", *c["layer_types"][1:]]},
                           "layer_types has 'sliding_attention'"),
    "short-layer-types": (lambda c: {"layer_types": c["layer_types"][:-1]}, "3 layer_types for 4 layers"),
    "swapped-kinds": (_swapped, "layer 0 is an attention layer in config.json's layer_types, but the checkpoint"),
    "expand": (lambda c: {"mamba_expand": 4}, r"is not mamba_expand × hidden_size = 256"),
    "time-step-clamp": (lambda c: {"time_step_limit": [0.001, 0.1]}, "does not clamp the Mamba-2 time step"),
    "gelu": (lambda c: {"hidden_act": "gelu"}, "uses SiLU"),
    "proj-bias": (lambda c: {"mamba_proj_bias": True}, "no in_proj/out_proj bias"),
    "experts-used": (lambda c: {"num_experts_per_tok": 5}, "num_experts_per_tok is 5, but there are 4 experts"),
    "experts-count": (lambda c: {"num_local_experts": 8}, r"not 8 experts' matrices"),
    "state-size": (lambda c: {"mamba_d_state": 32}, r"layers\.0\.mamba\.\S+ has shape .*, but config.json implies"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_what_llama_cpp_cannot_run_is_refused(tiny_builds, tmp_path, name):
    checkpoint, _, _ = tiny_builds.get(MOE)
    change, message = REFUSED[name]
    broken = with_config(checkpoint, tmp_path, **change(read_config(checkpoint)))
    out = tmp_path / "out.gguf"
    with pytest.raises(ConversionError, match=message):
        export(broken, out, "f16")
    assert not out.exists()


def test_infinite_time_step_limit_as_transformers_writes_it(tiny_builds, tmp_path):
    """transformers 5 writes the default limit's infinity as {"__float__": "Infinity"}; released
    configs as a bare Infinity: both are the default (no clamp) and convert."""
    checkpoint, _, f16 = tiny_builds.get(MOE)
    for i, limit in enumerate(([0.0, {"__float__": "Infinity"}], [0.0, math.inf])):
        copy = with_config(checkpoint, tmp_path / str(i), time_step_limit=limit)
        assert export(copy, tmp_path / f"{i}.gguf", "f16").path.read_bytes() == f16.read_bytes()


def test_refusal_is_one_line_from_the_cli(tiny_builds, tmp_path, capsys):
    checkpoint, _, _ = tiny_builds.get(MOE)
    broken = with_config(checkpoint, tmp_path, mamba_proj_bias=True)
    out = tmp_path / "out"
    out.mkdir()
    code, error = run_convert(capsys, "export", broken, "-o", out / "m.gguf")
    assert code == 1 and error == (
        "alpaca-convert: error: mamba_proj_bias is true: llama.cpp's granitehybrid has no in_proj/out_proj bias"
    )
    assert list(out.iterdir()) == []


def test_a_is_computed_one_way_for_every_ssm_family(monkeypatch):
    """mamba2.negative_exp (Granite 4's Mamba-2 and Qwen3.5's gated DeltaNet): a float32 A_log goes
    through torch's float32 exp, as llama.cpp's converter computes it; without torch, or for float16,
    numpy's float64 exp rounded once to float32."""
    import sys

    import torch

    from convert.export.mamba2 import negative_exp

    a_log = np.random.default_rng(3).normal(0, 2, size=4096).astype(np.float32)
    by_torch = (-torch.exp(torch.from_numpy(a_log))).numpy()
    correctly_rounded = (-np.exp(a_log.astype(np.float64))).astype(np.float32)
    assert (by_torch != correctly_rounded).any()  # the two ways differ somewhere in 4096 values
    assert negative_exp(a_log).tobytes() == by_torch.tobytes()
    assert negative_exp(a_log.astype(np.float16)).tobytes() == (
        (-np.exp(a_log.astype(np.float16).astype(np.float64))).astype(np.float32).tobytes())
    monkeypatch.setitem(sys.modules, "torch", None)  # export's install has no torch
    assert negative_exp(a_log).tobytes() == correctly_rounded.tobytes()
