"""Qwen3: per-head q/k norms, an explicit head_dim (32, not hidden 64 / 4 heads = 16), tied
embeddings as on the small sizes, and a base model's tokenizer: <|endoftext|> is the EOS, so
<|im_end|> must still end a turn (llama.cpp finds it by its text)."""

from convert_helpers import TinyCase, TokenizerInfo, write_bpe_tokenizer


def qwen3_base_tokenizer(out) -> TokenizerInfo:
    # As Qwen3-*-Base ships it: no BOS token, <|endoftext|> for EOS and padding.
    n_vocab = write_bpe_tokenizer(out, "qwen2", roles=dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>"))
    return TokenizerInfo(n_vocab, {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0})


CASES = [
    TinyCase(
        "qwen3-tied-head-dim",
        "Qwen3ForCausalLM",
        qwen3_base_tokenizer,
        {"tie_word_embeddings": True, "head_dim": 32},
    ),
]
