"""OLMo 2: post-norms only (after attention and MLP), q/k RMSNorm over whole projections,
untied output; cl100k's split, which llama.cpp names "dbrx" for OLMo 2.
"""

from pathlib import Path

from convert_helpers import LLAMA3_REGEX, TinyCase, TokenizerInfo, write_bpe_tokenizer

SPECIALS = ("<|endoftext|>", "<|pad|>")

# allenai/OLMo-2-1124-7B-Instruct's chat template (Tulu 3's).
OLMO2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<|system|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'user' %}"
    "{{ '<|user|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'assistant' %}"
    "{% if not loop.last %}{{ '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}"
)


def write_olmo2_tokenizer(out: Path) -> TokenizerInfo:
    """A byte-level BPE split like cl100k (OLMo 2's dolma2 tokenizer), with its special tokens."""
    roles = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                 pad_token="<|pad|>")
    n_vocab = write_bpe_tokenizer(
        out, regex=LLAMA3_REGEX, specials=SPECIALS, roles=roles, chat_template=OLMO2_CHAT_TEMPLATE
    )
    return TokenizerInfo(n_vocab, {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1})


CASES = [
    TinyCase("olmo2-postnorm", "Olmo2ForCausalLM", write_olmo2_tokenizer),
]
