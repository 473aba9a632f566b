"""Builders shared by the alpaca-convert tests: tiny random HF checkpoints, tokenizers,
logits on both sides, and llama.cpp's own converter as an oracle.

Plain functions (not fixtures) so that each test module caches what it builds
in its own module- or session-scoped fixtures.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LLAMA_CPP_PYTHON_VERSION = "0.3.36"

# Code, Unicode (accents, CJK, emoji, Cyrillic), whitespace runs, digits, special tokens.
MIXED_TEXT = (
    "def f(x):\n    return x**2  # square\n\n\n\tif x >= 10: print(f\"{x:>8}\")\n"
    "Café naïve résumé — “quotes” ‘single’ … 日本語のテキスト 中文 한국어 Привет мир 🚀🦙✅\n"
    "   three spaces,\t\ttwo tabs, trailing   \n"
    "12345 3.14159 1,000,000 0xFF 2025-01-31 I've we'll they'RE\n"
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
)

# Written out here, not imported from convert.export.pretokenizers: the tests build
# tokenizers with the regexes real models ship and check that the exporter recognizes them.
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def training_text() -> str:
    from convert.evaluate import sample_text

    return sample_text() + "\n" + MIXED_TEXT * 3


# -- tokenizers ----------------------------------------------------------------------


def write_bpe_tokenizer(
    out: Path,
    pre: str = "gpt-2",
    vocab_size: int = 400,
    *,
    regex: str | None = None,
    pre_tokenizer=None,
    specials: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    roles: dict[str, str] | None = None,
    chat_template: str = CHATML,
) -> int:
    """Train a byte-level BPE tokenizer (tokenizers library) and save it HF-style. Returns its size.

    The split comes from `pre` (a name known here), or `regex` (Split + ByteLevel, as Llama 3
    and Qwen ship), or a whole `pre_tokenizer` object. `specials` become added special tokens
    with ids 0, 1, 2...; `roles` maps bos_token/eos_token/unk_token/pad_token to their text
    (default: ChatML's markers).
    """
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if pre_tokenizer is not None:
        tok.pre_tokenizer = pre_tokenizer
    elif pre == "gpt-2" and regex is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        regex = regex or {"llama-bpe": LLAMA3_REGEX, "qwen2": QWEN2_REGEX}[pre]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([training_text()], trainer)
    roles = roles or dict(
        bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **roles)
    fast.chat_template = chat_template
    fast.save_pretrained(out)
    return tok.get_vocab_size()


def train_sentencepiece(vocab_size: int, **settings) -> bytes:
    """A SentencePiece model (BPE, byte fallback, digits split, no normalization, whitespace runs
    kept, as Llama's, Gemma's and ERNIE's) trained on the test text; `settings` add or override
    trainer options (special-token ids, dummy prefix, user-defined symbols)."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(**{
        "sentence_iterator": iter(training_text().splitlines()),
        "model_writer": model,
        "vocab_size": vocab_size,
        "model_type": "bpe",
        "byte_fallback": True,
        "character_coverage": 1.0,
        "split_digits": True,
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "minloglevel": 2,
        **settings,
    })
    return model.getvalue()


def write_sentencepiece_tokenizer(out: Path, vocab_size: int = 400) -> int:
    """Train a Llama-style SentencePiece model (BPE, byte fallback) into out/tokenizer.model."""
    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    model = train_sentencepiece(vocab_size, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    (out / "tokenizer.model").write_bytes(model)
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return spm.SentencePieceProcessor(model_proto=model).vocab_size()


# -- tiny random models --------------------------------------------------------------


@dataclass(frozen=True)
class TinyCase:
    """One tiny random checkpoint of a family, and what the tests may expect of it.

    Cases live in `tests/arch_cases/<family>.py` (one module per family, like the
    exporter); `TINY_CASES` below collects them all.
    """

    name: str
    architecture: str  # HF class name
    tokenizer: str | Callable[[Path], "TokenizerInfo"]  # "spm", a BPE pre-tokenizer name, or a writer
    config: dict = field(default_factory=dict)  # overrides the tiny defaults (hidden 64, 2 layers...)
    config_class: str | Callable | None = None  # transformers config class (or a factory), when not <Arch>Config
    oracle: bool = True  # compare with llama.cpp's converter
    # GGUF keys whose value may legitimately differ from llama.cpp's converter, each with
    # its reason; the README's difference table lists the same.
    metadata_differences: dict[str, str] = field(default_factory=dict)
    # Largest F32 logit difference from transformers. Above 1e-4 only with a reason: llama.cpp's
    # CPU GELU reads an f16 table (GGML_GELU_FP16), so GELU families (Gemma) differ by ~1e-2 there.
    f32_tolerance: float = 1e-4
    # Options llama.cpp's converter needs for this case, e.g. --no-mtp: it refuses a Qwen3.5 checkpoint
    # without multi-token-prediction tensors (transformers never saves them), which our export leaves out.
    oracle_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class TokenizerInfo:
    """What a tokenizer writer reports: its size and the special token ids for config.json."""

    n_vocab: int
    special_ids: dict[str, int]


def write_tokenizer(out: Path, case: TinyCase) -> TokenizerInfo:
    if callable(case.tokenizer):
        return case.tokenizer(out)
    if case.tokenizer == "spm":
        return TokenizerInfo(write_sentencepiece_tokenizer(out), {"bos_token_id": 1, "eos_token_id": 2})
    n_vocab = write_bpe_tokenizer(out, case.tokenizer)
    return TokenizerInfo(n_vocab, {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})


def _collect_cases() -> list[TinyCase]:
    import importlib
    import pkgutil

    import arch_cases

    cases: list[TinyCase] = []
    for module in sorted(pkgutil.iter_modules(arch_cases.__path__), key=lambda m: m.name):
        cases.extend(importlib.import_module(f"arch_cases.{module.name}").CASES)
    return cases


def build_tiny_model(out: Path, case: TinyCase, *, dtype: str = "float32", seed: int = 0) -> Path:
    """A random 2-layer model of `case`'s architecture with a real tokenizer, saved HF-style."""
    import torch
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    info = write_tokenizer(out, case)
    config_class = case.config_class if callable(case.config_class) else getattr(
        transformers, case.config_class or case.architecture.replace("ForCausalLM", "Config")
    )
    settings = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=info.n_vocab,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        **info.special_ids,
    )
    settings.update(case.config)
    config = config_class(**settings)
    config.architectures = [case.architecture]
    torch.manual_seed(seed)
    model = getattr(transformers, case.architecture)(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                # Larger than the usual init: peaked next-token distributions, no near-ties.
                param.normal_(0.0, 0.15)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    return out


class TinyBuilds:
    """Tiny checkpoints and their F32/F16 exports, built on first use and kept for the session."""

    def __init__(self, root: Path):
        self.root = root
        self._built: dict[str, tuple[Path, Path, Path]] = {}

    def get(self, name: str) -> tuple[Path, Path, Path]:
        """(checkpoint dir, F32 GGUF, F16 GGUF) of the case called `name`."""
        if name not in self._built:
            from convert.export import export

            case = CASES[name]
            checkpoint = build_tiny_model(self.root / name, case)
            f32 = export(checkpoint, self.root / f"{name}.F32.gguf", "f32").path
            f16 = export(checkpoint, self.root / f"{name}.F16.gguf", "f16").path
            self._built[name] = (checkpoint, f32, f16)
        return self._built[name]


TINY_CASES: list[TinyCase] = _collect_cases()
CASES: dict[str, TinyCase] = {case.name: case for case in TINY_CASES}


def hf_last_logits(checkpoint: Path, sequences: list[list[int]]) -> list[np.ndarray]:
    """Last-token logits from transformers, in float32."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0, -1].numpy().copy() for ids in sequences]


def gguf_last_logits(gguf_path: Path, sequences: list[list[int]], n_ctx: int = 128) -> list[np.ndarray]:
    from convert.evaluate import LogitsModel

    with LogitsModel(gguf_path, n_ctx=n_ctx, exact=True) as model:
        return [model.logits(ids, len(ids) - 1)[0] for ids in sequences]


def random_sequences(n_vocab: int, count: int = 4, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = [3, 11, 24, 47][:count]
    return [[int(t) for t in rng.integers(3, n_vocab, size=n)] for n in lengths]


# -- llama.cpp's converter as an oracle ----------------------------------------------


def reference_converter(cache_dir: Path) -> Path | None:
    """convert_hf_to_gguf.py from the llama-cpp-python sdist (downloaded once, cached)."""
    script = cache_dir / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    sdist = next(cache_dir.glob("llama_cpp_python-*.tar.gz"), None)
    if sdist is None:
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(cache_dir)],
            capture_output=True, text=True, timeout=600, env=env,
        )
        sdist = next(cache_dir.glob("llama_cpp_python-*.tar.gz"), None)
        if done.returncode != 0 or sdist is None:
            return None
    prefix = f"{sdist.name[: -len('.tar.gz')]}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.name[len(prefix):].startswith(wanted)]
        for member in members:
            member.name = "llama.cpp/" + member.name[len(prefix):]
        tar.extractall(cache_dir, members=members, filter="data")
    return script if script.is_file() else None


def reference_converter_or_fail(request, tmp_path_factory) -> Path:
    """The oracle script, cached in pytest's cache dir across runs (or a tmp dir without one).

    The oracle is part of the suite's promise (byte parity with llama.cpp's converter), so a
    machine that cannot fetch it fails the test instead of skipping it.
    """
    import pytest

    cache = getattr(request.config, "cache", None)
    cache_dir = cache.mkdir("llama-cpp-python-sdist") if cache is not None else tmp_path_factory.mktemp("sdist")
    script = reference_converter(Path(cache_dir))
    if script is None:
        pytest.fail(
            f"llama.cpp's converter is unavailable: could not download the llama-cpp-python=="
            f"{LLAMA_CPP_PYTHON_VERSION} sdist from PyPI into {cache_dir}"
        )
    return script


ORACLE_WRAPPER = Path(__file__).with_name("oracle_convert.py")


def run_reference_converter(
    script: Path, checkpoint: Path, out: Path, outtype: str = "f16", *, pre_tokenizer: str | None = None,
    extra_args: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """llama.cpp's converter on `checkpoint`. With `pre_tokenizer`, its hash lookup of the BPE
    pre-tokenizer is answered with that name (see oracle_convert.py); nothing else changes.
    `extra_args` go on its command line (a case's `oracle_args`)."""
    env = {**os.environ, "ORACLE_SCRIPT": str(script)}
    if pre_tokenizer is not None:
        env["ORACLE_PRE_TOKENIZER"] = pre_tokenizer
    return subprocess.run(
        [sys.executable, str(ORACLE_WRAPPER), str(checkpoint), "--outtype", outtype, "--outfile", str(out),
         *extra_args],
        capture_output=True, text=True, timeout=600, cwd=script.parent, env=env,
    )


# Keys only we write: provenance, and add_bos/add_eos (llama.cpp's converter may leave them to the loader's default).
OUR_EXTRA_KEYS = {
    "general.converter", "general.source.checkpoint", "general.quant_type",
    "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
}


def assert_same_file_as_reference(oracle: Path, checkpoint: Path, ours: Path, case: TinyCase, theirs: Path) -> None:
    """llama.cpp's converter on `checkpoint` writes `theirs`: the same keys and values as our export `ours`
    (but `case.metadata_differences` and our provenance), the same tensors, byte for byte."""
    our_fields = gguf_fields(ours)
    pre = our_fields.get("tokenizer.ggml.pre") if our_fields.get("tokenizer.ggml.model") == "gpt2" else None
    done = run_reference_converter(oracle, checkpoint, theirs, pre_tokenizer=pre, extra_args=case.oracle_args)
    assert done.returncode == 0, done.stderr[-3000:]

    their_fields = gguf_fields(theirs)
    differences = set(case.metadata_differences)
    assert set(our_fields) - set(their_fields) <= OUR_EXTRA_KEYS | differences
    assert set(their_fields) - differences <= set(our_fields)
    for key, value in their_fields.items():
        if key not in differences:
            assert our_fields[key] == value, key

    assert_same_tensors(ours, theirs)


def assert_same_tensors(ours: Path, theirs: Path) -> None:
    """The same tensors by name (the order in the file may differ: ours follows the checkpoint
    files), each of the same type and shape, byte for byte."""
    our_tensors, their_tensors = gguf_tensors(ours), gguf_tensors(theirs)
    assert sorted(our_tensors) == sorted(their_tensors)
    for tensor_name, (kind, shape, data) in their_tensors.items():
        assert our_tensors[tensor_name][:2] == (kind, shape), tensor_name
        assert same_bytes(our_tensors[tensor_name][2], data), f"{tensor_name}: bytes differ"


def without_quantization_config(checkpoint: Path, out: Path) -> Path:
    """A view of `checkpoint` (symlinks) whose config.json drops the `quantization_config` that
    transformers leaves after dequantizing a GGUF: llama.cpp's converter refuses it."""
    out.mkdir(parents=True, exist_ok=True)
    for item in checkpoint.iterdir():
        if item.name != "config.json":
            target = out / item.name
            if not target.exists():
                target.symlink_to(item.resolve())
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


# -- reading GGUFs -------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _read_gguf(path: str, mtime_ns: int, size: int):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape), t.data) for t in reader.tensors}
    return fields, tensors


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = Path(path).stat()
    return str(path), st.st_mtime_ns, st.st_size


def gguf_fields(path: Path) -> dict:
    return _read_gguf(*_stat_key(path))[0]


def gguf_tensors(path: Path) -> dict:
    """name -> (type name, shape, data as a read-only memory map)."""
    return _read_gguf(*_stat_key(path))[1]


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.nbytes == b.nbytes and np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=False)
    return dst


def read_config(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "config.json").read_text())


def edit_config(checkpoint: Path, **changes) -> None:
    """Update `checkpoint`'s config.json in place."""
    config = read_config(checkpoint)
    config.update(changes)
    (checkpoint / "config.json").write_text(json.dumps(config))


def run_convert(capsys, *argv) -> tuple[int, str]:
    """`alpaca-convert ARGV`: (exit code, its error line or ""); never more than one error line, no traceback."""
    from convert.cli import main

    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("alpaca-convert: error:")]
    assert len(errors) <= 1 and "Traceback" not in err
    return code, (errors[0] if errors else "")


def with_config(checkpoint: Path, tmp_path: Path, **changes) -> Path:
    """A copy of `checkpoint` in `tmp_path` whose config.json has `changes` (None removes a key)."""
    copy = copy_checkpoint(checkpoint, tmp_path / checkpoint.name)
    config = read_config(copy)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (copy / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return copy


def end_of_generation_tokens(gguf_path: Path) -> set[str]:
    """The texts of the tokens llama.cpp stops generating at (its end-of-generation set)."""
    import llama_cpp

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), params)
    assert model, f"llama.cpp could not load {gguf_path}"
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        return {
            llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8", "replace")
            for token in range(llama_cpp.llama_vocab_n_tokens(vocab))
            if llama_cpp.llama_vocab_is_eog(vocab, token)
        }
    finally:
        llama_cpp.llama_model_free(model)
