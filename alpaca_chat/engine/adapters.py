"""LoRA adapters applied at run time on one loaded model: loaded once, switched without reloading it.

`Adapters` owns the llama.cpp adapter handles of one `Engine` (its model and context): each file
is checked in Python (`adapter_check.check_adapter`), loaded once with llama_adapter_lora_init
(cached by resolved path while the file stays the same), and the active set applied with
llama_set_adapters_lora. `key` names what the context computes with (the files' content hashes
and scales): KV states and reused prefixes are only valid under the same key.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import llama_cpp

from alpaca_chat.engine.adapter_check import AdapterInfo, BaseLayout, check_adapter
from alpaca_chat.engine.llama_log import logged_errors
from alpaca_chat.errors import EngineError, ModelNotFoundError, UsageError
from alpaca_chat.lora_spec import AdapterSpec, format_adapters, parse_lora_arg

__all__ = ["AdapterInfo", "AdapterSpec", "Adapters", "BaseLayout", "adapter_key", "check_adapter",
           "format_adapters", "parse_lora_arg"]


@dataclass
class _Loaded:
    identity: tuple  # (size, mtime_ns): a file rewritten in place is checked and loaded again
    info: AdapterInfo
    handle: object


def adapter_key(specs_and_hashes) -> str:
    """A short stable name for a set of (scale, sha256) pairs: order-free (llama.cpp sums the deltas),
    zero scales left out (llama.cpp skips them); "" for none."""
    parts = sorted(f"{sha[:16]}*{scale!r}" for scale, sha in specs_and_hashes if scale != 0.0)
    return "+".join(parts)


class Adapters:
    """The adapters loaded on one model and the set applied to one context."""

    def __init__(self, model, ctx, model_path: Path):
        self._model, self._ctx, self._model_path = model, ctx, model_path
        self._layout: BaseLayout | None = None
        self._loaded: dict[Path, _Loaded] = {}
        self.active: tuple[AdapterSpec, ...] = ()
        self.key = ""

    def apply(self, specs) -> bool:
        """Make `specs` the active set; True if what the context computes changed. Every file is
        checked and loaded before anything changes: on an error the previous set stays."""
        specs = tuple(s if isinstance(s, AdapterSpec) else parse_lora_arg(s) for s in specs)
        seen: set[Path] = set()
        loaded = []
        for spec in specs:
            resolved = spec.path.expanduser().resolve()
            if resolved in seen:
                raise UsageError(f"LoRA adapter {spec.path} is listed twice")
            seen.add(resolved)
            loaded.append(self._load(spec.path, resolved))
        n = len(specs)
        handles = (llama_cpp.llama_adapter_lora_p_ctypes * n)(*[item.handle for item in loaded]) if n else None
        scales = (ctypes.c_float * n)(*[spec.scale for spec in specs]) if n else None
        status = llama_cpp.llama_set_adapters_lora(self._ctx, handles, n, scales)
        if status != 0:
            raise EngineError(f"llama.cpp could not apply the LoRA adapters (status {status})")
        key = adapter_key((spec.scale, item.info.sha256) for spec, item in zip(specs, loaded))
        changed, self.active, self.key = key != self.key, specs, key
        return changed

    def info(self, spec: AdapterSpec) -> AdapterInfo | None:
        """What the check learned about a loaded adapter (rank, alpha, hash), or None."""
        item = self._loaded.get(spec.path.expanduser().resolve())
        return item.info if item else None

    def _load(self, path: Path, resolved: Path) -> _Loaded:
        try:
            st = os.stat(resolved)
        except OSError:
            raise ModelNotFoundError(f"LoRA adapter not found: {path}") from None
        identity = (st.st_size, st.st_mtime_ns)
        item = self._loaded.get(resolved)
        if item is not None and item.identity == identity:
            return item
        if self._layout is None:
            self._layout = BaseLayout.of_model(self._model_path)
        info = check_adapter(path, self._layout)
        with logged_errors() as errors:
            handle = llama_cpp.llama_adapter_lora_init(self._model, str(resolved).encode())
        if not handle:
            why = f": {errors[-1]}" if errors else ""
            raise EngineError(f"llama.cpp could not load the LoRA adapter {path}{why}")
        if item is not None and not any(s.path.expanduser().resolve() == resolved for s in self.active):
            llama_cpp.llama_adapter_lora_free(item.handle)  # the old version of a rewritten file, unused
        # An old version still active stays alive (the model frees it) until the set changes.
        self._loaded[resolved] = _Loaded(identity, info, handle)
        return self._loaded[resolved]

    def close(self) -> None:
        """Detach every adapter from the context and free them (before the model is freed)."""
        if self._ctx is not None:
            llama_cpp.llama_set_adapters_lora(self._ctx, None, 0, None)
        for item in self._loaded.values():
            llama_cpp.llama_adapter_lora_free(item.handle)
        self._loaded.clear()
        self._ctx = self._model = None
        self.active, self.key = (), ""

    def describe(self) -> str:
        return format_adapters(self.active)
