"""alpaca-convert: fine-tune, merge, export to GGUF and quantize (needs the `convert` extra)."""
