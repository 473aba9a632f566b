"""The pipeline's compression steps on a tiny model: prune and distill after the fine-tune (manifests,
skipping, resuming an interrupted distill from its checkpoint and teacher cache), --distill-from
in place of the fine-tune, and bad compression flags refused before any work."""

import json

import pytest

from finetune_helpers import fast_config, make_tiny_llama, seed_rows, write_json

pytest.importorskip("peft", reason="needs the convert extra")

from transformers import TrainerCallback  # noqa: E402

from convert import cli, distill  # noqa: E402
from convert.distill_pipeline import CompressOptions  # noqa: E402
from convert.finetune import TrainingInterrupted  # noqa: E402
from convert.pipeline import PipelineOptions, run_pipeline  # noqa: E402
from convert.prune import PruneRequest  # noqa: E402

STEPS = ["finetune", "merge", "prune", "distill", "export", "quantize Q8_0"]


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    return write_json(tmp_path_factory.mktemp("data") / "rows.json", seed_rows(24))


def options(base, rows_file, out, **compress):
    settings = {"prune": PruneRequest(drop_layers=1), "distill": True, "distill_steps": 3, **compress}
    return PipelineOptions(finetune=fast_config(base, rows_file, out, max_steps=2), quants=("Q8_0",),
                           evaluate=False, compress=CompressOptions(**settings))


@pytest.fixture(scope="module")
def compressed(tiny_llama, rows_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("compress") / "run"
    lines = []
    summary = run_pipeline(options(tiny_llama, rows_file, out), report=lines.append)
    return out, summary, lines


def _block_count(gguf):
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    field = reader.fields["llama.block_count"]
    return int(field.parts[field.data[0]][0])


def test_prune_and_distill_are_steps_and_export_takes_the_distilled_model(compressed, tiny_llama):
    out, summary, _ = compressed
    assert [s.name for s in summary.steps] == STEPS and not any(s.skipped for s in summary.steps)
    assert json.loads((out / "pruned" / "pruning.json").read_text())["dropped_layers"].__len__() == 1
    assert json.loads((out / "distilled" / "distill.json").read_text())["steps"] == 3
    for name in ("prune", "distill"):
        manifest = json.loads((out / "manifests" / f"{name}.json").read_text())
        assert manifest["status"] == "done" and manifest["outputs"]
        held_out = manifest["info"]["held_out"]
        assert held_out["params"] < held_out["teacher_params"] and held_out["kl"] > 0 and held_out["ppl"] > 1
    export = json.loads((out / "manifests" / "export.json").read_text())
    assert export["inputs"]["merged"]["path"] == str(out / "distilled")
    gguf = summary.options.quantized("Q8_0")
    assert _block_count(gguf) == 1 == _block_count(summary.options.exported)  # the tiny model had 2 layers
    text = summary.format()
    assert "compression (held-out eval_sample.txt" in text
    assert "pruned" in text and "distilled" in text and str(out / "distilled" / "model.safetensors") in text


def test_the_distilled_gguf_chats(compressed):
    from alpaca_chat.conversation import SamplingParams
    from alpaca_chat.engine import Engine

    engine = Engine(compressed[1].chat_model, n_ctx=256)
    try:
        generation = engine.generate("### Instruction:\nSay hi.\n\n### Response:\n",
                                     SamplingParams(temperature=0.0, max_tokens=4))
        "".join(generation)
        assert generation.stats.generated_tokens >= 1
    finally:
        engine.close()


def test_the_compression_report_measures_every_model_of_the_run(compressed):
    """The eval step's report (convert/distill_pipeline.compression_report_info): the fine-tuned teacher,
    the pruned and distilled checkpoints and the Q8_0, each measured; the summary prints it."""
    from convert import compare
    from convert.distill_pipeline import compression_report_info, summary_lines
    from convert.pipeline import StepOutcome

    out, summary, _ = compressed
    labels = [m.label for m in compare.models_from(pipeline=out)]
    assert labels[:2] == ["base", "fine-tuned"] and labels[2:4] == ["pruned", "distilled"]
    info = compression_report_info(summary.options, {"distilled": 0.5}, ctx=128, max_chunks=1, speed_tokens=16,
                                   rounds=1)
    rows = {r["label"]: r for r in info["compression"]["rows"]}
    assert list(rows) == ["fine-tuned", "pruned", "distilled", "Q8_0"]
    assert rows["fine-tuned"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows["pruned"]["params"] < rows["fine-tuned"]["params"] and rows["pruned"]["kl"] > 0
    assert rows["distilled"]["params"] == rows["pruned"]["params"] == rows["Q8_0"]["params"]
    assert rows["distilled"]["kl"] != rows["pruned"]["kl"] and rows["distilled"]["rouge_l"] == 0.5
    assert all(r["tok_s"] > 0 for r in rows.values())
    assert (out / "compression.png").read_bytes()[:4] == b"\x89PNG"
    lines = summary_lines([*summary.steps, StepOutcome("eval", False, 0.0, info)])
    assert lines[0] == "compression report:" and any(line.strip().startswith("Q8_0") for line in lines)
    assert lines[-1].endswith("compression.png")


def test_running_again_skips_every_step(compressed, tiny_llama, rows_file):
    out, _, _ = compressed
    lines = []
    summary = run_pipeline(options(tiny_llama, rows_file, out), report=lines.append)
    assert all(s.skipped for s in summary.steps), lines


def test_interrupted_distill_resumes_from_its_checkpoint_and_cache(compressed, tiny_llama, rows_file, tmp_path,
                                                                    monkeypatch):
    import os
    import signal

    class SigintAtStep1(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGINT)

    real, calls = distill.distill, []

    def interrupted_once(config, settings, **kwargs):
        calls.append(config.resume)
        return real(config, settings, callbacks=[SigintAtStep1()] if len(calls) == 1 else [], progress=False)

    monkeypatch.setattr(distill, "distill", interrupted_once)
    out = tmp_path / "run"
    base = options(tiny_llama, rows_file, out)
    with pytest.raises(TrainingInterrupted):
        run_pipeline(base)
    assert json.loads((out / "manifests" / "distill.json").read_text())["status"] == "running"
    lines = []
    run_pipeline(base, report=lines.append)
    assert calls == [False, True] and "distill: resuming" in lines
    info = json.loads((out / "manifests" / "distill.json").read_text())["info"]
    assert info["resumed_from"] and info["teacher_examples_run"] == 0 and info["steps"] == 3


def test_distill_from_trains_the_fine_tune_on_a_teachers_logits(tiny_llama, smollm2_checkpoint, rows_file, tmp_path):
    teacher = make_tiny_llama(tmp_path / "teacher", smollm2_checkpoint, layers=1, seed=3)
    out = tmp_path / "run"
    summary = run_pipeline(options(tiny_llama, rows_file, out, prune=None, distill=False, distill_from=str(teacher)))
    assert [s.name for s in summary.steps] == ["distill-finetune", "export", "quantize Q8_0"]
    record = json.loads((out / "merged" / "distill.json").read_text())
    assert record["settings"]["teacher"] == str(teacher) and record["settings"]["full"] is False
    assert record["steps"] == 2 and not (out / "adapter").exists()
    assert summary.chat_model.is_file() and _block_count(summary.chat_model) == 2


@pytest.mark.parametrize("flags, message", [
    (["--distill"], "--distill trains the pruned model"),
    (["--prune-drop-layers", "2"], "--drop-layers must be between 0 and 1"),
    (["--prune-drop-layers", "1", "--distill", "--distill-steps", "0"], "--distill-steps must be at least 1"),
    (["--prune-ffn-keep", "1.5"], "--ffn-keep is the fraction kept"),
])
def test_bad_compression_flags_are_one_line_exit_2_before_any_work(tiny_llama, rows_file, tmp_path, capsys, flags,
                                                                    message):
    out = tmp_path / "run"
    code = cli.main(["pipeline", "--base", str(tiny_llama), "--data", str(rows_file), "--out", str(out), *flags])
    captured = capsys.readouterr()
    assert code == 2 and message in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
    assert "Traceback" not in captured.err and not out.exists()
