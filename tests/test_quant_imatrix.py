"""Quantizing with an importance matrix: IQ types, --quant auto, --keep-tensor, the cache.

The bundled model's F16 is its Q4_1 dequantized by llama.cpp's own quantizer (requantizing to
F16); its importance matrix is made here on two short chunks of the built-in calibration text (a
real `--imatrix auto` runs the whole text; these tests are about the plumbing, the benchmark about
the quality). --quant auto, --keep-tensor and the cache run on a tiny random Llama whose matrices
are 256 columns wide (so that K-quants apply, as on real models), in a fraction of the time.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from convert_helpers import gguf_fields, gguf_tensors


@pytest.fixture(scope="module")
def bundled_f16(default_model_path, tmp_path_factory):
    from convert.quantize import quantize

    out = tmp_path_factory.mktemp("bundled") / "smollm2.F16.gguf"
    return quantize(default_model_path, out, "F16", allow_requantize=True).path


@pytest.fixture(scope="module")
def tiny_f16(tmp_path_factory):
    """A random 2-layer Llama, hidden size 256, exported to F16, with its importance matrix."""
    from convert import imatrix
    from convert.export import export
    from convert_helpers import TinyCase, build_tiny_model, training_text

    case = TinyCase("quant-llama-256", "LlamaForCausalLM", "gpt-2", {"hidden_size": 256, "intermediate_size": 512})
    root = tmp_path_factory.mktemp("tiny-256")
    f16 = export(build_tiny_model(root / "tiny-256", case), root / "tiny.F16.gguf", "f16").path
    matrix = root / "tiny.imatrix.gguf"
    imatrix.compute_file(f16, matrix, training_text(), ctx=128, chunks=3, resumable=False)
    return f16, matrix


@pytest.fixture(scope="module")
def bundled_imatrix(bundled_f16):
    from convert import imatrix

    path = bundled_f16.with_name("smollm2.imatrix.gguf")
    imatrix.compute_file(bundled_f16, path, ctx=128, chunks=2, resumable=False)
    return path


def test_calibration_and_evaluation_texts_share_no_sentence():
    from convert.evaluate import sample_text
    from convert.imatrix import calibration_text

    def sentences(text):
        parts = re.split(r"(?<=[.!?:;])\s+|\n", text)
        return {" ".join(p.split()).lower() for p in parts if len(p.split()) >= 6}

    def shingles(text, n=8):
        words = re.findall(r"\w+", text.lower())
        return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}

    calibration, evaluation = calibration_text(), sample_text()
    assert len(calibration) > 5 * len(evaluation)
    assert not sentences(calibration) & sentences(evaluation)
    assert not shingles(calibration) & shingles(evaluation), "no run of 8 words in common"


def test_iq2_xxs_of_the_bundled_model_is_made_and_chats(bundled_f16, bundled_imatrix, tmp_path):
    from convert.quantize import quantize

    out = quantize(bundled_f16, tmp_path / "smollm2.IQ2_XXS.gguf", "IQ2_XXS", imatrix=bundled_imatrix).path
    kinds = {kind for kind, _, _ in gguf_tensors(out).values()}
    assert "IQ2_XXS" in kinds  # ffn_down (1536 columns); 576-column matrices fall back to IQ4_NL
    assert gguf_fields(out)["quantize.imatrix.file"] == bundled_imatrix.name
    assert out.stat().st_size < 0.35 * bundled_f16.stat().st_size

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-m", "alpaca_chat", "--model", str(out), "--prompt", "Name three colours.",
         "--max-tokens", "24", "--temp", "0", "--no-history"],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 3, "it answers"


def test_quant_auto_picks_the_smallest_type_within_the_budget(tiny_f16, tmp_path):
    """The test measures the ladder itself, then sets a budget between two measured KLs."""
    from convert import quant_auto
    from convert.evaluate import compare
    from convert.quantize import quantize

    f16, matrix = tiny_f16

    ladder = ["Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K"]
    measured = {}
    for qtype in ladder:
        path = quantize(f16, tmp_path / f"m.{qtype}.gguf", qtype, imatrix=matrix).path
        measured[qtype] = compare(path, f16, ctx=128, max_chunks=2).kl_divergence
        path.unlink()
    assert measured["Q6_K"] < measured["Q4_K_M"] < measured["Q3_K_M"] < measured["Q2_K"], measured
    budget = (measured["Q4_K_M"] * measured["Q3_K_M"]) ** 0.5  # Q4_K_M is within, Q3_K_M and Q2_K are not

    out = tmp_path / "out"
    out.mkdir()
    seen = []
    choice = quant_auto.choose(f16, out / "m.{quant}.gguf", max_kl=budget, imatrix=matrix,
                               ladder=ladder, ctx=128, max_chunks=2, on_step=seen.append)
    assert choice.quant_type == "Q4_K_M" and choice.within_budget
    assert [s.quant_type for s in seen] == ladder, "walked down until two types in a row were over budget"
    assert {s.quant_type: s.kl for s in seen} == pytest.approx(measured, rel=1e-9)
    assert sorted(p.name for p in out.iterdir()) == ["m.Q4_K_M.gguf"], "only the choice is left"
    assert gguf_fields(choice.path)["general.quant_type"] == "Q4_K_M"
    table = choice.table()
    assert all(t in table for t in ladder) and "<- chosen" in table and "Q4_K_M is the smallest file" in table

    tight = quant_auto.choose(f16, out / "t.{quant}.gguf", max_kl=measured["Q6_K"] / 10,
                              imatrix=matrix, ladder=ladder[:2], ctx=128, max_chunks=2)
    assert tight.quant_type == "Q6_K" and not tight.within_budget and "raise --max-kl" in tight.reason()


def test_keep_tensor_overrides_the_type_of_matching_tensors(tiny_f16, tmp_path):
    from alpaca_chat.errors import UsageError
    from convert.quantize import quantize

    f16 = tiny_f16[0]

    out = quantize(f16, tmp_path / "k.gguf", "Q4_K_M", keep_tensors=[r"attn_v\.weight=Q8_0"]).path
    tensors = gguf_tensors(out)
    attn_v = {kind for name, (kind, _, _) in tensors.items() if name.endswith("attn_v.weight")}
    assert attn_v == {"Q8_0"}
    assert {kind for name, (kind, _, _) in tensors.items() if name.endswith("attn_q.weight")} != {"Q8_0"}
    for bad, message in [("attn_v", "PATTERN=TYPE"), ("attn_v=Q9_9", "unknown tensor type"),
                         ("no_such_tensor=Q8_0", "matches no tensor"), ("(=Q8_0", "not a regular expression")]:
        with pytest.raises(UsageError, match=message):
            quantize(f16, tmp_path / "bad.gguf", "Q4_K_M", keep_tensors=[bad])
    assert not (tmp_path / "bad.gguf").exists()


def test_imatrix_auto_is_computed_once_and_cached(tiny_f16, tmp_path, monkeypatch):
    from convert import imatrix
    from convert.quantize import quantize

    f16 = tiny_f16[0]

    calls = []
    real = imatrix.compute

    def two_chunks(model, *args, **kwargs):
        calls.append(model)
        return real(model, *args, **{**kwargs, "ctx": 128, "chunks": 2})  # the tiny model's context is 256

    monkeypatch.setattr(imatrix, "compute", two_chunks)
    first = quantize(f16, tmp_path / "a.gguf", "IQ3_XXS", imatrix="auto").path
    second = quantize(f16, tmp_path / "b.gguf", "Q4_K_M", imatrix="auto").path
    assert len(calls) == 1, "the second run reuses the cached matrix"
    cached = list(imatrix.cache_dir().glob("*.imatrix.gguf"))
    assert len(cached) == 1 and cached[0].name.startswith(imatrix.file_sha256(f16)[:32])
    assert gguf_fields(first)["quantize.imatrix.file"] == gguf_fields(second)["quantize.imatrix.file"] == cached[0].name


def test_evaluation_refuses_the_calibration_text(tiny_f16, tmp_path):
    from convert.evaluate import EvaluationError, compare
    from convert.imatrix import calibration_text
    from convert.quantize import quantize

    f16 = tiny_f16[0]
    calibrated = f16.with_name("calibrated.imatrix.gguf")  # on the built-in calibration text
    if not calibrated.exists():
        from convert import imatrix

        imatrix.compute_file(f16, calibrated, ctx=128, chunks=1, resumable=False)
    out = quantize(f16, tmp_path / "q.gguf", "Q4_K_M", imatrix=calibrated).path
    with pytest.raises(EvaluationError, match="computed on"):
        compare(out, f16, calibration_text(), ctx=128, max_chunks=1, text_name="calibration.txt")
    report = compare(out, f16, ctx=128, max_chunks=1)
    assert report.imatrix == calibrated.name
    assert f"over {report.n_tokens} tokens of the built-in evaluation text" in report.summary()


# -- the command line ------------------------------------------------------------------------------


@pytest.fixture
def shared_cache(tmp_path_factory, monkeypatch):
    """One imatrix cache for the command-line tests: --imatrix auto computes the tiny model's matrix once
    (on 4 chunks)."""
    from convert import imatrix

    root = tmp_path_factory.getbasetemp() / "shared-imatrix-cache"
    monkeypatch.setattr(imatrix, "cache_dir", lambda: root)
    real = imatrix.compute  # the first 4 chunks of the built-in text are enough here

    def first_chunks(model, *args, **kwargs):
        return real(model, *args, **{**kwargs, "chunks": kwargs.get("chunks") or 4})

    monkeypatch.setattr(imatrix, "compute", first_chunks)
    return root


def _cli(capsys, *argv):
    from convert.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_imatrix_command_and_quantize_with_auto_and_keep_tensor(tiny_f16, tmp_path, capsys, shared_cache):
    from convert.imatrix_file import read_imatrix
    from convert_helpers import training_text

    f16 = tiny_f16[0]
    text = tmp_path / "calibration.txt"
    text.write_text(training_text(), encoding="utf-8")
    out = tmp_path / "m.imatrix.gguf"
    code, printed, err = _cli(capsys, "imatrix", f16, "-o", out, "--text", text, "--ctx", "64", "--chunks", "2")
    assert code == 0, err
    assert f"wrote {out}: 15 weight matrices, 2 chunks of 64 tokens of calibration.txt" in printed
    assert read_imatrix(out).datasets == ["calibration.txt"]

    code, printed, err = _cli(capsys, "quantize", f16, "--type", "IQ3_XXS", "--imatrix", "auto",
                              "--keep-tensor", "attn_v=Q8_0", "-o", tmp_path / "q.gguf")
    assert code == 0, err
    assert "computing the importance matrix" in err and "quality of q.gguf" in printed
    assert "tokens of the built-in evaluation text" in printed
    tensors = gguf_tensors(tmp_path / "q.gguf")
    assert tensors["blk.0.attn_v.weight"][0] == "Q8_0" and tensors["blk.0.attn_q.weight"][0] != "Q8_0"
    assert "IQ3_XXS" in {kind for kind, _, _ in tensors.values()}
    code, _, err = _cli(capsys, "quantize", f16, "--type", "Q4_K_M", "--imatrix", "auto", "-o", tmp_path / "r.gguf",
                        "--no-eval")
    assert code == 0 and "(cached)" in err


def test_convert_quant_auto_prints_the_ladder_and_keeps_one_file(tiny_f16, tmp_path, capsys, shared_cache):
    checkpoint = tiny_f16[0].parent / "tiny-256"
    out = tmp_path / "out"
    out.mkdir()
    code, printed, err = _cli(capsys, checkpoint, "--quant", "auto", "--max-kl", "0.5", "-o", out / "m.{quant}.gguf")
    assert code == 0, err
    written = list(out.iterdir())
    assert len(written) == 1, "only the chosen file; no F16, no temp files"
    chosen = written[0].name.split(".")[1]
    assert f"{chosen} is the smallest file" in printed and "<- chosen" in printed
    rows = [line.split() for line in printed.splitlines() if line.split() and line.split()[0] in ("Q8_0", "Q6_K")]
    assert rows, printed
    code, _, err = _cli(capsys, checkpoint, "--quant", "auto", "Q8_0", "-o", out / "x.gguf")
    assert code == 2 and "cannot be combined" in err


def test_eval_ladder_with_imatrix_auto_measures_both_curves(tiny_f16, tmp_path, capsys, shared_cache):
    f16 = tiny_f16[0]
    plot = tmp_path / "ladder.png"
    code, printed, err = _cli(capsys, "eval", f16, "--ladder", "Q4_K_M,IQ2_XXS", "--imatrix", "auto",
                              "--ctx", "128", "--chunks", "1", "--plot", plot)
    assert code == 0, err
    rows = [line.split() for line in printed.splitlines() if line.split()[:1] in (["Q4_K_M"], ["IQ2_XXS"])]
    assert sorted((r[0], r[1]) for r in rows) == [("IQ2_XXS", "yes"), ("Q4_K_M", "no"), ("Q4_K_M", "yes")]
    assert "tokens of the built-in evaluation text" in printed
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
