"""OLMo 3: OLMo 2's blocks with sliding-window attention (llama.cpp's olmo2 with a window).

Four layers, transformers' default pattern (three sliding, the fourth full) and a window
of 8 tokens, shorter than the longest test sequences, so a window that is lost or off by
one moves the logits. As in OLMo 3's long-context releases, the full-attention layers
scale rope with YaRN (factor 8, here from 32 original positions so the test sequences
pass them) and the sliding layers do not: llama.cpp scaling every layer, or none, moves
the logits by 0.1 to 0.7. The tokenizer is OLMo 2/3's cl100k-like split (dolma2) with OLMo 3's
ChatML-style special tokens and OLMo 3 Instruct's chat template.
"""

from pathlib import Path

from convert_helpers import LLAMA3_REGEX, TinyCase, TokenizerInfo, write_bpe_tokenizer

SPECIALS = ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")

# OLMo 3.1 Instruct's chat template (its "You are Olmo..." default system turn, <functions>
# tool declarations, <|im_end|> between turns and eos_token after the last assistant turn),
# as shipped with allenai's Olmo-3.1-32B-Instruct and quoted verbatim (LM Studio's MLX build
# of it) in a public repository found with the search tools. Olmo-3-7B-Instruct's has the
# same structure with a shorter default system turn ("You are a helpful function-calling AI
# assistant. ..."), which its model card and transformers' integration test show; its
# verbatim text was not found, so the 3.1 template is used.
OLMO3_CHAT_TEMPLATE = (
    "{%- set has_system = messages|selectattr('role', 'equalto', 'system')|list|length > 0 -%}"
    "{%- if not has_system -%}{{- '<|im_start|>system\nYou are Olmo, a helpful AI assistant built by Ai2. "
    "Your date cutoff is December 2024, and your model weights are available at https://huggingface.co/allenai. ' -}}"
    "{%- if tools is none or (tools | length) == 0 -%}"
    "{{- 'You do not currently have access to any functions. <functions></functions><|im_end|>\n' -}}"
    "{%- else -%}{{- 'You are provided with function signatures within <functions></functions> XML tags. "
    "You may call one or more functions to assist with the user query. Output any function calls within "
    "<function_calls></function_calls> XML tags. Do not make assumptions about what values to plug into functions.' -}}"
    "{{- '<functions>' -}}{{- tools | tojson -}}{{- '</functions><|im_end|>\n' -}}{%- endif -%}{%- endif -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'system' -%}"
    "{{- '<|im_start|>system\n' + message['content'] -}}{%- if tools is not none -%}{{- '<functions>' -}}"
    "{{- tools | tojson -}}{{- '</functions>' -}}{%- elif message.get('functions', none) is not none -%}"
    "{{- ' <functions>' + message['functions'] + '</functions>' -}}{%- endif -%}{{- '<|im_end|>\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- '<|im_start|>user\n' + message['content'] + '<|im_end|>\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- '<|im_start|>assistant\n' -}}"
    "{%- if message.get('content', none) is not none -%}{{- message['content'] -}}{%- endif -%}"
    "{%- if message.get('function_calls', none) is not none -%}"
    "{{- '<function_calls>' + message['function_calls'] + '</function_calls>' -}}"
    "{% elif message.get('tool_calls', none) is not none %}{{- '<function_calls>' -}}"
    "{%- for tool_call in message['tool_calls'] %}"
    "{%- if tool_call is mapping and tool_call.get('function', none) is not none %}"
    "{%- set args = tool_call['function']['arguments'] -%}{%- set ns = namespace(arguments_list=[]) -%}"
    "{%- for key, value in args.items() -%}"
    "{%- set ns.arguments_list = ns.arguments_list + [key ~ '=' ~ (value | tojson)] -%}{%- endfor -%}"
    "{%- set arguments = ns.arguments_list | join(', ') -%}"
    "{{- tool_call['function']['name'] + '(' + arguments + ')' -}}"
    "{%- if not loop.last -%}{{ '\n' }}{%- endif -%}{% else %}{{- tool_call -}}{%- endif %}{%- endfor %}"
    "{{- '</function_calls>' -}}{%- endif -%}"
    "{%- if not loop.last -%}{{- '<|im_end|>' + '\n' -}}{%- else -%}{{- eos_token -}}{%- endif -%}"
    "{%- elif message['role'] == 'environment' -%}"
    "{{- '<|im_start|>environment\n' + message['content'] + '<|im_end|>\n' -}}"
    "{%- elif message['role'] == 'tool' -%}{{- '<|im_start|>environment\n' + message['content'] + '<|im_end|>\n' -}}"
    "{%- endif -%}{%- if loop.last and add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
)


def write_olmo3_tokenizer(out: Path) -> TokenizerInfo:
    """A byte-level BPE split like cl100k (OLMo's dolma2 tokenizer) with OLMo 3's chat tokens.

    As OLMo 3 Instruct: BOS and EOS are <|endoftext|> (config.json ends generation at both
    <|endoftext|> and <|im_end|>), PAD is <|pad|>.
    """
    roles = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                 pad_token="<|pad|>")
    n_vocab = write_bpe_tokenizer(
        out, regex=LLAMA3_REGEX, specials=SPECIALS, roles=roles, chat_template=OLMO3_CHAT_TEMPLATE
    )
    return TokenizerInfo(n_vocab, {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1})


CASES = [
    TinyCase(
        "olmo3-swa-yarn",
        "Olmo3ForCausalLM",
        write_olmo3_tokenizer,
        {
            "num_hidden_layers": 4,
            "sliding_window": 8,
            "rope_parameters": {
                # As Olmo-3 Instruct's config.json (rope_scaling), scaled down to a tiny context.
                "full_attention": {
                    "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                    "attention_factor": 1.2079441541679836, "beta_fast": 32.0, "beta_slow": 1.0,
                    "rope_theta": 500000.0,
                },
                "sliding_attention": {"rope_type": "default", "rope_theta": 500000.0},
            },
        },
    ),
]
