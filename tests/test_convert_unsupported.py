"""An architecture without an exporter: one line that lists the supported families, names the
closest one when the name suggests it, and points to llama.cpp's converter; nothing is written.

Runs through the CLI's entry function on a checkpoint that is only a config.json and one tensor:
the architecture is refused before any weight is read.
"""

import json

import numpy as np
import pytest

from convert.cli import main
from convert.export import supported_architectures

ERROR = "alpaca-convert: error:"


def _checkpoint(root, architecture, model_type):
    from safetensors.numpy import save_file

    root.mkdir()
    config = {"model_type": model_type, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    if architecture is not None:
        config["architectures"] = [architecture]
    (root / "config.json").write_text(json.dumps(config), encoding="utf-8")
    save_file({"model.embed_tokens.weight": np.zeros((8, 64), dtype=np.float32)}, str(root / "model.safetensors"))
    return root


def _convert(capsys, tmp_path, architecture, model_type, command=("export",), options=()):
    checkpoint = _checkpoint(tmp_path / "model", architecture, model_type)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code = main([*command, str(checkpoint), *options, "-o", str(out_dir / "model.gguf")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(ERROR)]
    assert len(errors) == 1, err
    assert list(out_dir.iterdir()) == [], "nothing may be written"
    return code, errors[0]


@pytest.mark.parametrize(
    ("architecture", "model_type", "closest"),
    [
        ("Qwen3OmniMoeForConditionalGeneration", "qwen3_omni_moe", "Qwen3ForCausalLM"),  # a family name that starts like one
        ("SmolLM4ForCausalLM", "smollm4", "SmolLM3ForCausalLM"),  # a near spelling
        (None, "qwen3_omni_moe", "Qwen3ForCausalLM"),  # no architectures in config.json: its model_type
    ],
)
def test_unsupported_architecture_names_the_closest(capsys, tmp_path, architecture, model_type, closest):
    assert closest in supported_architectures()
    code, error = _convert(capsys, tmp_path, architecture, model_type)
    assert code == 1
    assert f"unsupported architecture: {architecture or 'none listed'}" in error
    assert f"closest supported family, {closest}," in error
    assert f"supported: {', '.join(supported_architectures())};" in error
    assert "llama.cpp's convert_hf_to_gguf.py" in error


def test_unsupported_architecture_without_a_close_one(capsys, tmp_path):
    code, error = _convert(capsys, tmp_path, "GPTBigCodeForCausalLM", "gpt_bigcode")
    assert code == 1
    assert "unsupported architecture: GPTBigCodeForCausalLM;" in error
    assert "closest" not in error
    assert f"supported: {', '.join(supported_architectures())};" in error
    assert "llama.cpp's convert_hf_to_gguf.py" in error


def test_unsupported_architecture_in_the_default_command(capsys, tmp_path):
    """`alpaca-convert CHECKPOINT --quant ...` (export, quantize, eval) stops the same way."""
    code, error = _convert(capsys, tmp_path, "Qwen3OmniMoeForConditionalGeneration", "qwen3_omni_moe", (), ("--quant", "Q4_K_M"))
    assert code == 1
    assert "unsupported architecture: Qwen3OmniMoeForConditionalGeneration" in error and "Qwen3ForCausalLM" in error
