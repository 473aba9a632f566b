"""LoRA fine-tuning on a tiny random Llama: outputs, packing, resume, Ctrl+C, errors."""

import json
import os
import signal
from dataclasses import replace

import pytest

from finetune_helpers import fast_config, seed_rows, write_json

pytest.importorskip("peft", reason="needs the convert extra")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from alpaca_chat.errors import TrainingError, UsageError  # noqa: E402
from convert import cli, data, finetune  # noqa: E402
from convert.finetune import PackedCollator, TrainingInterrupted, packed_loss  # noqa: E402


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    return write_json(tmp_path_factory.mktemp("data") / "rows.json", seed_rows(40))


@pytest.fixture(scope="module")
def finished_run(tiny_llama, rows_file, tmp_path_factory):
    """One uninterrupted 6-step run, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("runs") / "full"
    return finetune.finetune(fast_config(tiny_llama, rows_file, out, max_steps=6), progress=False)


class SigintAtStep(TrainerCallback):
    """Press Ctrl+C, for real, at the end of a step."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_writes_adapter_metrics_plot_and_held_out_rows(finished_run):
    out = finished_run.out
    for name in ("adapter_model.safetensors", "adapter_config.json", "training.json", "metrics.json", "loss.png", "heldout.jsonl"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 6
    assert [p["step"] for p in metrics["train_loss"]] == [1, 2, 3, 4, 5, 6]
    assert [p["step"] for p in metrics["eval_loss"]] == [0, 4, 6]
    assert metrics["base_eval_loss"] == metrics["eval_loss"][0]["loss"]
    assert metrics["final_eval_loss"] == metrics["eval_loss"][-1]["loss"]
    assert metrics["tokens_per_second"] > 0 and metrics["wall_seconds"] >= metrics["train_seconds"] > 0
    assert metrics["data"]["val_examples"] == 4
    meta = json.loads((out / "training.json").read_text())
    assert meta["template"] == "alpaca" and meta["base_model"]["hidden_size"] == 32
    assert meta["lora"]["target_modules"] == list(finetune.LORA_DEFAULTS["llama"].target_modules)
    assert len((out / "heldout.jsonl").read_text().splitlines()) == 4


def test_packed_batch_loss_equals_the_per_example_loss(tiny_llama):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    records = [data.parse_row(row, f"row {i}") for i, row in enumerate(seed_rows(4), 1)]
    examples, _ = data.tokenize(records, tokenizer, max_length=96)
    batch = PackedCollator()(examples)
    assert batch["input_ids"].shape == (1, sum(len(e) for e in examples))  # one row, no padding
    assert batch["position_ids"][0, len(examples[0])].item() == 0  # positions restart per example
    with torch.no_grad():
        loss, _ = packed_loss(model, batch)
        chunked, _ = packed_loss(model, batch, chunk_tokens=96)  # the row through the model a few examples at a time
        total = n = 0
        for e in examples:
            out = model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels]))
            k = sum(1 for label in e.labels[1:] if label != data.IGNORE_INDEX)
            total, n = total + out.loss.item() * k, n + k
    assert loss.item() == pytest.approx(total / n, rel=1e-5)
    assert chunked.item() == pytest.approx(total / n, rel=1e-5)


def test_chunks_are_cut_between_examples():
    def positions(*lengths):
        return torch.tensor([[p for n in lengths for p in range(n)]])

    assert finetune.chunk_bounds(positions(3, 4, 5), None) == [(0, 12)]
    assert finetune.chunk_bounds(positions(3, 4, 5), 12) == [(0, 12)]
    assert finetune.chunk_bounds(positions(3, 4, 5), 7) == [(0, 7), (7, 12)]
    assert finetune.chunk_bounds(positions(3, 4, 5), 2) == [(0, 3), (3, 7), (7, 12)]  # never inside an example
    assert finetune.chunk_bounds(positions(8, 2, 2), 5) == [(0, 8), (8, 12)]


def test_ctrl_c_saves_a_checkpoint_and_resume_reaches_the_same_adapter(tiny_llama, rows_file, tmp_path, finished_run):
    config = fast_config(tiny_llama, rows_file, tmp_path / "run", max_steps=6)
    with pytest.raises(TrainingInterrupted) as caught:
        finetune.finetune(config, callbacks=[SigintAtStep(3)], progress=False)
    assert caught.value.exit_code == 130 and "--resume" in str(caught.value)
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints[-1] in ("checkpoint-3", "checkpoint-4")  # saved at the end of the step Ctrl+C landed in
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "interrupted"

    with pytest.raises(UsageError, match="pass --resume"):
        finetune.finetune(config, progress=False)
    with pytest.raises(UsageError, match="settings differ.*learning_rate"):
        finetune.finetune(replace(config, resume=True, learning_rate=5e-4), progress=False)

    resumed = finetune.finetune(replace(config, resume=True), progress=False)
    assert resumed.metrics["resumed_from_step"] in (3, 4)
    assert [p["step"] for p in resumed.metrics["train_loss"]] == [1, 2, 3, 4, 5, 6]
    expected = load_file(finished_run.out / "adapter_model.safetensors")
    got = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)
    assert resumed.final_eval_loss == pytest.approx(finished_run.final_eval_loss, rel=1e-5)


def test_resume_without_a_checkpoint_is_a_usage_error(tiny_llama, rows_file, tmp_path):
    with pytest.raises(UsageError, match="no checkpoint"):
        finetune.finetune(fast_config(tiny_llama, rows_file, tmp_path / "new", resume=True), progress=False)


def test_base_checkpoint_that_does_not_exist(rows_file, tmp_path):
    with pytest.raises(TrainingError, match="base model: checkpoint directory not found: .*nowhere"):
        finetune.finetune(fast_config(tmp_path / "nowhere", rows_file, tmp_path / "out"), progress=False)


def test_base_with_only_pickled_weights_is_refused(tiny_llama, rows_file, tmp_path):
    base = tmp_path / "pickled"
    base.mkdir()
    (base / "config.json").write_bytes((tiny_llama / "config.json").read_bytes())
    (base / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(TrainingError, match="no .safetensors weights"):
        finetune.finetune(fast_config(base, rows_file, tmp_path / "out"), progress=False)


def test_lora_defaults_per_architecture_and_overrides():
    config = finetune.FinetuneConfig(base="b", data="d", out="o")
    llama = finetune.lora_settings("llama", config)
    assert (llama.r, llama.alpha, llama.dropout) == (16, 32, 0.0)
    assert "gate_proj" in llama.target_modules
    assert finetune.lora_settings("gpt2", config).target_modules == ("c_attn", "c_proj", "c_fc")
    assert finetune.lora_settings("some_new_arch", config).target_modules == "all-linear"
    custom = replace(config, lora_r=4, lora_alpha=8, lora_dropout=0.05, target_modules=("q_proj", "v_proj"))
    assert finetune.lora_settings("llama", custom) == finetune.LoraSettings(4, 8, 0.05, ("q_proj", "v_proj"))


def test_cli_finetune_prints_progress_and_the_loss_line(tiny_llama, rows_file, tmp_path, capsys):
    out = tmp_path / "cli-run"
    code = cli.main([
        "finetune", "--base", str(tiny_llama), "--data", str(rows_file), "--out", str(out),
        "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--max-length", "64", "--val-size", "2",
        "--learning-rate", "1e-3", "--target-modules", "q_proj", "v_proj", "--lora-r", "4",
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "step 2/2: loss" in captured.err and "tok/s" in captured.err and "ETA" in captured.err
    assert "eval loss on 2 held-out rows" in captured.out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_cli_errors_are_one_line(tiny_llama, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": 3}\n', encoding="utf-8")
    code = cli.main(["finetune", "--base", str(tiny_llama), "--data", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip() == f"alpaca-convert: error: {bad}: line 2: 'output' must be a string, not a number"

    code = cli.main(["finetune", "--base", str(tmp_path / "missing"), "--data", str(bad), "--out", str(tmp_path / "o")])
    assert code == 1 and "base model: checkpoint directory not found" in capsys.readouterr().err
