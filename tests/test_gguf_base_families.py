"""Fine-tuning from a GGUF of any supported family (`--base FILE.gguf`): the checkpoint it becomes
exports back to the same model. transformers' GGUF reader reads some families; the others are read
back by running our exporter backwards (convert/gguf_read_back.py) and are held to more: every tensor
byte-identical at F32, and the text tokenized alike by llama.cpp on both files and by transformers on
the checkpoint (what a fine-tune trains on).
"""

import json

import numpy as np
import pytest

from convert import cli, gguf_base, gguf_read_back
from convert_helpers import MIXED_TEXT, TINY_CASES, assert_same_tensors, gguf_last_logits, gguf_tensors, random_sequences
from finetune_helpers import seed_rows, write_json

pytestmark = pytest.mark.slow

# Read by transformers' GGUF reader; every other case is read back by our exporter (transformers'
# reader cannot read the architecture, or reads it as another model: Llama 3's and linear rope
# scaling, Gemma's soft-capping and windows, Phi-3's LongRoPE, Qwen3's head_dim, Gemma 4's per-kind sizes).
THROUGH_TRANSFORMERS = {"lfm2-conv-attention", "qwen35-hybrid-tied", "qwen35moe-hybrid", "qwen35-image-text-tower",
                        "qwen2-spm"}
NAMES = sorted(case.name for case in TINY_CASES)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_base.CACHE_ENV, str(tmp_path / "cache"))


@pytest.mark.parametrize("name", NAMES)
def test_a_gguf_base_of_every_family_exports_back_to_the_same_model(name, tiny_builds, tmp_path, capsys):
    checkpoint, f32, _ = tiny_builds.get(name)
    read_back = name not in THROUGH_TRANSFORMERS
    assert gguf_read_back.can_read_back(f32) == read_back
    back = gguf_base.checkpoint_from_gguf(str(f32))
    again = tmp_path / "again.gguf"
    out = cli.main(["export", str(back), "-o", str(again), "--outtype", "f32"])
    assert out == 0, capsys.readouterr().err
    sequences = random_sequences(gguf_tensors(f32)["token_embd.weight"][1][1])
    for want, got in zip(gguf_last_logits(f32, sequences), gguf_last_logits(again, sequences)):
        assert np.abs(want - got).max() < 1e-5, f"{name}: the dequantized base is another model"
    if read_back:
        _assert_same_tensors_and_tokens(f32, again, back)


CASES_BY_NAME = {case.name: case for case in TINY_CASES}


def _assert_same_tensors_and_tokens(original, again, checkpoint):
    """Every tensor byte-identical, and the text tokenized alike by llama.cpp on both files and by
    transformers on the checkpoint read back (what a fine-tune from it trains on)."""
    import transformers

    from convert.evaluate import LogitsModel

    assert_same_tensors(again, original)
    tokens = []
    for gguf in (original, again):
        with LogitsModel(gguf, n_ctx=256) as model:
            tokens.append(model.tokenize(MIXED_TEXT, add_special=True, parse_special=True))
    assert tokens[0] == tokens[1]
    assert transformers.AutoTokenizer.from_pretrained(checkpoint).encode(MIXED_TEXT) == tokens[0]



@pytest.mark.parametrize(("name", "key", "value"), [
    ("olmo3-swa-yarn", "olmo2.feed_forward_length", 96),  # the FFN tensors are 128 wide
    ("granite-hybrid-moe", "granitehybrid.ssm.inner_size", 64),  # the Mamba tensors are 128 wide
    ("gemma4-text-ple-kv-shared", "gemma4.feed_forward_length", [128, 256, 256, 256]),  # not Gemma 4's pattern
])
def test_a_gguf_whose_settings_disagree_with_its_tensors_stops_in_one_line(
    name, key, value, tiny_builds, tmp_path, capsys
):
    """Read back, a file's settings must account for every tensor exactly: otherwise one line, exit 1,
    and neither a run directory nor a cached checkpoint left behind."""
    _, f32, _ = tiny_builds.get(name)
    bad = _with_key(f32, tmp_path / "bad.gguf", key, value)
    rows = write_json(tmp_path / "rows.json", seed_rows(8))
    code = cli.main(["finetune", "--base", str(bad), "--data", str(rows), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (1, 2) and err and err[-1].startswith("alpaca-convert: ") and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "run").exists()
    assert not [p for p in gguf_base.cache_dir().glob("*") if p.is_dir()]


def _with_key(source, target, key, value, value_type=None):
    """A copy of a GGUF with one metadata value changed (to another type with `value_type`)."""
    import gguf

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(str(target), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        if field.name == key:
            writer.add_key_value(key, value, value_type or field.types[0], None if value_type else sub_type)
        else:
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


@pytest.mark.parametrize("name", ["granite-hybrid-moe", "ernie4_5-spm"])
def test_the_recipe_from_a_read_back_gguf_base_runs_to_a_chat(name, tiny_builds, tmp_path):
    """`pipeline --base FILE.gguf` for a family transformers cannot read (a hybrid with experts; a
    SentencePiece tokenizer): fine-tune, merge, export, Q4_K_M, and a chat with the result."""
    import subprocess
    import sys

    from convert.finetune_config import FinetuneConfig
    from convert.pipeline import PipelineOptions, run_pipeline

    _, f32, _ = tiny_builds.get(name)
    config = FinetuneConfig(
        base=str(f32), data=str(write_json(tmp_path / "rows.json", seed_rows(12))), out=tmp_path / "run",
        max_steps=2, batch_size=4, grad_accum=1, max_length=256, val_size=2, learning_rate=1e-3, save_steps=2,
        eval_steps=2,
    )
    summary = run_pipeline(PipelineOptions(config, quants=("Q4_K_M",), evaluate=False))
    assert [s.name for s in summary.steps] == ["finetune", "merge", "export", "quantize Q4_K_M"]
    exported = gguf_tensors(summary.options.exported)
    assert sorted(exported) == sorted(gguf_tensors(f32))  # the same model's tensors, fine-tuned
    result = subprocess.run(
        [sys.executable, "-m", "alpaca_chat", "--model", str(summary.options.quantized("Q4_K_M")), "--prompt",
         "Give three tips for staying healthy.", "--json", "--temp", "0", "--max-tokens", "8", "--no-history"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["stats"]["generated_tokens"] >= 1


@pytest.mark.parametrize(("name", "change", "named"), [
    ("llama3-bpe-tied", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}, "rope_freqs.weight"),
    ("gemma2-softcap-swa", {"attn_logit_softcapping": 50.0}, "gemma2.attn_logit_softcapping"),
    ("olmo3-swa-yarn", {"layer_types": ["full_attention"] * 4}, "olmo2.attention.sliding_window_pattern"),
])
def test_a_checkpoint_that_is_another_model_than_its_gguf_is_refused(name, change, named, tiny_builds, tmp_path):
    """What transformers' GGUF reader used to do to such files (drop Llama 3's rope scaling, take
    Gemma 2's soft-capping from its defaults, lose a window pattern): the check before a GGUF base is
    used names what would change."""
    from alpaca_chat.errors import TrainingError
    from convert import gguf_base_check
    from convert_helpers import copy_checkpoint, edit_config

    _, f32, _ = tiny_builds.get(name)
    back = copy_checkpoint(gguf_base.checkpoint_from_gguf(str(f32)), tmp_path / "other")
    gguf_base_check.check_base(f32, back)  # as read back: the same model
    edit_config(back, **change)
    with pytest.raises(TrainingError, match=named.replace(".", r"\.")):
        gguf_base_check.check_base(f32, back)


def test_a_gguf_with_settings_of_the_wrong_type_stops_in_one_line(tiny_builds, tmp_path, capsys):
    """A key of its family's that says nothing usable (here Qwen3-Next's recurrent-layer flags as a
    number) is refused in one line, not a traceback from the config reader."""
    _, f32, _ = tiny_builds.get("qwen3next-hybrid-moe")
    import gguf

    bad = _with_key(f32, tmp_path / "bad.gguf", "qwen3next.attention.recurrent_layers", 3, gguf.GGUFValueType.UINT32)
    rows = write_json(tmp_path / "rows.json", seed_rows(8))
    code = cli.main(["finetune", "--base", str(bad), "--data", str(rows), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (1, 2) and err[-1].startswith("alpaca-convert: ") and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "run").exists()
