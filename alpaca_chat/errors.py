"""Typed errors raised by the library.

Every error here is a problem the user can act on; its str() is a one-line
message. `cli.py` turns them into exit codes, the TUI into notifications.
"""


class AlpacaChatError(Exception):
    """Base class: a user-facing failure with a one-line message."""

    exit_code = 1


class UsageError(AlpacaChatError):
    """The command line itself is wrong (bad flag value, conflicting flags)."""

    exit_code = 2


class ModelNotFoundError(AlpacaChatError):
    """A model name, path or hub reference could not be resolved to a GGUF file."""


class InvalidModelFileError(AlpacaChatError):
    """A file is not a GGUF llama.cpp can safely load (truncated, corrupt, wrong arch...)."""


class InsufficientMemoryError(AlpacaChatError):
    """The model needs more RAM than the machine has available."""


class TemplateError(AlpacaChatError):
    """A chat template is missing, unsafe, or failed to render."""


class ContextOverflowError(AlpacaChatError):
    """A single prompt cannot fit in the context window."""


class EngineError(AlpacaChatError):
    """llama.cpp reported a failure while loading or generating."""


class StoreError(AlpacaChatError):
    """The history database could not be read or written."""


class ConversionError(AlpacaChatError):
    """alpaca-convert could not export, quantize or evaluate a model (bad checkpoint, output...)."""


class DataError(AlpacaChatError):
    """Training data is missing, malformed or unusable; the message names the file and row."""


class TrainingError(AlpacaChatError):
    """alpaca-convert could not fine-tune or merge (bad base checkpoint, mismatched adapter...)."""
