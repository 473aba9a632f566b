"""LoRA adapter GGUFs checked in Python against the loaded base before llama.cpp sees them.

llama.cpp's `llama_adapter_lora_init` trusts the file: it reads the header with gguf.cpp, then
checks only some shapes, and a NaN alpha or a half-copied file is applied without a word (or read
past its end). `check_adapter` parses the header with our bounded parser (`gguf_parse`: file
bounds, truncation, tensor layout) and checks what llama.cpp's llama-adapter.cpp relies on:

- `general.type` = "adapter", `adapter.type` = "lora" (not an activated LoRA), `general.architecture` = the base's;
- `adapter.lora.alpha` a finite number (absent: llama.cpp reads 0, "no alpha/rank scaling");
- every tensor `<base tensor>.lora_a` / `.lora_b` (norm vectors `*_norm.weight` are ignored by
  llama.cpp, as here), in pairs, naming a tensor the base has, in float types;
- shapes, in ggml order (ne): for a weight W of ne [n_in, n_out, ...], lora_a is [n_in, r, ...]
  and lora_b [r, n_out, ...] (W x + scale * B (A x)). token_embd is looked up by rows, so its pair
  is flipped: lora_a [r, n_vocab], lora_b [r, n_embd]. Both of a pair have the same rank r.

Errors are InvalidModelFileError, one line naming the adapter file and the tensor.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from alpaca_chat.errors import InvalidModelFileError, ModelNotFoundError
from alpaca_chat.gguf_parse import Parsed, gguf, parse_file, printable

_SUFFIXES = (".lora_a", ".lora_b")
# What llama.cpp can multiply a LoRA pair in: ggml_mul_mat on any CPU type works, but a quantized
# lora_b would need a row size that is a multiple of its block (r is usually 8-64); exporters write
# f32/f16/bf16 and q8_0. Other types are refused here rather than risk a ggml abort.
_FLOAT_TYPES = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16,
                gguf.GGMLQuantizationType.Q8_0}
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class BaseLayout:
    """What an adapter is checked against: the base model's architecture and tensor shapes (ne order)."""

    architecture: str
    tensors: Mapping[str, tuple[int, ...]]
    display: str = "the model"

    @classmethod
    def of_model(cls, model_path: str | os.PathLike) -> "BaseLayout":
        """Read from the base GGUF's header (already validated by gguf_check when it was loaded)."""
        parsed = parse_file(model_path)
        arch = parsed.metadata.get(gguf.Keys.General.ARCHITECTURE)
        return cls(str(arch), {t.name: t.shape for t in parsed.tensors}, Path(model_path).name)


@dataclass(frozen=True)
class AdapterInfo:
    """A checked adapter: its alpha, rank(s), how many weights it changes and its content hash."""

    path: Path
    alpha: float
    ranks: tuple[int, ...]
    n_weights: int
    sha256: str

    @property
    def rank(self) -> int:
        return max(self.ranks)


def check_adapter(path: str | os.PathLike, base: BaseLayout) -> AdapterInfo:
    """Validate the adapter GGUF at `path` for `base`; raise a one-line InvalidModelFileError if it is wrong."""
    display = os.fspath(path)
    try:
        parsed = parse_file(path)
    except ModelNotFoundError:
        raise ModelNotFoundError(f"LoRA adapter not found: {display}") from None
    except InvalidModelFileError as exc:
        message = str(exc)  # the parser's messages name the file first
        raise InvalidModelFileError(f"LoRA adapter {message}" if message.startswith(display) else
                                    f"LoRA adapter {display}: {message}") from None
    alpha = _check_metadata(display, parsed, base)
    ranks = _check_tensors(display, parsed, base)
    return AdapterInfo(Path(path), alpha, tuple(sorted(set(ranks))), len(ranks), file_sha256(path))


def _check_metadata(display: str, parsed: Parsed, base: BaseLayout) -> float:
    md = parsed.metadata
    general_type = md.get(gguf.Keys.General.TYPE)
    if general_type != "adapter":
        if general_type in (None, "model"):
            raise InvalidModelFileError(f"{display} is a model, not a LoRA adapter (general.type is not 'adapter')")
        raise InvalidModelFileError(f"{display} has general.type {printable(str(general_type))!r}, not 'adapter'")
    adapter_type = md.get(gguf.Keys.Adapter.TYPE)
    if adapter_type != "lora":
        raise InvalidModelFileError(f"{display}: adapter.type is {printable(str(adapter_type))!r}; only 'lora' "
                                    "adapters can be applied")
    if gguf.Keys.Adapter.ALORA_INVOCATION_TOKENS in parsed.types:
        # An activated LoRA applies only after its invocation tokens, which llama.cpp leaves to its server.
        raise InvalidModelFileError(f"{display} is an activated LoRA (aLoRA), which alpaca-chat cannot apply")
    arch = md.get(gguf.Keys.General.ARCHITECTURE)
    if arch != base.architecture:
        raise InvalidModelFileError(f"{display} is an adapter for architecture {printable(str(arch))!r}, but "
                                    f"{base.display} is {base.architecture!r}")
    key = gguf.Keys.Adapter.LORA_ALPHA
    alpha = md.get(key, 0.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InvalidModelFileError(f"{display}: {key} is {alpha!r}, not a finite number")
    if parsed.types.get(key, gguf.GGUFValueType.FLOAT32) != gguf.GGUFValueType.FLOAT32:
        # llama.cpp reads it with gguf_get_val_f32, which aborts the process on another type.
        raise InvalidModelFileError(f"{display}: {key} is not a float32")
    if key in parsed.array_lengths:
        raise InvalidModelFileError(f"{display}: {key} is an array, not a number")
    return float(alpha)


def _check_tensors(display: str, parsed: Parsed, base: BaseLayout) -> list[int]:
    pairs: dict[str, dict[str, object]] = {}
    for t in parsed.tensors:
        suffix = next((s for s in _SUFFIXES if t.name.endswith(s)), None)
        if suffix is None:
            if t.name.endswith("_norm.weight"):
                continue  # llama.cpp skips norm vectors
            raise InvalidModelFileError(f"{display}: tensor '{t.name}' is not a LoRA tensor "
                                        "(a name ending in .lora_a or .lora_b)")
        if t.ggml_type not in _FLOAT_TYPES:
            name = gguf.GGMLQuantizationType(t.ggml_type).name
            raise InvalidModelFileError(f"{display}: tensor '{t.name}' is {name}; LoRA tensors must be "
                                        "F32, F16, BF16 or Q8_0")
        pairs.setdefault(t.name[: -len(suffix)], {})[suffix] = t
    if not pairs:
        raise InvalidModelFileError(f"{display} holds no LoRA tensors")
    return [_check_pair(display, name, pair, base) for name, pair in sorted(pairs.items())]


def _check_pair(display: str, name: str, pair: dict, base: BaseLayout) -> int:
    for suffix in _SUFFIXES:
        if suffix not in pair:
            raise InvalidModelFileError(f"{display}: tensor '{name}' has no {suffix} to go with its "
                                        f"{next(iter(pair))}")
    if name not in base.tensors:
        raise InvalidModelFileError(f"{display}: tensor '{name}' is not in {base.display} (wrong base model?)")
    w, a, b = base.tensors[name], pair[".lora_a"].shape, pair[".lora_b"].shape
    if len(a) != len(w) or len(b) != len(w) or len(w) < 2:
        raise InvalidModelFileError(f"{display}: tensor '{name}' has lora_a {list(a)}, lora_b {list(b)}; "
                                    f"they must have the {len(w)} dimensions of the base's {list(w)}")
    if name == "token_embd.weight" and "output.weight" not in base.tensors:
        # A tied output reuses token_embd in the output matmul, where llama.cpp applies the pair
        # unflipped: ggml aborts the process on the shape mismatch.
        raise InvalidModelFileError(f"{display}: tensor '{name}': {base.display} ties its output to the token "
                                    "embeddings, and llama.cpp cannot apply an embedding LoRA to a tied output")
    if name.endswith("token_embd.weight"):
        # Embedding rows are looked up in lora_a, then multiplied by lora_b (llm_build_inp_embd).
        rank, expect_a, expect_b = a[0], (a[0], w[1]), (a[0], w[0])
    else:
        rank, expect_a, expect_b = a[1], (w[0], a[1]), (a[1], w[1])
    expect_a, expect_b = expect_a + tuple(w[2:]), expect_b + tuple(w[2:])
    if a != expect_a or b != expect_b or rank < 1:
        raise InvalidModelFileError(
            f"{display}: tensor '{name}' has lora_a {list(a)} and lora_b {list(b)}, but the base's "
            f"{list(w)} needs lora_a {list(expect_a)} and lora_b {list(expect_b)} (ggml order; wrong base model?)")
    return rank


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's content (an adapter is a few MB: read once per load)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
