"""Qwen3.5, dense and MoE: gated DeltaNet (linear attention) layers with a gated full-attention layer.

Four layers, as transformers lays them out by default: three linear-attention layers, then one
full-attention layer (full_attention_interval 4). Two key heads and four value heads in the
linear attention (the released sizes have twice as many value heads as key heads too), so the
value-head reordering llama.cpp needs is exercised; partial RoPE (a quarter of head_dim 32)
with interleaved multimodal sections that sum to the 4 rotated pairs.

The tokenizer splits text as Qwen3.5's does (its tokenizer.json regex, llama.cpp's "qwen35":
letters and combining marks together) and carries Qwen3.5's real chat template
(llama.cpp's models/templates/Qwen3.5-4B.jinja, the one Qwen/Qwen3.5-4B ships).
"""

from pathlib import Path

from convert_helpers import TinyCase, TokenizerInfo, write_bpe_tokenizer

QWEN35_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEMPLATES = Path(__file__).with_name("templates")
# llama.cpp's converter asserts on a checkpoint without multi-token-prediction layers (transformers saves
# none) unless told to leave them out; our exporter always leaves them out.
NO_MTP = ("--no-mtp",)

# The linear attention's sizes and the rope of both families' tiny cases.
HYBRID = {
    "num_hidden_layers": 4,
    "head_dim": 32,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    # As released. llama.cpp's l2-normalization of the linear attention's q and k uses rms_norm_eps,
    # transformers' a fixed 1e-6: with the tiny cases' default 1e-5 the logits differ by 1.3e-4.
    "rms_norm_eps": 1e-6,
}
QWEN35_ROPE = {
    "rope_type": "default",
    "rope_theta": 10_000_000.0,
    "partial_rotary_factor": 0.25,
    "mrope_section": [2, 1, 1],
    "mrope_interleaved": True,
}


def qwen35_tokenizer(out: Path) -> TokenizerInfo:
    # As Qwen3.5 ships it: no BOS token, <|im_end|> ends a turn, <|endoftext|> pads.
    n_vocab = write_bpe_tokenizer(
        out,
        "qwen35",
        regex=QWEN35_REGEX,
        roles=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
        chat_template=(TEMPLATES / "qwen3_5.jinja").read_text(encoding="utf-8"),
    )
    return TokenizerInfo(n_vocab, {"eos_token_id": 2, "pad_token_id": 0})


def qwen35_image_text_config(**text_settings):
    """A Qwen3_5Config whose text_config takes the tiny settings, with a one-block vision tower (left out
    of the GGUF, as llama.cpp writes it to a separate mmproj file)."""
    import transformers

    vision = transformers.Qwen3_5VisionConfig(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text_settings["hidden_size"],
        num_position_embeddings=16, patch_size=4,
    )
    text = transformers.Qwen3_5TextConfig(**text_settings)
    return transformers.Qwen3_5Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), tie_word_embeddings=text.tie_word_embeddings,
        image_token_id=text.vocab_size, video_token_id=text.vocab_size + 1,
        vision_start_token_id=text.vocab_size + 2, vision_end_token_id=text.vocab_size + 3,
    )


CASES = [
    TinyCase(
        "qwen35-hybrid-tied",
        "Qwen3_5ForCausalLM",
        qwen35_tokenizer,
        {**HYBRID, "tie_word_embeddings": True, "intermediate_size": 96, "rope_parameters": QWEN35_ROPE},
        config_class="Qwen3_5TextConfig",
        oracle_args=NO_MTP,
    ),
    TinyCase(
        # 4 experts of width 32, 2 used, and a shared expert 48 wide behind its sigmoid gate; one KV
        # head for the four query heads. Untied head, as the released MoE sizes.
        "qwen35moe-hybrid",
        "Qwen3_5MoeForCausalLM",
        qwen35_tokenizer,
        {
            **HYBRID,
            "num_key_value_heads": 1,
            "rope_parameters": QWEN35_ROPE,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48,
        },
        config_class="Qwen3_5MoeTextConfig",
        oracle_args=NO_MTP,
    ),
    TinyCase(
        # Qwen3.5 as released (Qwen/Qwen3.5-*): the image-text class; only its language model is written.
        "qwen35-image-text-tower",
        "Qwen3_5ForConditionalGeneration",
        qwen35_tokenizer,
        {**HYBRID, "tie_word_embeddings": True, "intermediate_size": 96, "rope_parameters": QWEN35_ROPE},
        config_class=qwen35_image_text_config,
        oracle_args=NO_MTP,
    ),
]
