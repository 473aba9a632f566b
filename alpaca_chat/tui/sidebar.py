"""The saved conversations beside the chat: listing, filtering, renaming and deleting them."""

from functools import partial

from alpaca_chat.errors import AlpacaChatError
from alpaca_chat.tui.screens import ConfirmScreen, TextPromptScreen

SIDEBAR_LIMIT = 200


class SidebarController:
    """Fills the Sidebar widget from the store and carries out what it asks (Sidebar.Action).

    Uses the app for its widgets, dialogs and notifications, and `app.chats`
    (the ConversationController) for the conversation on screen.
    """

    def __init__(self, app, store):
        self.app, self.store = app, store

    async def refresh(self) -> None:
        """List the conversations the filter matches, the open one highlighted (when shown)."""
        sidebar = self.app.sidebar
        if self.store is None or not sidebar.display:
            return
        try:
            found = self.store.list_conversations(limit=SIDEBAR_LIMIT, query=sidebar.query_text or None)
        except AlpacaChatError as exc:
            self.app.report(exc)
            return
        current = self.app.chats.conversation
        await sidebar.show(found, current.id if current else None)

    async def toggle(self) -> None:
        if self.store is None:
            self.app.notify("History is off (--no-history): there are no saved conversations.", severity="warning")
            return
        sidebar = self.app.sidebar
        sidebar.display = not sidebar.display
        if sidebar.display:
            await self.refresh()
            sidebar.query_one("#conversations").focus()
        else:
            self.app.prompt.focus()

    async def focus_filter(self) -> None:
        if self.store is None:
            return
        if not self.app.sidebar.display:
            await self.toggle()
        self.app.sidebar.query_one("#filter").focus()

    async def act(self, action: str, conversation) -> None:
        """Carry out a Sidebar.Action."""
        app = self.app
        if action == "filter":
            await self.refresh()
        elif action == "open":
            await app.open_conversation(conversation)
            app.prompt.focus()
        elif action == "rename":
            app.push_screen(TextPromptScreen("Rename the conversation", conversation.title),
                            partial(self._rename, conversation))
        elif action == "delete":
            title = conversation.title or "(untitled)"
            app.push_screen(
                ConfirmScreen(f"Delete “{title}” and all its messages? This cannot be undone.", yes="Delete"),
                partial(self._delete, conversation),
            )

    async def _rename(self, conversation, title: str | None) -> None:
        if title is None or not title.strip():
            return
        try:
            self.store.rename_conversation(conversation.id, title.strip())
        except AlpacaChatError as exc:
            self.app.report(exc)
            return
        self.app.chats.reread(conversation.id)
        await self.refresh()

    async def _delete(self, conversation, confirmed: bool | None) -> None:
        if not confirmed:
            return
        chats = self.app.chats
        if chats.conversation is not None and chats.conversation.id == conversation.id:
            if chats.busy("delete this conversation"):
                return
            await chats.new()
        try:
            self.store.delete_conversation(conversation.id)
        except AlpacaChatError as exc:
            self.app.report(exc)
        await self.refresh()
        self.app.notify(f"Deleted “{conversation.title or '(untitled)'}”.", markup=False)
