"""GLM-4: `GlmForCausalLM` (glm-4-9b-chat-hf, transformers' "glm") and `Glm4ForCausalLM`
(GLM-4-0414, transformers' "glm4").

llama.cpp's converter maps the first to its chatglm architecture and the second to glm4;
so do we. Both keep what transformers has:
- q/k/v with biases, and the fused `gate_up_proj` (gate rows, then up) as a double-height
  `ffn_up`, which llama.cpp splits itself;
- partial rotary embeddings (`partial_rotary_factor`, 0.5: the first half of each head
  rotates) on adjacent pairs, llama.cpp's "normal" rope: no permutation;
- glm4 only: the extra norms after attention and after the MLP (`post_attention_norm`,
  `post_ffw_norm`).

Where llama.cpp's chatglm converter reads ChatGLM's own config keys (`seq_length`,
`layernorm_epsilon`, `rope_ratio`), absent from transformers' glm config, we write what the
config says (context length, RMS epsilon, rope base) instead of its fallbacks (hidden_size,
1e-5, 10000); the tests list these keys as differences.

Tokenizer: byte-level BPE. GLM-4's split is Llama 3's regex, which llama.cpp names "glm4"
for GLM's tokenizers (no BOS by default); special tokens are set as llama.cpp's converter
sets them: EOS and UNK <|endoftext|>, end of turn <|user|> (glm4 also BOS <|endoftext|>),
and we add <|observation|> as end of message: a turn that calls a tool ends with it, and
llama.cpp stops there only if it is in the end-of-generation set.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import gguf

from alpaca_chat.errors import ConversionError
from convert.export.base import ArchModel
from convert.export.gguf_keys import decoder_config, rope_parameters
from convert.export.registry import register
from convert.export.vocab import TokenizerError, Vocab

# Our detected pre-tokenizer -> llama.cpp's name for the same split in GLM's tokenizers.
_GLM_PRE_TOKENIZERS = {"llama-bpe": "glm4"}


class _GlmFamily(ArchModel):
    expected_tokenizers = ("gpt2",)
    pre_tokenizer_names = _GLM_PRE_TOKENIZERS
    # Special token role -> its text, set unless the tokenizer files already name one.
    special_tokens: ClassVar[dict[str, str]] = {
        "eos": "<|endoftext|>",
        "eot": "<|user|>",
        "unk": "<|endoftext|>",
        "eom": "<|observation|>",
    }

    @property
    def head_dim(self) -> int:
        return int(self.hparams.get("head_dim") or self._param("hidden_size") // self.n_head)

    @property
    def rope_dims(self) -> int:
        factor = self.rope.get("partial_rotary_factor") or self.hparams.get("partial_rotary_factor") or 0.5
        return int(self.head_dim * float(factor))

    def load_vocab(self) -> Vocab:
        vocab = super().load_vocab()  # names the split "glm4" (pre_tokenizer_names)
        ids = {token: i for i, token in enumerate(vocab.tokens)}
        for role, text in self.special_tokens.items():
            token_id = ids.get(text.encode("utf-8"))
            if token_id is None:
                raise TokenizerError(
                    f"{self.checkpoint.architecture} expects GLM's chat tokens, but the tokenizer has no {text}: "
                    "a tokenizer from another model family?"
                )
            vocab.special._set_special_token(role, token_id)  # kept if the tokenizer files set one
        return vocab


@register("GlmForCausalLM")
class GlmModel(_GlmFamily):
    gguf_arch = gguf.MODEL_ARCH.CHATGLM

    @classmethod
    def config_from_gguf(cls, keys) -> dict:
        return glm_config(keys, "glm", "GlmForCausalLM")

    def set_parameters(self, writer: gguf.GGUFWriter) -> None:
        n_embd = int(self._param("hidden_size"))
        if self.head_dim * self.n_head != n_embd:
            raise ConversionError(
                f"head_dim {self.head_dim} × {self.n_head} heads is not hidden_size {n_embd}: "
                "llama.cpp's chatglm needs them equal"
            )
        writer.add_context_length(int(self._param("max_position_embeddings", "seq_length")))
        writer.add_embedding_length(n_embd)
        writer.add_feed_forward_length(int(self._param("intermediate_size", "ffn_hidden_size")))
        writer.add_block_count(self.block_count)
        writer.add_head_count(self.n_head)
        writer.add_head_count_kv(self.n_head_kv)
        writer.add_layer_norm_rms_eps(float(self._param("rms_norm_eps", "layernorm_epsilon")))
        writer.add_rope_dimension_count(self.rope_dims)
        self._set_rope(writer)


@register("Glm4ForCausalLM")
class Glm4Model(_GlmFamily):
    gguf_arch = gguf.MODEL_ARCH.GLM4
    special_tokens = {**_GlmFamily.special_tokens, "bos": "<|endoftext|>"}

    @classmethod
    def config_from_gguf(cls, keys) -> dict:
        return glm_config(keys, "glm4", "Glm4ForCausalLM")

    def set_parameters(self, writer: gguf.GGUFWriter) -> None:
        super().set_parameters(writer)
        writer.add_rope_dimension_count(self.rope_dims)

    def check_tensors(self, gguf_names: Iterable[str]) -> None:
        names = set(gguf_names)
        super().check_tensors(names)
        for bid in range(self.block_count):
            for kind in (gguf.MODEL_TENSOR.ATTN_POST_NORM, gguf.MODEL_TENSOR.FFN_POST_NORM):
                name = gguf.TENSOR_NAMES[kind].format(bid=bid) + ".weight"
                if name not in names:
                    raise ConversionError(
                        f"the checkpoint is incomplete: {name} is missing (GLM-4-0414 has post-attention "
                        "and post-MLP norms in every layer)"
                    )


def glm_config(keys, model_type: str, architecture: str) -> dict:
    """What GLM's families share in config.json: partial rotary from the rotated dimensions, and
    attention biases where the file has them."""
    config = decoder_config(keys)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rope = rope_parameters(keys)
    rope["partial_rotary_factor"] = keys.need("rope.dimension_count") / head_dim
    return {**config, "model_type": model_type, "architectures": [architecture], "rope_parameters": rope,
            "head_dim": head_dim,  # transformers' GLM default (128) is not hidden_size / heads
            "attention_bias": "blk.0.attn_q.bias" in keys.shapes}

