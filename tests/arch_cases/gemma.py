"""Gemma 2 and Gemma 3 (text, and the text tower of the 4B+ conditional-generation model).

Every case has a Gemma-like SentencePiece tokenizer (BPE with byte fallback, digits
split, no dummy prefix, <pad>=0 <eos>=1 <bos>=2 <unk>=3, then <start_of_turn> and
<end_of_turn>), saved as transformers' GemmaTokenizer with Gemma's real chat
template, and a sliding window (16) shorter than the longest test sequences.

F32 logits are compared within GELU_TOLERANCE, not 1e-4: llama.cpp's CPU backend computes
GELU from an f16 lookup table (GGML_GELU_FP16 in ggml-cpu), which moves these logits (about
7 in size) by up to 1.3e-2 over six layers. Computing transformers' GELU through the same
table brings the difference down to ~1e-5 on a 3-token input: the rest is the table's steps.
Conversion mistakes move them far more (a missing local rope base: 0.11; norms without their
offset: 4; Gemma 2's attention cap lost: 0.4).
"""

from __future__ import annotations

import json
from pathlib import Path

from convert_helpers import TinyCase, TokenizerInfo, train_sentencepiece

# Gemma 2's chat template, as google/gemma-2-2b-it ships it (llama.cpp's models/templates copy).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
GELU_TOLERANCE = 3e-2
SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0..3, as in Gemma's tokenizer.model
TURN_MARKERS = ("<start_of_turn>", "<end_of_turn>")  # user-defined pieces, marked special in tokenizer_config


def write_gemma_tokenizer(out: Path, vocab_size: int = 400) -> TokenizerInfo:
    """tokenizer.model plus transformers' files (tokenizer.json, tokenizer_config.json, chat template).

    transformers 5 saves no tokenizer.model and no `added_tokens_decoder`; Gemma's released
    tokenizers have both (llama.cpp's converter reads the token types from the latter), so
    they are written here as Gemma ships them.
    """
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
        user_defined_symbols=list(TURN_MARKERS),
    )
    (out / "tokenizer.model").write_bytes(model)

    # transformers' own SentencePiece import needs protobuf; build the same BPE from the pieces.
    processor = spm.SentencePieceProcessor(model_proto=model)
    vocab = {processor.IdToPiece(i): i for i in range(processor.GetPieceSize())}
    tokenizer = transformers.GemmaTokenizer(
        vocab=vocab, merges=generate_merges(vocab), mask_token=None, add_bos_token=True, add_eos_token=False
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in TURN_MARKERS]}
    )
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)

    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.update(
        add_bos_token=True,
        add_eos_token=False,
        added_tokens_decoder={
            str(vocab[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True}
            for t in (*SPECIALS, *TURN_MARKERS)
        },
    )
    config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return TokenizerInfo(processor.GetPieceSize(), {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2})


def gemma3_conditional_generation_config(**text_settings):
    """A Gemma3Config whose text_config takes the tiny settings, with a tiny SigLIP vision tower.

    The image token lies outside the text vocabulary, so random test sequences never hold one.
    """
    import transformers

    vision = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    text = transformers.Gemma3TextConfig(**text_settings)
    return transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=text.vocab_size
    )


CASES = [
    TinyCase(
        # Gemma 2: attention and final soft-capping (tighter than the released 50/30 so they matter
        # for these small logits); layer 0 slides (window 16), layer 1 is global.
        "gemma2-softcap-swa",
        "Gemma2ForCausalLM",
        write_gemma_tokenizer,
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 16,
            "attn_logit_softcapping": 10.0,
            "final_logit_softcapping": 15.0,
        },
        f32_tolerance=GELU_TOLERANCE,
    ),
    TinyCase(
        # Gemma 3 270m-like: one KV head, head_dim not hidden/heads, six layers of which the
        # sixth is global (the default pattern), local and global rope bases; final soft-capping.
        "gemma3-text-swa",
        "Gemma3ForCausalLM",
        write_gemma_tokenizer,
        {
            "num_hidden_layers": 6,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "query_pre_attn_scalar": 32,
            "sliding_window": 16,
            "final_logit_softcapping": 15.0,
            "rope_parameters": {  # a local base that is not llama.cpp's default (10000), so it must be written
                "sliding_attention": {"rope_type": "default", "rope_theta": 20_000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            },
        },
        config_class="Gemma3TextConfig",
        f32_tolerance=GELU_TOLERANCE,
    ),
    TinyCase(
        # Gemma 3 4B-like: the text tower of Gemma3ForConditionalGeneration (vision tower and
        # projector left out), linear rope scaling on the global layer, and a layer pattern
        # (sliding, global) that is not llama.cpp's default. No final soft-capping, as released:
        # transformers' Gemma3ForConditionalGeneration ignores it, llama.cpp would apply it.
        "gemma3-vision-text-tower",
        "Gemma3ForConditionalGeneration",
        write_gemma_tokenizer,
        {
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            },
        },
        config_class=gemma3_conditional_generation_config,
        f32_tolerance=GELU_TOLERANCE,
        metadata_differences={
            "gemma3.attention.sliding_window_pattern": (
                "llama.cpp's converter leaves which layers slide to llama.cpp's default (every 6th "
                "layer global), which is not this config's layer_types; we write them per layer"
            ),
        },
    ),
]
