"""GLM-4.5 / GLM-4.6 (`Glm4MoeForCausalLM`; llama.cpp's glm4moe): a mixture of experts after dense layers.

3 layers: layer 0 dense (first_k_dense_replace 1), layers 1-2 with 4 routed experts (2 used,
sigmoid routing, routed_scaling_factor 2.5 as GLM-4.5's) and one shared expert; q/k/v biases
and per-head q/k norms (GLM-4.5 355B's `use_qk_norm`), head_dim 16 with partial rotary 0.5.
config.json says num_nextn_predict_layers 1 but, as transformers saves a GLM-4.5, holds no MTP
layer: see convert/export/glm4_moe.py (tests/test_convert_glm4_moe.py covers a checkpoint with
one). Tokenizer: GLM's (tests/arch_cases/glm.py) with GLM-4.6's real chat template.
"""

from __future__ import annotations

from pathlib import Path

from arch_cases.glm import GLM_SPECIALS
from convert_helpers import LLAMA3_REGEX, TinyCase, TokenizerInfo, write_bpe_tokenizer

# GLM-4.6's chat template as zai-org ships it (llama.cpp keeps a copy: models/templates/GLM-4.6.jinja,
# sha256 8804f445...); GLM-4.5's differs only in details of tool calls and thinking.
GLM46_CHAT_TEMPLATE = r"""
[gMASK]<sop>
{%- if tools -%}
<|system|>
# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{% for tool in tools %}
{{ tool | tojson(ensure_ascii=False) }}
{% endfor %}
</tools>

For each function call, output the function name and arguments within the following XML format:
<tool_call>{function-name}
<arg_key>{arg-key-1}</arg_key>
<arg_value>{arg-value-1}</arg_value>
<arg_key>{arg-key-2}</arg_key>
<arg_value>{arg-value-2}</arg_value>
...
</tool_call>{%- endif -%}
{%- macro visible_text(content) -%}
    {%- if content is string -%}
        {{- content }}
    {%- elif content is iterable and content is not mapping -%}
        {%- for item in content -%}
            {%- if item is mapping and item.type == 'text' -%}
                {{- item.text }}
            {%- elif item is string -%}
                {{- item }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{- content }}
    {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(last_user_index=-1) %}
{%- for m in messages %}
    {%- if m.role == 'user' %}
        {% set ns.last_user_index = loop.index0 -%}
    {%- endif %}
{%- endfor %}
{% for m in messages %}
{%- if m.role == 'user' -%}<|user|>
{{ visible_text(m.content) }}
{{- '/nothink' if (enable_thinking is defined and not enable_thinking and not visible_text(m.content).endswith("/nothink")) else '' -}}
{%- elif m.role == 'assistant' -%}
<|assistant|>
{%- set reasoning_content = '' %}
{%- set content = visible_text(m.content) %}
{%- if m.reasoning_content is string %}
    {%- set reasoning_content = m.reasoning_content %}
{%- else %}
    {%- if '</think>' in content %}
        {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
        {%- set content = content.split('</think>')[-1].lstrip('\n') %}
    {%- endif %}
{%- endif %}
{%- if loop.index0 > ns.last_user_index and reasoning_content -%}
{{ '\n<think>' + reasoning_content.strip() +  '</think>'}}
{%- else -%}
{{ '\n<think></think>' }}
{%- endif -%}
{%- if content.strip() -%}
{{ '\n' + content.strip() }}
{%- endif -%}
{% if m.tool_calls %}
{% for tc in m.tool_calls %}
{%- if tc.function %}
    {%- set tc = tc.function %}
{%- endif %}
{{ '\n<tool_call>' + tc.name }}
{% set _args = tc.arguments or {} %}
{% if _args is not mapping %}
    {{ raise_exception("Invalid tool call arguments passed: " + _args | string) }}
{% endif %}
{% for k, v in _args.items() %}
<arg_key>{{ k }}</arg_key>
<arg_value>{{ v | tojson(ensure_ascii=False) if v is not string else v }}</arg_value>
{% endfor %}
</tool_call>{% endfor %}
{% endif %}
{%- elif m.role == 'tool' -%}
{%- if m.content is string -%}
{%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
    {{- '<|observation|>' }}
{%- endif %}
{{- '\n<tool_response>\n' }}
{{- m.content }}
{{- '\n</tool_response>' }}
{%- else -%}
<|observation|>{% for tr in m.content %}

<tool_response>
{{ tr.output if tr.output is defined else tr }}
</tool_response>{% endfor -%}
{% endif -%}
{%- elif m.role == 'system' -%}
<|system|>
{{ visible_text(m.content) }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    <|assistant|>{{- '\n<think></think>' if (enable_thinking is defined and not enable_thinking) else '' -}}
{%- endif -%}
"""[1:]


def write_glm45_tokenizer(out: Path) -> TokenizerInfo:
    roles = dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    n_vocab = write_bpe_tokenizer(
        out, regex=LLAMA3_REGEX, specials=GLM_SPECIALS, roles=roles, chat_template=GLM46_CHAT_TEMPLATE
    )
    ids = {t: i for i, t in enumerate(GLM_SPECIALS)}
    # GLM-4.5's generation config: <|endoftext|>, <|user|> and <|observation|> end a reply.
    end_of_turn = [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]]
    special_ids = {"eos_token_id": end_of_turn, "pad_token_id": ids["<|endoftext|>"], "bos_token_id": None}
    return TokenizerInfo(n_vocab, special_ids)


GLM45_CONFIG = {
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "n_shared_experts": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "head_dim": 16,
    "attention_bias": True,
    "use_qk_norm": True,
}
# What we write differently from llama.cpp's converter on a checkpoint without its MTP layer.
NO_MTP_LAYER = "the checkpoint holds no MTP layer (transformers drops it): we say so, llama.cpp's converter counts one"
MTP_DIFFERENCES = {"glm4moe.block_count": NO_MTP_LAYER, "glm4moe.nextn_predict_layers": NO_MTP_LAYER}

CASES = [
    TinyCase("glm4.5-moe-bpe", "Glm4MoeForCausalLM", write_glm45_tokenizer, GLM45_CONFIG,
             metadata_differences=MTP_DIFFERENCES),
]
