"""The compression report on a tiny model: every figure is measured (the teacher's KL to itself is 0,
the pruned model has fewer parameters and a positive KL, a quantization is smaller than the
checkpoint it came from), the PNG is drawn, and bad teachers and mismatched vocabularies are refused."""

import json
import math

import pytest

from finetune_helpers import make_tiny_llama

pytest.importorskip("transformers", reason="needs the convert extra")

from alpaca_chat.errors import AlpacaChatError, UsageError  # noqa: E402
from convert import compression_report as cr  # noqa: E402


@pytest.fixture(scope="module")
def models(tiny_llama, tmp_path_factory):
    """The tiny Llama (teacher), pruned by one layer and half its FFN, and the pruned model at Q8_0."""
    from convert.export import export
    from convert.prune import PruneRequest, prune
    from convert.quantize import quantize

    root = tmp_path_factory.mktemp("report")
    pruned = root / "pruned"
    prune(tiny_llama, pruned, PruneRequest(drop_layers=1, ffn_keep=0.5, ffn_multiple=32, calibration_tokens=256,
                                           max_length=128))
    f16 = export(pruned, root / "pruned.F16.gguf", "f16").path
    q8 = quantize(f16, root / "pruned.Q8_0.gguf", "Q8_0").path
    return root, [cr.ReportModel("teacher", tiny_llama), cr.ReportModel("pruned", pruned),
                  cr.ReportModel("Q8_0", q8)]


@pytest.fixture(scope="module")
def report(models):
    _, specs = models
    return cr.measure(specs, "teacher", rouge={"pruned": 0.25}, speed_tokens=16, rounds=2, ctx=128,
                      max_chunks=1)


def test_every_figure_is_measured(report, models, tiny_llama):
    teacher, pruned, q8 = (report.row(label) for label in ("teacher", "pruned", "Q8_0"))
    assert teacher.kl == pytest.approx(0.0, abs=1e-6)  # the same model, the same engine: no divergence
    assert teacher.ppl == pytest.approx(report.row("teacher").ppl) and teacher.ppl > 1
    assert pruned.params < teacher.params and pruned.params == q8.params
    pruning = json.loads((models[1][1].path / "pruning.json").read_text())
    assert pruned.params == pruning["params"]["after"]  # the GGUF's count is the checkpoint's
    assert pruned.kl > 1e-4 and q8.kl > 1e-4 and math.isfinite(pruned.ppl)
    assert q8.kl != pruned.kl  # the quantized file was measured, not its source again
    assert q8.file_bytes < pruned.file_bytes  # Q8_0 against the checkpoint's F32 safetensors
    assert q8.file_bytes == models[1][2].path.stat().st_size
    assert all(r.tok_s > 0 and r.speed_tokens >= 1 for r in report.rows)
    assert q8.tensor_types.startswith("Q8_0") and teacher.tensor_types.startswith("F16")
    assert teacher.timed == "its F16 export" and q8.timed == "pruned.Q8_0.gguf"
    assert pruned.rouge_l == 0.25 and teacher.rouge_l is None
    assert report.n_tokens == 128 // 2 - 1  # the second half of one 128-token chunk


def test_table_round_trip_and_plot(report, tmp_path):
    lines = report.table()
    assert len(lines) == 2 + 3 + 1 and lines[2].startswith("teacher") and "1.00x" in lines[2]
    assert "0.250" in lines[3] and "Q8_0 100%" in lines[4] and "up to 16 tokens" in lines[-1]
    again = cr.Report.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again.table() == lines
    png = cr.plot(report, tmp_path / "size-kl.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.partial"))


def test_the_teacher_must_be_known(models, tmp_path):
    _, specs = models
    with pytest.raises(UsageError, match="not among the models"):
        cr.measure(specs, "nobody")
    with pytest.raises(UsageError, match="neither a model label"):
        cr.resolve_teacher(specs, str(tmp_path / "missing"))
    assert cr.resolve_teacher(specs, None) == "teacher"
    assert cr.resolve_teacher([cr.ReportModel("base", tmp_path), cr.ReportModel("fine-tuned", tmp_path)],
                              None) == "fine-tuned"


def test_a_different_vocabulary_is_refused(models, smollm2_checkpoint, tmp_path):
    """A student with another tokenizer cannot be measured against the teacher: one clear error."""
    import transformers

    tokenizer_dir = tmp_path / "small-vocab-tokenizer"
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_checkpoint)
    tokenizer.save_pretrained(tokenizer_dir)
    other = make_tiny_llama(tmp_path / "other", tokenizer_dir, seed=1)
    _, specs = models
    with pytest.raises(AlpacaChatError, match="different vocabularies"):
        cr.measure([specs[2], cr.ReportModel("other", _grown(other, tmp_path / "grown"))], "Q8_0", speed_tokens=8,
                   rounds=1, ctx=128, max_chunks=1)


def _grown(checkpoint, out):
    """The checkpoint with 64 more embedding rows (a different vocabulary size)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.resize_token_embeddings(model.config.vocab_size + 64)
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out)
    return out


def test_compare_report_from_the_command_line(models, tmp_path, capsys):
    """`alpaca-convert compare --report`: the ROUGE-L of compare's answers lands in the report's rows."""
    from convert import cli
    from finetune_helpers import seed_rows, write_json

    _, specs = models
    prompts = write_json(tmp_path / "rows.json", seed_rows(1))
    capsys.readouterr()
    code = cli.main(["compare", "--base", str(specs[0].path), "--gguf", str(specs[2].path), "--prompts", str(prompts),
                     "-n", "1", "--max-tokens", "4", "--width", "100", "--plot", str(tmp_path / "rouge.png"),
                     "--report", "--teacher", "base", "--report-png", str(tmp_path / "size-kl.png"),
                     "--speed-tokens", "8"])
    out = capsys.readouterr().out
    assert code == 0
    report = out[out.index("compression report:"):].splitlines()
    assert report[3].startswith("base") and " 0.0000 " in report[3] and report[4].startswith("Q8_0")
    assert f"wrote {tmp_path / 'size-kl.png'}" in out and (tmp_path / "size-kl.png").is_file()
