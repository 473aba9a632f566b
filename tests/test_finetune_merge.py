"""Merging an adapter: safetensors only, tokenizer and template, the logits check, mismatches."""

import json
import shutil

import pytest

from finetune_helpers import fast_config, make_tiny_llama, seed_rows, write_json

pytest.importorskip("peft", reason="needs the convert extra")

import torch  # noqa: E402
import transformers  # noqa: E402

from alpaca_chat.errors import TrainingError  # noqa: E402
from alpaca_chat.templates import ALPACA_JINJA  # noqa: E402
from convert import cli, finetune, merge  # noqa: E402


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    data = write_json(root / "rows.json", seed_rows(24))
    finetune.finetune(fast_config(tiny_llama, data, root / "run", max_steps=3, val_size=0), progress=False)
    return root / "run"


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merged_checkpoint_reproduces_base_plus_adapter(tiny_llama, adapter, tmp_path):
    out = tmp_path / "merged"
    result = merge.merge(str(tiny_llama), adapter, out)
    assert result.max_logit_difference < 1e-4 and result.adapter_effect > 1e-3
    assert result.template == "alpaca" and result.dtype == "float32"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(out.glob("*.bin")) and not list(out.parent.glob(".merged.*"))
    for name in ("tokenizer.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_llama / name).read_bytes()
    assert (out / "chat_template.jinja").read_text() == ALPACA_JINJA
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == ALPACA_JINJA

    import peft

    ids = torch.tensor([[1, 520, 1430, 314, 2536, 30, 2]])
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    expected = _logits(peft.PeftModel.from_pretrained(base, str(adapter)).eval(), ids)
    torch.testing.assert_close(_logits(merged, ids), expected, rtol=1e-4, atol=1e-5)


def test_a_wrong_merge_fails_loudly_and_writes_nothing(tiny_llama, adapter, tmp_path, monkeypatch):
    from peft.tuners.lora import LoraModel

    # A merge that silently drops the adapter: the merged logits are the base's.
    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *a, **k: self.unload())
    with pytest.raises(merge.MergeCheckError, match="does not reproduce base \\+ adapter.*nothing was written"):
        merge.merge(str(tiny_llama), adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and not list(tmp_path.iterdir())


def test_verify_logits_tolerance_and_nan():
    expected = torch.tensor([[10.0, -3.0]])
    assert merge.verify_logits(expected + 1e-3, expected) == pytest.approx(1e-3, rel=1e-3)
    with pytest.raises(merge.MergeCheckError):
        merge.verify_logits(expected + 0.1, expected)
    with pytest.raises(merge.MergeCheckError):
        merge.verify_logits(torch.tensor([[float("nan"), -3.0]]), expected)


def test_adapter_for_another_base_is_refused(smollm2_checkpoint, adapter, tmp_path):
    wider = make_tiny_llama(tmp_path / "wider", smollm2_checkpoint, hidden_size=64)
    with pytest.raises(merge.AdapterMismatchError, match="trained on another model.*hidden_size 32 vs 64"):
        merge.merge(str(wider), adapter, tmp_path / "out")

    foreign = tmp_path / "foreign-adapter"  # made elsewhere: no training.json, so the shapes decide
    shutil.copytree(adapter, foreign, ignore=shutil.ignore_patterns("checkpoints", "training.json"))
    with pytest.raises(merge.AdapterMismatchError, match="does not fit.*size mismatch"):
        merge.merge(str(wider), foreign, tmp_path / "out")

    deeper = make_tiny_llama(tmp_path / "deeper", smollm2_checkpoint, layers=3)
    with pytest.raises(merge.AdapterMismatchError, match="LoRA tensors are missing"):
        merge.merge(str(deeper), foreign, tmp_path / "out")

    config = json.loads((foreign / "adapter_config.json").read_text())
    config["target_modules"] = ["c_attn"]
    (foreign / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(merge.AdapterMismatchError, match="does not fit"):
        merge.merge(str(deeper), foreign, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_base_or_adapter(tiny_llama, adapter, tmp_path):
    with pytest.raises(TrainingError, match="base model: checkpoint directory not found"):
        merge.merge(str(tmp_path / "no-base"), adapter, tmp_path / "out")
    with pytest.raises(TrainingError, match="adapter directory not found"):
        merge.merge(str(tiny_llama), tmp_path / "no-adapter", tmp_path / "out")
    (tmp_path / "half").mkdir()
    with pytest.raises(TrainingError, match="not a LoRA adapter: no adapter_model.safetensors"):
        merge.merge(str(tiny_llama), tmp_path / "half", tmp_path / "out")


def test_chat_trained_adapter_keeps_the_base_template(tiny_llama, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
        for r in seed_rows(12)
    ]
    data = write_json(tmp_path / "chat.json", rows)
    finetune.finetune(fast_config(tiny_llama, data, tmp_path / "run", max_steps=2, val_size=0, max_length=256), progress=False)
    assert json.loads((tmp_path / "run" / "training.json").read_text())["template"] == (tiny_llama / "chat_template.jinja").read_text()
    result = merge.merge(str(tiny_llama), tmp_path / "run", tmp_path / "merged")
    assert result.template == "base"
    assert (tmp_path / "merged" / "chat_template.jinja").read_text() == (tiny_llama / "chat_template.jinja").read_text()


def test_cli_merge(tiny_llama, adapter, tmp_path, capsys):
    code = cli.main(["merge", "--base", str(tiny_llama), "--adapter", str(adapter), "--out", str(tmp_path / "m"), "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert code == 0
    assert "bfloat16, chat template: alpaca" in out and "logits check: merged vs base+adapter differ by at most" in out
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
