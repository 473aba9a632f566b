"""Phi-3 / Phi-3.5-mini / Phi-4-mini (`Phi3ForCausalLM`): fused qkv_proj and gate_up_proj.

- Phi-3: SentencePiece with Phi-3's chat markers added on top (ids after the pieces, the
  vocabulary padded to a multiple of 64 as Phi-3's 32064), sliding window 2047;
- Phi-3.5: the same tokenizer, LongRoPE short/long factors, original context 256 < 1024
  (llama.cpp picks the factors by its context size, padded to a multiple of 256; the tests'
  128-token context becomes 256: the short factors, as transformers uses for sequences up
  to 256 tokens);
- Phi-4-mini-like: a byte-level BPE with the o200k split (llama.cpp's "gpt-4o"),
  `tokenizer_class` GPT2Tokenizer as Phi-4-mini ships it, partial rotary 0.75,
  tied embeddings, and LongRoPE over the 12 rotary dimensions (6 factors).
"""

from __future__ import annotations

import json
from pathlib import Path

from convert_helpers import TinyCase, TokenizerInfo, write_bpe_tokenizer, write_sentencepiece_tokenizer

# microsoft/Phi-3.5-mini-instruct's chat template (llama.cpp's models/templates copy).
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# microsoft/Phi-4-mini-instruct's chat template.
PHI4_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
    "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + "
    "message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + "
    "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
# Phi-3's tokens after the 32000 SentencePiece pieces, in their order (32000..32010).
PHI3_ADDED = (
    "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
    "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>",
)
# The o200k split Phi-4-mini's tokenizer.json ships (llama.cpp's "gpt-4o").
GPT4O_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PHI4_SPECIALS = (
    "<|endoftext|>", "<|endofprompt|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>",
    "<|tool|>", "<|/tool|>", "<|tool_call|>", "<|/tool_call|>",
)


def write_phi3_tokenizer(out: Path) -> TokenizerInfo:
    """tokenizer.model + tokenizer.json + tokenizer_config.json + added_tokens.json, as Phi-3 ships them."""
    import sentencepiece
    import transformers
    from tokenizers import AddedToken
    from transformers.tokenization_utils_base import generate_merges

    n_pieces = write_sentencepiece_tokenizer(out)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    vocab = {processor.IdToPiece(i): i for i in range(n_pieces)}
    # transformers' own SentencePiece import needs protobuf; the same BPE from the pieces.
    tokenizer = transformers.LlamaTokenizer(
        vocab=vocab, merges=generate_merges(vocab), legacy=False, add_bos_token=False,
        bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>", pad_token="<|endoftext|>",
    )
    added = [AddedToken(t, special=True, normalized=False, rstrip=t != "<|endoftext|>") for t in PHI3_ADDED]
    tokenizer.add_special_tokens({"additional_special_tokens": added})
    tokenizer.chat_template = PHI3_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    ids = {t: n_pieces + i for i, t in enumerate(PHI3_ADDED)}
    assert tokenizer.convert_tokens_to_ids(list(ids)) == list(ids.values())

    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.update(
        add_bos_token=False,
        add_eos_token=False,
        added_tokens_decoder={
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": t != "<|endoftext|>",
                     "single_word": False, "special": True}
            for t, i in ids.items()
        },
    )
    config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "added_tokens.json").write_text(json.dumps(ids, indent=2), encoding="utf-8")
    n_vocab = -(-(n_pieces + len(PHI3_ADDED)) // 64) * 64  # padded, as Phi-3's 32011 tokens to 32064
    end = ids["<|endoftext|>"]
    return TokenizerInfo(n_vocab, {"bos_token_id": 1, "eos_token_id": end, "pad_token_id": end})


def write_phi4_tokenizer(out: Path) -> TokenizerInfo:
    """Byte-level BPE with the o200k split; tokenizer_class GPT2Tokenizer, as Phi-4-mini ships it."""
    roles = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                 pad_token="<|endoftext|>")
    n_vocab = write_bpe_tokenizer(
        out, regex=GPT4O_REGEX, specials=PHI4_SPECIALS, roles=roles, chat_template=PHI4_CHAT_TEMPLATE
    )
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "GPT2Tokenizer"
    config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return TokenizerInfo(n_vocab, {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0})


SHORT_FACTORS = [1.0, 1.02, 1.05, 1.1, 1.2, 1.4, 1.7, 2.0]
LONG_FACTORS = [1.0, 1.3, 1.9, 2.8, 4.5, 7.0, 11.0, 16.0]

CASES = [
    TinyCase(
        "phi3-spm-fused",
        "Phi3ForCausalLM",
        write_phi3_tokenizer,
        {"sliding_window": 2047, "max_position_embeddings": 4096, "original_max_position_embeddings": 4096},
    ),
    TinyCase(
        "phi3.5-spm-longrope",
        "Phi3ForCausalLM",
        write_phi3_tokenizer,
        {
            "sliding_window": 262144,
            "max_position_embeddings": 1024,
            "original_max_position_embeddings": 256,
            "rope_parameters": {
                "rope_type": "longrope", "rope_theta": 10000.0,
                "short_factor": SHORT_FACTORS, "long_factor": LONG_FACTORS,
            },
        },
    ),
    TinyCase(
        "phi4-mini-bpe-partial-rotary",
        "Phi3ForCausalLM",
        write_phi4_tokenizer,
        {
            "tie_word_embeddings": True,
            "partial_rotary_factor": 0.75,
            "sliding_window": 262144,
            "max_position_embeddings": 1024,
            "original_max_position_embeddings": 256,
            "rope_parameters": {
                "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                "short_factor": SHORT_FACTORS[:6], "long_factor": LONG_FACTORS[:6],
            },
        },
    ),
]
