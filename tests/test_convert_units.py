"""alpaca-convert's pure parts: tables, naming, number formats, the CLI plumbing. Fast, no models."""

import json
import sys
import types

import numpy as np
import pytest

from convert import cli, commands
from convert.atomic import OutputError, atomic_output
from convert.export.checkpoint import bf16_to_f32
from convert.export.llama import permute_rope_rows
from convert.export.pretokenizers import (
    GPT2_REGEX,
    LLAMA3_REGEX,
    QWEN2_REGEX,
    UnknownPreTokenizer,
    detect_pre_tokenizer,
)
from convert.quantize import QUANT_TYPES, UnknownQuantTypeError, load_imatrix, parse_quant_type


# -- pre-tokenizers ---------------------------------------------------------------


def _split(regex):
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


BYTES = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
BYTES_GPT2 = {**BYTES, "use_regex": True}


@pytest.mark.parametrize(
    ("pre_tokenizer", "name"),
    [
        (BYTES_GPT2, "gpt-2"),
        ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTES_GPT2]}, "smollm"),
        ({"type": "Sequence", "pretokenizers": [_split(LLAMA3_REGEX), BYTES]}, "llama-bpe"),
        ({"type": "Sequence", "pretokenizers": [_split(QWEN2_REGEX), BYTES]}, "qwen2"),
    ],
)
def test_pre_tokenizer_detection(pre_tokenizer, name):
    assert detect_pre_tokenizer(pre_tokenizer) == name


@pytest.mark.parametrize(
    "pre_tokenizer",
    [
        None,
        {"type": "Whitespace"},
        {**BYTES_GPT2, "add_prefix_space": True},  # would add a space llama.cpp does not
        {"type": "Sequence", "pretokenizers": [_split(GPT2_REGEX + "|x"), BYTES]},
        {"type": "Sequence", "pretokenizers": [{**_split(LLAMA3_REGEX), "invert": True}, BYTES]},
    ],
)
def test_unknown_pre_tokenizers_are_refused(pre_tokenizer):
    with pytest.raises(UnknownPreTokenizer, match="--pre-tokenizer"):
        detect_pre_tokenizer(pre_tokenizer)


# -- tensors ------------------------------------------------------------------------


def test_bf16_widening_is_exact():
    torch = pytest.importorskip("torch")
    values = torch.randn(1000, dtype=torch.float32).to(torch.bfloat16)
    values = torch.cat([values, torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40], dtype=torch.bfloat16)])
    raw = values.view(torch.int16).numpy().view(np.uint16)
    expected = values.to(torch.float32).numpy()
    assert np.array_equal(bf16_to_f32(raw).view(np.uint32), expected.view(np.uint32))


def _rope_half_split(x, pos, theta=10000.0):
    """Hugging Face's rotary embedding: rotate the two halves of each head."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(pos * inv), np.sin(pos * inv)
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)


def _rope_adjacent_pairs(x, pos, theta=10000.0):
    """llama.cpp's (normal) rotary embedding: rotate adjacent pairs (2i, 2i+1)."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(pos * inv), np.sin(pos * inv)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
    return out


def test_qk_permutation_turns_half_split_rope_into_adjacent_pairs():
    rng = np.random.default_rng(0)
    n_head, head_dim, hidden = 3, 8, 12
    weight = rng.standard_normal((n_head * head_dim, hidden))
    x = rng.standard_normal(hidden)
    pos = 5
    hf = _rope_half_split((weight @ x).reshape(n_head, head_dim), pos)
    ours = _rope_adjacent_pairs((permute_rope_rows(weight, n_head) @ x).reshape(n_head, head_dim), pos)
    # Same attention scores: the permutation only reorders dimensions within each head.
    q_hf, q_ours = hf.reshape(n_head, head_dim), ours.reshape(n_head, head_dim)
    assert np.allclose(q_hf @ q_hf.T, q_ours @ q_ours.T)
    assert np.allclose(np.sort(q_hf, axis=-1), np.sort(q_ours, axis=-1))


# -- quant types -----------------------------------------------------------------------


def test_quant_type_table_matches_llama_cpp():
    llama_cpp = pytest.importorskip("llama_cpp")
    for name, qtype in QUANT_TYPES.items():
        constant = "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}"
        assert getattr(llama_cpp, constant) == qtype.ftype, name


@pytest.mark.parametrize(
    ("given", "name"), [("q4_k_m", "Q4_K_M"), ("Q4_K", "Q4_K_M"), (" q8-0 ", "Q8_0"), ("iq2_xxs", "IQ2_XXS")]
)
def test_quant_type_names(given, name):
    assert parse_quant_type(given).name == name


def test_unknown_quant_type_lists_the_choices():
    with pytest.raises(UnknownQuantTypeError, match="unknown quantization type 'Q4_K_X'.*Q4_K_M") as info:
        parse_quant_type("Q4_K_X")
    assert info.value.exit_code == 2


# -- importance matrix files ----------------------------------------------------------


def test_imatrix_formats_agree(tmp_path):
    import gguf

    sums = np.array([[2.0, 4.0, 6.0]], dtype=np.float32)
    modern = tmp_path / "imatrix.gguf"
    writer = gguf.GGUFWriter(modern, "imatrix")
    writer.add_tensor("blk.0.ffn_up.weight.in_sum2", sums)
    writer.add_tensor("blk.0.ffn_up.weight.counts", np.array([[2.0]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    legacy = tmp_path / "imatrix.dat"
    name = b"blk.0.ffn_up.weight"
    legacy.write_bytes(
        np.array([1, len(name)], dtype="<i4").tobytes() + name
        + np.array([2, 3], dtype="<i4").tobytes() + sums.tobytes()
        + np.array([2], dtype="<i4").tobytes()
    )
    for path in (modern, legacy):
        assert np.allclose(load_imatrix(path)["blk.0.ffn_up.weight"], [1.0, 2.0, 3.0])


def test_bad_imatrix_file(tmp_path):
    from convert.quantize import QuantizeError

    bad = tmp_path / "bad.dat"
    bad.write_bytes(b"\xff\xff\xff\xff")
    with pytest.raises(QuantizeError, match="not a valid importance matrix"):
        load_imatrix(bad)


# -- atomic output ---------------------------------------------------------------------


def test_atomic_output_renames_on_success(tmp_path):
    target = tmp_path / "m.gguf"
    with atomic_output(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_bytes(b"GGUF")
    assert target.read_bytes() == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    assert target.stat().st_mode & 0o044  # not mkstemp's 0600


def test_atomic_output_removes_temp_on_error(tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash")
    assert target.read_bytes() == b"old"  # an existing file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_atomic_output_missing_directory(tmp_path):
    with pytest.raises(OutputError, match="does not exist"), atomic_output(tmp_path / "no" / "m.gguf"):
        pass


# -- the CLI's plumbing --------------------------------------------------------------


def test_default_command_is_convert():
    parser = cli.build_parser()
    args = parser.parse_args(cli._with_default_command(["ckpt", "--quant", "Q4_K_M", "Q8_0"], parser))
    assert args.command == "convert" and args.checkpoint == "ckpt" and args.quant == ["Q4_K_M", "Q8_0"]
    assert cli._with_default_command(["export", "ckpt"], parser) == ["export", "ckpt"]
    assert cli._with_default_command(["--debug", "ckpt", "-q", "Q8_0"], parser)[0] == "convert"


def test_plugins_load_only_when_a_command_may_be_theirs(tmp_path):
    assert not cli._needs_plugins(["export", "ckpt"])
    assert not cli._needs_plugins(["--debug", "quantize", "m.gguf", "-T", "Q4_K_M"])
    assert not cli._needs_plugins(["owner/model", "--quant", "Q4_K_M"])  # a hub id
    assert not cli._needs_plugins([str(tmp_path), "--quant", "Q4_K_M"])  # an existing checkpoint
    assert cli._needs_plugins(["finetune", "--data", "x.json"])
    assert cli._needs_plugins(["--help"]) and cli._needs_plugins([])


def test_output_names():
    assert commands._outputs(None, "smol", ["Q4_K_M"]) == {"Q4_K_M": cli.Path("smol.Q4_K_M.gguf")}
    assert commands._outputs("out.gguf", "smol", ["Q8_0"]) == {"Q8_0": cli.Path("out.gguf")}
    assert commands._outputs("out.gguf", "smol", ["Q8_0", "Q4_0"])["Q4_0"] == cli.Path("out.Q4_0.gguf")
    assert commands._outputs("m-{quant}.gguf", "smol", ["Q8_0"]) == {"Q8_0": cli.Path("m-Q8_0.gguf")}
    assert commands._quantized_name(cli.Path("d/smol.F16.gguf"), "Q4_K_M") == cli.Path("d/smol.Q4_K_M.gguf")
    assert commands._quantized_name(cli.Path("smol.gguf"), "Q8_0") == cli.Path("smol.Q8_0.gguf")


def test_usage_errors_exit_2(capsys):
    assert cli.main(["export"]) == 2
    assert "error:" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert cli.main(["eval", "m.gguf"]) == 2  # no --reference and no --ladder


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    assert "export" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert "alpaca-convert" in capsys.readouterr().out


def test_training_commands_plug_in(monkeypatch, capsys):
    plugin = types.ModuleType("convert.training_commands")

    def register(subparsers):
        p = subparsers.add_parser("train", help="fine-tune")
        p.add_argument("--epochs", type=int, default=1)
        p.set_defaults(run=lambda args: print(f"training for {args.epochs}") or 0)

    plugin.register = register
    import convert

    monkeypatch.setitem(sys.modules, "convert.training_commands", plugin)
    monkeypatch.setattr(convert, "training_commands", plugin, raising=False)
    assert cli.main(["train", "--epochs", "3"]) == 0
    assert "training for 3" in capsys.readouterr().out


def test_chat_template_choice(tmp_path):
    from alpaca_chat.templates import ALPACA_JINJA

    assert commands._chat_template(None) is None and commands._chat_template("auto") is None
    assert commands._chat_template("alpaca") == ALPACA_JINJA
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    assert commands._chat_template(str(template)) == "{{ messages }}"


def test_eval_chunks():
    from convert.evaluate import _chunks

    tokens = list(range(10, 40))
    assert _chunks(tokens, 8, bos=1, max_chunks=None) == [[1, *range(11, 18)], [1, *range(19, 26)], [1, *range(27, 34)]]
    assert _chunks(tokens, 16, bos=None, max_chunks=None) == [tokens[:16]]  # under two chunks: one
    assert len(_chunks(tokens, 8, bos=None, max_chunks=2)) == 2


def test_kl_divergence_maths():
    from convert.evaluate import _Totals

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((5, 7)).astype(np.float32)
    other = ref + rng.standard_normal((5, 7)).astype(np.float32)
    targets = np.array([0, 1, 2, 3, 4])
    same = _Totals()
    same.add(ref, ref, targets)
    assert same.kld == pytest.approx(0.0, abs=1e-12) and same.same_top == 5

    def softmax(x):
        e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(ref), softmax(other)
    totals = _Totals()
    totals.add(ref, other, targets)
    assert totals.kld == pytest.approx(np.sum(p * np.log(p / q)))
    assert totals.ref_nll == pytest.approx(-np.log(p[np.arange(5), targets]).sum())
    assert totals.nll == pytest.approx(-np.log(q[np.arange(5), targets]).sum())
    assert totals.same_top == int((p.argmax(-1) == q.argmax(-1)).sum())


def test_sample_text_is_packaged():
    from convert.evaluate import sample_text

    text = sample_text()
    assert len(text.split()) > 500 and "def top_words" in text
    json.dumps(text)  # plain UTF-8 text
