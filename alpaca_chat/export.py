"""Export a saved conversation as Markdown or JSON.

`render` is pure (it takes the store's Conversation and Message records);
the result is written with `atomic.write_atomic` (a temp file beside the
target, renamed into place), so a reader never sees half a file.
"""

import json
import os
from pathlib import Path

from alpaca_chat.atomic import write_atomic  # the one atomic writer (its WriteError is a one-line AlpacaChatError)

FORMATS = ("md", "json")
_STATUS_NOTES = {"stopped": "stopped", "partial": "incomplete", "error": "failed"}


def format_for_path(path: str | os.PathLike) -> str:
    return "json" if str(path).lower().endswith(".json") else "md"


def render(conversation, messages, fmt: str) -> str:
    if fmt == "md":
        return to_markdown(conversation, messages)
    if fmt == "json":
        return to_json(conversation, messages)
    raise ValueError(f"unknown export format {fmt!r}")


def to_markdown(conversation, messages) -> str:
    title = conversation.title or f"Conversation {conversation.id}"
    lines = [f"# {title}", ""]
    lines.append(f"- model: `{conversation.model}`")
    lines.append(f"- created: {conversation.created_at.isoformat(timespec='seconds')}")
    if conversation.system_prompt:
        lines += ["", "## System", "", conversation.system_prompt]
    for message in messages:
        heading = {"user": "User", "assistant": "Assistant", "system": "System"}[message.role]
        note = _STATUS_NOTES.get(message.status)
        lines += ["", f"## {heading}" + (f" ({note})" if note else ""), "", message.content]
    return "\n".join(lines).rstrip("\n") + "\n"


def to_json(conversation, messages) -> str:
    payload = {
        "id": conversation.id,
        "title": conversation.title,
        "created_at": conversation.created_at.isoformat(),
        "updated_at": conversation.updated_at.isoformat(),
        "model": conversation.model,
        "template": conversation.template,
        "system_prompt": conversation.system_prompt,
        "sampling": conversation.sampling,
        "messages": [
            {
                "role": m.role,
                "content": m.content,
                "created_at": m.created_at.isoformat(),
                "status": m.status,
                "model": m.model,
                "stats": m.stats,
            }
            for m in messages
        ],
    }
    return json.dumps(payload, ensure_ascii=False, indent=2) + "\n"


def default_filename(conversation_id: int, fmt: str = "md") -> str:
    return f"alpaca-chat-{conversation_id}.{fmt}"


def export_conversation(store, conversation_id: int, path: str | os.PathLike | None = None) -> Path:
    """Write a saved conversation to path (default: ./alpaca-chat-ID.md); return where it went."""
    path = path or default_filename(conversation_id)
    conversation = store.get_conversation(conversation_id)
    text = render(conversation, store.messages(conversation_id), format_for_path(path))
    return write_atomic(Path(path).expanduser().absolute(), text, mode=0o644)
