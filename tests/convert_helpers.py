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


def write_bpe_tokenizer(out: Path, pre: str = "gpt-2", vocab_size: int = 400) -> int:
    """Train a byte-level BPE tokenizer (tokenizers library) and save it HF-style. Returns its size."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if pre == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        regex = {"llama-bpe": LLAMA3_REGEX, "qwen2": QWEN2_REGEX}[pre]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([training_text()], trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return tok.get_vocab_size()


def write_sentencepiece_tokenizer(out: Path, vocab_size: int = 400) -> int:
    """Train a Llama-style SentencePiece model (BPE, byte fallback) into out/tokenizer.model."""
    import io

    import sentencepiece as spm

    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text().splitlines()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        split_digits=True,
        normalization_rule_name="identity",  # as Llama's: no NFKC, whitespace runs kept
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return spm.SentencePieceProcessor(model_proto=model.getvalue()).vocab_size()


# -- tiny random models --------------------------------------------------------------


@dataclass(frozen=True)
class TinyCase:
    name: str
    architecture: str  # HF class name
    tokenizer: str  # "spm" or a BPE pre-tokenizer name
    config: dict = field(default_factory=dict)
    oracle: bool = False  # llama.cpp's converter can read it (it refuses unknown BPE tokenizers)


TINY_CASES = [
    TinyCase("llama-spm-gqa", "LlamaForCausalLM", "spm", oracle=True),
    TinyCase(
        "llama3-bpe-tied",
        "LlamaForCausalLM",
        "llama-bpe",
        {
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
            },
        },
    ),
    TinyCase(
        "mistral-spm-linear-rope",
        "MistralForCausalLM",
        "spm",
        {"sliding_window": None, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
        oracle=True,
    ),
    TinyCase("qwen2-bpe-tied", "Qwen2ForCausalLM", "qwen2", {"tie_word_embeddings": True}),
    TinyCase("qwen2-spm", "Qwen2ForCausalLM", "spm", oracle=True),
]


def build_tiny_model(out: Path, case: TinyCase, *, dtype: str = "float32", seed: int = 0) -> Path:
    """A random 2-layer model of `case`'s architecture with a real tokenizer, saved HF-style."""
    import torch
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    if case.tokenizer == "spm":
        n_vocab = write_sentencepiece_tokenizer(out)
        special = {"bos_token_id": 1, "eos_token_id": 2}
    else:
        n_vocab = write_bpe_tokenizer(out, case.tokenizer)
        special = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    config_class = getattr(transformers, case.architecture.replace("ForCausalLM", "Config"))
    config = config_class(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=n_vocab,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        **special,
        **case.config,
    )
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


def reference_converter_or_skip(request, tmp_path_factory) -> Path:
    """The oracle script, cached in pytest's cache dir across runs (or a tmp dir without one)."""
    import pytest

    cache = getattr(request.config, "cache", None)
    cache_dir = cache.mkdir("llama-cpp-python-sdist") if cache is not None else tmp_path_factory.mktemp("sdist")
    script = reference_converter(Path(cache_dir))
    if script is None:
        pytest.skip("llama.cpp's converter is unavailable (no network to PyPI, nothing cached)")
    return script


def run_reference_converter(script: Path, checkpoint: Path, out: Path, outtype: str = "f16") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), str(checkpoint), "--outtype", outtype, "--outfile", str(out)],
        capture_output=True, text=True, timeout=600, cwd=script.parent,
    )


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
