"""ERNIE 4.5: dense (llama.cpp's ernie4_5) and MoE (ernie4_5-moe).

Both with ERNIE 4.5's shapes: head_dim (32) not hidden/heads (16), grouped KV heads, rope on
adjacent pairs (transformers' Ernie4_5 rotates interleaved dimensions, as llama.cpp's "normal"
rope does: no q/k permutation), tied embeddings as in ERNIE-4.5-0.3B. The MoE case has one
dense layer before its MoE layers (moe_layer_start_index 1), 4 experts of which 2 are used,
a shared expert and the router's score-correction bias (moe_statics), made non-zero so that
it decides which experts are chosen.

The tokenizer is ERNIE-like SentencePiece (BPE with byte fallback, no dummy prefix:
tokenizer_config's add_prefix_space false, <unk>=0 <s>=1 </s>=2, and ERNIE's chat markers
<|begin_of_sentence|> / <|end_of_sentence|> as user-defined pieces), saved as transformers
saves it (tokenizer.json beside tokenizer.model), with ERNIE 4.5's real chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

from convert_helpers import TinyCase, TokenizerInfo, train_sentencepiece

# baidu/ERNIE-4.5-0.3B-PT's chat template (tokenizer_config.json; the same string is
# DEFAULT_CHAT_TEMPLATE in transformers' ERNIE 4.5 tokenizer conversion script).
ERNIE_CHAT_TEMPLATE = (
    '{%- if not add_generation_prompt is defined -%}\n    {%- set add_generation_prompt = true -%}\n{%- endif -%}\n'
    '{%- if not cls_token is defined -%}\n    {%- set cls_token = "<|begin_of_sentence|>" -%}\n{%- endif -%}\n'
    '{%- if not sep_token is defined -%}\n    {%- set sep_token = "<|end_of_sentence|>" -%}\n{%- endif -%}\n'
    '{{- cls_token -}}\n{%- for message in messages -%}\n    {%- if message["role"] == "user" -%}\n'
    '        {{- "User: " + message["content"] + "\n" -}}\n    {%- elif message["role"] == "assistant" -%}\n'
    '        {{- "Assistant: " + message["content"] + sep_token -}}\n    {%- elif message["role"] == "system" -%}\n'
    '        {{- message["content"] + "\n" -}}\n    {%- endif -%}\n{%- endfor -%}\n'
    '{%- if add_generation_prompt -%}\n    {{- "Assistant: " -}}\n{%- endif -%}'
)
SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0..2, as in ERNIE's tokenizer.model
CHAT_MARKERS = ("<|begin_of_sentence|>", "<|end_of_sentence|>")


def write_ernie_tokenizer(out: Path, vocab_size: int = 400) -> TokenizerInfo:
    """tokenizer.model plus transformers' files: tokenizer.json, tokenizer_config.json (ERNIE's
    roles: cls <|begin_of_sentence|>, sep <|end_of_sentence|>, pad <unk>; no BOS added, the
    template starts with cls), with the chat template."""
    import sentencepiece as spm
    import transformers
    from tokenizers import AddedToken
    from transformers.tokenization_utils_base import generate_merges

    out.mkdir(parents=True, exist_ok=True)
    model = train_sentencepiece(
        vocab_size,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=list(CHAT_MARKERS),
    )
    (out / "tokenizer.model").write_bytes(model)

    # transformers reads tokenizer.model only through protobuf; build the same BPE from the pieces
    # (GemmaTokenizer: SentencePiece-style BPE, byte fallback, no prefix space, as ERNIE's).
    processor = spm.SentencePieceProcessor(model_proto=model)
    vocab = {processor.IdToPiece(i): i for i in range(processor.GetPieceSize())}
    tokenizer = transformers.GemmaTokenizer(
        vocab=vocab, merges=generate_merges(vocab), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<unk>", mask_token=None, add_bos_token=False, add_eos_token=False,
    )
    markers = [AddedToken(t, special=True, normalized=False) for t in CHAT_MARKERS]
    tokenizer.add_special_tokens({"cls_token": markers[0], "sep_token": markers[1]})
    tokenizer.chat_template = ERNIE_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)

    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.update(
        add_bos_token=False,
        add_eos_token=False,
        add_prefix_space=False,  # as ERNIE 4.5's: llama.cpp's converter reads it
        added_tokens_decoder={
            str(vocab[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True}
            for t in (*SPECIALS, *CHAT_MARKERS)
        },
    )
    config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return TokenizerInfo(processor.GetPieceSize(), {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})


# ERNIE-4.5-0.3B's proportions, tiny: head_dim twice hidden/heads, 4 query heads per KV head.
ERNIE_CONFIG = {"head_dim": 32, "num_attention_heads": 4, "num_key_value_heads": 1, "tie_word_embeddings": True}
# <|end_of_sentence|> ends every assistant turn of ERNIE's template; llama.cpp's converter
# leaves it out of the end-of-generation set, so a chat would run on into an invented turn.
EOT_DIFFERENCE = {"tokenizer.ggml.eot_token_id": "we set <|end_of_sentence|> as end of turn, so llama.cpp stops at it"}

ERNIE_MOE_CONFIG = {
    **ERNIE_CONFIG,
    "num_hidden_layers": 3,
    "moe_num_experts": 4,
    "moe_k": 2,
    "moe_intermediate_size": 32,
    "moe_num_shared_experts": 1,
    "moe_layer_start_index": 1,
}

CASES = [
    TinyCase("ernie4_5-spm", "Ernie4_5ForCausalLM", write_ernie_tokenizer, ERNIE_CONFIG,
             metadata_differences=EOT_DIFFERENCE),
    TinyCase(
        "ernie4_5-moe-spm",
        "Ernie4_5_MoeForCausalLM",
        write_ernie_tokenizer,
        ERNIE_MOE_CONFIG,
        config_class="Ernie4_5_MoeConfig",
        metadata_differences={
            **EOT_DIFFERENCE,
            # transformers builds the shared experts as one MLP of moe_num_shared_experts ×
            # moe_intermediate_size (32 here); llama.cpp's converter writes intermediate_size //
            # num_key_value_heads (128), which is that width only in ERNIE-4.5-21B's and 300B's
            # configs; its file for this checkpoint does not load.
            "ernie4_5-moe.expert_shared_feed_forward_length": "the shared experts' real width (see above)",
        },
    ),
]
