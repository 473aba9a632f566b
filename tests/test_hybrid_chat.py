"""Chat on models whose memory is not only a KV cache: every hybrid family we export (tests/arch_cases:
LFM2's short convolutions, Qwen3.5's and Qwen3-Next's gated DeltaNet, Granite 4's Mamba-2, each beside
attention layers), exported by our exporter, and a pure Mamba-2 model converted by llama.cpp's own
converter (an architecture we do not export).

A recurrent state cannot be cut back to a shorter prefix (llama.cpp refuses a partial
`llama_memory_seq_rm` on it), so every rewind here (regenerate, edit, a new prompt that shares only
part of the cache) must fall back to evaluating from the start, and still give what an uninterrupted
session gives. Saved states (instant resume) must carry the recurrent part. A context overflow drops
old messages and evaluates the rest afresh: the cache is never shifted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from alpaca_chat import gguf_check, gguf_memory
from alpaca_chat.conversation import SamplingParams
from alpaca_chat.engine import Engine, ParallelRequest
from alpaca_chat.session import ChatSession
from alpaca_chat.templates import resolve_template
from convert_helpers import (
    TINY_CASES,
    TinyCase,
    build_tiny_model,
    reference_converter_or_fail,
    run_reference_converter,
)

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, repeat_penalty=1.0)

# Families whose layers carry a recurrent state; each of their tiny cases is exported by us and chatted with.
HYBRID_ARCHITECTURES = {
    "Lfm2ForCausalLM", "Lfm2MoeForCausalLM", "Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM", "Qwen3NextForCausalLM",
    "GraniteMoeHybridForCausalLM", "Qwen3_5ForConditionalGeneration",
}
OURS = sorted(case.name for case in TINY_CASES if case.architecture in HYBRID_ARCHITECTURES)
# Converted by llama.cpp's converter: what we do not export (LFM2 only until its exporter has a case).
CONVERTED = {
    "mamba2": TinyCase(
        "mamba2-ssm", "Mamba2ForCausalLM", "gpt-2",
        {"num_hidden_layers": 2, "num_heads": 8, "head_dim": 16, "state_size": 16, "n_groups": 1,
         "conv_kernel": 4, "expand": 2},
    ),
}
if not any(case.architecture == "Lfm2ForCausalLM" for case in TINY_CASES):
    CONVERTED["lfm2"] = TinyCase(
        "lfm2-hybrid", "Lfm2ForCausalLM", "gpt-2",
        {"num_hidden_layers": 4, "layer_types": ["conv", "full_attention", "conv", "full_attention"],
         "block_ff_dim": 128, "conv_L_cache": 3},
    )


@dataclass(frozen=True)
class HybridModel:
    name: str
    path: Path  # the F32 GGUF
    config: dict  # the checkpoint's config.json (a multimodal one's text_config on top)
    architecture: str


@pytest.fixture(scope="module", params=[*sorted(CONVERTED), *OURS])
def hybrid(request, tmp_path_factory, tiny_builds) -> HybridModel:
    if request.param in CONVERTED:
        case = CONVERTED[request.param]
        root = tmp_path_factory.mktemp(request.param)
        checkpoint = build_tiny_model(root / "hf", case)
        script = reference_converter_or_fail(request, tmp_path_factory)
        path = root / f"{request.param}.F32.gguf"
        done = run_reference_converter(script, checkpoint, path, "f32", pre_tokenizer=case.tokenizer)
        assert done.returncode == 0, done.stderr[-2000:]
    else:
        case = next(c for c in TINY_CASES if c.name == request.param)
        checkpoint, path, _ = tiny_builds.get(request.param)
    config = json.loads((checkpoint / "config.json").read_text())
    return HybridModel(request.param, path, {**config, **config.get("text_config", {})}, case.architecture)


def session_on(engine, **kwargs):
    template = resolve_template("auto", engine.chat_template, engine.bos_token, engine.eos_token)
    return ChatSession(engine, template, model_label="hybrid", sampling=GREEDY, **kwargs)


def reply_of(session, text):
    reply = session.send(text)
    return "".join(reply)


def test_the_model_really_is_recurrent(hybrid):
    """The fixture is what the tests claim: layers that carry a recurrent state llama.cpp cannot cut
    back to a shorter prefix (and, in LFM2, attention layers beside them)."""
    path = hybrid.path
    info = gguf_check.check_gguf(path)
    recurrent = gguf_memory.recurrent_layers(info)
    assert any(recurrent)
    assert all(recurrent) == (hybrid.architecture == "Mamba2ForCausalLM")  # the others have attention too
    with Engine(path, n_ctx=128) as engine:
        tokens = engine.tokenize("one two three four five")
        "".join(engine.generate(tokens, GREEDY))
        assert not engine.trim_sequence(0, 2)  # partial removal refused: the state is recurrent


def test_regenerate_and_edit_give_what_a_fresh_session_gives(hybrid):
    path = hybrid.path
    with Engine(path, n_ctx=256) as engine:
        session = session_on(engine)
        first = reply_of(session, "Tell me about llamas")
        second = reply_of(session, "And alpacas?")
        session.rewind()  # regenerate the last reply: the cache must not keep the old one's state
        assert reply_of(session, "And alpacas?") == second
        session.rewind()  # edit: another message after the same first turn
        edited = reply_of(session, "And vicunas?")
    with Engine(path, n_ctx=256) as fresh_engine:
        fresh = session_on(fresh_engine)
        assert reply_of(fresh, "Tell me about llamas") == first
        assert reply_of(fresh, "And vicunas?") == edited


def test_resume_from_a_saved_state_continues_like_an_uninterrupted_session(hybrid):
    """What instant resume saves (the engine's state: KV cells and the recurrent state) restored in
    another process's engine continues exactly as the uninterrupted one. (A session-level resume on
    these random models would not get this far: their garbage replies do not re-tokenize to the same
    tokens, and a recurrent state that only partly matches the new prompt is ignored, never cut.)"""
    path = hybrid.path
    with Engine(path, n_ctx=256) as engine:
        session = session_on(engine)
        reply_of(session, "Tell me about llamas")
        blob, tokens = engine.state()
        blob = bytes(blob)
        follow_up = tokens + engine.tokenize(" and alpacas")
        expected = "".join(engine.generate(follow_up, GREEDY))
    with Engine(path, n_ctx=256) as engine:
        engine.restore(blob, tokens)
        assert engine.cached_tokens == tokens
        assert "".join(engine.generate(follow_up, GREEDY)) == expected
    with Engine(path, n_ctx=256) as engine:  # and a state of the wrong length is refused, not loaded
        with pytest.raises(Exception):
            engine.restore(blob[: len(blob) // 2], tokens)


def test_context_overflow_drops_old_messages_and_keeps_answering(hybrid):
    path = hybrid.path
    with Engine(path, n_ctx=96) as engine:
        session = session_on(engine)
        for i in range(8):  # each turn takes ~20 tokens: the context overflows after a few
            reply_of(session, f"Message number {i} about llamas and alpacas")
        assert session.memory_start > 0  # old messages were dropped
        held = [m for m in session.messages if m.role != "system"][session.memory_start:]
        late = reply_of(session, "Last one")
    # The recurrent state could not be shifted: what it says is what a fresh session says on what the
    # overflowed one still holds.
    with Engine(path, n_ctx=96) as engine:
        assert reply_of(session_on(engine, history=held), "Last one") == late


def test_parallel_sequences_match_single_generation(hybrid):
    path = hybrid.path
    prompts = ["The capital of", "Once upon a time", "List three fruits", "1, 2, 3,"]
    with Engine(path, n_ctx=512, n_seq_max=4) as engine:
        tokens = [engine.tokenize(p) for p in prompts]
        single = ["".join(engine.generate(t, GREEDY)) for t in tokens]
        queue = iter([ParallelRequest(t, GREEDY, tag=i) for i, t in enumerate(tokens)])
        results = {r.request.tag: r.text for r in engine.generate_parallel(lambda: next(queue, None))}
    assert [results[i] for i in range(len(prompts))] == single


def expected_memory(hybrid: HybridModel) -> tuple[int, int]:
    """(recurrent state bytes per sequence, KV cache bytes per token) from the checkpoint's config, the
    way each family's layers keep state in transformers: independent of the GGUF's keys."""
    config = hybrid.config
    layer_types = config.get("layer_types") or []
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    f32, f16 = 4, 2

    def kv(attention_layers):  # K and V, f16
        return attention_layers * config["num_key_value_heads"] * head_dim * 2 * f16

    def ssm(layers, d_conv, d_inner, n_group, d_state):  # the convolution window and the SSM state
        return layers * ((d_conv - 1) * (d_inner + 2 * n_group * d_state) + d_state * d_inner) * f32

    if hybrid.architecture in ("Lfm2ForCausalLM", "Lfm2MoeForCausalLM"):  # (L_cache - 1) x hidden per conv layer
        conv = layer_types.count("conv")
        return conv * (config["conv_L_cache"] - 1) * config["hidden_size"] * f32, kv(len(layer_types) - conv)
    if hybrid.architecture == "Mamba2ForCausalLM":
        d_inner = config["expand"] * config["hidden_size"]
        layers = config["num_hidden_layers"]
        return ssm(layers, config["conv_kernel"], d_inner, config["n_groups"], config["state_size"]), 0
    if hybrid.architecture == "GraniteMoeHybridForCausalLM":
        mamba = sum(t in ("mamba", "linear_attention") for t in layer_types)
        d_inner = int(config["mamba_expand"] * config["hidden_size"])
        recurrent = ssm(mamba, config["mamba_d_conv"], d_inner, config["mamba_n_groups"], config["mamba_d_state"])
        return recurrent, kv(len(layer_types) - mamba)
    # Gated DeltaNet (Qwen3.5, Qwen3-Next): a convolution over q, k and v; a k_dim x v_dim state per value head.
    linear = layer_types.count("linear_attention")
    d_inner = config["linear_num_value_heads"] * config["linear_value_head_dim"]
    recurrent = ssm(linear, config["linear_conv_kernel_dim"], d_inner, config["linear_num_key_heads"],
                    config["linear_key_head_dim"])
    return recurrent, kv(len(layer_types) - linear)


def test_memory_estimate_counts_the_recurrent_state(hybrid):
    info = gguf_check.check_gguf(hybrid.path)
    expected, kv_per_token = expected_memory(hybrid)
    recurrent = gguf_memory.recurrent_state_bytes(info)
    assert recurrent == expected
    assert gguf_memory.recurrent_state_bytes(info, n_seq=4) == 4 * expected
    assert gguf_memory.kv_cache_bytes(info, 100) == 100 * kv_per_token  # attention layers only
    assert gguf_memory.estimated_ram_bytes(info, 100) > info.tensor_data_bytes + 100 * kv_per_token + recurrent


def test_fuzzed_hybrid_files_never_crash_hang_or_trace_back(hybrid, tmp_path):
    """The fuzz campaign (tests/gguf_fuzzing.py) on a hybrid file: every scalar hyperparameter,
    the recurrent ones included (a full-attention interval of 0 divides by zero in llama.cpp, a
    huge state size allocates per sequence), at extreme values, plus random header mutations."""
    from gguf_fuzzing import FAILURES, campaign_cases, run_campaign

    path = hybrid.path
    cases = campaign_cases(path, 100, 20261204)
    report = run_campaign(path, cases, workdir=tmp_path, batch=300, timeout=120)
    failures = {kind: report.counts[kind] for kind in FAILURES}
    assert failures == {"traceback": 0, "crash": 0, "hang": 0}, report.failures[:10]
    recurrent_keys = [label for label in report.outcomes if ".ssm." in label or ".shortconv." in label]
    assert recurrent_keys, "the campaign must mutate the recurrent hyperparameters"
    assert report.counts["ok"] + report.counts["refused"] >= 10, report.summary()
