"""Granite 4 (GraniteMoeHybridForCausalLM): Mamba-2 and attention layers, as the "H" models.

Two cases, 4 layers each (mamba, attention, mamba, attention), with a small Mamba-2 mixer
(8 heads of 16, 2 groups, state 16: the gated norm is per group) and Granite's four
multipliers set away from 1.0 (see tests/arch_cases/granite.py):
- granite-hybrid-moe: 4 experts (2 used) beside a shared expert, no positional embedding (NoPE),
  as Granite 4.0 H Tiny/Small;
- granite-hybrid-dense-rope: a dense shared MLP only (no experts), as Granite 4.0 H Micro,
  with rope on the attention layers (`position_embedding_type: rope`). llama.cpp's converter
  turns rope off for every hybrid it converts (it keeps it only for Bamba and all-attention
  checkpoints) and writes a 2**20 context: both keys differ here, with the reason below.

config.json is written with the layer-type spelling released checkpoints have ("mamba",
"attention"), which transformers 5 reads (it renames them when it loads) and llama.cpp's
converter needs: given transformers 5's own spelling ("linear_attention", "full_attention"),
it takes every layer for a Mamba layer and writes a file llama.cpp cannot load.
tests/test_convert_granite_hybrid.py checks that ours exports both spellings to the same bytes.

The tokenizer is byte-level BPE split like GPT-4's cl100k (the Llama 3 regex), which
llama.cpp names "dbrx" for Granite 4; its special tokens and chat template are Granite 4's.
"""

from pathlib import Path

from convert_helpers import LLAMA3_REGEX, TinyCase, TokenizerInfo, write_bpe_tokenizer

SPECIALS = (
    "<|end_of_text|>", "<|pad|>", "<|start_of_role|>", "<|end_of_role|>",
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
)
# transformers 5 renames these when it loads a config and writes its own names when it saves one.
RELEASED_LAYER_TYPES = {"linear_attention": "mamba", "full_attention": "attention"}
HYBRID = {
    "num_hidden_layers": 4,
    "layer_types": ["mamba", "attention", "mamba", "attention"],
    "mamba_n_heads": 8,
    "mamba_d_head": 16,  # 8 × 16 = 2 × hidden (llama.cpp supports mamba_expand 2 only)
    "mamba_n_groups": 2,
    "mamba_d_state": 16,
    "mamba_d_conv": 4,
    "mamba_expand": 2,
    "mamba_chunk_size": 16,  # shorter than the longest test input: the chunked scan crosses chunks
    "embedding_multiplier": 12.0,
    "residual_multiplier": 0.22,
    "attention_multiplier": 0.125,
    "logits_scaling": 8.0,
}
ROPE_DIFFERENCES = {
    "granitehybrid.rope.scaling.finetuned": (
        "llama.cpp's granitehybrid reads this key as 'use rope'; its converter writes false for every hybrid "
        "checkpoint, so a `position_embedding_type: rope` model would run without rope. Ours writes true then"
    ),
    "granitehybrid.context_length": (
        "llama.cpp's converter writes 2**20 whenever it turns rope off (see above); ours writes 2**20 for NoPE "
        "checkpoints only, max_position_embeddings with rope"
    ),
}


class ReleasedSpellingConfig:
    """GraniteMoeHybridConfig that saves its layer types as released checkpoints spell them."""

    def __new__(cls, **settings):
        import transformers

        class Released(transformers.GraniteMoeHybridConfig):
            def to_dict(self):
                data = super().to_dict()
                if data.get("layer_types"):
                    data["layer_types"] = [RELEASED_LAYER_TYPES.get(t, t) for t in data["layer_types"]]
                return data

        return Released(**settings)


def write_granite4_tokenizer(out: Path) -> TokenizerInfo:
    """A byte-level BPE split like Granite 4's, with its special tokens and chat template."""
    roles = dict(bos_token="<|end_of_text|>", eos_token="<|end_of_text|>", unk_token="<|end_of_text|>",
                 pad_token="<|pad|>")
    n_vocab = write_bpe_tokenizer(
        out, "llama-bpe", regex=LLAMA3_REGEX, specials=SPECIALS, roles=roles, chat_template=GRANITE4_CHAT_TEMPLATE
    )
    return TokenizerInfo(n_vocab, {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1})


CASES = [
    TinyCase(
        "granite-hybrid-moe",
        "GraniteMoeHybridForCausalLM",
        write_granite4_tokenizer,
        {**HYBRID, "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32,
         "shared_intermediate_size": 48},
        config_class=ReleasedSpellingConfig,
    ),
    TinyCase(
        "granite-hybrid-dense-rope",
        "GraniteMoeHybridForCausalLM",
        write_granite4_tokenizer,
        # As Granite 4.0 H Micro: no experts, intermediate_size = shared_intermediate_size.
        {**HYBRID, "num_local_experts": 0, "num_experts_per_tok": 0, "intermediate_size": 96,
         "shared_intermediate_size": 96, "position_embedding_type": "rope"},
        config_class=ReleasedSpellingConfig,
        metadata_differences=ROPE_DIFFERENCES,
    ),
]

# ibm-granite/granite-4.0-h-tiny's chat template (as llama.cpp keeps it in models/templates/ibm-granite-granite-4.0.jinja).
GRANITE4_CHAT_TEMPLATE = r"""{%- set tools_system_message_prefix = 'You are a helpful assistant with access to the following tools. You may call one or more tools to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>'  %}
{%- set tools_system_message_suffix = '\n</tools>\n\nFor each tool call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>. If a tool does not exist in the provided list of tools, notify the user that you do not have the ability to fulfill the request.' %}
{%- set documents_system_message_prefix = 'You are a helpful assistant with access to the following documents. You may use one or more documents to assist with the user query.\n\nYou are given a list of documents within <documents></documents> XML tags:\n<documents>' %}
{%- set documents_system_message_suffix = '\n</documents>\n\nWrite the response to the user\'s input by strictly aligning with the facts in the provided documents. If the information needed to answer the question is not available in the documents, inform the user that the question cannot be answered based on the available data.' %}
{%- set g4_default_system_message = 'You are a helpful assistant. Please ensure responses are professional, accurate, and safe.' %}
{%- if available_tools is defined and available_tools %}
    {%- set tools = available_tools %}
{%- endif %}
{%- set ns = namespace(tools_system_message=tools_system_message_prefix,
                       documents_system_message=documents_system_message_prefix,
                       default_system_message=g4_default_system_message,
                       system_message=''
                       ) %}
{%- if tools %}
    {%- for tool in tools %}
        {%- set ns.tools_system_message = ns.tools_system_message + '\n' + (tool | tojson) %}
    {%- endfor %}
    {%- set ns.tools_system_message = ns.tools_system_message + tools_system_message_suffix %}
{%- else %}
    {%- set ns.tools_system_message = '' %}
{%- endif %}
{%- if documents %}
    {%- for document in documents %}
        {%- set ns.documents_system_message = ns.documents_system_message + '\n' + (document | tojson) %}
    {%- endfor %}
    {%- set ns.documents_system_message = ns.documents_system_message + documents_system_message_suffix %}
{%- else %}
    {%- set ns.documents_system_message = '' %}
{%- endif %}
{%- if messages[0].role == 'system' %}
    {%- if messages[0].content is string %}
        {%- set ns.system_message = messages[0].content %}
    {%- elif messages[0].content is iterable %}
        {%- for entry in messages[0].content %}
            {%- if entry.type== 'text' %}
                {%- if ns.system_message != '' %}
                    {%- set ns.system_message = ns.system_message + '\n' %}
                {%- endif %}
                {%- set ns.system_message = ns.system_message + entry.text %}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {%- if tools and documents %}
        {%- set ns.system_message = ns.system_message + '\n\n' +  ns.tools_system_message + '\n\n' + ns.documents_system_message %}
    {%- elif tools %}
        {%- set ns.system_message = ns.system_message + '\n\n' + ns.tools_system_message %}
    {%- elif documents %}
        {%- set ns.system_message = ns.system_message + '\n\n' + ns.documents_system_message %}
    {%- endif %}
{%- else %}
    {%- if tools and documents %}
        {%- set ns.system_message = ns.tools_system_message + '\n\n' + ns.documents_system_message  %}
    {%- elif tools %}
        {%- set ns.system_message = ns.tools_system_message %}
    {%- elif documents %}
        {%- set ns.system_message = ns.documents_system_message %}
    {%- endif %}
{%- endif %}
{%- if ns.system_message %}
    {{- '<|start_of_role|>system<|end_of_role|>' + ns.system_message + '<|end_of_text|>\n' }}
{%- else %}
    {{- '<|start_of_role|>system<|end_of_role|>' + ns.default_system_message + '<|end_of_text|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- set content = namespace(val='') %}
    {%- if message.content is string %}
        {%- set content.val = message.content %}
    {%- else %}
        {%- if message.content is iterable %}
            {%- for entry in message.content %}
                {%- if entry.type== 'text' %}
                    {%- if content.val != '' %}
                        {%- set content.val = content.val + '\n' %}
                    {%- endif %}
                    {%- set content.val = content.val + entry.text %}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
    {%- endif %}
    {%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}
        {{- '<|start_of_role|>' + message.role + '<|end_of_role|>' + content.val + '<|end_of_text|>\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|start_of_role|>' + message.role + '<|end_of_role|>' + content.val }}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content.val) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|end_of_text|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or (messages[loop.index0 - 1].role != 'tool') %}
            {{- '<|start_of_role|>user<|end_of_role|>' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content.val }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}
            {{- '<|end_of_text|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_of_role|>assistant<|end_of_role|>' }}
{%- endif %}"""
