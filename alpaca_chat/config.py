"""Settings: built-in defaults < config.toml < environment < command-line flags.

Pure: the caller reads the file and the environment and passes them in.
"""

import tomllib
from dataclasses import dataclass, fields, replace

from alpaca_chat.conversation import SamplingParams
from alpaca_chat.errors import UsageError

# Environment variables that override the config file.
ENV_KEYS = {"ALPACA_CHAT_MODEL": "model", "ALPACA_CHAT_TEMPLATE": "template"}


@dataclass(frozen=True)
class Settings:
    model: str | None = None  # None: the bundled default model
    template: str = "auto"
    system: str | None = None
    n_ctx: int | None = None  # None: min(4096, the model's training context)
    threads: int | None = None  # None: physical cores
    sampling: SamplingParams = SamplingParams()


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
    return data


def env_overrides(environ: dict) -> dict:
    return {key: environ[var] for var, key in ENV_KEYS.items() if environ.get(var)}


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
