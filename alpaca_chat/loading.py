"""Open a chat session from settings: resolve, check and load the model,
pick the template, and restore a saved conversation if asked.

Shared by the one-shot CLI, the TUI and the line mode.
"""

import sys

from alpaca_chat import gguf_check, models
from alpaca_chat.config import Settings
from alpaca_chat.conversation import Message, SamplingParams
from alpaca_chat.errors import StoreError
from alpaca_chat.session import ChatSession
from alpaca_chat.templates import resolve_template


def load_engine(model_spec: str | None, *, n_ctx: int | None, threads: int | None, verbose: bool):
    """Resolve and validate a model, then load it. Returns (engine, resolved model)."""
    resolved = models.resolve_model(model_spec)
    info = gguf_check.check_gguf(resolved.path)
    wanted_ctx = n_ctx or min(4096, info.context_length or 4096)
    gguf_check.check_memory(info, wanted_ctx)

    from alpaca_chat.engine import Engine  # imports llama_cpp: only once the file is known good

    engine = Engine(resolved.path, n_ctx=wanted_ctx, n_threads=threads, verbose=verbose)
    return engine, resolved


def choose_template(engine, choice: str, registry_hint: str | None):
    """--template wins; with 'auto', a registry hint beats the GGUF's own template."""
    if choice == "auto" and registry_hint and registry_hint != "auto":
        choice = registry_hint
    return resolve_template(choice, engine.chat_template, engine.bos_token, engine.eos_token)


def open_store(save_history: bool):
    if not save_history:
        return None
    from alpaca_chat.store import Store

    store = Store()
    if store.recovered_from is not None:
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
    model_spec = settings.model or (saved.model if saved else None)
    engine, resolved = load_engine(model_spec, n_ctx=settings.n_ctx, threads=settings.threads, verbose=verbose)
    template = choose_template(engine, settings.template, resolved.template)
    history, sampling, system = [], settings.sampling, settings.system
    if saved is not None:
        history = [Message(m.role, m.content) for m in store.messages(saved.id) if m.content or m.role == "user"]
        sampling = SamplingParams.from_dict({**(saved.sampling or {}), **_explicit_sampling(settings)})
        system = settings.system if settings.system is not None else saved.system_prompt
    return ChatSession(
        engine,
        template,
        # What --continue will pass back to resolve_model: a path for local files.
        model_label=str(resolved.path) if resolved.source == "local" else resolved.name,
        sampling=sampling,
        system_prompt=system,
        store=store,
        conversation_id=saved.id if saved else None,
        history=history,
    )


def _explicit_sampling(settings: Settings) -> dict:
    """Sampling values that differ from the defaults: flags beat the saved conversation."""
    defaults = SamplingParams().to_dict()
    return {k: v for k, v in settings.sampling.to_dict().items() if v != defaults[k]}
