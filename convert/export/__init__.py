"""Hugging Face checkpoint -> GGUF.

`export()` is the entry point; one module per architecture family registers
itself by its Hugging Face `architectures` name when imported here.
"""

from convert.export import llama, mistral, qwen2  # noqa: F401 - registers the architectures
from convert.export import mixtral, qwen3, qwen3_moe  # noqa: F401 - registers the architectures
from convert.export import gemma  # noqa: F401 - registers the architectures
from convert.export import glm, phi3  # noqa: F401 - registers the architectures
from convert.export import granite, olmo2, smollm3  # noqa: F401 - registers the architectures
from convert.export.checkpoint import CheckpointError
from convert.export.exporter import OUTTYPES, ExportResult, export
from convert.export.registry import UnsupportedArchitectureError, supported_architectures
from convert.export.vocab import TokenizerError

__all__ = [
    "OUTTYPES",
    "CheckpointError",
    "ExportResult",
    "TokenizerError",
    "UnsupportedArchitectureError",
    "export",
    "supported_architectures",
]
