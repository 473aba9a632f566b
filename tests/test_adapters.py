"""LoRA adapters at run time, against the real llama.cpp and the bundled model: an adapter GGUF written
here (tests/adapter_helpers.py) changes the model as the merged model it stands for does, switches in
place, keys the KV cache, and a bad one is one line before llama.cpp ever sees it."""

import math
import struct

import gguf
import numpy as np
import pytest

from adapter_helpers import deltas, random_pairs, write_adapter, write_merged
from alpaca_chat.conversation import SamplingParams
from alpaca_chat.engine import AdapterSpec, BaseLayout, Engine, check_adapter
from alpaca_chat.errors import InvalidModelFileError, ModelNotFoundError, UsageError

# Two late feed-forward projections, rank 4: small, yet enough to change a greedy reply.
TARGETS = ("blk.28.ffn_down.weight", "blk.29.ffn_down.weight")
ALPHA = 8.0
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


@pytest.fixture(scope="session")
def layout(default_model_path):
    return BaseLayout.of_model(default_model_path)


@pytest.fixture(scope="session")
def lora_files(default_model_path, layout, tmp_path_factory):
    """Two adapters for the bundled model and the merged model of the first."""
    root = tmp_path_factory.mktemp("lora")
    pairs = random_pairs(layout, TARGETS, rank=4, std=0.3, seed=3)
    first = write_adapter(root / "first.gguf", layout.architecture, pairs, alpha=ALPHA)
    second = write_adapter(root / "second.gguf", layout.architecture,
                           random_pairs(layout, TARGETS, rank=4, std=0.3, seed=4), alpha=ALPHA)
    merged = write_merged(root / "first-merged.gguf", default_model_path, deltas(pairs, alpha=ALPHA))
    return {"first": first, "second": second, "merged": merged, "pairs": pairs, "root": root}


def _logits(engine, tokens):
    return engine.sequence_logits(tokens, len(tokens) - 4)


def test_an_adapter_changes_the_model_as_its_merged_model_does(default_model_path, lora_files):
    with Engine(default_model_path, n_ctx=256) as engine:
        tokens = engine.tokenize(PROMPT)
        base = _logits(engine, tokens)
        engine.set_adapters([AdapterSpec(lora_files["first"])])
        adapted = _logits(engine, tokens)
        engine.set_adapters([AdapterSpec(lora_files["first"], 0.0)])  # scale 0: llama.cpp skips it
        zero = _logits(engine, tokens)
        engine.set_adapters([])
        off = _logits(engine, tokens)
    with Engine(lora_files["merged"], n_ctx=256) as merged_engine:
        merged = _logits(merged_engine, tokens)
    moved = np.abs(adapted - base).max()
    assert moved > 1.0, "the adapter did not change the logits"
    # The merged model holds W + delta in F32 while the base multiplies 4-bit W: close, not equal.
    assert np.abs(adapted - merged).max() < 0.05 * moved
    assert np.array_equal(off, base) and np.array_equal(zero, base)


def test_switching_keeps_the_model_and_never_reuses_a_prefix_across_sets(default_model_path, lora_files):
    first, second = AdapterSpec(lora_files["first"]), AdapterSpec(lora_files["second"], 0.5)
    with Engine(default_model_path, n_ctx=256, adapters=[first]) as engine:
        assert engine.adapters == (first,) and engine.adapter_key
        tokens = engine.tokenize(PROMPT)
        with_first = "".join(engine.generate(tokens, GREEDY))
        again = engine.generate(tokens, GREEDY)
        assert "".join(again) == with_first and again.stats.cached_tokens > 0  # the same set reuses its prefix
        key_first = engine.adapter_key
        engine.set_adapters([])
        assert engine.cached_tokens == [] and engine.adapter_key == ""
        plain = engine.generate(tokens, GREEDY)
        base_reply = "".join(plain)
        assert plain.stats.cached_tokens == 0  # computed under the adapter: not reused
        assert base_reply != with_first
        engine.set_adapters([second])
        assert engine.adapter_key not in ("", key_first)
        with engine.snapshot() as snap:
            assert snap.adapter_key == engine.adapter_key
        engine.set_adapters([first])  # loaded once: switching back is in place
        assert engine.adapter_key == key_first
        assert "".join(engine.generate(tokens, GREEDY)) == with_first


def test_a_bad_adapter_keeps_the_previous_set(default_model_path, lora_files, layout, tmp_path):
    first = AdapterSpec(lora_files["first"])
    bad = write_adapter(tmp_path / "bad.gguf", layout.architecture, random_pairs(layout, TARGETS), alpha=math.nan)
    with Engine(default_model_path, n_ctx=256, adapters=[first]) as engine:
        key = engine.adapter_key
        with pytest.raises(InvalidModelFileError, match="bad.gguf.*not a finite number"):
            engine.set_adapters([AdapterSpec(bad)])
        with pytest.raises(UsageError, match="listed twice"):
            engine.set_adapters([first, AdapterSpec(lora_files["first"], 2.0)])
        assert engine.adapters == (first,) and engine.adapter_key == key
        assert "".join(engine.generate(engine.tokenize(PROMPT), GREEDY))
    with pytest.raises(InvalidModelFileError, match="bad.gguf"):
        Engine(default_model_path, n_ctx=256, adapters=[AdapterSpec(bad)])


# -- the check before llama.cpp (pure Python: no model is loaded) --------------------------------------


def _pair(layout, name, rank=4):
    return random_pairs(layout, [name], rank=rank)[name]


def test_a_good_adapter_passes_with_its_rank_and_hash(lora_files, layout):
    info = check_adapter(lora_files["first"], layout)
    assert info.ranks == (4,) and info.alpha == ALPHA and info.n_weights == len(TARGETS) and len(info.sha256) == 64


@pytest.mark.parametrize("case, message", [
    ("architecture", r"bad\.gguf is an adapter for architecture 'qwen2', but .* is 'llama'"),
    ("rank", r"bad\.gguf: tensor 'blk\.0\.attn_q\.weight' has lora_a \[576, 4\] and lora_b \[8, 576\]"),
    ("shape", r"bad\.gguf: tensor 'blk\.0\.attn_k\.weight' has lora_a .* needs lora_a \[576, 4\] and lora_b \[4, 192\]"),
    ("nan", r"bad\.gguf: adapter\.lora\.alpha is nan, not a finite number"),
    ("unknown", r"bad\.gguf: tensor 'blk\.99\.attn_q\.weight' is not in"),
    ("unpaired", r"bad\.gguf: tensor 'blk\.0\.attn_q\.weight' has no \.lora_b"),
    ("tied", r"bad\.gguf: tensor 'token_embd\.weight': .* ties its output"),
    ("not lora", r"bad\.gguf: adapter\.type is 'control_vector'"),
    ("a model", r"bad\.gguf is a model, not a LoRA adapter"),
    ("alora", r"bad\.gguf is an activated LoRA \(aLoRA\)"),
])
def test_bad_adapters_are_one_line_naming_file_and_tensor(case, message, layout, tmp_path):
    path, arch, pairs, kwargs = tmp_path / "bad.gguf", layout.architecture, {}, {"alpha": ALPHA}
    q = "blk.0.attn_q.weight"
    if case == "architecture":
        arch, pairs = "qwen2", {q: _pair(layout, q)}
    elif case == "rank":
        a, _ = _pair(layout, q, rank=4)
        _, b = _pair(layout, q, rank=8)
        pairs = {q: (a, b)}
    elif case == "shape":
        pairs = {"blk.0.attn_k.weight": _pair(layout, q)}  # q's [576, 576] pair on k's [576, 192]
    elif case == "nan":
        pairs, kwargs = {q: _pair(layout, q)}, {"alpha": math.nan}
    elif case == "unknown":
        pairs = {"blk.99.attn_q.weight": _pair(layout, q)}
    elif case == "unpaired":
        a, _ = _pair(layout, q)
        kwargs["extra_tensors"] = {f"{q}.lora_a": a}
    elif case == "tied":
        rng = np.random.default_rng(0)
        pairs = {"token_embd.weight": (rng.normal(size=(49152, 4)).astype(np.float32),
                                       rng.normal(size=(576, 4)).astype(np.float32))}
    elif case == "not lora":
        pairs, kwargs["adapter_type"] = {q: _pair(layout, q)}, "control_vector"
    elif case == "alora":
        pairs = {q: _pair(layout, q)}
        kwargs["extra_kv"] = {gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS: [1, 2, 3]}
    elif case == "a model":
        pairs, kwargs["general_type"] = {q: _pair(layout, q)}, "model"
    write_adapter(path, arch, pairs, **kwargs)
    with pytest.raises(InvalidModelFileError, match=message) as caught:
        check_adapter(path, layout)
    assert "\n" not in str(caught.value)


def test_truncated_missing_and_garbage_files(lora_files, layout, tmp_path):
    whole = lora_files["first"].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) - 1000])
    with pytest.raises(InvalidModelFileError, match=r"LoRA adapter .*cut\.gguf is truncated"):
        check_adapter(cut, layout)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\xff" * 40)
    with pytest.raises(InvalidModelFileError, match="garbage.gguf"):
        check_adapter(garbage, layout)
    with pytest.raises(ModelNotFoundError, match="LoRA adapter not found: .*nothing.gguf"):
        check_adapter(tmp_path / "nothing.gguf", layout)
