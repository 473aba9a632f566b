"""A loaded model's GGUF metadata as strings (llama.cpp's view of it: arrays are summarised)."""

import ctypes

import llama_cpp


def read_metadata(model) -> dict[str, str]:
    """key -> value for every metadata entry llama.cpp can render in 4 KiB."""
    buf = ctypes.create_string_buffer(4096)
    meta = {}
    for i in range(llama_cpp.llama_model_meta_count(model)):
        if llama_cpp.llama_model_meta_key_by_index(model, i, buf, len(buf)) < 0:
            continue
        key = buf.value.decode("utf-8", errors="replace")
        if llama_cpp.llama_model_meta_val_str_by_index(model, i, buf, len(buf)) < 0:
            continue
        meta[key] = buf.value.decode("utf-8", errors="replace")
    return meta
