"""The one checkpoint and tokenizer loader of every `convert` command that runs a model.

    path = resolve_base(spec)            a directory, a hub id, or a GGUF (dequantized once)
    config = load_model_config(path)     transformers' config, no weights
    tokenizer = load_tokenizer(path)     with a pad token (EOS when it has none)
    model = load_model(path, "cpu")      safetensors only, float32 unless told
    model, tokenizer = load_gguf(file)   a GGUF dequantized by transformers, as a plain model

finetune, merge, compare, distill, prune and the pipeline all load here, so
that every command accepts the same `--base` and refuses the same things:
pickled weights, remote code, a directory without config.json. A GGUF given as
`--base` goes through convert/gguf_base.py's cache, which reads it with
`load_gguf` the first time. A failure is a TrainingError of one line.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from huggingface_hub.errors import StrictDataclassError

from alpaca_chat.errors import TrainingError
from convert import gguf_base
from convert.packing import attention_implementation

# The frozen base weights are stored in the compute type: half the memory, no cast per op. The LoRA
# weights peft adds stay fp32 (its autocast_adapter_dtype), and so does the optimizer state.
FROZEN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_base(spec: str) -> Path:
    """A local checkpoint directory, a hub id fetched into the HF cache, or a GGUF (a path or
    any `alpaca-chat --model` name) dequantized once into a cached checkpoint (convert/gguf_base.py)."""
    from convert.export.checkpoint import CheckpointError, resolve_checkpoint

    if gguf_base.is_gguf_spec(spec):
        return gguf_base.checkpoint_from_gguf(spec)
    try:
        path, _ = resolve_checkpoint(spec)
    except CheckpointError as exc:
        raise TrainingError(f"base model: {exc}") from None
    if not (path / "config.json").is_file():
        raise TrainingError(f"base model: no config.json in {path}: not a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        raise TrainingError(
            f"base model: {path} has no .safetensors weights; only safetensors are loaded (pickles can run code)"
        )
    return path


def load_tokenizer(path: Path):
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot load the tokenizer of {path}: {exc}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_config(path: Path):
    try:
        return transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot read the model config in {path}: {exc}") from None


def load_model(path: Path, device: str, dtype: torch.dtype | None = None):
    """The base model from safetensors only, float32 unless `dtype` says otherwise. It stays on the
    CPU: the Trainer (or the caller) moves it to `device`."""
    if dtype is None:
        dtype = torch.float32
    config = load_model_config(path)
    quantization = getattr(config, "quantization_config", None)
    if _quant_method(quantization) == "gguf":
        # transformers marks weights it dequantized from a GGUF this way; on disk they are plain floats.
        del config.quantization_config
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=dtype,
            use_safetensors=True,
            trust_remote_code=False,
            attn_implementation=attention_implementation(config),
        )
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot load the base model from {path}: {exc}") from None
    model.config.use_cache = False  # a cache only costs memory while training
    return model


def load_gguf(gguf: Path):
    """A GGUF's weights, dequantized by transformers' GGUF reader, in a fresh model of the same class
    (plain float32 weights, no quantization config), and its tokenizer."""
    kwargs = {"gguf_file": gguf.name}
    try:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    except (ValueError, KeyError, TypeError, NotImplementedError, OSError, StrictDataclassError) as exc:
        # e.g. a GGUF whose settings transformers' config cannot hold (Gemma 4's per-layer FFN widths)
        raise TrainingError(
            f"base model: transformers cannot dequantize {gguf.name} ({_first_line(exc)}); "
            "give a Hugging Face checkpoint directory instead"
        ) from None
    model = type(loaded)(loaded.config)
    model.load_state_dict(loaded.state_dict())
    model.config.architectures = [type(loaded).__name__]
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # plain floats from here on
    model.generation_config = loaded.generation_config
    _set_gemma_query_scale(model.config)
    return model, tokenizer


def _set_gemma_query_scale(config) -> None:
    """Gemma's query scale as llama.cpp runs the GGUF. A GGUF has no key for it (llama.cpp derives
    1/sqrt(head_dim), or 1/sqrt(hidden_size / heads) for the 27B sizes), and transformers' reader
    leaves its config default, 256: right only for head_dim 256. Training with it, and exporting
    (which refuses a scale llama.cpp cannot run), would then disagree with the model."""
    from convert.export.gemma import Gemma2Model, Gemma3Model

    family = {"gemma2": Gemma2Model, "gemma3_text": Gemma3Model}.get(config.model_type)
    if family is None:
        return
    if config.num_hidden_layers == family.scaled_by_hidden_layers:
        config.query_pre_attn_scalar = config.hidden_size // config.num_attention_heads
    else:
        config.query_pre_attn_scalar = config.head_dim


def base_shape(model_config) -> dict:
    """What an adapter must be merged into: the model type and its language model's shape
    (an image-text model such as Gemma 3 4B keeps that in its text config)."""
    text_config = model_config.get_text_config()
    shape = {name: getattr(text_config, name, None) for name in ("hidden_size", "num_hidden_layers", "vocab_size")}
    return {"model_type": model_config.model_type, **shape}


def _quant_method(quantization) -> str | None:
    if isinstance(quantization, dict):
        return quantization.get("quant_method")
    method = getattr(quantization, "quant_method", None)
    return getattr(method, "value", method)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
