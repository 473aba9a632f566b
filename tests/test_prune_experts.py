"""`alpaca-convert prune --experts-keep N` on tiny Mixtral and Qwen3-MoE checkpoints: each layer keeps
its most-routed experts (counted on calibration text, recorded in pruning.json), the result loads
in transformers, exports, and its F32 GGUF gives transformers' logits; bad counts are refused."""

import json

import numpy as np
import pytest

from convert_helpers import CASES, TinyCase, build_tiny_model, gguf_last_logits, hf_last_logits, random_sequences

pytest.importorskip("transformers", reason="needs the convert extra")

# Mixtral with a BPE tokenizer (the shared mixtral-spm case needs sentencepiece's protobuf to tokenize).
MIXTRAL = TinyCase("mixtral-bpe", "MixtralForCausalLM", "llama-bpe", {"num_local_experts": 4, "num_experts_per_tok": 2})


@pytest.fixture(scope="module")
def moe_checkpoints(tiny_builds, tmp_path_factory):
    return {"qwen3moe-bpe": tiny_builds.get("qwen3moe-bpe")[0],
            "mixtral-bpe": build_tiny_model(tmp_path_factory.mktemp("mixtral") / "mixtral-bpe", MIXTRAL)}


@pytest.mark.parametrize("name", ["qwen3moe-bpe", "mixtral-bpe"])
def test_least_routed_experts_go_and_the_gguf_matches(moe_checkpoints, tmp_path, name):
    from convert.export import export
    from convert.prune_experts import prune_experts

    checkpoint = moe_checkpoints[name]
    result = prune_experts(checkpoint, tmp_path / "out", 3, calibration_tokens=256, max_length=64)
    record = json.loads((tmp_path / "out" / "pruning.json").read_text())
    assert record["experts"] == {"before": 4, "after": 3, "per_token": 2}
    for layer, counts in enumerate(record["scores"]["routed_tokens"]):
        dropped = record["dropped_experts"][str(layer)]
        kept = record["kept_experts"][str(layer)]
        assert len(dropped) == 1 and sorted(kept + dropped) == [0, 1, 2, 3]
        assert counts[dropped[0]] == min(counts)  # the least-routed expert went
        assert sum(counts) == record["calibration"]["tokens"] * 2  # every token chose 2 experts
    assert result.params_after < result.params_before == record["params"]["before"]

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("num_local_experts", config.get("num_experts")) == 3
    f32 = export(tmp_path / "out", tmp_path / "out.F32.gguf", "f32").path
    sequences = random_sequences(config["vocab_size"])
    tolerance = CASES["qwen3moe-bpe"].f32_tolerance if name == "qwen3moe-bpe" else 1e-4
    for want, have in zip(hf_last_logits(tmp_path / "out", sequences), gguf_last_logits(f32, sequences)):
        assert np.abs(have - want).max() < tolerance

    again = prune_experts(checkpoint, tmp_path / "again", 3, calibration_tokens=256, max_length=64)
    assert again.kept == result.kept  # a function of the calibration text


@pytest.mark.parametrize("flags, message", [
    (["--experts-keep", "4"], "below the 4"),
    (["--experts-keep", "1"], "at least the 2"),
    (["--experts-keep", "3", "--drop-layers", "1"], "alone"),
])
def test_bad_expert_counts_are_one_line_exit_2_and_no_output(moe_checkpoints, tmp_path, capsys, flags, message):
    from convert.cli import main

    capsys.readouterr()
    code = main(["prune", str(moe_checkpoints["qwen3moe-bpe"]), "-o", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_dense_model_has_no_experts_to_prune(tiny_llama, tmp_path, capsys):
    from convert.cli import main

    code = main(["prune", str(tiny_llama), "-o", str(tmp_path / "out"), "--experts-keep", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not a mixture of experts" in err and not (tmp_path / "out").exists()


def test_cli_prunes_experts(moe_checkpoints, tmp_path, capsys):
    from convert.cli import main

    code = main(["prune", str(moe_checkpoints["mixtral-bpe"]), "-o", str(tmp_path / "out"), "--experts-keep", "2",
                 "--calibration-tokens", "128", "--max-length", "64"])
    assert code == 0, capsys.readouterr().err
    assert "2 experts per layer" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_local_experts"] == 2
