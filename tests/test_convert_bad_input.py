"""Bad input: each case gets a one-line message, the right exit code, and no partial output.

Everything runs through the CLI's entry function, in process, on a tiny
random Llama checkpoint copied and broken per test.
"""

import errno
import json
import shutil

import gguf
import numpy as np
import pytest

from convert_helpers import TinyCase, build_tiny_model, gguf_fields

from convert.cli import main
from convert.export import export

TINY = TinyCase("bad-input-llama", "LlamaForCausalLM", "gpt-2")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    checkpoint = build_tiny_model(root / "tiny-llama", TINY, dtype="bfloat16")
    f16 = export(checkpoint, root / "tiny.F16.gguf", "f16").path
    return checkpoint, f16


@pytest.fixture
def checkpoint(pristine, tmp_path):
    return shutil.copytree(pristine[0], tmp_path / "tiny-llama")


@pytest.fixture
def f16(pristine):
    return pristine[1]


@pytest.fixture
def out_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    return out


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("alpaca-convert: error:")]
    return code, (lines[-1] if lines else ""), captured


def assert_nothing_written(out_dir):
    assert list(out_dir.iterdir()) == [], "a partial or temp file was left behind"


def test_missing_directory(capsys, tmp_path, out_dir):
    code, error, _ = run(capsys, "export", tmp_path / "no-such-model", "-o", out_dir / "m.gguf")
    assert code == 1
    assert "checkpoint directory not found" in error and "no-such-model" in error
    assert_nothing_written(out_dir)


def test_no_config_json(capsys, checkpoint, out_dir):
    (checkpoint / "config.json").unlink()
    code, error, _ = run(capsys, checkpoint, "--quant", "Q8_0", "-o", out_dir / "m.gguf")
    assert code == 1
    assert "no config.json" in error
    assert_nothing_written(out_dir)


def test_unsupported_architecture_lists_supported_ones(capsys, checkpoint, out_dir):
    config = json.loads((checkpoint / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    code, error, _ = run(capsys, "export", checkpoint, "-o", out_dir / "m.gguf")
    assert code == 1
    assert "unsupported architecture: GPT2LMHeadModel" in error
    assert all(name in error for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"))
    assert_nothing_written(out_dir)


def test_missing_tokenizer(capsys, checkpoint, out_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (checkpoint / name).unlink()
    code, error, _ = run(capsys, "export", checkpoint, "-o", out_dir / "m.gguf")
    assert code == 1
    assert "no tokenizer in" in error and "tokenizer.json or tokenizer.model" in error
    assert_nothing_written(out_dir)


def test_truncated_safetensors(capsys, checkpoint, out_dir):
    weights = checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    code, error, _ = run(capsys, checkpoint, "--quant", "Q4_K_M", "-o", out_dir / "m.gguf")
    assert code == 1
    assert "model.safetensors is truncated or corrupt" in error
    assert_nothing_written(out_dir)


def test_unknown_quant_type_is_a_usage_error(capsys, checkpoint, out_dir, f16):
    code, error, _ = run(capsys, checkpoint, "--quant", "Q4_K_M", "Q3_X", "-o", out_dir / "m.gguf")
    assert code == 2
    assert "unknown quantization type 'Q3_X'" in error and "Q4_K_M" in error
    assert_nothing_written(out_dir)  # rejected before the export started
    code, error, _ = run(capsys, "quantize", f16, "--type", "Q9", "-o", out_dir / "q.gguf")
    assert code == 2 and "unknown quantization type 'Q9'" in error
    assert_nothing_written(out_dir)


@pytest.mark.parametrize("where", ["missing-dir", "parent-is-a-file", "is-a-directory", "read-only-dir"])
def test_output_path_not_writable(capsys, checkpoint, tmp_path, where):
    if where == "missing-dir":
        target = tmp_path / "nowhere" / "m.gguf"
    elif where == "parent-is-a-file":
        (tmp_path / "file").write_text("x")
        target = tmp_path / "file" / "m.gguf"
    elif where == "is-a-directory":
        target = tmp_path / "dir.gguf"
        target.mkdir()
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        if _can_write(locked):
            pytest.skip("running with privileges that ignore directory permissions")
        target = locked / "m.gguf"
    code, error, _ = run(capsys, "export", checkpoint, "-o", target)
    assert code == 1
    assert f"cannot write {target}" in error
    assert not target.is_file()
    if target.parent.is_dir():
        assert [p.name for p in target.parent.iterdir() if p.name.endswith(".partial")] == []


def _can_write(directory) -> bool:
    try:
        (directory / "probe").write_text("x")
    except OSError:
        return False
    (directory / "probe").unlink()
    return True


@pytest.mark.parametrize("damage", ["garbage", "truncated", "html"])
@pytest.mark.parametrize("command", ["quantize", "eval", "inspect"])
def test_corrupt_input_gguf(capsys, f16, tmp_path, out_dir, command, damage):
    bad = tmp_path / "bad.gguf"
    if damage == "garbage":
        bad.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    elif damage == "truncated":
        bad.write_bytes(f16.read_bytes()[: f16.stat().st_size // 2])
    else:
        bad.write_text("<!DOCTYPE html><html><body>Rate limit exceeded</body></html>")
    args = {
        "quantize": ["quantize", bad, "--type", "Q4_0", "-o", out_dir / "q.gguf"],
        "eval": ["eval", bad, "--reference", f16],
        "inspect": ["inspect", bad],
    }[command]
    code, error, _ = run(capsys, *args)
    assert code == 1
    assert "bad.gguf" in error
    assert_nothing_written(out_dir)


def test_full_disk_leaves_no_partial_file(capsys, checkpoint, out_dir, monkeypatch):
    calls = {"n": 0}
    real = gguf.GGUFWriter.write_tensor_data

    def fill_up(self, tensor, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fill_up)
    code, error, _ = run(capsys, "export", checkpoint, "-o", out_dir / "m.gguf")
    assert code == 1
    assert "no space left on the device" in error
    assert_nothing_written(out_dir)


def test_interrupt_during_export_leaves_no_partial_file(capsys, checkpoint, out_dir, monkeypatch):
    real = gguf.GGUFWriter.write_tensor_data
    calls = {"n": 0}

    def interrupted(self, tensor, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", interrupted)
    code, _, captured = run(capsys, checkpoint, "--quant", "Q8_0", "-o", out_dir / "m.gguf")
    assert code == 130
    assert "interrupted" in captured.err
    assert_nothing_written(out_dir)


def test_no_traceback_unless_debug(capsys, tmp_path):
    code, error, captured = run(capsys, "inspect", tmp_path / "missing.gguf")
    assert code == 1 and error and "Traceback" not in captured.err
    from alpaca_chat.errors import AlpacaChatError

    with pytest.raises(AlpacaChatError):  # --debug lets the typed error (and its traceback) through
        main(["inspect", str(tmp_path / "missing.gguf"), "--debug"])


def test_pickle_refused_unless_allowed(capsys, pristine, tmp_path, out_dir):
    import torch
    import transformers

    source = pristine[0]
    pickled = shutil.copytree(source, tmp_path / "pickled", ignore=shutil.ignore_patterns("*.safetensors"))
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")  # transformers 5 only writes safetensors

    code, error, _ = run(capsys, "export", pickled, "-o", out_dir / "m.gguf")
    assert code == 1 and "--allow-pickle" in error
    assert_nothing_written(out_dir)

    code, _, _ = run(capsys, "export", pickled, "--allow-pickle", "-o", out_dir / "m.gguf")
    assert code == 0
    from convert_helpers import gguf_tensors, same_bytes

    from_pickle, from_safetensors = gguf_tensors(out_dir / "m.gguf"), gguf_tensors(pristine[1])
    assert all(same_bytes(from_pickle[n][2], t[2]) for n, t in from_safetensors.items())


def test_unknown_pre_tokenizer_needs_override(capsys, checkpoint, out_dir):
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Whitespace"}
    (checkpoint / "tokenizer.json").write_text(json.dumps(tokenizer))
    code, error, _ = run(capsys, "export", checkpoint, "-o", out_dir / "m.gguf")
    assert code == 1 and "--pre-tokenizer" in error and "gpt-2" in error
    assert_nothing_written(out_dir)
    code, _, _ = run(capsys, "export", checkpoint, "--pre-tokenizer", "gpt-2", "-o", out_dir / "m.gguf")
    assert code == 0
    assert gguf_fields(out_dir / "m.gguf")["tokenizer.ggml.pre"] == "gpt-2"


def test_lora_adapter_is_not_a_model(capsys, tmp_path, out_dir):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    code, error, _ = run(capsys, "export", adapter, "-o", out_dir / "m.gguf")
    assert code == 1 and "LoRA adapter" in error


def test_quantized_checkpoint_refused(capsys, checkpoint, out_dir):
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (checkpoint / "config.json").write_text(json.dumps(config))
    code, error, _ = run(capsys, "export", checkpoint, "-o", out_dir / "m.gguf")
    assert code == 1 and "bitsandbytes-quantized" in error


def test_hub_id_offline_and_not_cached(capsys, out_dir, monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code, error, _ = run(capsys, "export", "nobody/not-a-model", "-o", out_dir / "m.gguf")
    assert code == 1
    assert "nobody/not-a-model" in error and "not in the Hugging Face cache" in error
    assert_nothing_written(out_dir)


def test_hub_id_from_the_cache_offline(capsys, pristine, out_dir, monkeypatch, tmp_path):
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-llama"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(pristine[0], snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    code, _, _ = run(capsys, "export", "someone/tiny-llama", "-o", out_dir / "m.gguf")
    assert code == 0
    assert gguf_fields(out_dir / "m.gguf")["general.source.checkpoint"] == "someone/tiny-llama"


def test_iq_type_needs_an_importance_matrix(capsys, f16, out_dir, tmp_path):
    code, error, _ = run(capsys, "quantize", f16, "--type", "IQ2_XXS", "-o", out_dir / "q.gguf")
    assert code == 1 and "needs an importance matrix" in error and "--imatrix" in error
    assert_nothing_written(out_dir)

    matrix = tmp_path / "imatrix.gguf"
    write_imatrix(f16, matrix)
    code, _, _ = run(capsys, "quantize", f16, "--type", "IQ2_XXS", "--imatrix", matrix, "-o", out_dir / "q.gguf",
                     "--no-eval")
    assert code == 0
    fields = gguf_fields(out_dir / "q.gguf")
    assert fields["general.quant_type"] == "IQ2_XXS"
    assert fields["quantize.imatrix.entries_count"] > 0


def write_imatrix(model, path):
    """A flat importance matrix (all ones) in llama-imatrix's GGUF format, for every weight matrix."""
    from convert_helpers import gguf_tensors

    writer = gguf.GGUFWriter(path, "imatrix")
    writer.add_type("imatrix")
    for name, (kind, shape, _) in gguf_tensors(model).items():
        if len(shape) == 2 and kind == "F16":
            writer.add_tensor(f"{name}.in_sum2", np.full((1, shape[0]), 5.0, dtype=np.float32))
            writer.add_tensor(f"{name}.counts", np.full((1, 1), 5.0, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_quantize_refuses_to_overwrite_its_input(capsys, f16, tmp_path):
    copy = shutil.copy(f16, tmp_path / "m.gguf")
    code, error, _ = run(capsys, "quantize", copy, "--type", "Q8_0", "-o", copy)
    assert code == 1 and "overwrite the input" in error


def test_convert_never_deletes_an_existing_file_of_the_users(capsys, checkpoint, out_dir):
    mine = out_dir / "tiny-llama.F16.gguf"
    mine.write_bytes(b"my own file")
    code, _, _ = run(capsys, checkpoint, "--quant", "Q8_0", "-o", out_dir / "m.gguf", "--no-eval")
    assert code == 0
    assert mine.read_bytes() == b"my own file"
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.gguf", "tiny-llama.F16.gguf"]


def edit_config(checkpoint, **changes):
    config = json.loads((checkpoint / "config.json").read_text())
    config.update(changes)
    (checkpoint / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "tensor, cut, because",
    [
        ("model.embed_tokens.weight", (slice(None), slice(0, 48)), "(vocab_size, hidden_size)"),
        ("model.layers.1.self_attn.q_proj.weight", (slice(0, 48),), "(num_attention_heads × head_dim, hidden_size)"),
        ("model.layers.0.self_attn.v_proj.weight", (slice(0, 16),), "(num_key_value_heads × head_dim, hidden_size)"),
        ("model.layers.1.mlp.gate_proj.weight", (slice(0, 96),), "(intermediate_size, hidden_size)"),
        ("model.layers.0.mlp.down_proj.weight", (slice(None), slice(0, 96)), "(hidden_size, intermediate_size)"),
        ("model.layers.1.post_attention_layernorm.weight", (slice(0, 60),), "(hidden_size)"),
    ],
)
def test_tensor_shape_disagrees_with_config(capsys, checkpoint, out_dir, tensor, cut, because):
    from safetensors.torch import load_file, save_file

    weights = checkpoint / "model.safetensors"
    tensors = load_file(weights)
    expected = list(tensors[tensor].shape)
    tensors[tensor] = tensors[tensor][cut].contiguous()
    save_file(tensors, weights, metadata={"format": "pt"})
    code, error, _ = run(capsys, "export", checkpoint, "-o", out_dir / "m.gguf")
    assert code == 1
    assert f"tensor {tensor} has shape {list(tensors[tensor].shape)}, but config.json implies {expected} {because}" in error
    assert_nothing_written(out_dir)


@pytest.mark.parametrize(
    "changes, tensors",
    [
        (dict(head_dim=32), r"model\.layers\.0\.self_attn\.[qkvo]_proj\.weight"),
        (dict(intermediate_size=192), r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight"),
        (dict(hidden_size=96, head_dim=None), r"lm_head\.weight"),
        (dict(vocab_size=512), r"lm_head\.weight"),
        (dict(num_key_value_heads=4), r"model\.layers\.0\.self_attn\.[kv]_proj\.weight"),
    ],
)
def test_config_disagrees_with_tensor_shapes(capsys, checkpoint, out_dir, changes, tensors):
    import re

    edit_config(checkpoint, **changes)
    code, error, _ = run(capsys, checkpoint, "--quant", "Q8_0", "-o", out_dir / "m.gguf")
    assert code == 1
    assert re.search(rf"tensor {tensors} has shape \[\d+(, \d+)*\], but config\.json implies", error), error
    assert "the config and the weights disagree" in error
    assert_nothing_written(out_dir)


def test_unknown_rope_scaling_type(capsys, checkpoint, out_dir):
    edit_config(checkpoint, rope_parameters={"rope_type": "fancy-ntk", "factor": 4.0, "rope_theta": 10000.0})
    code, error, _ = run(capsys, "export", checkpoint, "-o", out_dir / "m.gguf")
    assert code == 1
    assert "rope scaling type 'fancy-ntk' is not supported for LlamaForCausalLM" in error
    assert_nothing_written(out_dir)


def test_unknown_rope_scaling_type_in_a_transformers_4_config(capsys, checkpoint, out_dir):
    edit_config(checkpoint, rope_parameters=None, rope_theta=10000.0, rope_scaling={"type": "fancy-ntk", "factor": 2.0})
    code, error, _ = run(capsys, "export", checkpoint, "-o", out_dir / "m.gguf")
    assert code == 1
    assert "rope scaling type 'fancy-ntk' is not supported" in error
    assert_nothing_written(out_dir)


def test_tokenizer_of_a_kind_the_family_does_not_expect(capsys, checkpoint, out_dir, monkeypatch):
    """A family that declares its tokenizer kind (e.g. SentencePiece only) refuses another kind."""
    from convert.export.registry import model_class_for

    family = model_class_for({"architectures": ["LlamaForCausalLM"]})
    monkeypatch.setattr(family, "expected_tokenizers", ("llama",))
    code, error, _ = run(capsys, "export", checkpoint, "-o", out_dir / "m.gguf")
    assert code == 1
    assert error.endswith(
        "LlamaForCausalLM expects a SentencePiece tokenizer, but this checkpoint's is byte-level BPE: "
        "a tokenizer from another model family?"
    )
    assert_nothing_written(out_dir)
    monkeypatch.setattr(family, "expected_tokenizers", ("llama", "gpt2"))
    code, _, _ = run(capsys, "export", checkpoint, "-o", out_dir / "m.gguf")
    assert code == 0


def test_registered_families_expect_known_tokenizer_kinds():
    from convert.export.registry import _REGISTRY

    for name, family in _REGISTRY.items():
        assert set(family.expected_tokenizers) <= {"llama", "gpt2"}, name


@pytest.mark.parametrize("kind", ["WordPiece", "Unigram"])
def test_tokenizer_json_of_another_kind(capsys, checkpoint, out_dir, kind):
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    tokenizer["model"]["type"] = kind
    (checkpoint / "tokenizer.json").write_text(json.dumps(tokenizer))
    code, error, _ = run(capsys, "export", checkpoint, "-o", out_dir / "m.gguf")
    assert code == 1
    assert f"a {kind} tokenizer; only byte-level BPE (or a SentencePiece tokenizer.model) can be converted" in error
    assert_nothing_written(out_dir)


def test_sentencepiece_style_tokenizer_json_without_tokenizer_model(capsys, checkpoint, out_dir):
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    tokenizer["model"]["byte_fallback"] = True
    (checkpoint / "tokenizer.json").write_text(json.dumps(tokenizer))
    code, error, _ = run(capsys, "export", checkpoint, "-o", out_dir / "m.gguf")
    assert code == 1
    assert "SentencePiece-style BPE tokenizer; tokenizer.model is needed" in error
    assert_nothing_written(out_dir)


def _one_case_per_family_expecting_one_tokenizer_kind():
    from convert_helpers import TINY_CASES

    from convert.export.registry import model_class_for

    seen, cases = set(), []
    for case in TINY_CASES:
        family = model_class_for({"architectures": [case.architecture]})
        if len(family.expected_tokenizers) == 1 and family not in seen:
            seen.add(family)
            cases.append(pytest.param(case, id=case.name))
    return cases


def test_some_family_expects_one_tokenizer_kind():
    assert _one_case_per_family_expecting_one_tokenizer_kind(), "no family declares expected_tokenizers"


@pytest.mark.parametrize("case", _one_case_per_family_expecting_one_tokenizer_kind())
def test_family_given_a_tokenizer_of_another_kind(capsys, tmp_path, out_dir, case):
    """E.g. Gemma (SentencePiece only) with a byte-level BPE tokenizer.json: one line, nothing written."""
    import dataclasses

    from convert.export.registry import model_class_for

    expected = model_class_for({"architectures": [case.architecture]}).expected_tokenizers[0]
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # the stand-in tokenizer's, not the family's
    other = dataclasses.replace(case, tokenizer="gpt-2" if expected == "llama" else "spm", config={**case.config, **ids})
    checkpoint = build_tiny_model(tmp_path / case.name, other, dtype="bfloat16")
    code, error, _ = run(capsys, "export", checkpoint, "-o", out_dir / "m.gguf")
    assert code == 1
    kinds = {"llama": "SentencePiece", "gpt2": "byte-level BPE"}
    wrong = kinds["gpt2" if expected == "llama" else "llama"]
    assert f"{case.architecture} expects a {kinds[expected]} tokenizer, but this checkpoint's is {wrong}" in error
    assert_nothing_written(out_dir)
