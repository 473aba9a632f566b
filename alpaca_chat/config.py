"""Settings: built-in defaults < config.toml < environment < command-line flags.

Pure: the caller reads the file and the environment and passes them in.
"""

import math
import tomllib
from pathlib import Path, PurePath
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

from alpaca_chat.conversation import SamplingParams
from alpaca_chat.errors import UsageError
from alpaca_chat.lora_spec import AdapterSpec, parse_lora_arg

# Environment variables that override the config file.
ENV_KEYS = {"ALPACA_CHAT_MODEL": "model", "ALPACA_CHAT_TEMPLATE": "template"}
# The KV cache's element types: q8_0 halves its memory and saved state size (and needs flash attention).
KV_TYPES = ("f16", "q8_0")


@dataclass(frozen=True)
class Settings:
    model: str | None = None  # None: the bundled default model
    template: str = "auto"
    system: str | None = None
    n_ctx: int | None = None  # None: min(4096, the model's training context)
    threads: int | None = None  # None: physical cores
    sampling: SamplingParams = SamplingParams()
    kv_cache: bool = True  # instant resume: save/restore llama.cpp's KV state per conversation
    kv_cache_max_mb: int = 2048  # disk budget of the KV state files (least recently used evicted)
    kv_type: str = "f16"  # the KV cache's element type, one of KV_TYPES
    # LoRA adapters applied on the model (`--lora FILE[:SCALE]`, config `lora = ["FILE[:SCALE]", ...]`);
    # given, they beat the set a continued conversation recorded (as sampling flags do).
    lora: tuple[AdapterSpec, ...] = ()


# Every setting: the type a value must have, the range it must be in (as a predicate and its wording),
# and the flag that sets it. A bad value anywhere is one line naming where it came from and the key.
@dataclass(frozen=True)
class _Rule:
    kind: str  # "str", "int", "number", "bool"
    ok: Callable[[object], bool] = lambda v: True
    wanted: str = ""
    flag: str | None = None


def _finite(low: float, high: float = math.inf, *, open_low: bool = False) -> Callable[[object], bool]:
    return lambda v: math.isfinite(v) and (v > low if open_low else v >= low) and v <= high


_NONEMPTY = _Rule("str", lambda v: bool(v.strip()), "a non-empty string")
SCHEMA: dict[str, _Rule] = {
    "model": replace(_NONEMPTY, flag="--model"),
    "template": replace(_NONEMPTY, flag="--template"),
    "system": _Rule("str", flag="--system"),
    "n_ctx": _Rule("int", _finite(64, 1 << 24), "an integer from 64 to 16777216", "--ctx"),
    "threads": _Rule("int", _finite(1, 1024), "an integer from 1 to 1024", "--threads"),
    "kv_cache": _Rule("bool", wanted="true or false", flag="--no-kv-cache"),
    "kv_cache_max_mb": _Rule("int", _finite(0, 1 << 30), "an integer >= 0"),
    "kv_type": _Rule("str", lambda v: v in KV_TYPES, " or ".join(KV_TYPES), "--kv-type"),
    "temperature": _Rule("number", _finite(0, 100), "a number from 0 to 100", "--temp"),
    "top_p": _Rule("number", _finite(0, 1, open_low=True), "a number in (0, 1]", "--top-p"),
    "top_k": _Rule("int", _finite(0, 1 << 31), "an integer >= 0", "--top-k"),
    "min_p": _Rule("number", _finite(0, 1), "a number in [0, 1]", "--min-p"),
    "repeat_penalty": _Rule("number", _finite(0, 100, open_low=True), "a number above 0, at most 100", "--repeat-penalty"),
    "seed": _Rule("int", _finite(0, 2**32 - 1), "an integer from 0 to 4294967295", "--seed"),
    "max_tokens": _Rule("int", _finite(1, 1 << 24), "an integer >= 1", "--max-tokens"),
    "lora": _Rule("strlist", lambda v: all(s.strip() for s in v), "a list of \"FILE[:SCALE]\" strings", "--lora"),
}
_KINDS = {
    "str": ("a string", lambda v: isinstance(v, str)),
    "int": ("an integer", lambda v: type(v) is int),
    "number": ("a number", lambda v: type(v) in (int, float)),
    "bool": ("true or false", lambda v: type(v) is bool),
    "strlist": ("a list of strings", lambda v: isinstance(v, (list, tuple)) and all(isinstance(s, str) for s in v)),
}


def check_values(layer: dict, origin: str | None = None) -> dict:
    """Type- and range-check a layer of settings; raise UsageError naming `origin` and the key.

    `origin` None means command-line flags: the error then names the flag.
    """
    for key, value in layer.items():
        rule = SCHEMA.get(key)
        if rule is None or value is None:
            continue
        where = f"{origin}: {key}" if origin else (rule.flag or key)
        kind_name, is_kind = _KINDS[rule.kind]
        if not is_kind(value):
            raise UsageError(f"{where} must be {kind_name}, not {_show(value)}")
        if not rule.ok(value):
            raise UsageError(f"{where} must be {rule.wanted}, not {_show(value)}")
    return layer


def check_flags(flags: dict) -> dict:
    """check_values for the command line's flags (errors name the flag)."""
    return check_values(flags)


def _show(value: object) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 40 else text[:40] + "..."


def parse_config(text: str, origin: str) -> dict:
    """Parse config.toml into flat overrides; unknown keys are an error, not ignored."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{origin}: invalid TOML: {exc}") from exc
    allowed = {f.name for f in fields(Settings)} - {"sampling"}
    allowed |= {f.name for f in fields(SamplingParams)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise UsageError(f"{origin}: unknown setting(s): {', '.join(unknown)}")
    if isinstance(data.get("lora"), str):
        data["lora"] = [data["lora"]]  # one adapter may be written without the list
    check_values(data, origin)
    if "lora" in data:
        data["lora"] = lora_specs(data["lora"], origin, base_dir=_directory_of(origin))
    return data


def lora_specs(values, origin: str | None, base_dir: str | None = None) -> tuple[AdapterSpec, ...]:
    """"FILE[:SCALE]" strings as AdapterSpecs; a relative FILE in the config file is relative to its directory."""
    specs = []
    for value in values:
        try:
            spec = parse_lora_arg(value)
        except UsageError as exc:
            raise UsageError(f"{origin}: {exc}" if origin else str(exc)) from None
        if base_dir is not None and not spec.path.is_absolute():
            spec = AdapterSpec(Path(base_dir) / spec.path, spec.scale)
        specs.append(spec)
    return tuple(specs)


def _directory_of(origin: str) -> str | None:
    parent = PurePath(origin).parent
    return str(parent) if str(parent) not in ("", ".") else None


def env_overrides(environ: dict) -> dict:
    layer = {key: environ[var] for var, key in ENV_KEYS.items() if environ.get(var)}
    for var, key in ENV_KEYS.items():
        if key in layer:
            check_values({key: layer[key]}, f"environment variable {var}")
    return layer


def build_settings(*layers: dict) -> Settings:
    """Apply override layers in order (later wins); None values are 'not given'."""
    sampling_names = {f.name for f in fields(SamplingParams)}
    settings, sampling = Settings(), {}
    for layer in layers:
        given = {k: v for k, v in layer.items() if v is not None}
        sampling.update({k: v for k, v in given.items() if k in sampling_names})
        top = {k: v for k, v in given.items() if k not in sampling_names}
        settings = replace(settings, **top)
    try:
        merged = replace(settings.sampling, **sampling)
    except TypeError as exc:
        raise UsageError(f"invalid setting: {exc}") from exc
    return replace(settings, sampling=merged.validated())
