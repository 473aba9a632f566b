"""`alpaca-convert prune` on every family's tiny checkpoint: the pruned model is a standard
checkpoint of its family that transformers loads, that exports, and whose F32 GGUF gives
transformers' logits; selection is a function of the calibration text; bad requests are
refused before any output exists."""

import json

import numpy as np
import pytest

from convert_helpers import CASES, gguf_last_logits, hf_last_logits, random_sequences

# One case per family: (case, whether its heads may be pruned).
FAMILY_CASES = {
    "llama3-bpe-tied": True,  # tied embeddings, llama3 rope factors
    "mistral-nemo-tekken": True,  # head_dim 32 with hidden 64 and 4 heads
    "qwen2-bpe-tied": False,  # q/k/v biases, tied embeddings
    "qwen3-tied-head-dim": True,  # per-head q/k norms
    "gemma2-softcap-swa": True,
    "gemma3-text-swa": True,  # one KV head: heads go within the group; six layers, layer_types
    "phi3-spm-fused": False,  # fused qkv_proj and gate_up_proj
    "granite-multipliers": False,
    "olmo2-postnorm": False,  # post-norms only; llama.cpp's olmo2 wants attn_q hidden_size wide
}


def _request(**kwargs):
    from convert.prune import PruneRequest

    return PruneRequest(ffn_multiple=32, calibration_tokens=512, max_length=128, **kwargs)


def _config(path):
    return json.loads((path / "config.json").read_text())


@pytest.fixture(scope="module")
def pruned(tiny_builds, tmp_path_factory):
    """Each family's case, pruned (one layer, half the FFN, half the heads where allowed) and exported at F32."""
    from convert.export import export
    from convert.prune import prune

    root = tmp_path_factory.mktemp("pruned")
    built = {}

    def get(name):
        if name not in built:
            checkpoint, _, _ = tiny_builds.get(name)
            heads = {"heads_keep": 0.5} if FAMILY_CASES[name] else {}
            out = root / name
            result = prune(checkpoint, out, _request(drop_layers=1, ffn_keep=0.5, **heads))
            f32 = export(out, root / f"{name}.F32.gguf", "f32").path
            built[name] = (checkpoint, out, f32, result)
        return built[name]

    return get


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_pruned_checkpoint_loads_exports_and_matches(pruned, name):
    checkpoint, out, f32, result = pruned(name)
    before, after = _config(checkpoint), _config(out)
    assert after["num_hidden_layers"] == before["num_hidden_layers"] - 1
    assert after["intermediate_size"] == before["intermediate_size"] // 2
    if FAMILY_CASES[name]:
        assert after["num_attention_heads"] == before["num_attention_heads"] // 2
        assert after["head_dim"] == before.get("head_dim") or before["hidden_size"] // before["num_attention_heads"]
    if "layer_types" in before:
        kept = json.loads((out / "pruning.json").read_text())["kept_layers"]
        assert after["layer_types"] == [before["layer_types"][i] for i in kept]
    assert result.params_after < result.params_before
    assert (out / "tokenizer_config.json").is_file() or (out / "tokenizer.model").is_file()

    sequences = random_sequences(after["vocab_size"])
    expected = hf_last_logits(out, sequences)  # transformers loads it
    got = gguf_last_logits(f32, sequences)
    for ids, want, have in zip(sequences, expected, got):
        assert np.abs(have - want).max() < CASES[name].f32_tolerance, f"{name}: logits differ after {len(ids)} tokens"


def test_pruning_record_names_what_went_and_why(pruned):
    checkpoint, out, _, result = pruned("llama3-bpe-tied")
    record = json.loads((out / "pruning.json").read_text())
    scores = record["scores"]
    assert len(scores["layers_block_influence"]) == 2
    dropped = record["dropped_layers"]
    assert len(dropped) == 1
    influence = scores["layers_block_influence"]
    assert influence[dropped[0]] == min(influence)  # the layer of least Block Influence went
    layer = str(record["kept_layers"][0])
    neurons = np.array(scores["ffn_neurons_mean_abs_activation"][record["kept_layers"][0]])
    gone = record["kept_per_layer"][layer]["ffn_neurons_dropped"]
    kept = sorted(set(range(len(neurons))) - set(gone))
    assert neurons[gone].max() <= neurons[kept].min()  # the weakest neurons went
    assert record["params"] == {"before": result.params_before, "after": result.params_after}


def test_selection_is_deterministic_for_a_calibration_text(tiny_builds, tmp_path):
    from convert.prune import prune

    checkpoint, _, _ = tiny_builds.get("gemma3-text-swa")
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(f"item {i} of the list, and a word about it." for i in range(200)))
    records = []
    for name in ("a", "b"):
        prune(checkpoint, tmp_path / name, _request(drop_layers=2, ffn_keep=0.5, calibration=text))
        records.append(json.loads((tmp_path / name / "pruning.json").read_text()))
    for key in ("kept_layers", "kept_per_layer", "scores"):
        assert records[0][key] == records[1][key]
    import safetensors.numpy

    a = safetensors.numpy.load_file(tmp_path / "a" / "model.safetensors")
    b = safetensors.numpy.load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_target_params_reaches_below_the_target(tiny_builds, tmp_path):
    from convert.prune import prune

    checkpoint, _, _ = tiny_builds.get("llama3-bpe-tied")
    probe = prune(checkpoint, tmp_path / "probe", _request(ffn_keep=0.75))
    target = probe.params_after + 10
    result = prune(checkpoint, tmp_path / "target", _request(target_params=target))
    assert result.params_after <= target
    assert result.plan.kept_layers == (0, 1) and result.plan.shape.ffn == 96  # width first: the same plan
    deep = prune(checkpoint, tmp_path / "deep", _request(target_params=target, prefer="depth"))
    assert len(deep.plan.kept_layers) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ffn_keep": 1.5}, "--ffn-keep"),
        ({"ffn_keep": 0.0}, "--ffn-keep"),
        ({"heads_keep": -0.5}, "--heads-keep"),
        ({"drop_layers": 2}, "--drop-layers"),  # every layer of two
        ({"heads_keep": 0.75}, "cannot be divided"),  # 3 heads over 2 KV heads
        ({}, "say what to remove"),
        ({"target_params": 10, "drop_layers": 1}, "alone"),
        ({"target_params": 10}, "smallest pruned model"),
    ],
)
def test_bad_requests_are_one_line_and_leave_nothing(tiny_builds, tmp_path, kwargs, message):
    from alpaca_chat.errors import UsageError
    from convert.prune import prune

    checkpoint, _, _ = tiny_builds.get("llama3-bpe-tied")
    with pytest.raises(UsageError, match=message) as caught:
        prune(checkpoint, tmp_path / "out", _request(**kwargs))
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # no output directory, no staging directory


def test_heads_of_a_family_that_derives_head_dim_are_refused(tiny_builds, tmp_path):
    from alpaca_chat.errors import UsageError
    from convert.prune import prune

    checkpoint, _, _ = tiny_builds.get("phi3-spm-fused")
    with pytest.raises(UsageError, match="head_dim"):
        prune(checkpoint, tmp_path / "out", _request(heads_keep=0.5))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "flags",
    [
        ["--ffn-keep", "2"],
        ["--drop-layers", "2"],  # every layer
        ["--heads-keep", "0.75", "--ffn-multiple", "32"],  # 3 heads cannot share 2 KV heads
        ["--target-params", "lots"],
    ],
)
def test_cli_bad_input_is_one_line_exit_2_and_no_output(tiny_builds, tmp_path, capsys, flags):
    from convert.cli import main

    checkpoint, _, _ = tiny_builds.get("llama3-bpe-tied")
    capsys.readouterr()  # what building the case printed
    code = main(["prune", str(checkpoint), "-o", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("alpaca-convert: ")
    assert list(tmp_path.iterdir()) == []


def test_cli_prunes(tiny_builds, tmp_path, capsys):
    from convert.cli import main

    checkpoint, _, _ = tiny_builds.get("llama3-bpe-tied")
    code = main(["prune", str(checkpoint), "-o", str(tmp_path / "out"), "--drop-layers", "1",
                 "--ffn-multiple", "32", "--calibration-tokens", "256"])
    assert code == 0, capsys.readouterr().err
    assert "parameters" in capsys.readouterr().out
    assert _config(tmp_path / "out")["num_hidden_layers"] == 1
