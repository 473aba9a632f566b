"""Gemma 4 (text): llama.cpp's gemma4, for Gemma4ForCausalLM and Gemma4ForConditionalGeneration's language model.

What Gemma 4 does that Gemma 3 (convert/export/gemma.py) does not, read from transformers'
modeling_gemma4.py and written as llama.cpp's converter writes it:
- two kinds of layer (`layer_types`): sliding-window layers with `head_dim` and rope over the
  whole head (`rope.freq_base_swa`), and full-attention layers with their own head size and
  KV head count (`global_head_dim` / `num_global_key_value_heads`, or transformers 5's
  `per_layer_config`), written as `key_length` vs `key_length_swa` and, when they differ, a
  per-layer `head_count_kv`. Full layers use "proportional" rope: only the first
  `partial_rotary_factor` of each half-head rotates, at frequencies of the whole head size;
  llama.cpp rotates the whole head and the `rope_freqs` tensor freezes the rest (factor 1e30);
- final soft-capping: always written, 0 when config.json has none. llama.cpp's converter then
  writes nothing, and llama.cpp's gemma4 caps at its default of 30 (transformers does not cap);
- norms multiply by their weight as stored (no Gemma 3 offset of 1); the value states are
  RMS-normalized without a weight, the query scale is 1 (llama.cpp does both itself); each
  layer's output is scaled by `layer_scalar` (`layer_output_scale`);
- KV sharing (`num_kv_shared_layers`): the last layers reuse the keys and values of the last
  sliding and the last full layer before them; their own k/v weights, if saved, are unused;
- per-layer input embeddings (E2B/E4B, `hidden_size_per_layer_input`), the double-wide MLP of
  KV-shared layers (a per-layer `feed_forward_length`), and the 26B-A4B mixture of experts in
  parallel with the dense MLP (router with its scale and per-expert scale);
- the tokenizer is tokenizer.json's SentencePiece-style BPE, written as llama.cpp's own
  "gemma4" tokenizer model (see `gemma4_vocab`).
What llama.cpp cannot run is refused in one line before anything is written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import gguf
import numpy as np

from alpaca_chat.errors import ConversionError, TrainingError
from convert.export.base import ArchModel
from convert.export.checkpoint import Checkpoint
from convert.export.gemma4_vocab import add_gemma4_vocab
from convert.export.gguf_keys import decoder_config
from convert.export.registry import register

# transformers' Gemma4TextConfig defaults, for what a config.json leaves out.
GEMMA4_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_144,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 30,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "sliding_window": 512,
    "final_logit_softcapping": None,
    "vocab_size_per_layer_input": 262_144,
    "hidden_size_per_layer_input": 256,
    "attention_k_eq_v": False,
    "num_kv_shared_layers": 0,
    "enable_moe_block": False,
    "use_double_wide_mlp": False,
    "global_head_dim": 512,
}
DEFAULT_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
SLIDING, FULL = "sliding_attention", "full_attention"
# Gemma4ForConditionalGeneration's towers and projections around the language model.
_NOT_LANGUAGE_MODEL = ("vision_tower.", "audio_tower.", "embed_vision.", "embed_audio.", "multi_modal_projector.")
# Checkpoint tensors without a .weight suffix, and their llama.cpp names (per layer).
_UNSUFFIXED = {
    "layer_scalar": "blk.{bid}.layer_output_scale.weight",
    "router.scale": "blk.{bid}.ffn_gate_inp.scale",
    "router.per_expert_scale": "blk.{bid}.ffn_down_exps.scale",
    "experts.gate_up_proj": "blk.{bid}.ffn_gate_up_exps.weight",
    "experts.down_proj": "blk.{bid}.ffn_down_exps.weight",
}
_KV_TENSORS = ("self_attn.k_proj.", "self_attn.v_proj.", "self_attn.k_norm.")


@dataclasses.dataclass(frozen=True)
class LayerAttention:
    head_dim: int
    kv_heads: int


@register("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration")
class Gemma4Model(ArchModel):
    gguf_arch = gguf.MODEL_ARCH.GEMMA4

    def __init__(self, checkpoint: Checkpoint, *, pre_tokenizer: str | None = None):
        config = {**GEMMA4_DEFAULTS, **checkpoint.config}  # an explicit null stays null, as in transformers
        if config.get("rope_parameters") is None:
            config["rope_parameters"] = DEFAULT_ROPE
        super().__init__(dataclasses.replace(checkpoint, config=config), pre_tokenizer=pre_tokenizer)
        self.types = self._layer_types()
        self.attention = self._layer_attention()
        self.swa = self._kind_attention(SLIDING)
        self.full = self._kind_attention(FULL)
        self.first_shared = self.block_count - int(self.hparams.get("num_kv_shared_layers") or 0)
        self.n_per_layer_input = int(self.hparams.get("hidden_size_per_layer_input") or 0)
        self._check_supported()

    # -- what the config means ---------------------------------------------------------

    def _layer_types(self) -> list[str]:
        types = self.hparams.get("layer_types")
        if types is None:  # transformers' default: every 6th layer global, and the last one
            types = [SLIDING if (i + 1) % 6 else FULL for i in range(self.block_count)]
        types = list(types)
        if len(types) != self.block_count or not set(types) <= {SLIDING, FULL}:
            raise ConversionError(
                f"config.json's layer_types must name {SLIDING} or {FULL} for each of the "
                f"{self.block_count} layers; got {types}"
            )
        types[-1] = FULL  # transformers forces the last layer global
        return types

    def _layer_attention(self) -> list[LayerAttention]:
        """Each layer's head size and KV heads, as transformers resolves them."""
        hp = self.hparams
        per_layer = hp.get("per_layer_config")
        if per_layer is None:  # transformers derives it from the global_* settings
            override: dict[str, Any] = {"head_dim": hp.get("global_head_dim") or GEMMA4_DEFAULTS["global_head_dim"]}
            if hp.get("attention_k_eq_v") and hp.get("num_global_key_value_heads") is not None:
                override["num_key_value_heads"] = hp["num_global_key_value_heads"]
            per_layer = {str(i): override for i, kind in enumerate(self.types) if kind == FULL}
        layers = []
        for i in range(self.block_count):
            override = per_layer.get(str(i)) or {}
            unknown = set(override) - {"head_dim", "num_key_value_heads"}
            if unknown:
                raise ConversionError(
                    f"per_layer_config sets {', '.join(sorted(unknown))} for layer {i}: llama.cpp's gemma4 "
                    "varies only the head size and KV heads between layers"
                )
            layers.append(LayerAttention(int(override.get("head_dim", hp["head_dim"])),
                                         int(override.get("num_key_value_heads", self.n_head_kv))))
        return layers

    def _kind_attention(self, kind: str) -> LayerAttention:
        found = {a for a, t in zip(self.attention, self.types) if t == kind}
        if len(found) > 1:
            raise ConversionError(
                f"the {kind} layers have different head sizes or KV heads ({sorted(found, key=str)}): "
                "llama.cpp's gemma4 has one setting for each kind of layer"
            )
        if found:
            return found.pop()
        return LayerAttention(int(self.hparams["head_dim"]), self.n_head_kv)

    def layer_rope(self, kind: str) -> dict[str, Any]:
        rope = dict((self.hparams.get("rope_parameters") or {}).get(kind) or DEFAULT_ROPE[kind])
        if "rope_type" not in rope and "type" in rope:
            rope["rope_type"] = rope["type"]
        rope.setdefault("rope_type", "default")
        rope.setdefault("rope_theta", DEFAULT_ROPE[kind]["rope_theta"])
        return rope

    def _check_supported(self) -> None:
        hp = self.hparams
        if hp.get("use_bidirectional_attention") == "all":
            raise ConversionError("use_bidirectional_attention is 'all': an encoder, not a causal language model")
        if hp.get("attention_bias"):
            raise ConversionError("attention_bias is set: llama.cpp's gemma4 has no attention biases")
        if hp.get("hidden_activation") != "gelu_pytorch_tanh":
            raise ConversionError(
                f"hidden_activation is {hp.get('hidden_activation')!r}: llama.cpp's gemma4 computes GELU (tanh)"
            )
        if self.pre_tokenizer not in (None, "gemma4"):
            raise ConversionError("Gemma 4's tokenizer is llama.cpp's 'gemma4'; --pre-tokenizer cannot change it")
        sliding = self.layer_rope(SLIDING)
        if sliding["rope_type"] != "default":
            raise ConversionError(
                f"rope type {sliding['rope_type']!r} on sliding-window layers: llama.cpp's gemma4 rotates "
                "their whole head at the sliding base frequency, no scaling"
            )
        full = self.layer_rope(FULL)
        if full["rope_type"] not in ("default", "proportional") or float(full.get("factor") or 1.0) != 1.0:
            raise ConversionError(
                f"rope type {full['rope_type']!r} (factor {full.get('factor')}) on full-attention layers: "
                "llama.cpp's gemma4 supports proportional rope without scaling"
            )
        if self.first_shared < self.block_count:
            self._check_kv_sharing()
        if self.n_per_layer_input and int(hp["vocab_size_per_layer_input"]) != int(hp["vocab_size"]):
            raise ConversionError(
                f"vocab_size_per_layer_input ({hp['vocab_size_per_layer_input']}) differs from vocab_size "
                f"({hp['vocab_size']}): llama.cpp's gemma4 looks both embeddings up by the same token ids"
            )
        if hp.get("enable_moe_block"):
            missing = [k for k in ("num_experts", "top_k_experts", "moe_intermediate_size") if not hp.get(k)]
            if missing:
                raise ConversionError(f"enable_moe_block is set but config.json has no {', '.join(missing)}")

    def _check_kv_sharing(self) -> None:
        """llama.cpp's shared layers read the KV of layer first-1 (full) and first-2 (sliding);
        transformers', of the last layer of their own kind before the shared ones."""
        first = self.first_shared
        if first < 2 or self.types[first - 1] != FULL or self.types[first - 2] != SLIDING:
            raise ConversionError(
                f"num_kv_shared_layers is {self.block_count - first}: llama.cpp's gemma4 needs the two layers "
                "before the shared ones to be a sliding-window then a full-attention layer, whose KV they reuse"
            )

    def has_kv(self, bid: int) -> bool:
        return bid < self.first_shared

    def feed_forward_lengths(self) -> list[int]:
        n_ff = int(self.hparams["intermediate_size"])
        if not self.hparams.get("use_double_wide_mlp"):
            return [n_ff] * self.block_count
        return [n_ff if self.has_kv(i) else 2 * n_ff for i in range(self.block_count)]

    # -- hyperparameters -----------------------------------------------------------------

    def set_parameters(self, writer: gguf.GGUFWriter) -> None:
        hp = self.hparams
        writer.add_block_count(self.block_count)
        writer.add_context_length(int(hp["max_position_embeddings"]))
        writer.add_embedding_length(int(hp["hidden_size"]))
        if hp.get("use_double_wide_mlp"):
            writer.add_feed_forward_length(self.feed_forward_lengths())
        else:
            writer.add_feed_forward_length(int(hp["intermediate_size"]))
        writer.add_head_count(self.n_head)
        if self._global_kv_heads_given():
            writer.add_head_count_kv([a.kv_heads for a in self.attention])
        else:
            writer.add_head_count_kv(self.n_head_kv)
        writer.add_layer_norm_rms_eps(float(hp["rms_norm_eps"]))
        writer.add_rope_freq_base(float(self.layer_rope(FULL)["rope_theta"]))
        writer.add_rope_freq_base_swa(float(self.layer_rope(SLIDING)["rope_theta"]))
        writer.add_key_length(self.full.head_dim)
        writer.add_value_length(self.full.head_dim)
        writer.add_key_length_swa(self.swa.head_dim)
        writer.add_value_length_swa(self.swa.head_dim)
        writer.add_rope_dimension_count(self.full.head_dim)  # the unrotated part is frozen by rope_freqs
        writer.add_rope_dimension_count_swa(self.swa.head_dim)
        writer.add_sliding_window(int(hp["sliding_window"]))
        writer.add_sliding_window_pattern([kind == SLIDING for kind in self.types])
        writer.add_shared_kv_layers(self.block_count - self.first_shared)
        writer.add_embedding_length_per_layer_input(self.n_per_layer_input)
        # Always written: without the key llama.cpp's gemma4 caps at its default, 30 (0 = no cap).
        writer.add_final_logit_softcapping(float(hp.get("final_logit_softcapping") or 0.0))
        if hp.get("enable_moe_block"):
            writer.add_expert_count(int(hp["num_experts"]))
            writer.add_expert_used_count(int(hp["top_k_experts"]))
            writer.add_expert_feed_forward_length(int(hp["moe_intermediate_size"]))

    @classmethod
    def config_from_gguf(cls, keys) -> dict[str, Any]:
        """(transformers' GGUF reader drops the per-kind head sizes, rope and KV sharing.)"""
        config = decoder_config(keys)
        n_layers = config["num_hidden_layers"]
        types = [SLIDING if sliding else FULL for sliding in keys.need("attention.sliding_window_pattern")]
        shared = int(keys.get("attention.shared_kv_layers") or 0)
        kv_heads = keys.need("attention.head_count_kv")
        kv_heads = kv_heads if isinstance(kv_heads, list) else [kv_heads] * n_layers
        swa_kv = next((n for n, t in zip(kv_heads, types) if t == SLIDING), kv_heads[0])
        full_head = keys.need("attention.key_length")
        per_layer: dict[str, dict[str, int]] = {}
        for i, kind in enumerate(types):
            if kind == FULL:
                per_layer[str(i)] = {"head_dim": full_head}
                if kv_heads[i] != swa_kv:
                    per_layer[str(i)]["num_key_value_heads"] = kv_heads[i]
        config.update(
            model_type="gemma4_text", architectures=["Gemma4ForCausalLM"], layer_types=types,
            head_dim=keys.need("attention.key_length_swa"), num_key_value_heads=swa_kv, per_layer_config=per_layer,
            sliding_window=keys.need("attention.sliding_window"), num_kv_shared_layers=shared,
            hidden_size_per_layer_input=keys.get("embedding_length_per_layer_input") or 0,
            vocab_size_per_layer_input=config["vocab_size"],
            final_logit_softcapping=keys.get("final_logit_softcapping") or None,
            hidden_activation="gelu_pytorch_tanh", attention_bias=False,
            attention_k_eq_v=_keys_are_values_in_file(keys, types, n_layers - shared),
            rope_parameters={SLIDING: {"rope_type": "default", "rope_theta": keys.need("rope.freq_base_swa")},
                             FULL: _full_rope_from_gguf(keys, full_head)},
            **_ffn_from_gguf(keys, n_layers - shared),
        )
        return config

    def _global_kv_heads_given(self) -> bool:
        """Whether the full layers' KV heads are set apart (then written per layer, as llama.cpp's
        converter does), rather than left at num_key_value_heads."""
        per_layer = self.hparams.get("per_layer_config")
        if per_layer is not None:
            return any("num_key_value_heads" in (v or {}) for v in per_layer.values())
        return bool(self.hparams.get("attention_k_eq_v")) and self.hparams.get("num_global_key_value_heads") is not None

    def set_vocab(self, writer: gguf.GGUFWriter, chat_template: str | None = None) -> None:
        add_gemma4_vocab(writer, self.checkpoint.path, self.hparams, chat_template)

    # -- tensors ---------------------------------------------------------------------------

    def skip_tensor(self, name: str) -> bool:
        name = _language_model_name(name)
        if name.startswith(_NOT_LANGUAGE_MODEL) or name.startswith(tuple("model." + p for p in _NOT_LANGUAGE_MODEL)):
            return True
        bid = _block_id(name)
        if bid is not None and not self.has_kv(bid) and any(part in name for part in _KV_TENSORS):
            return True  # a KV-shared layer's own k/v (transformers ignores them too)
        if bid is not None and self._keys_are_values(bid) and "self_attn.v_proj." in name:
            return True  # transformers has no v_proj there; llama.cpp would use a stored one
        return super().skip_tensor(name)

    def _keys_are_values(self, bid: int) -> bool:
        return bool(self.hparams.get("attention_k_eq_v")) and self.types[bid] == FULL

    def gguf_name(self, name: str) -> str:
        name = _language_model_name(name)
        bid = _block_id(name)
        if bid is not None:
            suffix = name.split(f"layers.{bid}.", 1)[1]
            if suffix in _UNSUFFIXED:
                return _UNSUFFIXED[suffix].format(bid=bid)
        return super().gguf_name(name)

    def extra_tensors(self) -> Iterable[tuple[str, np.ndarray]]:
        """rope_freqs for the full layers: 1 for the rotated frequencies, 1e30 (frozen) for the rest."""
        rope = self.layer_rope(FULL)
        half = self.full.head_dim // 2
        rotated = half
        if rope["rope_type"] == "proportional":
            rotated = int(float(rope.get("partial_rotary_factor", 1.0)) * self.full.head_dim // 2)
        factors = np.array([1.0] * rotated + [1e30] * (half - rotated), dtype=np.float32)
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors

    def expected_shape(self, name: str, gguf_name: str) -> tuple[int, ...] | None:
        base, _, suffix = gguf_name.rpartition(".")
        parts = base.split(".")
        if parts[0] == "blk" and len(parts) > 2:
            rule = self._layer_shapes(int(parts[1])).get(".".join(parts[2:]) + "." + suffix)
        else:
            rule = self._model_shapes().get(gguf_name)
        return rule

    def _model_shapes(self) -> dict[str, tuple[int, ...]]:
        hp = self.hparams
        hidden, vocab, ple = int(hp["hidden_size"]), int(hp["vocab_size"]), self.n_per_layer_input
        return {
            "token_embd.weight": (vocab, hidden),
            "output.weight": (vocab, hidden),
            "output_norm.weight": (hidden,),
            "per_layer_token_embd.weight": (int(hp["vocab_size_per_layer_input"]), self.block_count * ple),
            "per_layer_model_proj.weight": (self.block_count * ple, hidden),
            "per_layer_proj_norm.weight": (ple,),
        }

    def _layer_shapes(self, bid: int) -> dict[str, tuple[int, ...]]:
        hp = self.hparams
        hidden, ple = int(hp["hidden_size"]), self.n_per_layer_input
        att = self.attention[bid]
        q, kv, ff = self.n_head * att.head_dim, att.kv_heads * att.head_dim, self.feed_forward_lengths()[bid]
        shapes = {
            "attn_q.weight": (q, hidden), "attn_k.weight": (kv, hidden), "attn_v.weight": (kv, hidden),
            "attn_output.weight": (hidden, q),
            "attn_q_norm.weight": (att.head_dim,), "attn_k_norm.weight": (att.head_dim,),
            "ffn_gate.weight": (ff, hidden), "ffn_up.weight": (ff, hidden), "ffn_down.weight": (hidden, ff),
            "layer_output_scale.weight": (1,),
            "inp_gate.weight": (ple, hidden), "proj.weight": (hidden, ple),
        }
        for norm in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm", "post_norm",
                     "pre_ffw_norm_2", "post_ffw_norm_1", "post_ffw_norm_2"):
            shapes[norm + ".weight"] = (hidden,)
        if hp.get("enable_moe_block"):
            n_exp, n_ff_exp = int(hp["num_experts"]), int(hp["moe_intermediate_size"])
            shapes.update({
                "ffn_gate_inp.weight": (n_exp, hidden), "ffn_gate_inp.scale": (hidden,),
                "ffn_down_exps.scale": (n_exp,),
                "ffn_gate_up_exps.weight": (n_exp, 2 * n_ff_exp, hidden),
                "ffn_down_exps.weight": (n_exp, hidden, n_ff_exp),
            })
        return shapes

    def check_tensors(self, gguf_names: Iterable[str]) -> None:
        names = set(gguf_names)
        super().check_tensors(names)
        needed = []
        for bid in range(self.block_count):
            if self.has_kv(bid):
                needed.append(f"blk.{bid}.attn_k.weight")
                if not self._keys_are_values(bid):
                    needed.append(f"blk.{bid}.attn_v.weight")
            if self.n_per_layer_input:
                needed.append(f"blk.{bid}.inp_gate.weight")
        if self.n_per_layer_input:
            needed.append("per_layer_token_embd.weight")
        missing = [n for n in needed if n not in names]
        if missing:
            raise ConversionError(f"the checkpoint is incomplete: {len(missing)} tensor(s) missing, e.g. {missing[0]}")


def _keys_are_values_in_file(keys, types: list[str], first_shared: int) -> bool:
    """Full layers with keys but no values of their own: transformers' attention_k_eq_v."""
    full = [i for i, kind in enumerate(types[:first_shared]) if kind == FULL]
    return bool(full) and all(f"blk.{i}.attn_v.weight" not in keys.shapes for i in full)


def _full_rope_from_gguf(keys, head_dim: int) -> dict[str, Any]:
    """Proportional rope: rope_freqs is 1 for each rotated frequency, 1e30 for each frozen one."""
    factors = keys.values("rope_freqs.weight") if "rope_freqs.weight" in keys.shapes else np.ones(head_dim // 2)
    rotated = int(np.count_nonzero(factors == 1.0))
    return {"rope_type": "proportional", "partial_rotary_factor": 2 * rotated / head_dim,
            "rope_theta": keys.need("rope.freq_base")}


def _ffn_from_gguf(keys, first_shared: int) -> dict[str, Any]:
    """intermediate_size, the double-wide MLP of KV-shared layers, and the experts."""
    widths = keys.need("feed_forward_length")
    ffn: dict[str, Any] = {"intermediate_size": widths, "use_double_wide_mlp": False}
    if isinstance(widths, list):
        base = widths[0]
        if widths != [base if i < first_shared else 2 * base for i in range(len(widths))]:
            raise TrainingError(
                f"base model: feed_forward_length {widths} is not Gemma 4's (double-wide on the KV-shared layers)"
            )
        ffn.update(intermediate_size=base, use_double_wide_mlp=first_shared < len(widths))
    if keys.has("expert_count"):
        ffn.update(enable_moe_block=True, num_experts=keys.need("expert_count"),
                   top_k_experts=keys.need("expert_used_count"),
                   moe_intermediate_size=keys.need("expert_feed_forward_length"))
    return ffn


def _language_model_name(name: str) -> str:
    """A conditional-generation checkpoint's language-model tensor under the causal LM's name."""
    return name.replace("model.language_model.", "model.", 1)


def _block_id(name: str) -> int | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None
