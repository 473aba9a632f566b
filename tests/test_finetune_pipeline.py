"""The pipeline on a tiny model: every step, manifests, skipping unchanged work, resuming."""

import json
import re
from dataclasses import replace

import pytest

from finetune_helpers import fast_config, seed_rows, write_json

pytest.importorskip("peft", reason="needs the convert extra")

from transformers import TrainerCallback  # noqa: E402

from alpaca_chat.templates import ALPACA_JINJA  # noqa: E402
from convert import cli, compare, finetune, pipeline  # noqa: E402
from convert.finetune import TrainingInterrupted  # noqa: E402
from convert.pipeline import PipelineOptions, run_pipeline  # noqa: E402

STEPS = ["finetune", "merge", "export", "quantize Q4_K_M", "quantize Q8_0", "eval"]


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    return write_json(tmp_path_factory.mktemp("data") / "rows.json", seed_rows(32))


def options(tiny_llama, rows_file, out, quants=("Q4_K_M", "Q8_0"), **overrides):
    return PipelineOptions(finetune=fast_config(tiny_llama, rows_file, out, **overrides), quants=quants)


@pytest.fixture(scope="module")
def first_run(tiny_llama, rows_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    lines = []
    summary = run_pipeline(options(tiny_llama, rows_file, out), report=lines.append)
    return out, summary, lines


def test_runs_every_step_and_ends_with_the_chat_command(first_run):
    out, summary, lines = first_run
    assert [s.name for s in summary.steps] == STEPS and not any(s.skipped for s in summary.steps)
    text = summary.format()
    name = summary.options.name
    assert name == f"{tiny_name(summary)}-alpaca"
    for path in ("adapter/adapter_model.safetensors", "merged/model.safetensors", f"gguf/{name}.F16.gguf",
                 f"gguf/{name}.Q4_K_M.gguf", f"gguf/{name}.Q8_0.gguf"):
        assert (out / path).is_file() and str(out / path) in text
    assert re.search(r"eval loss on \d held-out rows: \d+\.\d{4} \(base\) -> \d+\.\d{4} \(fine-tuned\)", text)
    assert "quality of Q4_K_M vs F16: KL divergence" in text and "quality of Q8_0 vs F16" in text
    rouge = re.search(r"ROUGE-L F vs reference on (\d) held-out rows: base ([\d.]+), fine-tuned ([\d.]+), "
                      r"Q4_K_M ([\d.]+), Q8_0 ([\d.]+)", text)
    assert rouge and int(rouge.group(1)) == 4
    scores = json.loads((out / "eval.json").read_text())["rouge_l"]
    assert sorted(scores) == ["Q4_K_M", "Q8_0", "base", "fine-tuned"] and all(0 <= v <= 1 for v in scores.values())
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert text.endswith(f"alpaca-chat --model {(out / 'gguf' / f'{name}.Q4_K_M.gguf').resolve()}")
    assert (out / "summary.txt").read_text().strip() == text


def tiny_name(summary):
    from pathlib import Path

    return Path(summary.options.finetune.base).name


def gguf(out, qtype):
    return next((out / "gguf").glob(f"*.{qtype}.gguf"))


def test_each_step_records_inputs_hashes_and_settings(first_run):
    out, _, _ = first_run
    manifest = json.loads((out / "manifests" / "finetune.json").read_text())
    assert manifest["status"] == "done"
    assert set(manifest["inputs"]) == {"base", "data"} and len(manifest["inputs"]["data"]["sha256"]) == 64
    assert manifest["settings"]["learning_rate"] == 1e-3 and manifest["settings"]["max_steps"] == 4
    assert "adapter/adapter_model.safetensors" in manifest["outputs"]
    quantize = json.loads((out / "manifests" / "quantize-q4_k_m.json").read_text())
    export = json.loads((out / "manifests" / "export.json").read_text())
    (exported,) = export["outputs"].values()
    assert quantize["inputs"]["source"]["sha256"] == exported["sha256"]
    assert quantize["settings"] == {"type": "Q4_K_M"}


def test_the_gguf_carries_the_alpaca_template(first_run):
    from alpaca_chat.engine import Engine
    from alpaca_chat.templates import resolve_template

    out, _, _ = first_run
    with Engine(gguf(out, "Q4_K_M"), n_ctx=256) as engine:
        assert engine.chat_template == ALPACA_JINJA
        assert resolve_template("auto", engine.chat_template).name == "alpaca"


def test_running_again_does_no_work(first_run, tiny_llama, rows_file, monkeypatch):
    out, _, _ = first_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "summary.txt"}

    def fail(*args, **kwargs):
        raise AssertionError("a step ran again")

    for name in ("_finetune", "_merge", "_export", "_quantize", "_evaluate"):
        monkeypatch.setattr(pipeline, name, fail)
    lines = []
    summary = run_pipeline(options(tiny_llama, rows_file, out), report=lines.append)
    assert all(s.skipped for s in summary.steps)
    assert lines == [f"{name}: up to date, skipped" for name in STEPS]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert "held-out rows" in summary.format()


def test_a_new_quant_type_redoes_only_what_depends_on_it(first_run, tiny_llama, rows_file, tmp_path):
    out = copy_run(first_run, tmp_path / "copy")
    summary = run_pipeline(options(tiny_llama, rows_file, out, quants=("Q4_K_M", "Q8_0", "Q5_K_M")))
    ran = [s.name for s in summary.steps if not s.skipped]
    assert ran == ["quantize Q5_K_M", "eval"]


def copy_run(first_run, out):
    """A copy of the first run whose manifests name the copy's paths (so its steps are up to date)."""
    import shutil

    shutil.copytree(first_run[0], out)
    for manifest in (out / "manifests").glob("*.json"):
        manifest.write_text(manifest.read_text().replace(str(first_run[0]), str(out)))
    return out


def test_adapter_gguf_adds_the_base_and_the_adapter_for_llama_cpp(first_run, tiny_llama, rows_file, tmp_path):
    import numpy as np

    from alpaca_chat.engine import AdapterSpec, Engine

    out = copy_run(first_run, tmp_path / "copy")
    opts = replace(options(tiny_llama, rows_file, out), adapter_gguf=True)
    summary = run_pipeline(opts)
    assert [s.name for s in summary.steps if not s.skipped] == ["export base", "quantize base Q4_K_M", "export adapter"]
    base_name = tiny_llama.name
    base_q4, lora = out / "gguf" / f"{base_name}.Q4_K_M.gguf", out / "gguf" / f"{opts.name}.lora.gguf"
    text = summary.format()
    assert f"alpaca-chat --model {(out / 'gguf' / f'{opts.name}.Q4_K_M.gguf').resolve()}" in text  # merged
    assert text.endswith(f"alpaca-chat --model {base_q4.resolve()} --lora {lora.resolve()}")
    for path in (base_q4, lora, out / "gguf" / f"{base_name}.F16.gguf"):
        assert path.is_file() and str(path) in text
    assert lora.stat().st_size < 0.2 * base_q4.stat().st_size

    # Base F16 + adapter in llama.cpp is the merged F16, as near as F16 rounding allows, and nearer
    # than the base alone.
    rng = np.random.default_rng(0)
    sequences = [[int(t) for t in rng.integers(10, 2000, size=n)] for n in (5, 17, 40)]

    def last_logits(model, adapters=()):
        with Engine(model, n_ctx=64, n_batch=64, exact=True, adapters=adapters) as engine:
            return np.stack([engine.sequence_logits(ids, len(ids) - 1)[0] for ids in sequences])

    base_f16, merged_f16 = out / "gguf" / f"{base_name}.F16.gguf", out / "gguf" / f"{opts.name}.F16.gguf"
    merged = last_logits(merged_f16)
    adapted = last_logits(base_f16, [AdapterSpec(out / "gguf" / f"{opts.name}.lora.gguf")])
    alone = last_logits(base_f16)
    assert np.abs(adapted - merged).max() < 0.05 * np.abs(alone - merged).max()
    assert np.abs(adapted - merged).max() <= 1e-2 * (merged.max() - merged.min())

    # compare asks the base with the adapter as one more model (the adapter file is not a model).
    from convert import compare

    models = compare.models_from(pipeline=out)
    paired = [m for m in models if m.adapter is not None]
    assert [(m.label, m.path, m.adapter) for m in paired] == [("Q4_K_M+lora", base_q4, lora)]
    assert all(not str(m.path).endswith(".lora.gguf") for m in models)
    prompts = compare.load_prompts(None, pipeline=out, limit=1)
    rows = compare.compare([m for m in models if m.is_gguf], prompts, max_tokens=8)
    assert len(rows) == 1 and len(rows[0].answers) == len([m for m in models if m.is_gguf])

    again = run_pipeline(opts)  # and all of it is up to date on the next run
    assert all(s.skipped for s in again.steps)


def test_interrupted_finetune_resumes_on_the_next_run(first_run, tiny_llama, rows_file, tmp_path, monkeypatch):
    real_finetune = finetune.finetune

    class SigintAtStep2(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                import os
                import signal

                os.kill(os.getpid(), signal.SIGINT)

    calls = []

    def finetune_interrupted_once(config, **kwargs):
        calls.append(config.resume)
        callbacks = [SigintAtStep2()] if len(calls) == 1 else []
        return real_finetune(config, callbacks=callbacks, progress=False)

    monkeypatch.setattr(finetune, "finetune", finetune_interrupted_once)
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        run_pipeline(options(tiny_llama, rows_file, out))
    assert json.loads((out / "manifests" / "finetune.json").read_text())["status"] == "running"
    lines = []
    run_pipeline(options(tiny_llama, rows_file, out), report=lines.append)
    assert calls == [False, True] and lines[0] == "finetune: resuming"
    assert gguf(out, "Q8_0").read_bytes() == gguf(first_run[0], "Q8_0").read_bytes()


def test_changed_settings_start_the_fine_tune_over(first_run, tiny_llama, rows_file, tmp_path):
    out = tmp_path / "run"
    run_pipeline(options(tiny_llama, rows_file, out, quants=("Q8_0",), max_steps=2))
    summary = run_pipeline(options(tiny_llama, rows_file, out, quants=("Q8_0",), max_steps=3))
    assert not any(s.skipped for s in summary.steps)
    assert json.loads((out / "adapter" / "metrics.json").read_text())["steps"] == 3


def test_cli_pipeline_then_compare(first_run, tiny_llama, rows_file, capsys):
    out, _, _ = first_run
    code = cli.main([
        "pipeline", "--base", str(tiny_llama), "--data", str(rows_file), "--out", str(out), "--quant", "Q4_K_M", "Q8_0",
        "--max-steps", "4", "--batch-size", "4", "--grad-accum", "1", "--max-length", "96", "--val-size", "4",
        "--learning-rate", "1e-3", "--save-steps", "2", "--eval-steps", "4",
    ])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "finetune: up to date, skipped" in captured.err
    assert "alpaca-chat --model" in captured.out

    code = cli.main(["compare", "--pipeline", str(out), "-n", "2", "--max-tokens", "4", "--width", "150"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    header = next(line for line in captured.out.splitlines() if line.startswith("BASE"))
    assert [h.strip() for h in header.split("|")] == ["BASE", "FINE-TUNED", "Q4_K_M", "Q8_0", "REFERENCE"]
    assert captured.out.count("[1] ") == 1 and captured.out.count("[2] ") == 1
    scored = [line.split()[0] for line in captured.out.splitlines() if "(mean of 2)" in line]
    assert scored == ["base", "fine-tuned", "Q4_K_M", "Q8_0"]
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_needs_models_and_prompts(tmp_path):
    from alpaca_chat.errors import UsageError

    with pytest.raises(UsageError, match="nothing to compare"):
        compare.models_from()
    with pytest.raises(UsageError, match="--prompts"):
        compare.load_prompts(None)
    with pytest.raises(UsageError, match="not a pipeline directory"):
        compare.models_from(pipeline=tmp_path)


def test_unknown_quant_type_fails_before_training(tiny_llama, rows_file, tmp_path):
    from convert.quantize import UnknownQuantTypeError

    with pytest.raises(UnknownQuantTypeError):
        run_pipeline(options(tiny_llama, rows_file, tmp_path / "run", quants=("Q9_Z",)))
    assert not (tmp_path / "run" / "adapter").exists()


def test_compare_refuses_a_missing_base_or_adapter(tmp_path):
    from alpaca_chat.errors import UsageError
    from convert import compare

    base = tmp_path / "base.Q4_K_M.gguf"
    base.write_bytes(b"GGUF")
    with pytest.raises(UsageError, match="does not exist"):
        compare.models_from(lora_pairs=[(base, tmp_path / "missing.lora.gguf")])
