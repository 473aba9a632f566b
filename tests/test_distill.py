"""`alpaca-convert distill`: the loss is the KL it claims to be, an interrupted run resumes from
its checkpoint and its teacher cache (the teacher never runs again), a GGUF teacher gives the
HF teacher's top-k, and a student with another vocabulary is refused before anything is written."""

import json
import os
import signal

import numpy as np
import pytest

from finetune_helpers import fast_config, make_tiny_llama, seed_rows, write_json


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_loss_equals_a_hand_computed_kl(alpha):
    import torch

    from convert.distill import distill_loss

    rng = np.random.default_rng(0)
    student = rng.normal(size=(3, 7)) * 3
    teacher_full = rng.normal(size=(3, 7)) * 3
    ids = np.argsort(-teacher_full, axis=-1)[:, :4]  # the teacher's top 4
    values = np.take_along_axis(teacher_full, ids, -1)
    targets = np.array([1, 5, 0])
    t = 2.5

    expected = 0.0
    for row in range(3):
        p = _softmax(values[row] / t)  # the teacher's top-k, renormalized
        log_q = np.log(_softmax(student[row] / t))[ids[row]]
        kl = float(np.sum(p * (np.log(p) - log_q)))
        ce = -float(np.log(_softmax(student[row])[targets[row]]))
        expected += (1 - alpha) * t * t * kl + alpha * ce

    got = distill_loss(torch.tensor(student), torch.tensor(values), torch.tensor(ids), torch.tensor(targets), t, alpha)
    assert abs(float(got) - expected) < 1e-5 * max(1.0, abs(expected))


def test_full_vocabulary_top_k_is_torch_kl_div():
    import torch

    from convert.distill import distill_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(5, 11), torch.randn(5, 11)
    ids = torch.arange(11).expand(5, 11)
    got = distill_loss(student, teacher, ids, torch.zeros(5, dtype=torch.long), 1.0, 0.0)
    want = torch.nn.functional.kl_div(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1),
                                      log_target=True, reduction="sum")
    assert torch.allclose(got, want, atol=1e-5)


def stop_at(step):
    """A callback that sends a real SIGINT at the end of `step`: the Trainer's Ctrl+C path."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                os.kill(os.getpid(), signal.SIGINT)

    return StopAt()


@pytest.fixture(scope="module")
def student(smollm2_checkpoint, tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("student"), smollm2_checkpoint, layers=1, seed=1)


def test_interrupted_distill_resumes_from_its_checkpoint_and_teacher_cache(tiny_llama, student, tmp_path):
    import transformers

    from convert.distill import CACHE_DIR, DistillSettings, distill
    from convert.finetune import TrainingInterrupted

    data = write_json(tmp_path / "rows.json", seed_rows(24))
    out = tmp_path / "out"
    config = fast_config(student, data, out, max_steps=4, save_steps=2)
    settings = DistillSettings(teacher=str(tiny_llama), top_k=8, full=True)
    with pytest.raises(TrainingInterrupted):
        distill(config, settings, callbacks=[stop_at(2)], progress=False)
    blocks = sorted((out / CACHE_DIR).rglob("*.safetensors"))
    assert blocks and not (out / "config.json").exists()
    stamps = [b.stat().st_mtime_ns for b in blocks]

    from dataclasses import replace

    metrics = distill(replace(config, resume=True), settings, progress=False)
    # Saved at the end of the step Ctrl+C landed in (the signal comes at step 2's end).
    assert metrics["steps"] == 4 and metrics["resumed_from"].endswith(("checkpoint-2", "checkpoint-3"))
    assert metrics["teacher_examples_run"] == 0  # every example's teacher logits came from the cache
    assert [b.stat().st_mtime_ns for b in sorted((out / CACHE_DIR).rglob("*.safetensors"))] == stamps
    assert [p["step"] for p in metrics["train_loss"]] == [1, 2, 3, 4]
    model = transformers.AutoModelForCausalLM.from_pretrained(out)  # OUT is a checkpoint
    assert model.config.num_hidden_layers == 1
    assert json.loads((out / "distill.json").read_text())["settings"]["top_k"] == 8


def test_distillation_moves_the_student_toward_the_teacher(tiny_llama, student, tmp_path):
    """A LoRA student (merged into OUT) trained on the teacher's logits: its KL to the teacher drops."""
    import torch
    import transformers

    from convert.distill import DistillSettings, distill

    data = write_json(tmp_path / "rows.json", seed_rows(16))
    out = tmp_path / "out"
    config = fast_config(student, data, out, max_steps=8, learning_rate=3e-3, val_size=2)
    distill(config, DistillSettings(teacher=str(tiny_llama), top_k=16, temperature=1.0), progress=False)
    assert not list(out.glob("adapter_*"))  # merged
    ids = torch.tensor([list(range(100, 140))])

    def kl(path):
        with torch.no_grad():
            s = transformers.AutoModelForCausalLM.from_pretrained(path)(ids).logits.log_softmax(-1)
            t = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)(ids).logits.log_softmax(-1)
        return float((t.exp() * (t - s)).sum(-1).mean())

    assert kl(out) < kl(student)


def test_gguf_teacher_gives_the_hf_teachers_top_k_and_writes_samples(tiny_llama, tmp_path):
    from convert.distill_teacher import GGUFTeacher, HFTeacher, top_k_of
    from convert.export import export

    gguf = export(tiny_llama, tmp_path / "teacher.F32.gguf", "f32").path
    hf, ggml = HFTeacher(tiny_llama), GGUFTeacher(gguf, n_ctx=128)
    ids = list(range(200, 240))
    positions = np.arange(5, 40)
    hv, hi = top_k_of(hf.logits(ids, positions), 4)
    gv, gi = top_k_of(ggml.logits(ids, positions), 4)
    assert np.array_equal(hi[:, 0], gi[:, 0])
    assert np.abs(hv - gv).max() < 1e-2
    assert ggml.sample("Name a colour.", max_tokens=8, seed=1)  # teacher-samples text comes from the engine
    ggml.close()


def test_a_student_with_another_vocabulary_is_refused(tiny_llama, tiny_builds, tmp_path):
    from alpaca_chat.errors import UsageError
    from convert.distill import DistillSettings, distill

    other, _, _ = tiny_builds.get("llama3-bpe-tied")  # 400 tokens; the teacher has SmolLM2's 49152
    data = write_json(tmp_path / "rows.json", seed_rows(8))
    with pytest.raises(UsageError, match="vocabulary") as caught:
        distill(fast_config(other, data, tmp_path / "out"), DistillSettings(teacher=str(tiny_llama)), progress=False)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_another_vocabulary_with_exit_2(tiny_llama, tiny_builds, tmp_path, capsys):
    from convert.cli import main

    other, _, _ = tiny_builds.get("llama3-bpe-tied")
    data = write_json(tmp_path / "rows.json", seed_rows(8))
    capsys.readouterr()  # what building the case printed
    code = main(["distill", "--teacher", str(tiny_llama), "--student", str(other), "--data", str(data),
                 "-o", str(tmp_path / "out"), "--max-steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "vocabulary" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--alpha", "1.5"], "--alpha"),
    (["--temperature", "0"], "--temperature"),
    (["--top-k", "0"], "--top-k"),
    (["--gguf-teacher"], "vocabulary"),  # a GGUF teacher of 400 tokens against SmolLM2's 49152
])
def test_cli_bad_settings_and_a_gguf_teacher_of_another_vocabulary_exit_2(tiny_llama, tiny_builds, tmp_path, capsys,
                                                                           flags, message):
    from convert.cli import main

    teacher = str(tiny_llama)
    if flags == ["--gguf-teacher"]:
        teacher, flags = str(tiny_builds.get("llama3-bpe-tied")[2]), []
    data = write_json(tmp_path / "rows.json", seed_rows(8))
    capsys.readouterr()  # what building the case printed
    code = main(["distill", "--teacher", teacher, "--student", str(tiny_llama), "--data", str(data),
                 "-o", str(tmp_path / "out"), "--max-steps", "1", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["lfm2-conv-attention", "llama3-bpe-tied"])
def test_the_distill_loss_of_a_packed_batch_is_each_examples_own(name, tiny_builds):
    """A packed row's distillation loss is the per-example loss: a model whose layers carry a state
    across tokens (LFM2's convolutions) goes through one example per padded row, others in chunks."""
    import torch

    from convert import data, distill, model_loading
    from convert.packing import PackedCollator

    checkpoint, _, _ = tiny_builds.get(name)
    model = model_loading.load_model(checkpoint, "cpu").eval()
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(0)
    examples = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in (9, 4, 14)]
    batch = PackedCollator()([data.Example(tuple(e), tuple(e)) for e in examples])
    trained = int(batch["shift_labels"].ne(data.IGNORE_INDEX).sum())
    values = torch.randn((trained, 4), generator=generator)
    ids = torch.randint(0, vocab, (trained, 4), generator=generator)
    trainer = distill.make_trainer_class().__new__(distill.make_trainer_class())
    trainer.chunk_tokens, trainer.temperature, trainer.alpha = 16, 2.0, 0.3
    with torch.no_grad():
        loss = trainer.compute_loss(model, {**batch, "teacher_values": values, "teacher_ids": ids})
        total, offset = torch.zeros(()), 0
        for example in examples:
            logits = model(input_ids=torch.tensor([example]), use_cache=False).logits[0, :-1]
            n = len(example) - 1
            total = total + distill.distill_loss(logits, values[offset:offset + n], ids[offset:offset + n],
                                                 torch.tensor(example[1:]), 2.0, 0.3)
            offset += n
    assert loss.item() == pytest.approx((total / offset).item(), rel=1e-5)
