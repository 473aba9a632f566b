"""A chat session: history + template + engine + (optionally) the history store.

The one place that turns "the user said X" into a rendered prompt, a streamed
reply and saved rows, shared by the one-shot CLI, the TUI and the line mode.
The user's message is saved when sent and the reply as it streams, so a crash
or kill loses at most the last moments of a reply.
"""

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from alpaca_chat.conversation import GenerationStats, Message, SamplingParams, fit_to_context, split_turns
from alpaca_chat.engine import ChatEngine, common_prefix
from alpaca_chat.templates import ChatTemplate

# How often a streaming reply is written to the database.
SAVE_INTERVAL_S = 1.0
# A saved KV state is restored only if at least this many of its tokens start the
# prompt: a changed system prompt leaves a few template tokens in common, not worth it.
MIN_RESTORE_TOKENS = 32


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
        engine: ChatEngine,
        template: ChatTemplate,
        *,
        model_label: str,
        sampling: SamplingParams | None = None,
        system_prompt: str | None = None,
        store=None,
        conversation_id: int | None = None,
        history: list[Message] | None = None,
        kv_cache=None,
        notice=None,
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
        # Instant resume: a kvcache.KVCache (None: off) and where one-line notices go.
        self.kv_cache = kv_cache
        self.notice = notice or (lambda text: None)
        self.restored_tokens = 0  # restored from the last state file read
        self.last_restore_s = 0.0  # what reading, checking and restoring it took
        self.last_save_s = 0.0  # what the last save_state took, the file written
        self.last_save_held_s = 0.0  # of which the engine (and the caller) waited for its state to be copied
        self._writer_lock = threading.Lock()
        self._writers: list[threading.Thread] = []  # save_state(wait=False)'s writes still running
        self._kv_lock = threading.Lock()
        self._kv_tokens: list[int] | None = None  # what this session last left in the engine
        self._kv_saved: list[int] | None = None  # what was last saved
        self._kv_save_failed = False
        # LoRA adapters turned off with /lora, remembered for /lora on (the active ones are the engine's).
        self.adapters_off: tuple = ()
        self._recorded_adapters: list[dict] | None = None  # what the store holds for this conversation (None: unknown)

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

    def set_adapters(self, specs) -> None:
        """Apply these LoRA adapters (in place, the model stays loaded) and record them with the
        conversation. On an error the engine keeps its previous set, and the error is raised."""
        self.engine.set_adapters(specs)
        self.save_settings()

    def adapter_records(self) -> list[dict]:
        """The engine's adapters as the store records them: absolute paths, so `-c` finds them anywhere."""
        return [{"path": str(spec.path.expanduser().resolve()), "scale": spec.scale} for spec in self.engine.adapters]

    def switch_model(self, engine: ChatEngine, template: ChatTemplate, model_label: str) -> None:
        """Carry on the conversation with another model (the caller closes the old engine)."""
        self.engine, self.template, self.model_label = engine, template, model_label
        self.save_settings()

    def save_settings(self) -> None:
        """Write the system prompt, sampling, model, template and adapters to the saved conversation."""
        if self.store is None or self.conversation_id is None:
            return
        self._recorded_adapters = self.adapter_records()
        self.store.update_conversation_settings(
            self.conversation_id,
            system_prompt=self.system_prompt,
            sampling=self.sampling.to_dict(),
            model=self.model_label,
            template=self.template.name,
            adapters=self._recorded_adapters,
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
        with self._kv_lock:  # not while a state is being copied out of the engine
            self._resume(prompt)
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
        # On a timer, not per token: a kill -9 loses at most SAVE_INTERVAL_S of a reply, even while
        # llama.cpp is busy between two tokens.
        saver = PartialSaver(lambda: reply.text, lambda text: self._save_reply(reply.message_id, text, "partial", None))
        status = "error"
        try:
            for delta in generation:
                reply.text += delta
                yield delta
            status = "stopped" if generation.stats.stop_reason == "cancelled" else "complete"
        except (GeneratorExit, KeyboardInterrupt):
            # Ctrl+C, or the consumer stopped reading: keep what came, marked stopped.
            generation.stats.stop_reason = "cancelled"
            status = "stopped"
            raise
        finally:
            saver.stop()  # before the final save: the two never race
            generation.close()  # frees the engine for the next turn
            self._kv_tokens = self._engine_tokens()
            reply.stats = generation.stats
            self.messages.append(Message("assistant", reply.text))
            self._save_reply(reply.message_id, reply.text, status, generation.stats)

    # -- instant resume (no-ops without a KV cache) ----------------------------

    def save_state(self, conversation_id: int | None = None, *, wait: bool = True) -> int:
        """Save the engine's KV state for this conversation; return the bytes written.

        Front ends call it after a reply is shown (never before), and when they leave
        a conversation (`conversation_id`: the one left, when the session has moved on).
        Saves only what this session's own last turn left in the engine, once. A
        failure is a notice, never an error: the chat goes on.

        The engine is held only while its state is copied out (`Engine.snapshot`); the
        file is then written from that copy. With `wait=False` a thread writes it and this
        returns as soon as the engine is free, with the state's size (the file will be its
        header larger); `finish_saving()` waits for the write, and so does the interpreter
        before it exits.
        """
        conversation_id = conversation_id if conversation_id is not None else self.conversation_id
        if not self._kv_usable() or conversation_id is None or not self._kv_tokens:
            return 0
        started = time.perf_counter()
        with self._kv_lock:
            if self._engine_tokens() != self._kv_tokens or self._kv_tokens == self._kv_saved:
                return 0
            try:
                key = self._state_key()  # of this engine and template, whatever happens while it is written
                snap = self.engine.snapshot()
            except Exception as exc:  # noqa: BLE001 - resume is an optimisation, never a failure
                self.notice(f"KV state not saved: {exc}")
                return 0
            if snap.tokens != self._kv_tokens:  # another conversation took the engine meanwhile
                snap.release()
                return 0
            # Keyed by the adapter set the state was computed under, even if /lora changes it meanwhile.
            key = dataclasses.replace(key, adapters=snap.adapter_key)
            self._kv_saved = snap.tokens  # taken: a second call saves nothing twice (undone if the write fails)
        held = time.perf_counter() - started  # until the engine was free again
        if not wait:
            writer = threading.Thread(target=self._write_state, args=(snap, conversation_id, key, started, held, True),
                                      name="kv-state-writer")  # not a daemon: the interpreter waits for it at exit
            try:
                writer.start()
            except RuntimeError:  # no thread to be had: written here
                pass
            else:
                with self._writer_lock:
                    self._writers = [t for t in self._writers if t.is_alive()] + [writer]
                return len(snap.data) + 4 * len(snap.tokens)
        return self._write_state(snap, conversation_id, key, started, held, background=False)

    def finish_saving(self) -> None:
        """Wait for the KV state writes that `save_state(wait=False)` left running."""
        with self._writer_lock:
            writers, self._writers = self._writers, []
        for writer in writers:
            writer.join()

    def _write_state(self, snap, conversation_id: int, key, started: float, held: float, background: bool) -> int:
        try:
            written = self.kv_cache.save(conversation_id, key, snap.tokens, snap.data)
        except Exception as exc:  # noqa: BLE001 - e.g. an unwritable or full disk
            # Not under _kv_lock: _resume holds it while it waits for this thread (finish_saving).
            if self._kv_saved is snap.tokens:
                self._kv_saved = None
            if not self._kv_save_failed:  # one notice, not one per reply
                self.notice(f"KV state not saved: {exc}")
            self._kv_save_failed = True
            return 0
        finally:
            snap.release()  # the engine's buffer is free for the next snapshot
        self.last_save_s = time.perf_counter() - started
        self.last_save_held_s = held
        # Both times, never only the short one: "held" is what the caller and the engine waited,
        # the total includes writing the file (checksum, write, fsync, rename).
        where = " in the background" if background else ""
        self.notice(f"saved KV state: {len(snap.tokens)} tokens, {written / 1e6:.1f} MB in "
                    f"{self.last_save_s * 1000:.0f} ms (engine held {held * 1000:.0f} ms, "
                    f"then written{where})")
        return written

    def restore_state(self) -> int:
        """Load this conversation's saved state ahead of the next message (the TUI does it in a
        worker when a conversation is opened); return how many tokens the engine then holds."""
        in_memory = self._in_memory()
        if not in_memory:
            return 0
        with self._kv_lock:
            return self._resume(self.template.render(in_memory, add_generation_prompt=False))

    def _resume(self, prompt: str) -> int:
        """If the engine does not hold this conversation's tokens, restore the saved state
        whose tokens share the longest prefix with `prompt`. Never trusts the file: a state
        for anything else is ignored and the prompt is evaluated as usual."""
        self.restored_tokens, self.last_restore_s = 0, 0.0
        if not self._kv_usable() or self.conversation_id is None:
            return 0
        started = time.perf_counter()
        tokens = self.engine.tokenize(prompt)
        held = self.engine.common_prefix(tokens)
        if held >= len(tokens) - 1:
            return held
        self.finish_saving()  # a state still being written is read once it is whole
        if held and self.kv_cache.peek_tokens(self.conversation_id) <= held:
            return held  # e.g. the next turn of a live chat: the file holds nothing more, so it is not read
        try:
            saved = self.kv_cache.load(self.conversation_id, self._state_key())
        except Exception as exc:  # noqa: BLE001 - StateRejected, or unreadable: evaluate as today
            self.notice(f"saved KV state ignored: {exc}")
            return held
        if saved is None:
            return held
        usable = min(common_prefix(saved.tokens, tokens), len(tokens) - 1)  # one is evaluated for logits
        if usable <= held or usable < MIN_RESTORE_TOKENS:
            # e.g. a changed system prompt; an edited turn keeps the turns before it
            self.notice(f"saved KV state ignored: it shares {usable} of {len(tokens)} prompt tokens")
            return held
        try:
            self.engine.restore(saved.payload, saved.tokens)
        except Exception as exc:  # noqa: BLE001 - refused by llama.cpp: evaluate as today
            self.notice(f"saved KV state ignored: {exc}")
            return 0
        self._kv_tokens = self._kv_saved = list(saved.tokens)
        self.restored_tokens = usable
        self.last_restore_s = time.perf_counter() - started
        self.notice(f"restored KV state: {usable} of {len(tokens)} prompt tokens "
                    f"in {self.last_restore_s * 1000:.0f} ms")
        return usable

    def _kv_usable(self) -> bool:
        """A KV cache is configured and the engine can hand its state over."""
        return self.kv_cache is not None and self.engine.supports_state

    def _state_key(self):
        from alpaca_chat.kvcache import state_key

        engine, template = self.engine, self.template
        return state_key(engine.model_path, engine.n_ctx, engine.kv_type, f"{template.name}\n{template.source}",
                         engine.adapter_key)

    def _engine_tokens(self) -> list[int]:
        return self.engine.cached_tokens

    # -- persistence (no-ops without a store) --------------------------------

    def _ensure_conversation(self) -> None:
        if self.conversation_id is None:
            conversation = self.store.create_conversation(
                model=self.model_label,
                template=self.template.name,
                system_prompt=self.system_prompt,
                sampling=self.sampling.to_dict(),
                adapters=self.adapter_records(),
            )
            self.conversation_id = conversation.id
            self._recorded_adapters = list(conversation.adapters)

    def _save_user(self, user: Message) -> None:
        if self.store is None:
            return
        self._ensure_conversation()
        self.store.add_message(self.conversation_id, "user", user.flattened_content())
        records = self.adapter_records()
        if records != self._recorded_adapters:  # e.g. a conversation continued with other --lora
            self.store.update_conversation_settings(self.conversation_id, adapters=records)
            self._recorded_adapters = records

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


class PartialSaver:
    """Saves a streaming reply every half SAVE_INTERVAL_S from a daemon thread, when it has changed."""

    def __init__(self, text: Callable[[], str], save: Callable[[str], None], interval: float = SAVE_INTERVAL_S / 2):
        self._text, self._save, self._interval = text, save, interval
        self._stopped = threading.Event()
        self._saved = ""
        self._thread = threading.Thread(target=self._run, name="reply-saver", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            text = self._text()
            if text != self._saved:
                try:
                    self._save(text)
                except Exception:  # noqa: BLE001 - the final save reports; a partial save may not kill the reply
                    continue
                self._saved = text

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
