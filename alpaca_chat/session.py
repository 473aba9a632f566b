"""A chat session: history + template + engine + (optionally) the history store.

The one place that turns "the user said X" into a rendered prompt, a streamed
reply and saved rows, shared by the one-shot CLI, the TUI and the line mode.
The user's message is saved when sent and the reply as it streams, so a crash
or kill loses at most the last moments of a reply.
"""

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from alpaca_chat.conversation import GenerationStats, Message, SamplingParams, fit_to_context, split_turns
from alpaca_chat.engine import Engine
from alpaca_chat.templates import ChatTemplate

# How often a streaming reply is written to the database.
SAVE_INTERVAL_S = 1.0


@dataclass
class Reply:
    """One streamed reply. Iterate for text deltas; `stats`, `text` when done.

    `progress` is the same stats object while it fills in: prompt tokens from
    the start, generated tokens as they come (for a status bar).
    """

    deltas: Iterator[str]
    dropped: list[Message] = field(default_factory=list)
    text: str = ""
    stats: GenerationStats | None = None
    progress: GenerationStats | None = None
    message_id: int | None = None

    def __iter__(self):
        return self.deltas


class ChatSession:
    def __init__(
        self,
        engine: Engine,
        template: ChatTemplate,
        *,
        model_label: str,
        sampling: SamplingParams | None = None,
        system_prompt: str | None = None,
        store=None,
        conversation_id: int | None = None,
        history: list[Message] | None = None,
    ):
        self.engine = engine
        self.template = template
        self.model_label = model_label
        self.sampling = sampling or SamplingParams()
        self.store = store
        self.conversation_id = conversation_id
        self.messages: list[Message] = list(history or [])
        if system_prompt is not None:
            self.set_system_prompt(system_prompt)
        # Index of the first non-system message still in the model's memory.
        self.memory_start = 0

    def set_system_prompt(self, text: str | None) -> None:
        self.messages = [m for m in self.messages if m.role != "system"]
        if text:
            self.messages.insert(0, Message("system", text))

    def start_new(self) -> None:
        """Start a fresh conversation with the same model, template and settings."""
        system = self.system_prompt
        self.messages, self.conversation_id, self.memory_start = [], None, 0
        self.set_system_prompt(system)

    @property
    def system_prompt(self) -> str | None:
        return next((m.content for m in self.messages if m.role == "system"), None)

    def count_prompt_tokens(self, messages: list[Message]) -> int:
        return len(self.engine.tokenize(self.template.render(messages)))

    def context_tokens(self) -> int:
        """Tokens the conversation still in the model's memory takes, before a reply."""
        in_memory = self._in_memory()
        return self.count_prompt_tokens(in_memory) if in_memory else 0

    def rewind(self) -> Message | None:
        """Take back the last exchange, to regenerate it or to edit the message.

        Removes the last user message and everything after it, here and in the
        store, and returns that message (None when there is none).
        """
        last_user = next((i for i in range(len(self.messages) - 1, -1, -1) if self.messages[i].role == "user"), None)
        if last_user is None:
            return None
        user = self.messages[last_user]
        del self.messages[last_user:]
        self.memory_start = min(self.memory_start, sum(m.role != "system" for m in self.messages))
        if self.store is not None and self.conversation_id is not None:
            self.store.delete_last_turn(self.conversation_id)
        return user

    def switch_model(self, engine: Engine, template: ChatTemplate, model_label: str) -> None:
        """Carry on the conversation with another model (the caller closes the old engine)."""
        self.engine, self.template, self.model_label = engine, template, model_label
        self.save_settings()

    def save_settings(self) -> None:
        """Write the system prompt, sampling, model and template to the saved conversation."""
        if self.store is None or self.conversation_id is None:
            return
        self.store.update_conversation_settings(
            self.conversation_id,
            system_prompt=self.system_prompt,
            sampling=self.sampling.to_dict(),
            model=self.model_label,
            template=self.template.name,
        )

    def send(self, text: str, *, input: str = "", cancel: threading.Event | None = None) -> Reply:
        """Add a user message and start the reply (saved as it streams)."""
        user = Message("user", text, input=input)
        self.messages.append(user)
        self._save_user(user)
        system, turns = split_turns(self._in_memory())
        fit = fit_to_context(
            system + [m for t in turns for m in t],
            self.count_prompt_tokens,
            self.engine.n_ctx,
            self.sampling.max_tokens,
        )
        self.memory_start += len(fit.dropped)
        prompt = self.template.render(fit.messages)
        generation = self.engine.generate(
            prompt, self.sampling, stop_strings=self.template.stop_strings, cancel=cancel
        )
        reply = Reply(deltas=iter(()), dropped=fit.dropped, progress=generation.stats)
        reply.deltas = self._stream(generation, reply)
        return reply

    def _in_memory(self) -> list[Message]:
        system = [m for m in self.messages if m.role == "system"]
        rest = [m for m in self.messages if m.role != "system"]
        return system + rest[self.memory_start :]

    def _stream(self, generation, reply: Reply) -> Iterator[str]:
        reply.message_id = self._save_reply_start()
        last_save = time.monotonic()
        status = "error"
        try:
            for delta in generation:
                reply.text += delta
                yield delta
                if time.monotonic() - last_save > SAVE_INTERVAL_S:
                    self._save_reply(reply.message_id, reply.text, "partial", None)
                    last_save = time.monotonic()
            status = "stopped" if generation.stats.stop_reason == "cancelled" else "complete"
        except (GeneratorExit, KeyboardInterrupt):
            # Ctrl+C, or the consumer stopped reading: keep what came, marked stopped.
            generation.stats.stop_reason = "cancelled"
            status = "stopped"
            raise
        finally:
            generation.close()  # frees the engine for the next turn
            reply.stats = generation.stats
            self.messages.append(Message("assistant", reply.text))
            self._save_reply(reply.message_id, reply.text, status, generation.stats)

    # -- persistence (no-ops without a store) --------------------------------

    def _ensure_conversation(self) -> None:
        if self.conversation_id is None:
            conversation = self.store.create_conversation(
                model=self.model_label,
                template=self.template.name,
                system_prompt=self.system_prompt,
                sampling=self.sampling.to_dict(),
            )
            self.conversation_id = conversation.id

    def _save_user(self, user: Message) -> None:
        if self.store is None:
            return
        self._ensure_conversation()
        self.store.add_message(self.conversation_id, "user", user.flattened_content())

    def _save_reply_start(self) -> int | None:
        if self.store is None:
            return None
        return self.store.add_message(
            self.conversation_id,
            "assistant",
            "",
            status="partial",
            model=self.model_label,
            template=self.template.name,
            sampling=self.sampling.to_dict(),
        )

    def _save_reply(self, message_id, text, status, stats: GenerationStats | None) -> None:
        if self.store is None or message_id is None:
            return
        self.store.update_message(message_id, text, status, stats=stats.to_dict() if stats else None)
