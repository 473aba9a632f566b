"""What the app's thread workers post up to the UI, and how an error reads in a notification."""

from textual.message import Message

from alpaca_chat.errors import AlpacaChatError


def describe_error(exc: BaseException) -> str:
    """One line for a notification: our errors speak for themselves, others get their type."""
    if isinstance(exc, AlpacaChatError):
        text = str(exc)
    else:
        text = f"unexpected {type(exc).__name__}: {exc}"
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


class ModelLoaded(Message):
    def __init__(self, loaded):
        super().__init__()
        self.loaded = loaded


class ModelFailed(Message):
    def __init__(self, spec: str | None, error: str):
        super().__init__()
        self.spec, self.error = spec, error


class StateRestored(Message):
    """A conversation's saved KV state is back in the engine."""

    def __init__(self, session, tokens: int):
        super().__init__()
        self.session, self.tokens = session, tokens


def load_in_worker(loader, spec: str | None, post) -> None:
    """The model worker: load `spec` and post ModelLoaded or ModelFailed (never raise)."""
    try:
        loaded = loader(spec)
    except Exception as exc:  # noqa: BLE001 - shown as a notification, never a traceback
        post(ModelFailed(spec, describe_error(exc)))
    else:
        post(ModelLoaded(loaded))
