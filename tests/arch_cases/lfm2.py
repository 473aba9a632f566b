"""LFM2: short convolution blocks and attention blocks in one stack (conv, conv, attention, conv,
as LFM2-1.2B's first four layers), GQA, per-head q/k norms and tied embeddings; the FFN width
computed from block_ff_dim as transformers does (2/3, times the multiplier, rounded up to
block_multiple_of: 192 -> 128 -> 166 -> 192, every step changing it). LFM2's tokenizer: Llama 3's
split with whole-word tokens kept (ignore_merges), <|startoftext|> added in front, its special
tokens at their real ids, and LFM2.5-Instruct's chat template. LFM2 MoE (LFM2-8B-A1B): the same
layers with dense FFNs first, then mixtures of experts; LFM2-8B-A1B's chat template.
"""

import json
from pathlib import Path

from convert_helpers import LLAMA3_REGEX, TinyCase, TokenizerInfo, write_bpe_tokenizer

# LiquidAI/LFM2's first special tokens, at their ids in the released tokenizer.
SPECIALS = (
    "<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|fim_pre|>", "<|fim_mid|>", "<|fim_suf|>",
    "<|im_start|>", "<|im_end|>", "<|tool_list_start|>", "<|tool_list_end|>", "<|tool_call_start|>",
    "<|tool_call_end|>", "<|tool_response_start|>", "<|tool_response_end|>",
)


def write_lfm2_tokenizer(out: Path, chat_template: str | None = None) -> TokenizerInfo:
    """A byte-level BPE as LFM2 ships it: BOS <|startoftext|> added, <|im_end|> ends a turn."""
    roles = dict(bos_token="<|startoftext|>", eos_token="<|im_end|>", pad_token="<|pad|>")
    n_vocab = write_bpe_tokenizer(
        out, regex=LLAMA3_REGEX, specials=SPECIALS, roles=roles, chat_template=chat_template or LFM2_CHAT_TEMPLATE
    )
    path = out / "tokenizer.json"
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    tokenizer["model"]["ignore_merges"] = True
    bos = {"SpecialToken": {"id": "<|startoftext|>", "type_id": 0}}
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|startoftext|>": {"id": "<|startoftext|>", "ids": [1], "tokens": ["<|startoftext|>"]}},
    }
    path.write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    ids = {token: i for i, token in enumerate(SPECIALS)}
    special_ids = {
        "bos_token_id": ids["<|startoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|pad|>"],
    }
    return TokenizerInfo(n_vocab, special_ids)


def write_lfm2_moe_tokenizer(out: Path) -> TokenizerInfo:
    """LFM2's tokenizer with LFM2-8B-A1B's chat template."""
    return write_lfm2_tokenizer(out, LFM2_MOE_CHAT_TEMPLATE)


CASES = [
    TinyCase(
        "lfm2-conv-attention",
        "Lfm2ForCausalLM",
        write_lfm2_tokenizer,
        {
            "num_hidden_layers": 4,
            "layer_types": ["conv", "conv", "full_attention", "conv"],
            "conv_L_cache": 3,
            "block_ff_dim": 192,
            "block_auto_adjust_ff_dim": True,
            "block_ffn_dim_multiplier": 1.3,
            "block_multiple_of": 48,
            "norm_eps": 1e-6,
        },
    ),
    TinyCase(
        # LFM2-8B-A1B: dense SwiGLUs in the first layers (one conv, one attention here), then
        # mixtures of experts (sigmoid router, expert bias) after both kinds of layer.
        "lfm2-moe",
        "Lfm2MoeForCausalLM",
        write_lfm2_moe_tokenizer,
        {
            "num_hidden_layers": 4,
            "layer_types": ["conv", "full_attention", "conv", "full_attention"],
            "num_dense_layers": 2,
            "intermediate_size": 96,
            "moe_intermediate_size": 32,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "conv_L_cache": 3,
            "norm_eps": 1e-6,
        },
        metadata_differences={
            "lfm2moe.attention.layer_norm_rms_epsilon": (
                "this config.json also has rms_norm_eps (1e-5, the tiny builder's default) beside LFM2's norm_eps "
                "(1e-6), which transformers uses; llama.cpp's lfm2moe converter takes rms_norm_eps first (its "
                "lfm2 converter rewrites it from norm_eps). Released LFM2 MoE configs have only norm_eps"
            ),
        },
    ),
]

# LiquidAI/LFM2.5-1.2B-Instruct's chat template (as llama.cpp keeps it in models/templates/LFM2.5-Instruct.jinja).
LFM2_CHAT_TEMPLATE = r"""{{- bos_token -}}
{%- set keep_past_thinking = keep_past_thinking | default(false) -%}
{%- set ns = namespace(system_prompt="") -%}
{%- if messages[0]["role"] == "system" -%}
    {%- set ns.system_prompt = messages[0]["content"] -%}
    {%- set messages = messages[1:] -%}
{%- endif -%}
{%- if tools -%}
    {%- set ns.system_prompt = ns.system_prompt + ("\n" if ns.system_prompt else "") + "List of tools: [" -%}
    {%- for tool in tools -%}
        {%- if tool is not string -%}
            {%- set tool = tool | tojson -%}
        {%- endif -%}
        {%- set ns.system_prompt = ns.system_prompt + tool -%}
        {%- if not loop.last -%}
            {%- set ns.system_prompt = ns.system_prompt + ", " -%}
        {%- endif -%}
    {%- endfor -%}
    {%- set ns.system_prompt = ns.system_prompt + "]" -%}
{%- endif -%}
{%- if ns.system_prompt -%}
    {{- "<|im_start|>system\n" + ns.system_prompt + "<|im_end|>\n" -}}
{%- endif -%}
{%- set ns.last_assistant_index = -1 -%}
{%- for message in messages -%}
    {%- if message["role"] == "assistant" -%}
        {%- set ns.last_assistant_index = loop.index0 -%}
    {%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
    {{- "<|im_start|>" + message["role"] + "\n" -}}
    {%- set content = message["content"] -%}
    {%- if content is not string -%}
        {%- set content = content | tojson -%}
    {%- endif -%}
    {%- if message["role"] == "assistant" and not keep_past_thinking and loop.index0 != ns.last_assistant_index -%}
        {%- if "</think>" in content -%}
            {%- set content = content.split("</think>")[-1] | trim -%}
        {%- endif -%}
    {%- endif -%}
    {{- content + "<|im_end|>\n" -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "<|im_start|>assistant\n" -}}
{%- endif -%}"""

# LiquidAI/LFM2-8B-A1B's chat template (as llama.cpp keeps it in models/templates/LFM2-8B-A1B.jinja).
LFM2_MOE_CHAT_TEMPLATE = r"""{{- bos_token -}}
{%- set system_prompt = "" -%}
{%- set ns = namespace(system_prompt="") -%}
{%- if messages[0]["role"] == "system" -%}
	{%- set ns.system_prompt = messages[0]["content"] -%}
	{%- set messages = messages[1:] -%}
{%- endif -%}
{%- if tools -%}
	{%- set ns.system_prompt = ns.system_prompt + ("\n" if ns.system_prompt else "") + "List of tools: <|tool_list_start|>[" -%}
	{%- for tool in tools -%}
		{%- if tool is not string -%}
			{%- set tool = tool | tojson -%}
		{%- endif -%}
		{%- set ns.system_prompt = ns.system_prompt + tool -%}
		{%- if not loop.last -%}
			{%- set ns.system_prompt = ns.system_prompt + ", " -%}
		{%- endif -%}
	{%- endfor -%}
	{%- set ns.system_prompt = ns.system_prompt + "]<|tool_list_end|>" -%}
{%- endif -%}
{%- if ns.system_prompt -%}
	{{- "<|im_start|>system\n" + ns.system_prompt + "<|im_end|>\n" -}}
{%- endif -%}
{%- for message in messages -%}
	{{- "<|im_start|>" + message["role"] + "\n" -}}
	{%- set content = message["content"] -%}
	{%- if content is not string -%}
		{%- set content = content | tojson -%}
	{%- endif -%}
	{%- if message["role"] == "tool" -%}
		{%- set content = "<|tool_response_start|>" + content + "<|tool_response_end|>" -%}
	{%- endif -%}
	{{- content + "<|im_end|>\n" -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
	{{- "<|im_start|>assistant\n" -}}
{%- endif -%}"""
