"""Tiny random checkpoints, one module per architecture family (as in convert/export/).

Each module defines `CASES`, a list of `convert_helpers.TinyCase`; the
architecture tests run every case: logits against transformers at F32 and F16,
metadata, tokenizer parity, and byte parity with llama.cpp's converter.
"""
