"""Hugging Face checkpoint -> GGUF.

`export()` is the entry point; one module per architecture family registers
itself by its Hugging Face `architectures` name; every module of the package is
imported here, so adding a family is adding its module.
"""

import importlib as _importlib
import pkgutil as _pkgutil

from convert.export.checkpoint import CheckpointError
from convert.export.exporter import OUTTYPES, ExportResult, export
from convert.export.registry import UnsupportedArchitectureError, supported_architectures
from convert.export.vocab import TokenizerError


def _register_families() -> None:
    """Import every module of this package: each family module registers its architectures when
    imported, so a new family is one new file (the others import nothing heavy)."""
    for module in _pkgutil.iter_modules(__path__):
        _importlib.import_module(f"{__name__}.{module.name}")


_register_families()

__all__ = [
    "OUTTYPES",
    "CheckpointError",
    "ExportResult",
    "TokenizerError",
    "UnsupportedArchitectureError",
    "export",
    "supported_architectures",
]
