"""Fine-tuning from a GGUF: the bundled model by registry name and by path, the cached
dequantized checkpoint, its provenance in the manifest and the exported GGUF; and --precision."""

import json
import os
import subprocess
import sys

import pytest

from convert import cli, gguf_base, precision
from convert_helpers import gguf_fields
from finetune_helpers import fast_config, seed_rows, write_json

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def convert_cache(tmp_path_factory):
    """One dequantized-base cache for the whole session (each test has its own ALPACA_CHAT_HOME)."""
    return tmp_path_factory.mktemp("gguf-bases")


@pytest.fixture(autouse=True)
def _shared_cache(convert_cache, monkeypatch):
    monkeypatch.setenv(gguf_base.CACHE_ENV, str(convert_cache))


PIPELINE_FLAGS = ["--max-steps", "1", "--batch-size", "2", "--grad-accum", "1", "--max-length", "64",
                  "--val-size", "2", "--quant", "Q8_0", "--no-eval"]


def _pipeline(base, out, capsys):
    code = cli.main(["pipeline", "--base", base, "--data", "alpaca-seed", "--out", str(out), *PIPELINE_FLAGS])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured


def _chat(gguf):
    done = subprocess.run(
        [sys.executable, "-m", "alpaca_chat", "--model", str(gguf), "--prompt", "Name a color.", "--json",
         "--max-tokens", "8", "--temp", "0"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_pipeline_from_the_bundled_gguf_by_name(tmp_path, capsys, default_model_path):
    out = tmp_path / "run"
    _pipeline("smollm2-135m", out, capsys)
    meta = json.loads((out / "adapter" / "training.json").read_text())
    base = meta["base_gguf"]
    assert base["gguf"] == default_model_path.name and base["quant"] == "Q4_1"
    manifest = json.loads((out / "manifests" / "finetune.json").read_text())
    assert manifest["info"]["base_gguf"]["sha256_head_tail"] == base["sha256_head_tail"]
    assert meta["precision"] in ("bf16", "fp32")
    gguf = next((out / "gguf").glob("*.Q8_0.gguf"))
    fields = gguf_fields(gguf)
    assert fields["general.source.base_gguf"].startswith(default_model_path.name)
    assert base["sha256_head_tail"] in fields["general.source.base_gguf"]
    answer = _chat(gguf)
    assert answer["template"] == "alpaca"  # trained on Alpaca rows: the template travels with the model
    assert answer["stats"]["generated_tokens"] >= 1 or answer["text"] == ""


def test_the_same_file_by_path_reuses_the_cached_checkpoint(tmp_path, capsys, default_model_path, monkeypatch):
    by_name = gguf_base.checkpoint_from_gguf("smollm2-135m")

    def no_second_dequantize(*args, **kwargs):
        raise AssertionError("dequantized again")

    monkeypatch.setattr(gguf_base, "_dequantize", no_second_dequantize)
    assert gguf_base.checkpoint_from_gguf(str(default_model_path)) == by_name
    out = tmp_path / "run"
    _pipeline(str(default_model_path), out, capsys)
    _chat(next((out / "gguf").glob("*.Q8_0.gguf")))


def test_a_gguf_no_reader_reads_is_one_line(tmp_path, capsys):
    """An attention-only Granite 4 with experts is llama.cpp's granitemoe: neither transformers' GGUF
    reader nor ours (convert/gguf_read_back.py) reads that architecture back."""
    from convert.export import export
    from convert_helpers import build_tiny_model
    from test_convert_granite_hybrid import ATTENTION_ONLY

    case = ATTENTION_ONLY["granitemoe"]
    f16 = export(build_tiny_model(tmp_path / case.name, case), tmp_path / "granitemoe.gguf", "f16").path
    rows = write_json(tmp_path / "rows.json", seed_rows(8))
    code = cli.main(["finetune", "--base", str(f16), "--data", str(rows), "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "transformers cannot dequantize" in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "a").exists()


def test_a_corrupt_gguf_base_is_one_line(tmp_path, capsys):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    rows = write_json(tmp_path / "rows.json", seed_rows(8))
    code = cli.main(["finetune", "--base", str(bad), "--data", str(rows), "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "broken.gguf" in err[-1] and len(err) <= 2
    assert not list(gguf_base.cache_dir().glob("broken*"))


def test_a_held_out_file_without_output_is_one_line(tmp_path, capsys, default_model_path):
    bad = tmp_path / "heldout.jsonl"
    bad.write_text('{"instruction": "Say hi", "output": "hi"}\n{"instruction": "No answer here"}\n')
    code = cli.main(["compare", "--gguf", str(default_model_path), "--prompts", str(bad)])
    assert code == 1 and "line 2: missing 'output'" in capsys.readouterr().err


# -- precision ---------------------------------------------------------------------------------


def test_auto_precision_follows_the_cpu_flags():
    assert precision.resolve_precision("auto", "cpu", flags={"avx2", "avx512_bf16"}) == "bf16"
    assert precision.resolve_precision("auto", "cpu", flags={"amx_bf16"}) == "bf16"
    assert precision.resolve_precision("auto", "cpu", flags={"avx2", "fma"}) == "fp32"
    assert precision.resolve_precision("fp32", "cpu", flags={"avx512_bf16"}) == "fp32"
    assert precision.resolve_precision("auto", "cuda", cuda_bf16=True) == "bf16"
    here = precision.cpu_flags()
    assert precision.resolve_precision("auto", "cpu") == ("bf16" if {"avx512_bf16", "amx_bf16"} & here else "fp32")


def test_bf16_on_a_cpu_without_it_is_a_usage_error(tiny_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda *a: {"avx2"})
    rows = write_json(tmp_path / "rows.json", seed_rows(8))
    code = cli.main(["finetune", "--base", str(tiny_llama), "--data", str(rows), "--out", str(tmp_path / "a"),
                     "--precision", "bf16", "--device", "cpu"])
    assert code == 2 and "no bf16 instructions" in capsys.readouterr().err
    assert cli.main(["finetune", "--base", str(tiny_llama), "--data", str(rows), "--out", str(tmp_path / "b"),
                     "--precision", "fp16", "--device", "cpu"]) == 2


@pytest.mark.skipif(not precision.cpu_has_bf16(), reason="bf16 training needs a CPU with AVX512-BF16 or AMX")
def test_bf16_loss_stays_within_2_percent_of_fp32(tiny_llama, tmp_path):
    from convert.finetune import finetune

    rows = write_json(tmp_path / "rows.json", seed_rows(48))
    losses = {}
    for kind in ("fp32", "bf16"):
        config = fast_config(tiny_llama, rows, tmp_path / kind, max_steps=20, precision=kind, max_length=64,
                             batch_size=2, val_size=4, eval_steps=20, save_steps=100)
        result = finetune(config, progress=False)
        assert json.loads((tmp_path / kind / "training.json").read_text())["precision"] == kind
        losses[kind] = result.metrics["train_loss"][-1]["loss"]
    assert abs(losses["bf16"] - losses["fp32"]) <= 0.02 * losses["fp32"]


@pytest.mark.parametrize("name", ["llama-spm-gqa", "phi3-spm-fused", "gemma3-text-swa", "llama3-bpe-tied"])
def test_a_gguf_base_exports_and_tokenizes_like_the_gguf_it_came_from(tiny_builds, tmp_path, name):
    """What the GGUF base is dequantized into (safetensors and tokenizer.json, as transformers 5
    saves it) is all export needs for each kind of tokenizer: SentencePiece with and without a
    dummy prefix, and byte-level BPE. The export tokenizes the mixed text as the original does."""
    import transformers

    from convert.evaluate import LogitsModel
    from convert.export import export
    from convert_helpers import MIXED_TEXT

    _, _, original = tiny_builds.get(name)
    checkpoint = gguf_base.checkpoint_from_gguf(str(original))
    assert not (checkpoint / "tokenizer.model").exists()
    again = export(checkpoint, tmp_path / "again.gguf", "f16").path
    vocab = transformers.AutoTokenizer.from_pretrained(checkpoint).get_vocab()
    text = MIXED_TEXT
    for marker in ("<|im_start|>", "<|im_end|>"):  # a family without ChatML markers: leave them out
        if marker not in vocab:
            text = text.replace(marker, "")
    with LogitsModel(original, n_ctx=256) as model:
        expected = model.tokenize(text, add_special=True, parse_special=True)
    with LogitsModel(again, n_ctx=256) as model:
        assert model.tokenize(text, add_special=True, parse_special=True) == expected
    kinds = (gguf_fields(original)["tokenizer.ggml.model"], gguf_fields(again)["tokenizer.ggml.model"])
    # Gemma's SentencePiece comes back as llama.cpp's SentencePiece-style BPE, as its converter writes it.
    assert kinds == (("llama", "gpt2") if name.startswith("gemma") else (kinds[0], kinds[0]))
