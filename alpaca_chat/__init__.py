"""alpaca-chat: offline, CPU-first chat with quantized language models."""

__version__ = "0.1.0"
