"""--quant auto in the pipeline: the choice is in the summary, in compare's label, and a rerun skips it."""

import pytest

from finetune_helpers import fast_config, seed_rows, write_json

pytest.importorskip("peft", reason="needs the convert extra")

from convert import compare  # noqa: E402
from convert.pipeline import PipelineOptions, run_pipeline  # noqa: E402


def test_pipeline_quant_auto_shows_its_choice(tiny_llama, tmp_path, monkeypatch):
    from convert import imatrix

    real = imatrix.compute
    monkeypatch.setattr(imatrix, "compute", lambda model, *a, **k: real(model, *a, **{**k, "ctx": 64, "chunks": 2}))
    rows = write_json(tmp_path / "rows.json", seed_rows(16))
    out = tmp_path / "run"
    # A budget nothing meets: two types are tried (Q8_0, Q6_K), the closest is kept and the summary says so.
    options = PipelineOptions(finetune=fast_config(tiny_llama, rows, out), quants=("AUTO",), max_kl=1e-9,
                              evaluate=False)
    summary = run_pipeline(options)
    auto = summary.step("quantize AUTO").info
    chosen = auto["chosen"]
    assert options.quantized("AUTO").is_file() and chosen in " ".join(auto["ladder"])
    text = summary.format()
    assert f"--quant auto chose {chosen}" in text and "<- chosen" in text and "raise --max-kl" in text
    assert chosen in ("Q8_0", "Q6_K") and len(auto["ladder"]) == 2 + 3  # header, two types, source, reason
    labels = [m.label for m in compare.models_from(pipeline=out)]
    assert f"auto={chosen}" in labels

    again = run_pipeline(options)
    assert all(step.skipped for step in again.steps), "a rerun redoes nothing"
    assert f"--quant auto chose {chosen}" in again.format()
