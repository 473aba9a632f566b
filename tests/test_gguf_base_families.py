"""Fine-tuning from a GGUF of the 2026 families (`--base FILE.gguf`): the dequantized checkpoint
exports back to the same model (llama.cpp's logits equal), or, where transformers' GGUF reader cannot
read the file (granitehybrid, olmo2, glm4moe, ernie4_5 today; Gemma 4's per-layer FFN widths), the
command stops in one line with nothing written. Each case is held to whichever transformers does, so a
family it learns to read is then held to the round trip.
"""

import json

import numpy as np
import pytest

from convert import cli, gguf_base
from convert_helpers import TINY_CASES, gguf_last_logits, random_sequences
from finetune_helpers import seed_rows, write_json

pytestmark = pytest.mark.slow

NEW_FAMILIES = {
    "Lfm2ForCausalLM", "Lfm2MoeForCausalLM", "Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM",
    "Qwen3NextForCausalLM", "Gemma4ForCausalLM", "GraniteMoeHybridForCausalLM", "Olmo3ForCausalLM",
    "Glm4MoeForCausalLM", "Ernie4_5ForCausalLM", "Ernie4_5_MoeForCausalLM",
}
NAMES = sorted(case.name for case in TINY_CASES if case.architecture in NEW_FAMILIES)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_base.CACHE_ENV, str(tmp_path / "cache"))


@pytest.mark.parametrize("name", NAMES)
def test_a_gguf_base_round_trips_or_stops_in_one_line(name, tiny_builds, tmp_path, capsys):
    checkpoint, f32, _ = tiny_builds.get(name)
    try:
        back = gguf_base.checkpoint_from_gguf(str(f32))
    except Exception as exc:  # noqa: BLE001 - asserted below: the one-line refusal
        refusal = exc
    else:
        refusal = None
    if refusal is None:
        out = cli.main(["export", str(back), "-o", str(tmp_path / "again.gguf"), "--outtype", "f32"])
        assert out == 0, capsys.readouterr().err
        sequences = random_sequences(json.loads((checkpoint / "config.json").read_text())["vocab_size"])
        for want, got in zip(gguf_last_logits(f32, sequences), gguf_last_logits(tmp_path / "again.gguf", sequences)):
            assert np.abs(want - got).max() < 1e-5, f"{name}: the dequantized base is another model"
        return
    # Refused: through the CLI, one line, exit 1, nothing written.
    assert "transformers cannot dequantize" in str(refusal), refusal
    rows = write_json(tmp_path / "rows.json", seed_rows(8))
    code = cli.main(["finetune", "--base", str(f32), "--data", str(rows), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "transformers cannot dequantize" in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "run").exists()
