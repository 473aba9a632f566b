"""Open a chat session from settings: resolve, check and load the model,
pick the template, and restore a saved conversation if asked.

Shared by the one-shot CLI, the TUI and the line mode.
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alpaca_chat import gguf_check, kvcache, models
from alpaca_chat.config import Settings
from alpaca_chat.conversation import Message, SamplingParams
from alpaca_chat.errors import AlpacaChatError, StoreError, UsageError
from alpaca_chat.lora_spec import AdapterSpec, format_adapters
from alpaca_chat.session import ChatSession
from alpaca_chat.templates import ChatTemplate, resolve_template


@dataclass
class LoadedModel:
    """A loaded engine with its chat template, and how to name the model."""

    engine: Any
    template: ChatTemplate
    label: str  # saved with a conversation: what --continue resolves again
    name: str  # short, for display
    quant: str | None = None

    @property
    def display_name(self) -> str:
        return f"{self.name} {self.quant}" if self.quant and self.quant not in self.name else self.name


def load_engine(
    model_spec: str | None,
    *,
    n_ctx: int | None,
    threads: int | None,
    verbose: bool,
    n_seq_max: int = 1,
    kv_type: str = "f16",
    adapters=(),
):
    """Resolve and validate a model, then load it. Returns (engine, resolved model).

    `n_seq_max` > 1 sizes the context for that many parallel sequences sharing `n_ctx` cells;
    `adapters` (AdapterSpecs) are LoRA adapters applied on it, each checked before llama.cpp loads it.
    """
    resolved = models.resolve_model(model_spec)
    info = gguf_check.check_gguf(resolved.path)
    wanted_ctx = n_ctx or min(4096, info.context_length or 4096)
    gguf_check.check_memory(info, wanted_ctx)

    from alpaca_chat.engine import Engine  # imports llama_cpp: only once the file is known good

    engine = Engine(
        resolved.path, n_ctx=wanted_ctx, n_threads=threads, verbose=verbose, n_seq_max=n_seq_max, kv_type=kv_type,
        adapters=adapters,
    )
    return engine, resolved


def check_adapters(model_spec: str | None, adapters) -> None:
    """Check LoRA adapters against a model before it is loaded (the full-screen app loads it inside
    itself: a bad adapter given at startup is one line and exit 1 here, not a notification there)."""
    if not adapters:
        return
    from alpaca_chat.engine.adapter_check import BaseLayout, check_adapter

    base = BaseLayout.of_model(models.resolve_model(model_spec).path)
    for spec in adapters:
        check_adapter(spec.path, base)


def choose_template(engine, choice: str, registry_hint: str | None):
    """--template wins; with 'auto', a registry hint beats the GGUF's own template."""
    if choice == "auto" and registry_hint and registry_hint != "auto":
        choice = registry_hint
    return resolve_template(choice, engine.chat_template, engine.bos_token, engine.eos_token)


def load_model(model_spec: str | None, settings: Settings, *, verbose: bool = False) -> LoadedModel:
    """Resolve, check and load a model, and pick its chat template."""
    engine, resolved = load_engine(
        model_spec, n_ctx=settings.n_ctx, threads=settings.threads, verbose=verbose, kv_type=settings.kv_type,
        adapters=getattr(settings, "lora", ()),
    )
    try:
        template = choose_template(engine, settings.template, resolved.template)
    except BaseException:
        engine.close()
        raise
    return LoadedModel(
        engine,
        template,
        # What --continue will pass back to resolve_model: a path for local files.
        label=str(resolved.path) if resolved.source == "local" else resolved.name,
        name=resolved.name,
        quant=resolved.quant or models.parse_quant(resolved.path.name),
    )


def open_store(save_history: bool, *, warn: bool = True):
    """The history store (None with --no-history); `warn` reports a recovered corrupt file on stderr."""
    if not save_history:
        return None
    from alpaca_chat.store import Store

    store = Store()
    store.on_delete.append(kvcache.delete_conversation_state)  # a conversation's KV state goes with it
    if warn and store.recovered_from is not None:
        print(
            f"alpaca-chat: warning: the history database was corrupt; it was moved to {store.recovered_from}",
            file=sys.stderr,
        )
    return store


def saved_conversation(store, continue_last: bool, conversation_id: int | None):
    """The conversation to resume, or None for a new one."""
    if not (continue_last or conversation_id is not None):
        return None
    if store is None:
        raise StoreError("--continue needs the history; it cannot be combined with --no-history")
    if conversation_id is not None:
        return store.get_conversation(conversation_id)
    conversation = store.latest_conversation()
    if conversation is None:
        raise StoreError("there is no saved conversation to continue")
    return conversation


def kept_rows(rows) -> list:
    """The saved messages a conversation resumes with: not system rows nor empty replies."""
    return [m for m in rows if m.role != "system" and (m.content or m.role == "user")]


def new_session(
    loaded: LoadedModel, settings: Settings, store=None, saved=None, *, notice=None, kv_cache=None, warn=None
) -> ChatSession:
    """A session on a loaded model: a new conversation, or `saved` with its settings restored.

    With history on and `kv_cache` set, the session saves and restores KV states (instant
    resume; `kv_cache` passes in one already open, else it is opened here); `notice` receives
    its one-line notes (e.g. a state file that was ignored), `warn` its warnings (a recorded
    LoRA adapter that is gone; default: stderr).
    """
    history, sampling, system = [], settings.sampling, settings.system
    if saved is not None:
        history = [Message(m.role, m.content) for m in kept_rows(store.messages(saved.id))]
        sampling = SamplingParams.from_dict({**(saved.sampling or {}), **_explicit_sampling(settings)})
        system = settings.system if settings.system is not None else saved.system_prompt
    session = ChatSession(
        loaded.engine,
        loaded.template,
        model_label=loaded.label,
        sampling=sampling,
        system_prompt=system,
        store=store,
        conversation_id=saved.id if saved else None,
        history=history,
        kv_cache=kv_cache if kv_cache is not None else open_kv_cache(settings) if store is not None else None,
        notice=notice,
    )
    if saved is not None and not getattr(settings, "lora", ()):
        # --lora / config `lora` beat what it recorded; the session records those with its next message.
        restore_adapters(session, saved, warn or stderr_warning)
    return session


def stderr_warning(text: str) -> None:
    print(f"alpaca-chat: warning: {text}", file=sys.stderr)


def restore_adapters(session: ChatSession, saved, warn) -> None:
    """Apply the LoRA adapters a saved conversation recorded (--lora / config `lora` beat them).

    A recorded file that is gone, or that no longer fits the model, is one warning and the
    conversation goes on without it: a chat is never lost to a missing adapter."""
    wanted = [AdapterSpec(Path(a["path"]), a["scale"]) for a in getattr(saved, "adapters", ())]
    present = [spec for spec in wanted if spec.path.is_file()]
    for spec in wanted:
        if spec not in present:
            warn(f"LoRA adapter {spec.path}, recorded with conversation {saved.id}, is gone; continuing without it")
    if tuple(present) == tuple(session.engine.adapters):
        return
    try:
        session.engine.set_adapters(present)
    except AlpacaChatError as exc:
        warn(f"the conversation's LoRA adapters were not applied: {exc}; continuing on {_adapters_left(session)}")

def open_kv_cache(settings: Settings):
    """The KV state files, or None when `kv_cache = false` / --no-kv-cache."""
    if not getattr(settings, "kv_cache", True):
        return None
    budget = getattr(settings, "kv_cache_max_mb", kvcache.DEFAULT_MAX_MB)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise UsageError(f"kv_cache_max_mb must be a whole number of megabytes, not {budget!r}")
    return kvcache.KVCache(max_bytes=budget * kvcache.MIB)


def verbose_notice(verbose: bool):
    """Where a session's one-line notes go: stderr under --verbose, nowhere otherwise."""
    if not verbose:
        return None
    return lambda text: print(f"alpaca-chat: {text}", file=sys.stderr)


def open_session(
    settings: Settings,
    *,
    continue_last: bool = False,
    conversation_id: int | None = None,
    save_history: bool = True,
    verbose: bool = False,
) -> ChatSession:
    store = open_store(save_history)
    saved = saved_conversation(store, continue_last, conversation_id)
    kv_cache = open_kv_cache(settings) if store is not None else None
    if kv_cache is not None and saved is not None:
        kv_cache.prefetch(saved.id)  # its state file is read while the model loads
    loaded = load_model(settings.model or (saved.model if saved else None), settings, verbose=verbose)
    return new_session(loaded, settings, store, saved, notice=verbose_notice(verbose), kv_cache=kv_cache)


def _explicit_sampling(settings: Settings) -> dict:
    """Sampling values that differ from the defaults: flags beat the saved conversation."""
    defaults = SamplingParams().to_dict()
    return {k: v for k, v in settings.sampling.to_dict().items() if v != defaults[k]}


def _adapters_left(session: ChatSession) -> str:
    active = format_adapters(session.engine.adapters)
    return f"LoRA {active}" if active else "the base model"
