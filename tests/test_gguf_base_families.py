"""Fine-tuning from a GGUF of the 2026 families (`--base FILE.gguf`): the dequantized checkpoint
exports back to the same model (llama.cpp's logits equal), or the command stops in one line with
nothing written. The families transformers' GGUF reader cannot read and our exporter reads back
(convert/gguf_read_back.py) must round trip: every tensor byte-identical at F32 and the same
tokenization. The others are held to whichever transformers does, so a family it learns to read is
then held to the round trip.
"""

import json

import numpy as np
import pytest

from convert import cli, gguf_base
from convert_helpers import MIXED_TEXT, TINY_CASES, gguf_last_logits, gguf_tensors, random_sequences, same_bytes
from finetune_helpers import seed_rows, write_json

pytestmark = pytest.mark.slow

NEW_FAMILIES = {
    "Lfm2ForCausalLM", "Lfm2MoeForCausalLM", "Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM",
    "Qwen3NextForCausalLM", "Gemma4ForCausalLM", "GraniteMoeHybridForCausalLM", "Olmo3ForCausalLM",
    "Glm4MoeForCausalLM", "Ernie4_5ForCausalLM", "Ernie4_5_MoeForCausalLM",
}
# Read back by running our exporter backwards: never refused.
READ_BACK = {"GraniteMoeHybridForCausalLM", "Olmo3ForCausalLM", "Glm4MoeForCausalLM", "Lfm2MoeForCausalLM",
             "Ernie4_5ForCausalLM", "Ernie4_5_MoeForCausalLM", "Gemma4ForCausalLM",
             "Qwen3NextForCausalLM"}
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
    read_back = CASES_BY_NAME[name].architecture in READ_BACK
    assert refusal is None or not read_back, refusal
    if refusal is None:
        again = tmp_path / "again.gguf"
        out = cli.main(["export", str(back), "-o", str(again), "--outtype", "f32"])
        assert out == 0, capsys.readouterr().err
        sequences = random_sequences(json.loads((checkpoint / "config.json").read_text())["vocab_size"])
        for want, got in zip(gguf_last_logits(f32, sequences), gguf_last_logits(again, sequences)):
            assert np.abs(want - got).max() < 1e-5, f"{name}: the dequantized base is another model"
        if read_back:
            _assert_same_tensors_and_tokens(f32, again, back)
        return
    # Refused: through the CLI, one line, exit 1, nothing written.
    assert "transformers cannot dequantize" in str(refusal), refusal
    rows = write_json(tmp_path / "rows.json", seed_rows(8))
    code = cli.main(["finetune", "--base", str(f32), "--data", str(rows), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "transformers cannot dequantize" in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "run").exists()


CASES_BY_NAME = {case.name: case for case in TINY_CASES}


def _assert_same_tensors_and_tokens(original, again, checkpoint):
    """Every tensor byte-identical, and the text tokenized alike by llama.cpp on both files and by
    transformers on the checkpoint read back (what a fine-tune from it trains on)."""
    import transformers

    from convert.evaluate import LogitsModel

    want, got = gguf_tensors(original), gguf_tensors(again)
    assert sorted(want) == sorted(got)
    for tensor, (kind, shape, data) in want.items():
        assert got[tensor][:2] == (kind, shape) and same_bytes(got[tensor][2], data), f"{tensor} differs"
    tokens = []
    for gguf in (original, again):
        with LogitsModel(gguf, n_ctx=256) as model:
            tokens.append(model.tokenize(MIXED_TEXT, add_special=True, parse_special=True))
    assert tokens[0] == tokens[1]
    assert transformers.AutoTokenizer.from_pretrained(checkpoint).encode(MIXED_TEXT) == tokens[0]

