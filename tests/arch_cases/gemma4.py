"""Gemma 4 (text): Gemma4ForCausalLM, and the language model of Gemma4ForConditionalGeneration.

Every case has a Gemma 4-like tokenizer as transformers 5 saves it: `tokenizer.json` only (a
SentencePiece-style BPE with byte fallback, no dummy prefix), <pad>=0 <eos>=1 <bos>=2 <unk>=3
<mask>=4, then Gemma 4's turn, channel, tool and media markers, named in tokenizer_config.json
as google/gemma-4-31B-it names them, and Gemma 4's real chat template
(llama.cpp's models/templates/google-gemma-4-31B-it.jinja, google's own). Layers alternate
sliding (window 16, shorter than the longest test sequences) and full attention, the full
layers with their own head size and proportional rope (a quarter of the dimensions rotated).

F32 logits are compared within GELU_TOLERANCE, not 1e-4: llama.cpp's CPU backend computes GELU
from an f16 lookup table (GGML_GELU_FP16 in ggml-cpu), as for Gemma 2 and 3
(tests/arch_cases/gemma.py); Gemma 4 also runs GELU on the per-layer-input gates and in every
expert. Measured: at most 3.9e-3 (PLE case) and 1.4e-3 (MoE case) on logits of size 4-6;
with transformers' GELU computed through the same f16 table, 2.7e-4 and 4e-5. Conversion
mistakes move them far more (the missing no-soft-cap key below: 0.11).
"""

from __future__ import annotations

import json
from pathlib import Path

from convert_helpers import TinyCase, TokenizerInfo, train_sentencepiece

GELU_TOLERANCE = 1e-2
SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # ids 0..4, as in Gemma 4's tokenizer
# tokenizer_config.json's names for Gemma 4's markers (google/gemma-4-31B-it), in id order here.
NAMED_MARKERS = {
    "sot_token": "<|turn>", "eot_token": "<turn|>", "think_token": "<|think|>",
    "soc_token": "<|channel>", "eoc_token": "<channel|>",
    "std_token": "<|tool>", "etd_token": "<tool|>",
    "stc_token": "<|tool_call>", "etc_token": "<tool_call|>",
    "str_token": "<|tool_response>", "etr_token": "<tool_response|>",
    "escape_token": '<|"|>',
    "boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
    "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>",
}
EXTRA_MARKERS = ("<|video|>",)
MARKERS = (*NAMED_MARKERS.values(), *EXTRA_MARKERS)


def chat_template() -> str:
    """Gemma 4's chat template as google ships it (a copy in llama.cpp's models/templates)."""
    return (Path(__file__).with_name("gemma4_chat_template.jinja")).read_text(encoding="utf-8")


def write_gemma4_tokenizer(out: Path, vocab_size: int = 400) -> TokenizerInfo:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja, as transformers 5 saves a
    Gemma 4 tokenizer: no tokenizer.model. The BPE is trained by SentencePiece, then written
    as transformers' GemmaTokenizer (its merges derived from the pieces)."""
    import sentencepiece as spm
    import transformers
    from tokenizers import AddedToken
    from transformers.tokenization_utils_base import generate_merges

    out.mkdir(parents=True, exist_ok=True)
    model = train_sentencepiece(
        vocab_size,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<mask>", *MARKERS],
    )
    processor = spm.SentencePieceProcessor(model_proto=model)
    vocab = {processor.IdToPiece(i): i for i in range(processor.GetPieceSize())}
    tokenizer = transformers.GemmaTokenizer(
        vocab=vocab, merges=generate_merges(vocab), mask_token="<mask>", add_bos_token=True, add_eos_token=False
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in MARKERS]}
    )
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(chat_template(), encoding="utf-8")

    # The named markers as google's tokenizer_config.json has them (transformers reads them as
    # the tokenizer's own special tokens); "<|video|>" is its one extra special token.
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.pop("additional_special_tokens", None)
    config.update(NAMED_MARKERS, extra_special_tokens=list(EXTRA_MARKERS), add_bos_token=True, add_eos_token=False)
    config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return TokenizerInfo(processor.GetPieceSize(), {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2})


def gemma4_conditional_generation_config(**text_settings):
    """A Gemma4Config whose text_config takes the tiny settings, with a tiny vision tower (no audio)."""
    import transformers

    vision = transformers.Gemma4VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        head_dim=16, patch_size=4, position_embedding_size=64,
    )
    text = transformers.Gemma4TextConfig(**text_settings)
    return transformers.Gemma4Config(text_config=text, vision_config=vision, audio_config=None)


N_VOCAB = 400  # write_gemma4_tokenizer's size: the per-layer embeddings have one row per token too

CASES = [
    TinyCase(
        # E2B-like: per-layer input embeddings, the last two layers reuse the KV of the first two
        # and have double-wide MLPs, full layers with twice the head size and proportional rope
        # (a quarter rotated), final soft-capping (tighter than the released 30 so it matters).
        "gemma4-text-ple-kv-shared",
        "Gemma4ForCausalLM",
        write_gemma4_tokenizer,
        {
            "num_hidden_layers": 4,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            "head_dim": 16,
            "global_head_dim": 32,
            "sliding_window": 16,
            "num_kv_shared_layers": 2,
            "use_double_wide_mlp": True,
            "hidden_size_per_layer_input": 8,
            "vocab_size_per_layer_input": N_VOCAB,
            "final_logit_softcapping": 15.0,
        },
        config_class="Gemma4TextConfig",
        f32_tolerance=GELU_TOLERANCE,
    ),
    TinyCase(
        # 26B-A4B-like: the language model of Gemma4ForConditionalGeneration (its vision tower and
        # embedder left out), a mixture of experts beside the dense MLP, and full layers whose
        # keys are their values (attention_k_eq_v) with their own KV head count and head size.
        "gemma4-vision-text-tower-moe",
        "Gemma4ForConditionalGeneration",
        write_gemma4_tokenizer,
        {
            "layer_types": ["sliding_attention", "full_attention"],
            "head_dim": 16,
            "global_head_dim": 32,
            "num_global_key_value_heads": 1,
            "attention_k_eq_v": True,
            "sliding_window": 16,
            "hidden_size_per_layer_input": 0,
            "enable_moe_block": True,
            "num_experts": 4,
            "top_k_experts": 2,
            "moe_intermediate_size": 32,
        },
        config_class=gemma4_conditional_generation_config,
        f32_tolerance=GELU_TOLERANCE,
        metadata_differences={
            "gemma4.final_logit_softcapping": (
                "this config has no final soft-capping; llama.cpp's converter then writes no key and "
                "llama.cpp's gemma4 caps logits at its default of 30, so we write 0 (no cap), as transformers"
            ),
        },
    ),
]
