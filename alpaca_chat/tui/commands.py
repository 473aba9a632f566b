"""Slash commands and the command palette: the app's actions by name."""

from functools import partial

from textual.app import SystemCommand

from alpaca_chat.commands import CommandDispatcher, format_sampling, format_stats, handles_commands, parse_set
from alpaca_chat.errors import AlpacaChatError, UsageError
from alpaca_chat.lora_spec import format_lora_list, plan_lora
from alpaca_chat.tui.screens import TextPromptScreen


@handles_commands
class TuiCommands:
    """The app's handler for every command in COMMANDS (`CommandHandlers`), and its palette entries.

    Uses the app's actions, widgets and notifications, and `app.chats` for the session.
    """

    def __init__(self, app):
        self.app = app
        self._dispatch = CommandDispatcher(self)

    async def run(self, line: str) -> None:
        """Run a command line; a mistake in it is a notification."""
        try:
            await self._dispatch(line)
        except AlpacaChatError as exc:
            self.app.report(exc)

    # -- the commands --------------------------------------------------------

    async def help(self, args: str) -> None:
        self.app.action_help()

    async def new(self, args: str) -> None:
        await self.app.action_new_conversation()

    async def exit(self, args: str) -> None:
        await self.app.action_quit()

    async def system(self, args: str) -> None:
        chats = self.app.chats
        if chats.busy("change the system prompt") or not chats.need_session():
            return
        chats.session.set_system_prompt(args or None)
        chats.session.save_settings()
        chats.update_context()
        self.app.notify("System prompt set." if args else "System prompt cleared.")

    async def set(self, args: str) -> None:
        chats = self.app.chats
        if chats.busy("change settings") or not chats.need_session():
            return
        session = chats.session
        session.sampling = session.sampling.with_changes(**parse_set(args))
        session.save_settings()
        self.app.notify(format_sampling(session.sampling), title="Sampling", markup=False)

    async def model(self, args: str) -> None:
        if not args:
            raise UsageError("usage: /model NAME_OR_PATH")
        if self.app.chats.busy("switch models"):
            return
        if self.app.state.startswith("loading"):
            self.app.notify("A model is already loading.", severity="warning")
            return
        self.app.load(args)

    async def lora(self, args: str) -> None:
        chats = self.app.chats
        if not chats.need_session():
            return
        session = chats.session
        plan = plan_lora(args, session.engine.adapters, session.adapters_off)
        if plan is None:
            self.app.notify(format_lora_list(session.engine.adapters, session.adapters_off), title="LoRA",
                            timeout=10, markup=False)
            return
        if chats.busy("change LoRA adapters"):
            return
        session.set_adapters(plan.active)  # a bad adapter raises (a notification): the previous set stays
        session.adapters_off = plan.off
        chats.show_adapters()
        chats.update_context()
        self.app.notify(plan.message, markup=False)

    async def stats(self, args: str) -> None:
        if self.app.last_stats is None:
            self.app.notify("No reply yet.")
            return
        session = self.app.chats.session
        adapters = session.engine.adapters if session is not None else ()
        self.app.notify(format_stats(self.app.last_stats, adapters), title="Last reply", timeout=10, markup=False)

    async def clear(self, args: str) -> None:
        await self.app.chats.clear_screen()

    async def export(self, args: str) -> None:
        from alpaca_chat.export import export_conversation

        conversation_id = self.app.chats.export_id()
        if self.app.store is None or conversation_id is None:
            raise UsageError("nothing to export yet (or history is off)")
        written = export_conversation(self.app.store, conversation_id, args or None)
        self.app.notify(f"Saved to {written}", title="Export", markup=False)

    # -- the command palette ---------------------------------------------------

    def palette(self):
        """The app's own entries in the command palette (Ctrl+P)."""
        app = self.app
        yield SystemCommand("New conversation", "Start a new conversation (Ctrl+N)", app.action_new_conversation)
        yield SystemCommand("Regenerate", "Generate the last reply again (Ctrl+R)", app.action_regenerate)
        yield SystemCommand("Edit last message", "Edit your last message and send it again (Ctrl+E)",
                            app.action_edit_last)
        yield SystemCommand("Copy reply", "Copy the last reply (Ctrl+O)", app.action_copy_reply)
        yield SystemCommand("Stop", "Stop the reply being generated (Esc)", app.action_stop)
        yield SystemCommand("Conversations", "Show or hide saved conversations (Ctrl+B)", app.action_toggle_sidebar)
        yield SystemCommand("Export", "Save this conversation as Markdown in the current directory",
                            partial(self.run, "/export"))
        yield SystemCommand("Stats", "Timings of the last reply", partial(self.run, "/stats"))
        yield SystemCommand("Clear screen", "Clear the transcript (the conversation is kept)",
                            partial(self.run, "/clear"))
        yield SystemCommand("Help", "Keys and commands (F1)", app.action_help)
        session = app.chats.session
        system = session.system_prompt if session else ""
        yield SystemCommand("System prompt…", "Set the system prompt",
                            partial(self._ask_then_run, "System prompt", "system", system or ""))
        yield SystemCommand("Sampling…", "Change a sampling setting, e.g. temp 0.7",
                            partial(self._ask_then_run, "NAME VALUE", "set", "", "temp 0.7"))
        yield SystemCommand("LoRA adapters", "List the LoRA adapters, on and off", partial(self.run, "/lora"))
        yield SystemCommand("Add LoRA adapter…", "Apply a LoRA adapter GGUF: FILE or FILE:SCALE",
                            partial(self._ask_then_run, "LoRA adapter", "lora add", "", "adapter.gguf:1.0"))
        yield SystemCommand("Switch model…", "Load another model: a registry name, a .gguf path or a hub id",
                            partial(self._ask_then_run, "Model", "model", "", "smollm2-360m"))

    def _ask_then_run(self, title: str, command: str, value: str = "", placeholder: str = "") -> None:
        async def run(answer: str | None) -> None:
            if answer is not None:
                await self.run(f"/{command} {answer}")

        self.app.push_screen(TextPromptScreen(title, value, placeholder), run)
