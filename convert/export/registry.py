"""The architecture registry: Hugging Face `architectures` names -> the `ArchModel` that exports them.

    @register("LlamaForCausalLM")
    class LlamaModel(ArchModel): ...

    model_class_for(config) -> the class, or UnsupportedArchitectureError naming the closest family
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from alpaca_chat.errors import ConversionError

if TYPE_CHECKING:
    from convert.export.base import ArchModel


class UnsupportedArchitectureError(ConversionError):
    """The checkpoint's architecture has no exporter."""


_REGISTRY: dict[str, type[ArchModel]] = {}


def register(*hf_names: str) -> Callable[[type[ArchModel]], type[ArchModel]]:
    def add(cls: type[ArchModel]) -> type[ArchModel]:
        for name in hf_names:
            _REGISTRY[name] = cls
        return cls

    return add


def registered_classes() -> list[type[ArchModel]]:
    """Each family class once, in registration order."""
    return list(dict.fromkeys(_REGISTRY.values()))


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def model_class_for(config: dict[str, Any]) -> type[ArchModel]:
    names = config.get("architectures") or []
    for name in names:
        if name in _REGISTRY:
            return _REGISTRY[name]
    found = ", ".join(names) if names else f"none listed (model_type {config.get('model_type', '?')})"
    closest = closest_supported(names or [str(config.get("model_type") or "")])
    hint = f" (the closest supported family, {closest}, is a different architecture)" if closest else ""
    raise UnsupportedArchitectureError(
        f"unsupported architecture: {found}{hint}; supported: {', '.join(supported_architectures())}; "
        "for other architectures, use llama.cpp's convert_hf_to_gguf.py"
    )


_HEAD_SUFFIXES = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel", "Model")


def closest_supported(names: Iterable[str]) -> str | None:
    """The supported architecture whose family name the given names suggest, e.g.
    Qwen3OmniMoeForConditionalGeneration -> Qwen3ForCausalLM: the longest family name one starts with,
    else a close spelling (Olmo3 -> Olmo2); None when nothing is near."""

    def family(name: str) -> str:
        for suffix in _HEAD_SUFFIXES:
            if name.endswith(suffix) and name != suffix:
                return name[: -len(suffix)].lower()
        return name.replace("_", "").lower()

    families = {family(supported): supported for supported in supported_architectures()}
    for name in names:
        wanted = family(name)
        if not wanted:
            continue
        prefixes = [f for f in families if wanted.startswith(f)]
        if prefixes:
            return families[max(prefixes, key=len)]
        close = difflib.get_close_matches(wanted, list(families), n=1, cutoff=0.75)
        if close:
            return families[close[0]]
    return None
