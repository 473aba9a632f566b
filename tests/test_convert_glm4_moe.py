"""GLM-4.5 (glm4moe) beyond the shared architecture tests.

- A checkpoint as the hub ships it, with its multi-token-prediction (MTP, "nextn") layer after
  the last one: written as llama.cpp's converter writes it (an extra block with nextn tensors,
  the same file byte for byte), loaded by llama.cpp, and left out of the normal forward pass
  (the logits stay transformers').
- Routing that the tiny case leaves at its defaults: a nonzero `e_score_correction_bias`
  (it chooses the experts but does not weight them) and expert groups (`n_group` 2,
  `topk_group` 1): llama.cpp's logits equal transformers'.
- Special tokens as llama.cpp's converter sets them for GLM-4.5 (BOS [gMASK], which the
  template writes itself): a reply ends at <|user|>, at <|observation|> (a tool call) and at
  <|endoftext|>.
- A LoRA adapter on the routed experts (what peft makes of gate_proj/up_proj/down_proj targets
  on this MoE) is refused by export-adapter in one line: llama.cpp's adapters are 2-D only.
- Bad input, one line and nothing written: dense/MoE layers that disagree with
  `first_k_dense_replace`, MTP layers config.json does not announce, an activation llama.cpp's
  glm4moe does not have.

The tiny checkpoint is the case of tests/arch_cases/glm4_moe.py.
"""

import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert_helpers import (
    CASES,
    build_tiny_model,
    edit_config,
    end_of_generation_tokens,
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
)

from convert.export import export

pytestmark = pytest.mark.slow

CASE = "glm4.5-moe-bpe"
OUR_EXTRA_KEYS = {
    "general.converter", "general.source.checkpoint", "general.quant_type",
    "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
}


def _with_mtp_layer(checkpoint, out):
    """The checkpoint plus one MTP layer, as GLM-4.5 stores it: after the last layer, a whole MoE
    decoder layer (here the last one's tensors, perturbed) with eh_proj, enorm, hnorm,
    shared_head.norm and its own embed_tokens (GLM-4.5-Air's layer 46 holds these)."""
    shutil.copytree(checkpoint, out)
    config = read_config(out)
    last, mtp, hidden = config["num_hidden_layers"] - 1, config["num_hidden_layers"], config["hidden_size"]
    assert config["num_nextn_predict_layers"] == 1
    tensors = load_file(out / "model.safetensors")
    rng = np.random.default_rng(7)
    prefix = f"model.layers.{last}."
    for name in [n for n in tensors if n.startswith(prefix)]:
        data = tensors[name]
        tensors[f"model.layers.{mtp}." + name[len(prefix):]] = (data + rng.normal(0, 0.05, data.shape)).astype(data.dtype)
    tensors[f"model.layers.{mtp}.eh_proj.weight"] = rng.normal(0, 0.15, (hidden, 2 * hidden)).astype(np.float32)
    embed = tensors["model.embed_tokens.weight"]
    tensors[f"model.layers.{mtp}.embed_tokens.weight"] = (embed + rng.normal(0, 0.05, embed.shape)).astype(np.float32)
    for norm in ("enorm", "hnorm", "shared_head.norm"):
        tensors[f"model.layers.{mtp}.{norm}.weight"] = (1 + rng.normal(0, 0.1, hidden)).astype(np.float32)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_reply_ends_at_user_observation_and_endoftext(tiny_builds):
    _, _, f16 = tiny_builds.get(CASE)
    fields = gguf_fields(f16)
    tokens = fields["tokenizer.ggml.tokens"]
    assert tokens[fields["tokenizer.ggml.bos_token_id"]] == "[gMASK]"
    assert fields["tokenizer.ggml.add_bos_token"] is False  # the template starts with [gMASK]<sop>
    assert end_of_generation_tokens(f16) == {"<|user|>", "<|observation|>", "<|endoftext|>"}


@pytest.fixture(scope="module")
def mtp_checkpoint(tiny_builds, tmp_path_factory):
    return _with_mtp_layer(tiny_builds.get(CASE)[0], tmp_path_factory.mktemp("glm45-mtp") / "glm45-mtp")


def test_mtp_layer_is_written_as_llama_cpp_does(mtp_checkpoint, request, tmp_path_factory, tmp_path):
    ours = export(mtp_checkpoint, tmp_path / "ours.gguf", "f16").path
    fields, tensors = gguf_fields(ours), gguf_tensors(ours)
    assert fields["glm4moe.block_count"] == 4 and fields["glm4moe.nextn_predict_layers"] == 1
    nextn = {"blk.3.nextn.eh_proj.weight", "blk.3.nextn.enorm.weight", "blk.3.nextn.embed_tokens.weight"}
    assert {*nextn, "blk.3.ffn_gate_exps.weight", "blk.3.exp_probs_b.bias"} <= set(tensors)

    oracle = reference_converter_or_fail(request, tmp_path_factory)
    theirs = tmp_path / "theirs.gguf"
    done = run_reference_converter(oracle, mtp_checkpoint, theirs, pre_tokenizer=fields["tokenizer.ggml.pre"])
    assert done.returncode == 0, done.stderr[-3000:]
    their_fields, their_tensors = gguf_fields(theirs), gguf_tensors(theirs)
    assert set(fields) - set(their_fields) <= OUR_EXTRA_KEYS
    assert {key: fields[key] for key in their_fields} == their_fields  # no difference left with the MTP layer
    assert sorted(tensors) == sorted(their_tensors)
    for name, (kind, shape, data) in their_tensors.items():
        assert tensors[name][:2] == (kind, shape), name
        assert same_bytes(tensors[name][2], data), f"{name}: bytes differ"


def test_mtp_layer_is_not_in_the_forward_pass(mtp_checkpoint, tmp_path):
    f32 = export(mtp_checkpoint, tmp_path / "m.F32.gguf", "f32").path
    sequences = random_sequences(read_config(mtp_checkpoint)["vocab_size"], count=2)
    expected = hf_last_logits(mtp_checkpoint, sequences)  # transformers ignores the MTP layer
    for want, have in zip(expected, gguf_last_logits(f32, sequences)):
        assert np.abs(have - want).max() < CASES[CASE].f32_tolerance


def test_correction_bias_and_expert_groups_route_as_transformers(tmp_path):
    case = CASES[CASE]
    grouped = type(case)(f"{case.name}-grouped", case.architecture, case.tokenizer,
                         {**case.config, "n_group": 2, "topk_group": 1})
    checkpoint = build_tiny_model(tmp_path / "grouped", grouped)
    tensors = load_file(checkpoint / "model.safetensors")
    rng = np.random.default_rng(5)
    biases = [n for n in tensors if n.endswith("e_score_correction_bias")]
    assert biases and all(not tensors[n].any() for n in biases)  # transformers starts it at zero
    sequences = random_sequences(read_config(checkpoint)["vocab_size"], count=3)
    unbiased = hf_last_logits(checkpoint, sequences)
    for name in biases:
        tensors[name] = rng.normal(0, 0.3, tensors[name].shape).astype(np.float32)
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})

    f32 = export(checkpoint, tmp_path / "grouped.F32.gguf", "f32").path
    fields = gguf_fields(f32)
    assert (fields["glm4moe.expert_group_count"], fields["glm4moe.expert_group_used_count"]) == (2, 1)
    expected = hf_last_logits(checkpoint, sequences)
    assert max(np.abs(a - b).max() for a, b in zip(expected, unbiased)) > 0.1, "the bias chooses no other expert"
    for want, have in zip(expected, gguf_last_logits(f32, sequences)):
        assert np.abs(have - want).max() < case.f32_tolerance


def test_adapter_on_the_routed_experts_is_refused(tiny_builds, tmp_path, capsys):
    """peft 0.21 turns gate_proj/up_proj/down_proj targets on a transformers 5 MoE into LoRA on the
    routed experts' fused 3-D parameters (target_parameters), and then adapts no Linear MLP at all;
    llama.cpp's adapters hold 2-D pairs only, so export-adapter must refuse it, writing nothing."""
    import peft
    import torch
    import transformers

    checkpoint = tiny_builds.get(CASE)[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    targets = ["q_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert any(n.endswith(".mlp.experts") for n in adapted)
    model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    out.mkdir()
    code, error = run_convert(capsys, "export-adapter", tmp_path / "adapter", "-o", out / "a.gguf", "--base", checkpoint)
    assert code == 1 and "mlp.experts" in error, error
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"first_k_dense_replace": 2}, "layer 1 is incomplete: blk.1.ffn_gate.weight is missing"),
        ({"first_k_dense_replace": 0}, "layer 0 is incomplete: blk.0.ffn_gate_inp.weight is missing"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' cannot be represented"),
        ({"n_group": 3}, "n_group 3 / topk_group 1 do not fit 4 experts"),
    ],
)
def test_config_the_weights_contradict_is_refused(tiny_builds, tmp_path, capsys, changes, message):
    checkpoint = shutil.copytree(tiny_builds.get(CASE)[0], tmp_path / "ckpt")
    edit_config(checkpoint, **changes)
    out = tmp_path / "out"
    out.mkdir()
    code, error = run_convert(capsys, "export", checkpoint, "-o", out / "m.gguf")
    assert code == 1 and message in error, error
    assert list(out.iterdir()) == []


def test_mtp_layers_config_does_not_announce_are_refused(mtp_checkpoint, tmp_path, capsys):
    checkpoint = shutil.copytree(mtp_checkpoint, tmp_path / "ckpt")
    edit_config(checkpoint, num_nextn_predict_layers=0)
    out = tmp_path / "out"
    out.mkdir()
    code, error = run_convert(capsys, "export", checkpoint, "-o", out / "m.gguf")
    assert code == 1 and "layers 3..3 after its 3 layers" in error and "num_nextn_predict_layers is 0" in error
    assert list(out.iterdir()) == []
