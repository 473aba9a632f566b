"""gguf_check's hyperparameter checks: bounds, finiteness, consistency with the tensors.

Each bad value gets one line naming the key; every GGUF our exporter writes still passes.
"""

import math
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from alpaca_chat.errors import InvalidModelFileError
from alpaca_chat.gguf_check import check_gguf
from convert_helpers import TINY_CASES

N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_LAYER = 64, 4, 2, 96, 2
TOKENS = ["<s>", "</s>", "hello", "world", "!", "a", "b", "c"]
HEAD = N_EMBD // N_HEAD


def write_llama(path: Path, **overrides) -> Path:
    """A complete two-block llama GGUF (all tensors llama.cpp wants), with some keys overridden."""
    w = gguf.GGUFWriter(path, "llama")
    keys = {
        "llama.context_length": (256, w.add_uint32),
        "llama.embedding_length": (N_EMBD, w.add_uint32),
        "llama.block_count": (N_LAYER, w.add_uint32),
        "llama.feed_forward_length": (N_FF, w.add_uint32),
        "llama.attention.head_count": (N_HEAD, w.add_uint32),
        "llama.attention.head_count_kv": (N_HEAD_KV, w.add_uint32),
        "llama.rope.dimension_count": (HEAD, w.add_uint32),
        "llama.rope.freq_base": (10000.0, w.add_float32),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, w.add_float32),
    }
    for key, (value, add) in keys.items():
        value = overrides.pop(key, value)
        if value is None:
            continue
        if isinstance(value, (tuple, list)):
            w.add_array(key, list(value))
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            add(key, value)
    for key, value in overrides.items():
        (w.add_float32 if isinstance(value, float) else w.add_string if isinstance(value, str) else w.add_uint32)(key, value)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TOKENS)
    w.add_token_types([1] * len(TOKENS))
    w.add_token_merges(["h e"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    rng = np.random.default_rng(0)

    def tensor(name, *shape):  # ggml order (ne0, ne1)
        w.add_tensor(name, (0.02 * rng.standard_normal(tuple(reversed(shape)))).astype(np.float32))

    tensor("token_embd.weight", N_EMBD, len(TOKENS))
    tensor("output_norm.weight", N_EMBD)
    for i in range(N_LAYER):
        tensor(f"blk.{i}.attn_norm.weight", N_EMBD)
        tensor(f"blk.{i}.attn_q.weight", N_EMBD, N_HEAD * HEAD)
        tensor(f"blk.{i}.attn_k.weight", N_EMBD, N_HEAD_KV * HEAD)
        tensor(f"blk.{i}.attn_v.weight", N_EMBD, N_HEAD_KV * HEAD)
        tensor(f"blk.{i}.attn_output.weight", N_HEAD * HEAD, N_EMBD)
        tensor(f"blk.{i}.ffn_norm.weight", N_EMBD)
        tensor(f"blk.{i}.ffn_gate.weight", N_EMBD, N_FF)
        tensor(f"blk.{i}.ffn_up.weight", N_EMBD, N_FF)
        tensor(f"blk.{i}.ffn_down.weight", N_FF, N_EMBD)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def rejected(path: Path, key: str) -> str:
    with pytest.raises(InvalidModelFileError) as excinfo:
        check_gguf(path)
    message = str(excinfo.value)
    assert "\n" not in message and str(path) in message and key in message, message
    return message


def test_tiny_llama_passes(tmp_path):
    info = check_gguf(write_llama(tmp_path / "ok.gguf"))
    assert info.metadata["llama.block_count"] == N_LAYER


BAD = [
    ("llama.block_count", 0),
    ("llama.block_count", 2**31),
    ("llama.block_count", 2**32 - 1),
    ("llama.block_count", 3),  # more blocks than the file has tensors for
    ("llama.block_count", 1),  # fewer
    ("llama.context_length", 0),
    ("llama.context_length", 2**31 - 1),
    ("llama.embedding_length", 0),
    ("llama.embedding_length", 2**31),
    ("llama.embedding_length", 128),  # token_embd rows are 64 wide
    ("llama.feed_forward_length", 2**32 - 1),
    ("llama.feed_forward_length", 64),
    ("llama.attention.head_count", 0 + 3),  # does not divide 64
    ("llama.attention.head_count", 2**31),
    ("llama.attention.head_count", 2),  # divides 64 but q has 4 heads of 16
    ("llama.attention.head_count_kv", 3),
    ("llama.attention.head_count_kv", 8),
    ("llama.attention.head_count_kv", 1),  # k has 2 heads
    ("llama.attention.head_count", (4, 4, 4)),  # three values for two blocks
    ("llama.rope.dimension_count", 2**31),
    ("llama.rope.dimension_count", 15),
    ("llama.attention.layer_norm_rms_epsilon", math.nan),
    ("llama.attention.layer_norm_rms_epsilon", math.inf),
    ("llama.attention.layer_norm_rms_epsilon", -1.0),
    ("llama.attention.layer_norm_rms_epsilon", 2**31),  # an integer where a float belongs
    ("llama.rope.freq_base", math.nan),
    ("llama.rope.freq_base", -math.inf),
    ("llama.rope.freq_base", 0.0),
    ("llama.rope.scaling.factor", math.inf),
    ("llama.rope.scaling.factor", -2.0),
    ("llama.rope.scaling.type", "spiral"),
    ("llama.expert_count", 2**31),
    ("llama.expert_count", 8),  # experts, but none used
    ("llama.expert_used_count", 2),  # used, but no experts
    ("llama.vocab_size", 9),
]


@pytest.mark.parametrize("key,value", BAD, ids=[f"{k.removeprefix('llama.')}={v}" for k, v in BAD])
def test_bad_hyperparameter_is_one_line_naming_the_key(tmp_path, key, value):
    path = write_llama(tmp_path / "bad.gguf", **{key: value})
    rejected(path, key)


def test_nan_epsilon_patched_in_place(tmp_path):
    path = write_llama(tmp_path / "bad.gguf")
    data = path.read_bytes()
    # Turn the epsilon (a float32 scalar) into NaN by patching its bytes: the value follows key + type.
    key = b"llama.attention.layer_norm_rms_epsilon"
    at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key) + 4
    patched = data[:at] + struct.pack("<f", math.nan) + data[at + 4 :]
    bad = tmp_path / "nan.gguf"
    bad.write_bytes(patched)
    assert "not a finite number" in rejected(bad, "layer_norm_rms_epsilon")


def test_memory_estimate_uses_checked_values(tmp_path):
    info = check_gguf(write_llama(tmp_path / "ok.gguf"))
    kv = info.kv_cache_bytes(100)
    assert kv == 100 * N_LAYER * N_HEAD_KV * 2 * HEAD * 2
    assert info.estimated_ram_bytes(100) >= info.tensor_data_bytes + kv


@pytest.mark.parametrize("case", [c.name for c in TINY_CASES])
def test_every_exported_family_passes(tiny_builds, case):
    """What alpaca-convert writes for every supported family passes the hyperparameter checks."""
    _, f32, f16 = tiny_builds.get(case)
    for path in (f32, f16):
        info = check_gguf(path)
        assert info.metadata[f"{info.architecture}.block_count"] >= 1


@pytest.mark.parametrize(
    "command",
    [
        ["alpaca-chat", "--model", "{bad}", "--prompt", "hi"],
        ["alpaca-convert", "inspect", "{bad}"],
        ["alpaca-convert", "quantize", "{bad}", "-T", "Q8_0", "-o", "{out}"],
        ["alpaca-convert", "eval", "{bad}", "-r", "{bad}"],
    ],
    ids=["chat", "inspect", "quantize", "eval"],
)
def test_every_command_checks_before_llama_cpp(tmp_path, command):
    import subprocess
    import sys

    bad = write_llama(tmp_path / "bad.gguf", **{"llama.attention.layer_norm_rms_epsilon": math.nan})
    args = [a.format(bad=bad, out=tmp_path / "out.gguf") for a in command]
    script = Path(sys.executable).parent / args[0]  # the installed entry point, beside the interpreter
    done = subprocess.run([str(script), *args[1:]], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "llama.attention.layer_norm_rms_epsilon is nan, not a finite number" in errors[0]
    assert not (tmp_path / "out.gguf").exists()
