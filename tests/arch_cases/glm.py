"""GLM-4: `GlmForCausalLM` (glm-4-9b-chat-hf; llama.cpp's chatglm) and `Glm4ForCausalLM`
(GLM-4-0414; llama.cpp's glm4, with post-attention and post-MLP norms).

Both: q/k/v biases, fused gate_up_proj, partial rotary 0.5 (head_dim 16: 8 rotary
dimensions), GLM-4's RMS epsilon (1.5625e-07), and a GLM-like byte-level BPE: Llama 3's
split (as GLM-4's tokenizer.json), GLM's special tokens, EOS and PAD <|endoftext|>, no BOS,
config.json's eos_token_id listing <|endoftext|>, <|user|> and <|observation|>.
"""

from __future__ import annotations

from pathlib import Path

from convert_helpers import LLAMA3_REGEX, TinyCase, TokenizerInfo, write_bpe_tokenizer

GLM_SPECIALS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
)
# GLM-4's chat format ([gMASK]<sop>, then <|role|> and a newline per message), without
# the tool-calling part of the templates GLM-4 ships.
GLM4_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}{% if message['role'] == 'tool' %}<|observation|>"
    "{% else %}<|{{ message['role'] }}|>{% endif %}{{ '\\n' + message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def write_glm_tokenizer(out: Path) -> TokenizerInfo:
    roles = dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    n_vocab = write_bpe_tokenizer(
        out, regex=LLAMA3_REGEX, specials=GLM_SPECIALS, roles=roles, chat_template=GLM4_CHAT_TEMPLATE
    )
    ids = {t: i for i, t in enumerate(GLM_SPECIALS)}
    end_of_turn = [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]]
    special_ids = {"eos_token_id": end_of_turn, "pad_token_id": ids["<|endoftext|>"], "bos_token_id": None}
    return TokenizerInfo(n_vocab, special_ids)


GLM_CONFIG = {"head_dim": 16, "rms_norm_eps": 1.5625e-07}
# <|observation|> ends a turn that calls a tool; llama.cpp's converter sets it as end of
# message for GLM-4.5 but not for GLM-4, where llama.cpp would then never stop after a tool call.
EOM_DIFFERENCE = {"tokenizer.ggml.eom_token_id": "we set <|observation|> as end of message, so llama.cpp stops at it"}

CASES = [
    TinyCase(
        "glm4-0414-bpe",
        "Glm4ForCausalLM",
        write_glm_tokenizer,
        GLM_CONFIG,
        metadata_differences=EOM_DIFFERENCE,
    ),
    TinyCase(
        "glm-4-chat-hf-bpe",
        "GlmForCausalLM",
        write_glm_tokenizer,
        GLM_CONFIG,
        metadata_differences={
            **EOM_DIFFERENCE,
            # llama.cpp's chatglm converter reads ChatGLM's own keys (seq_length, layernorm_epsilon),
            # absent from transformers' glm config, and falls back to hidden_size and 1e-5.
            "chatglm.context_length": "max_position_embeddings; llama.cpp's converter writes hidden_size",
            "chatglm.attention.layer_norm_rms_epsilon": "rms_norm_eps; llama.cpp's converter writes 1e-5",
        },
    ),
]
