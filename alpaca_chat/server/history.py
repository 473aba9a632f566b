"""`serve --history`: API conversations saved in the chat's history store (the TUI's sidebar;
`alpaca-chat -c` continues the latest).

The API is stateless: a client re-sends its whole conversation each turn. A request whose messages
before its last one are exactly a conversation saved here (its messages and the reply) continues
that conversation; any other starts a new one. A conversation records the adapter set of the
model it was asked of (`--lora`), so that `alpaca-chat -c` continues it with the same adapters.
"""

import hashlib
import json

from alpaca_chat.conversation import Message

STATUS = {"cancelled": "stopped"}  # a reply its client abandoned; the others are complete


def _digest(messages: list[Message], adapters: list[dict]) -> str:
    """Names a conversation under one adapter set (the same messages asked of another model are another)."""
    return hashlib.sha256(json.dumps([[[m.role, m.content] for m in messages], adapters]).encode()).hexdigest()


class ApiHistory:
    """Saves chat completions into a `store.Store` (called from the event loop only)."""

    def __init__(self, store, model_label: str, template_name: str):
        self.store = store
        self.model_label = model_label
        self.template_name = template_name
        self._known: dict[str, int] = {}  # digest of a saved conversation's messages -> its id

    def record(self, messages: list[Message], reply: str, sampling: dict, stats, adapters=()) -> int:
        """Save the request's new messages and its reply (asked of the base with `adapters`, the
        AdapterSpecs of the request's model); return the conversation id."""
        *earlier, last = messages
        saved_adapters = [{"path": str(spec.path), "scale": spec.scale} for spec in adapters]
        conversation_id = self._known.pop(_digest(earlier, saved_adapters), None) if earlier else None
        if conversation_id is None:
            system = "\n\n".join(m.content for m in messages if m.role == "system") or None
            conversation_id = self.store.create_conversation(
                model=self.model_label, template=self.template_name, system_prompt=system, sampling=sampling,
                adapters=saved_adapters).id
            new = [m for m in messages if m.role != "system"]
        else:
            new = [last]
        for message in new:
            self.store.add_message(conversation_id, message.role, message.content)
        self.store.add_message(conversation_id, "assistant", reply, status=STATUS.get(stats.stop_reason, "complete"),
                               model=self.model_label, template=self.template_name, stats=stats, sampling=sampling)
        self._known[_digest([*messages, Message("assistant", reply)], saved_adapters)] = conversation_id
        return conversation_id
