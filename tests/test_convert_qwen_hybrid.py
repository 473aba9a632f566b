"""Qwen3.5 and Qwen3-Next (gated DeltaNet hybrids) beyond the shared per-case tests.

- A checkpoint as Qwen publishes it: bf16, the image-text class (`Qwen3_5ForConditionalGeneration`,
  language model under `model.language_model.`, settings in `text_config`), a vision tower and
  multi-token-prediction (`mtp.*`) tensors. Its export holds the same tensors, byte for byte, as
  the plain causal LM's, and as llama.cpp's converter's (run with --no-mtp: we never write MTP).
- The linear attention as llama.cpp's graph reads it: value heads reordered (Qwen3.5), the fused
  qkvz projection cut per key head (Qwen3-Next), A = -exp(A_log), norms' offsets, the per-layer
  recurrent flags and ssm sizes; checked against the checkpoint's own tensors.
- A LoRA adapter on Qwen3.5's default targets (value heads reordered in rows of in_proj_qkv/z/a/b,
  in the columns of out_proj) exports byte for byte as llama.cpp's convert_lora_to_gguf.py does.
  (That script cannot convert a Qwen3-Next adapter on in_proj_qkvz: its LoRA tensors cannot be
  reshaped per key head. Ours cuts B's rows; tests/test_export_adapter.py checks it against peft.)
- Configurations llama.cpp cannot run are refused in one line before anything is written.
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from convert_helpers import (
    gguf_fields,
    gguf_tensors,
    reference_converter_or_fail,
    same_bytes,
)

pytest.importorskip("transformers", reason="needs the convert extra")

import torch  # noqa: E402
from safetensors.numpy import load_file as load_numpy  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from alpaca_chat.errors import ConversionError  # noqa: E402
from convert.export import export  # noqa: E402
from convert.export.adapter import export_adapter  # noqa: E402
from test_export_adapter import lora_oracle, make_adapter, targets  # noqa: E402

DENSE, MOE, NEXT = "qwen35-hybrid-tied", "qwen35moe-hybrid", "qwen3next-hybrid-moe"


def published_layout(plain, out):
    """`plain` (a Qwen3_5ForCausalLM checkpoint) saved as Qwen/Qwen3.5-* are: bf16, the image-text
    class, with a (tiny) vision tower and an MTP layer beside the language model."""
    out.mkdir()
    for item in plain.iterdir():
        if item.name not in ("model.safetensors", "config.json"):
            shutil.copy(item, out / item.name)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(plain / "model.safetensors").items()}
    saved = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v for k, v in tensors.items()}
    hidden = tensors["model.norm.weight"].shape[0]
    rng = torch.Generator().manual_seed(0)
    extra = {
        "mtp.fc.weight": (hidden, 2 * hidden),
        "mtp.norm.weight": (hidden,),
        "mtp.pre_fc_norm_hidden.weight": (hidden,),
        "mtp.layers.0.self_attn.q_proj.weight": tuple(tensors["model.layers.3.self_attn.q_proj.weight"].shape),
        "model.visual.blocks.0.attn.qkv.weight": (96, 32),
        "model.visual.merger.linear_fc1.weight": (32, 32),
    }
    for name, shape in extra.items():
        saved[name] = torch.randn(shape, generator=rng).to(torch.bfloat16)
    save_file(saved, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((plain / "config.json").read_text())
    text = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version")}
    text["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "model_type": "qwen3_5",
        "text_config": text,
        "vision_config": {"depth": 1, "hidden_size": 32, "num_heads": 2},
        "tie_word_embeddings": text["tie_word_embeddings"],
    }))
    return out


# Both of llama.cpp's converters in one process (torch loads once): the model's, as tests/oracle_convert.py runs
# it (the pre-tokenizer lookup answered with our name), then the LoRA adapter's. Neither may look for MTP
# tensors (the model converter's --no-mtp; the LoRA converter has no flag, so the class attribute is set).
_RUN_ORACLES = """
import runpy, sys
from pathlib import Path
model_script, lora_script, pre, checkpoint, model_out, adapter, base_dir, lora_out = sys.argv[1:]
sys.path.insert(0, str(Path(model_script).parent))
sys.path.insert(1, str(Path(model_script).parent / "gguf-py"))
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
base.ModelBase.no_mtp = True
sys.argv = [model_script, checkpoint, "--outtype", "f16", "--outfile", model_out, "--no-mtp"]
runpy.run_path(model_script, run_name="__main__")
sys.argv = [lora_script, adapter, "--base", base_dir, "--outfile", lora_out, "--outtype", "f16"]
runpy.run_path(lora_script, run_name="__main__")
"""


@pytest.fixture(scope="module")
def against_llama_cpp(request, tmp_path_factory, tiny_builds):
    """Ours and llama.cpp's files for (1) the published layout of the Qwen3.5 case, (2) a LoRA adapter on
    that case's default targets: {"model": (ours, theirs), "lora": (ours, theirs)}."""
    root = tmp_path_factory.mktemp("qwen35-oracle")
    plain = tiny_builds.get(DENSE)[0]
    published = published_layout(plain, root / "published")
    model = export(published, root / "published.gguf", "f16").path
    adapter = root / "adapter"
    make_adapter(plain, adapter, targets(plain))
    lora = export_adapter(adapter, root / "adapter.gguf", "f16", base=str(plain)).path
    script = reference_converter_or_fail(request, tmp_path_factory)
    args = [script, lora_oracle(script), gguf_fields(model)["tokenizer.ggml.pre"], published, root / "ref.gguf",
            adapter, plain, root / "ref-lora.gguf"]
    done = subprocess.run([sys.executable, "-c", _RUN_ORACLES, *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=script.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"model": (model, root / "ref.gguf"), "lora": (lora, root / "ref-lora.gguf")}


def assert_same_tensors(ours, theirs, what):
    mine, reference = gguf_tensors(ours), gguf_tensors(theirs)
    assert sorted(mine) == sorted(reference)
    for name, (kind, shape, data) in reference.items():
        assert mine[name][:2] == (kind, shape), name
        assert same_bytes(mine[name][2], data), f"{name}: bytes differ from llama.cpp's {what}"


def test_published_bf16_image_text_checkpoint_exports_its_language_model(against_llama_cpp, tiny_builds):
    ours, theirs = against_llama_cpp["model"]
    assert sorted(gguf_tensors(ours)) == sorted(gguf_tensors(tiny_builds.get(DENSE)[2]))  # no mtp, no vision
    fields = gguf_fields(ours)
    assert fields["qwen35.block_count"] == 4 and "qwen35.nextn_predict_layers" not in fields
    assert_same_tensors(ours, theirs, "converter (bf16 source)")


def test_lora_adapter_matches_llama_cpp_lora_converter(against_llama_cpp):
    ours, theirs = against_llama_cpp["lora"]
    assert {"blk.0.ssm_out.weight.lora_a", "blk.0.attn_qkv.weight.lora_b"} <= set(gguf_tensors(ours))
    assert_same_tensors(ours, theirs, "LoRA converter")


def test_linear_attention_tensors_as_llama_cpp_reads_them(tiny_builds):
    """Qwen3.5: value heads (4, two per key head) from grouped to tiled order wherever they appear."""
    checkpoint, f32, _ = tiny_builds.get(DENSE)
    source = load_numpy(checkpoint / "model.safetensors")
    tensors = {name: np.array(data) for name, (_, _, data) in gguf_tensors(f32).items()}
    fields = gguf_fields(f32)
    assert fields["qwen35.attention.recurrent_layers"] == [True, True, True, False]
    assert fields["qwen35.full_attention_interval"] == 4
    assert (fields["qwen35.ssm.group_count"], fields["qwen35.ssm.time_step_rank"]) == (2, 4)
    assert (fields["qwen35.ssm.state_size"], fields["qwen35.ssm.inner_size"]) == (16, 64)
    assert fields["qwen35.rope.dimension_count"] == 8  # a quarter of head_dim 32
    assert fields["qwen35.rope.dimension_sections"] == [2, 1, 1, 0]

    tiled = [0, 2, 1, 3]  # value head order in the file: head 0 of key heads 0 and 1, then their heads 1
    a_log = source["model.layers.0.linear_attn.A_log"]
    np.testing.assert_array_equal(tensors["blk.0.ssm_a"], -torch.exp(torch.from_numpy(a_log[tiled])).numpy())
    np.testing.assert_array_equal(tensors["blk.0.ssm_dt.bias"], source["model.layers.0.linear_attn.dt_bias"][tiled])
    z = source["model.layers.0.linear_attn.in_proj_z.weight"].reshape(4, 16, 64)
    np.testing.assert_array_equal(tensors["blk.0.attn_gate.weight"], z[tiled].reshape(64, 64))
    out = source["model.layers.0.linear_attn.out_proj.weight"].reshape(64, 4, 16)
    np.testing.assert_array_equal(tensors["blk.0.ssm_out.weight"], out[:, tiled].reshape(64, 64))
    conv = source["model.layers.0.linear_attn.conv1d.weight"][:, 0]  # [channels, 1, kernel] -> [channels, kernel]
    np.testing.assert_array_equal(tensors["blk.0.ssm_conv1d.weight"][:64], conv[:64])  # q and k channels stay
    np.testing.assert_array_equal(tensors["blk.0.ssm_conv1d.weight"][64:], conv[64:].reshape(4, 16, 4)[tiled].reshape(64, 4))
    norm = source["model.norm.weight"]
    np.testing.assert_array_equal(tensors["output_norm.weight"], norm + np.float32(1))  # x * (1 + w)
    gated = source["model.layers.0.linear_attn.norm.weight"]
    np.testing.assert_array_equal(tensors["blk.0.ssm_norm.weight"], gated)  # the gated norm is x * w


def test_qwen3_next_fused_projection_is_cut_per_key_head(tiny_builds):
    checkpoint, f32, _ = tiny_builds.get(NEXT)
    source = load_numpy(checkpoint / "model.safetensors")
    tensors = {name: np.array(data) for name, (_, _, data) in gguf_tensors(f32).items()}
    # Per key head (2): q 16, k 16, v 2 × 16, z 2 × 16 rows.
    heads = source["model.layers.1.linear_attn.in_proj_qkvz.weight"].reshape(2, 96, 64)
    q, k, v, z = heads[:, :16], heads[:, 16:32], heads[:, 32:64], heads[:, 64:]
    qkv = np.concatenate([q.reshape(-1, 64), k.reshape(-1, 64), v.reshape(-1, 64)])
    np.testing.assert_array_equal(tensors["blk.1.attn_qkv.weight"], qkv)
    np.testing.assert_array_equal(tensors["blk.1.attn_gate.weight"], z.reshape(-1, 64))
    np.testing.assert_array_equal(tensors["blk.1.ssm_ba.weight"], source["model.layers.1.linear_attn.in_proj_ba.weight"])
    assert "blk.3.attn_qkv.weight" not in tensors and "blk.3.attn_q.weight" in tensors  # layer 3 attends fully
    assert gguf_fields(f32)["qwen3next.expert_shared_feed_forward_length"] == 48


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        (DENSE, {"linear_num_value_heads": 3}, "linear_num_value_heads (3) is not a multiple of linear_num_key_heads (2)"),
        (DENSE, {"layer_types": ["linear_attention"] * 3}, "layer_types must name linear_attention or full_attention"),
        (DENSE, {"attention_bias": True}, "attention_bias is set"),
        (DENSE, {"linear_key_head_dim": 32}, "config.json implies"),
        (NEXT, {"mlp_only_layers": [3]}, "llama.cpp's qwen3next has a mixture of experts in every layer"),
    ],
)
def test_what_llama_cpp_cannot_run_is_refused_in_one_line(tiny_builds, tmp_path, name, change, message):
    checkpoint = shutil.copytree(tiny_builds.get(name)[0], tmp_path / "checkpoint")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, **change}))
    out = tmp_path / "out.gguf"
    with pytest.raises(ConversionError, match="^[^\n]*$") as refused:
        export(checkpoint, out, "f16")
    assert message in str(refused.value)
    assert not out.exists() and not list(tmp_path.glob("*.gguf*"))
