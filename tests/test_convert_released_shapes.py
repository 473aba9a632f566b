"""The 2026 families at their released models' structural sizes, with small widths.

The tiny cases in tests/arch_cases/ keep every size small (head size 16-32, 2-4 heads); the released
models have head sizes of 128-512, twice as many DeltaNet value heads as key heads (16 and 32),
Mamba-2 heads of 64 with a state of 128, 4:1 sliding/full layer patterns, KV sharing over the last
layers, partial rotary with real multimodal sections. These cases take those structural settings from
the released configs (Qwen3.5, Granite 4.0 H, LFM2-1.2B, ERNIE-4.5-0.3B, GLM-4.5-Air, Gemma 4 E2B) and
shrink only the hidden width, the layer count and the vocabulary. Each is exported and compared
with llama.cpp's converter byte for byte, and with transformers' logits at F32. Kept out of
arch_cases so the per-family fine-tune and chat tests do not run them again.
"""

import pytest

from convert_helpers import (
    TinyCase,
    assert_same_file_as_reference,
    assert_same_tensors,
    build_tiny_model,
    gguf_last_logits,
    hf_last_logits,
    random_sequences,
    reference_converter_or_fail,
)
# After convert_helpers, which arch_cases imports.
from arch_cases.ernie import EOT_DIFFERENCE, write_ernie_tokenizer
from arch_cases.gemma4 import N_VOCAB, write_gemma4_tokenizer
from arch_cases.glm4_moe import MTP_DIFFERENCES, write_glm45_tokenizer
from arch_cases.granite_hybrid import ReleasedSpellingConfig, write_granite4_tokenizer
from arch_cases.lfm2 import write_lfm2_tokenizer
from arch_cases.qwen3_5 import NO_MTP, qwen35_tokenizer

pytestmark = pytest.mark.slow

RELEASED = [
    TinyCase("qwen35-released-heads", "Qwen3_5ForCausalLM", qwen35_tokenizer, {
        "hidden_size": 512, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 2, "head_dim": 256, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
        "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10_000_000.0, "partial_rotary_factor": 0.25,
                            "mrope_section": [11, 11, 10], "mrope_interleaved": True}},
        config_class="Qwen3_5TextConfig", oracle_args=NO_MTP),
    TinyCase("granite4h-released-mamba", "GraniteMoeHybridForCausalLM", write_granite4_tokenizer, {
        "hidden_size": 256, "num_hidden_layers": 4, "layer_types": ["mamba", "mamba", "attention", "mamba"],
        "num_attention_heads": 4, "num_key_value_heads": 1, "mamba_n_heads": 8, "mamba_d_head": 64,
        "mamba_n_groups": 1, "mamba_d_state": 128, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_chunk_size": 256,
        "num_local_experts": 0, "num_experts_per_tok": 0, "intermediate_size": 512, "shared_intermediate_size": 512,
        "embedding_multiplier": 12.0, "residual_multiplier": 0.246, "attention_multiplier": 0.0078125,
        "logits_scaling": 6.0},
        config_class=ReleasedSpellingConfig),
    TinyCase("lfm2-released-pattern", "Lfm2ForCausalLM", write_lfm2_tokenizer, {
        "hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 2,
        "layer_types": ["conv", "conv", "full_attention", "conv", "conv", "full_attention"],
        "conv_L_cache": 3, "block_ff_dim": 2048, "block_auto_adjust_ff_dim": True, "block_ffn_dim_multiplier": 1.0,
        "block_multiple_of": 256, "rope_theta": 1_000_000.0}),
    TinyCase("ernie-released-heads", "Ernie4_5ForCausalLM", write_ernie_tokenizer, {
        "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 3, "num_attention_heads": 8,
        "num_key_value_heads": 2, "head_dim": 128, "tie_word_embeddings": True, "rope_theta": 500_000.0},
        metadata_differences=EOT_DIFFERENCE,
        # 8 heads of 128 over a 512 width: float32 sums 4x longer than the tiny case's (1.0e-4 measured).
        f32_tolerance=3e-4),
    TinyCase("glm45-released-rope", "Glm4MoeForCausalLM", write_glm45_tokenizer, {
        "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 3, "num_attention_heads": 8,
        "num_key_value_heads": 2, "head_dim": 128, "partial_rotary_factor": 0.5, "attention_bias": True,
        "use_qk_norm": False, "first_k_dense_replace": 1, "n_routed_experts": 8, "num_experts_per_tok": 4,
        "moe_intermediate_size": 64, "n_shared_experts": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": True,
        "n_group": 1, "topk_group": 1, "rope_theta": 1_000_000.0},
        metadata_differences=MTP_DIFFERENCES),
    TinyCase("gemma4-released-e2b-layout", "Gemma4ForCausalLM", write_gemma4_tokenizer, {
        "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 10, "num_attention_heads": 8,
        "num_key_value_heads": 1, "layer_types": (["sliding_attention"] * 4 + ["full_attention"]) * 2,
        "head_dim": 256, "global_head_dim": 512, "sliding_window": 512, "num_kv_shared_layers": 5,
        "use_double_wide_mlp": True, "hidden_size_per_layer_input": 64, "vocab_size_per_layer_input": N_VOCAB,
        "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6},
        config_class="Gemma4TextConfig",
        # llama.cpp's GELU reads an f16 table (see arch_cases/gemma4.py); logits capped at 30 here, not 15.
        f32_tolerance=3e-2),
]


@pytest.fixture(scope="module")
def oracle(request, tmp_path_factory):
    return reference_converter_or_fail(request, tmp_path_factory)


@pytest.mark.parametrize("case", RELEASED, ids=lambda case: case.name)
def test_released_shapes_export_as_llama_cpp_does_and_give_transformers_logits(case, oracle, tmp_path):
    from convert.export import export

    checkpoint = build_tiny_model(tmp_path / case.name, case)
    ours = export(checkpoint, tmp_path / "ours.gguf", "f16").path
    assert_same_file_as_reference(oracle, checkpoint, ours, case, tmp_path / "reference.gguf")

    f32 = export(checkpoint, tmp_path / "ours.F32.gguf", "f32").path
    sequences = random_sequences(case_vocab(checkpoint))
    for ids, want, have in zip(sequences, hf_last_logits(checkpoint, sequences), gguf_last_logits(f32, sequences)):
        assert abs(have - want).max() < case.f32_tolerance, f"{case.name}: logits differ after {len(ids)} tokens"


@pytest.mark.parametrize("case", RELEASED, ids=lambda case: case.name)
def test_released_shapes_read_back_from_a_gguf_base_to_the_same_file(case, tmp_path, monkeypatch):
    """`--base FILE.gguf` at the released shapes: the checkpoint it becomes (transformers' GGUF reader
    for Qwen3.5 and LFM2, ours for the rest) exports to the same tensors, byte for byte."""
    from convert import gguf_base
    from convert.export import export

    monkeypatch.setenv(gguf_base.CACHE_ENV, str(tmp_path / "cache"))
    f32 = export(build_tiny_model(tmp_path / case.name, case), tmp_path / "ours.F32.gguf", "f32").path
    again = export(gguf_base.checkpoint_from_gguf(str(f32)), tmp_path / "again.F32.gguf", "f32").path
    assert_same_tensors(again, f32)


def case_vocab(checkpoint) -> int:
    import json

    return json.loads((checkpoint / "config.json").read_text())["vocab_size"]
