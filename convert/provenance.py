"""Where a GGUF came from, written into its `general.*` metadata.

llama.cpp ignores keys it does not know, so these travel with the file through
quantization (llama.cpp's quantizer copies every key) and show in `inspect`.
"""

from alpaca_chat import __version__

KEY_CONVERTER = "general.converter"  # "alpaca-convert 0.1.0 (gguf 0.19.0)"
KEY_SOURCE = "general.source.checkpoint"  # the hub id, or the checkpoint directory's name
KEY_QUANT_TYPE = "general.quant_type"  # "F16", "Q4_K_M"...
# Fine-tuned from a quantized GGUF (dequantized by transformers): that file's name, size and hash.
KEY_BASE_GGUF = "general.source.base_gguf"


def converter_version() -> str:
    try:
        from importlib.metadata import version

        gguf_version = version("gguf")
    except Exception:  # noqa: BLE001 - metadata is best effort
        gguf_version = "?"
    return f"alpaca-convert {__version__} (gguf {gguf_version})"
