"""Slash commands and the command palette: the app's actions by name.

Mixed into ChatApp, whose state (session, store, transcript...) they use.
"""

from functools import partial

from textual.app import SystemCommand

from alpaca_chat.commands import format_sampling, format_stats, parse_command, parse_set
from alpaca_chat.errors import AlpacaChatError, UsageError
from alpaca_chat.tui.screens import TextPromptScreen


class CommandsMixin:
    async def run_command(self, line: str) -> None:
        try:
            name, args = parse_command(line)
            await getattr(self, f"_command_{name}")(args)
        except AlpacaChatError as exc:
            self.report(exc)

    async def _command_help(self, args: str) -> None:
        self.action_help()

    async def _command_new(self, args: str) -> None:
        await self.action_new_conversation()

    async def _command_exit(self, args: str) -> None:
        await self.action_quit()

    async def _command_system(self, args: str) -> None:
        if self._busy("change the system prompt") or not self._need_session():
            return
        self.session.set_system_prompt(args or None)
        self.session.save_settings()
        self.update_context()
        self.notify("System prompt set." if args else "System prompt cleared.")

    async def _command_set(self, args: str) -> None:
        if self._busy("change settings") or not self._need_session():
            return
        self.session.sampling = self.session.sampling.with_changes(**parse_set(args))
        self.session.save_settings()
        self.notify(format_sampling(self.session.sampling), title="Sampling", markup=False)

    async def _command_model(self, args: str) -> None:
        if not args:
            raise UsageError("usage: /model NAME_OR_PATH")
        if self._busy("switch models"):
            return
        if self.state.startswith("loading"):
            self.notify("A model is already loading.", severity="warning")
            return
        self.load(args)

    async def _command_stats(self, args: str) -> None:
        if self.last_stats is None:
            self.notify("No reply yet.")
            return
        self.notify(format_stats(self.last_stats), title="Last reply", timeout=10, markup=False)

    async def _command_clear(self, args: str) -> None:
        self.hidden += len(self.transcript.messages)
        await self.transcript.clear()

    async def _command_export(self, args: str) -> None:
        from alpaca_chat.export import export_conversation

        conversation_id = self.session.conversation_id if self.session else None
        conversation_id = conversation_id or (self.conversation.id if self.conversation else None)
        if self.store is None or conversation_id is None:
            raise UsageError("nothing to export yet (or history is off)")
        written = export_conversation(self.store, conversation_id, args or None)
        self.notify(f"Saved to {written}", title="Export", markup=False)

    # -- the command palette ---------------------------------------------------

    def _ask_then_run(self, title: str, command: str, value: str = "", placeholder: str = "") -> None:
        async def run(answer: str | None) -> None:
            if answer is not None:
                await self.run_command(f"/{command} {answer}")

        self.push_screen(TextPromptScreen(title, value, placeholder), run)

    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        yield SystemCommand("New conversation", "Start a new conversation (Ctrl+N)", self.action_new_conversation)
        yield SystemCommand("Regenerate", "Generate the last reply again (Ctrl+R)", self.action_regenerate)
        yield SystemCommand("Edit last message", "Edit your last message and send it again (Ctrl+E)",
                            self.action_edit_last)
        yield SystemCommand("Copy reply", "Copy the last reply (Ctrl+O)", self.action_copy_reply)
        yield SystemCommand("Stop", "Stop the reply being generated (Esc)", self.action_stop)
        yield SystemCommand("Conversations", "Show or hide saved conversations (Ctrl+B)", self.action_toggle_sidebar)
        yield SystemCommand("Export", "Save this conversation as Markdown in the current directory",
                            partial(self.run_command, "/export"))
        yield SystemCommand("Stats", "Timings of the last reply", partial(self.run_command, "/stats"))
        yield SystemCommand("Clear screen", "Clear the transcript (the conversation is kept)",
                            partial(self.run_command, "/clear"))
        yield SystemCommand("Help", "Keys and commands (F1)", self.action_help)
        system = self.session.system_prompt if self.session else ""
        yield SystemCommand("System prompt…", "Set the system prompt",
                            partial(self._ask_then_run, "System prompt", "system", system or ""))
        yield SystemCommand("Sampling…", "Change a sampling setting, e.g. temp 0.7",
                            partial(self._ask_then_run, "NAME VALUE", "set", "", "temp 0.7"))
        yield SystemCommand("Switch model…", "Load another model: a registry name, a .gguf path or a hub id",
                            partial(self._ask_then_run, "Model", "model", "", "smollm2-360m"))
