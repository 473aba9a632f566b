"""What `alpaca-convert finetune` takes: its settings and the LoRA defaults per architecture.

Plain data, no torch: the command line builds its flags from `FinetuneConfig`
(help text included) without loading the training stack.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: int
    dropout: float
    target_modules: tuple[str, ...] | str  # or "all-linear": every linear layer but the output head


# LoRA defaults by `model_type`. Every linear projection of attention and MLP is
# adapted (QLoRA's finding: which layers matters more than r); r=16, alpha=32
# (scale 2) are the common LoRA recipe for instruction tuning. Dropout is 0, as in
# peft's and unsloth's defaults: on a CPU the dropout masks (one per adapted layer
# and step) cost about a sixth of a bf16 step (bench_finetune: +20% tokens/s
# without them), and alpaca-lora's 0.05 is `--lora-dropout 0.05` away.
# Anything not listed gets LORA_FALLBACK. The names are transformers 5's modules:
# - Phi-3 and GLM fuse projections into one Linear (`qkv_proj`, `gate_up_proj`):
#   the adapter spans the fused matrix and merges into it; the exporter splits it.
# - A mixture of experts (Mixtral, Qwen3 MoE) adapts attention only. transformers 5
#   stores the experts as fused 3-D parameters (`mlp.experts.gate_up_proj`), which
#   peft's LoRA cannot target as Linear layers, and adapting each expert would give
#   every expert its own adapter; the router is a plain parameter too.
# - Gemma 3 4B and up (`gemma3`, image-text) adapts the language model only: the
#   vision tower has its own q/k/v projections, and the GGUF holds the text tower.
# - Hybrids adapt their token mixers too, not only attention: most of their layers
#   are not attention, and a default that names only q/k/v/o would leave them
#   untouched (peft adapts what matches and says nothing). Qwen3.5's gated
#   DeltaNet (`in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`, `out_proj`) and
#   Qwen3-Next's (`in_proj_qkvz`, `in_proj_ba`, `out_proj`); Granite 4's Mamba-2
#   (`in_proj`, `out_proj`) and its `shared_mlp` (the MLP of the dense Granite 4 H
#   models, the shared expert of the MoE ones); LFM2's short convolutions
#   (`conv.in_proj`, `conv.out_proj`) and its `w1`/`w2`/`w3` MLP. The convolution
#   kernels, A_log, dt_bias and D are small parameters, not Linear layers: frozen.
# - The newer MoE families (Qwen3.5 MoE, Qwen3-Next, GLM-4.5, ERNIE 4.5 MoE) adapt
#   attention and their token mixers, as Qwen3 MoE does: their shared experts and
#   first dense MLPs stay frozen too. Naming `gate_proj`/`up_proj`/`down_proj` there
#   would not reach those Linear layers: for the families transformers 5 converts
#   from a v4 MoE layout (Qwen3-Next, GLM-4.5, ERNIE 4.5 MoE; peft's
#   transformers_weight_conversion) peft rewrites any target ending in those names
#   into the fused routed experts (one adapter per expert, which the GGUF adapter
#   export refuses) and drops the shared ones. Routers (`mlp.gate`,
#   `shared_expert_gate`, Gemma 4's `router.proj`) are never named.
# - Gemma 4's per-layer-input projections (`per_layer_input_gate`,
#   `per_layer_projection`) stay frozen, as in unsloth's Gemma 4 recipe.
_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_FUSED_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
# A regular expression (peft matches a string target in full against module names).
_GEMMA3_LANGUAGE_MODEL = r"model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
_NEOX_LIKE = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
_GEMMA4_LANGUAGE_MODEL = _GEMMA3_LANGUAGE_MODEL  # Gemma4ForConditionalGeneration's text tower, same names
_GATED_DELTANET = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")  # Qwen3.5's
_QWEN35 = (*_LLAMA_LIKE, *_GATED_DELTANET)
_QWEN35_MOE = (*_ATTENTION, *_GATED_DELTANET)
_QWEN3_NEXT = (*_ATTENTION, "in_proj_qkvz", "in_proj_ba", "out_proj")
_GRANITE_HYBRID = (*_ATTENTION, "in_proj", "out_proj", "shared_mlp.input_linear", "shared_mlp.output_linear")
_LFM2 = ("q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3")


def _lora(target_modules: tuple[str, ...] | str) -> LoraSettings:
    return LoraSettings(r=16, alpha=32, dropout=0.0, target_modules=target_modules)


LORA_DEFAULTS: dict[str, LoraSettings] = {
    "llama": _lora(_LLAMA_LIKE),
    "mistral": _lora(_LLAMA_LIKE),
    "mixtral": _lora(_ATTENTION),
    "qwen2": _lora(_LLAMA_LIKE),
    "qwen3": _lora(_LLAMA_LIKE),
    "qwen3_moe": _lora(_ATTENTION),
    "gemma": _lora(_LLAMA_LIKE),
    "gemma2": _lora(_LLAMA_LIKE),
    "gemma3_text": _lora(_LLAMA_LIKE),
    "gemma3": _lora(_GEMMA3_LANGUAGE_MODEL),
    "granite": _lora(_LLAMA_LIKE),
    "olmo2": _lora(_LLAMA_LIKE),
    "smollm3": _lora(_LLAMA_LIKE),
    "phi3": _lora(("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "glm": _lora(_FUSED_MLP),
    "glm4": _lora(_FUSED_MLP),
    "phi": _lora(("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")),
    "gpt2": _lora(("c_attn", "c_proj", "c_fc")),
    "gpt_neox": _lora(_NEOX_LIKE),
    "falcon": _lora(_NEOX_LIKE),
    # the 2026 families (issue 22); `qwen3_5` and `qwen3_5_moe` load as their text-only causal LM
    "qwen3_5": _lora(_QWEN35),
    "qwen3_5_text": _lora(_QWEN35),
    "qwen3_5_moe": _lora(_QWEN35_MOE),
    "qwen3_5_moe_text": _lora(_QWEN35_MOE),
    "qwen3_next": _lora(_QWEN3_NEXT),
    "gemma4_text": _lora(_LLAMA_LIKE),
    "gemma4": _lora(_GEMMA4_LANGUAGE_MODEL),
    "granitemoehybrid": _lora(_GRANITE_HYBRID),
    "lfm2": _lora(_LFM2),
    "lfm2_moe": _lora(_LFM2),
    "olmo3": _lora(_LLAMA_LIKE),
    "ernie4_5": _lora(_LLAMA_LIKE),
    "ernie4_5_moe": _lora(_ATTENTION),
    "glm4_moe": _lora(_ATTENTION),
}
LORA_FALLBACK = _lora("all-linear")


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything `alpaca-convert finetune` takes; the help text is the flag's."""

    base: str = field(metadata={"help": "base model: a Hugging Face directory or hub id", "metavar": "DIR|ID"})
    data: str = field(
        metadata={"help": "Alpaca JSON/JSONL, a `datasets` directory, a hub dataset id, or chat data", "metavar": "DATA"}
    )
    out: Path = field(metadata={"help": "output directory for the adapter, metrics and checkpoints", "metavar": "DIR"})
    val_data: str | None = field(
        default=None, metadata={"help": "validation data (default: hold out --val-size of --data)", "metavar": "DATA"}
    )
    val_size: float = field(default=0.1, metadata={"help": "rows held out for eval loss: a fraction below 1, or a count"})
    max_length: int = field(default=512, metadata={"help": "longest example in tokens; longer ones are truncated"})
    train_on_inputs: bool = field(default=False, metadata={"help": "also take loss on the prompt, not only the response"})
    epochs: float = field(default=3.0, metadata={"help": "passes over the training data (ignored with --max-steps)"})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps"})
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    lr_scheduler: str = field(default="cosine", metadata={"help": "learning rate schedule: cosine, linear, constant..."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of the steps spent warming the learning rate up"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    batch_size: int = field(default=4, metadata={"help": "examples per micro-batch (packed into one row)"})
    grad_accum: int = field(default=4, metadata={"help": "micro-batches per optimizer step"})
    lora_r: int | None = field(default=None, metadata={"help": "LoRA rank (default: per architecture, 16)"})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default: per architecture, 32)"})
    lora_dropout: float | None = field(default=None, metadata={"help": "LoRA dropout (default: 0)"})
    target_modules: tuple[str, ...] | None = field(
        default=None, metadata={"help": "modules to adapt (default: per architecture; 'all-linear' for all)"}
    )
    seed: int = field(default=42, metadata={"help": "random seed: the same seed gives the same adapter"})
    save_steps: int = field(default=50, metadata={"help": "save a checkpoint every N steps"})
    eval_steps: int | None = field(default=None, metadata={"help": "eval loss every N steps (default: 5 times a run)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory"})
    device: str = field(default="auto", metadata={"help": "auto (a GPU when present), cpu or cuda"})
    precision: str = field(
        default="auto",
        metadata={"help": "compute type: auto (bf16 on a GPU or CPU that has it, else fp32), fp32, bf16 or fp16; "
                  "weights, LoRA and optimizer stay fp32"},
    )
    resume: bool = field(default=False, metadata={"help": "continue an interrupted run from its last checkpoint"})

    def run_settings(self) -> dict:
        """What must match for --resume to continue a run (all but where and whether to resume)."""
        settings = asdict(self)
        for name in ("out", "resume"):
            settings.pop(name)
        settings["target_modules"] = list(self.target_modules) if self.target_modules else None
        return settings


def lora_settings(model_type: str, config: FinetuneConfig) -> LoraSettings:
    """The architecture's defaults, with the config's overrides on top."""
    default = LORA_DEFAULTS.get(model_type, LORA_FALLBACK)
    targets = config.target_modules or default.target_modules
    return LoraSettings(
        r=config.lora_r or default.r,
        alpha=config.lora_alpha or default.alpha,
        dropout=default.dropout if config.lora_dropout is None else config.lora_dropout,
        target_modules="all-linear" if targets == ("all-linear",) else targets,
    )
