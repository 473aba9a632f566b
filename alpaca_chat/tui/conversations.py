"""The conversation on screen: the session that talks about it, the model it talks to, its exchanges."""

from alpaca_chat.errors import AlpacaChatError
from alpaca_chat.loading import LoadedModel, kept_rows, new_session
from alpaca_chat.lora_spec import format_adapters
from alpaca_chat.tui.resume import ResumeSaver


class ConversationController:
    """Owns the open conversation, its session and the loaded model, and what changes them.

    Uses the app for its widgets (transcript, prompt, status, stream), its state,
    notifications and model loading, and the app's SidebarController to follow
    changes in the list.
    """

    def __init__(self, app, settings, store, saved):
        self.app, self.settings, self.store = app, settings, store
        self.conversation = saved  # the conversation on screen (None: a new one)
        self.session = None  # once a model is loaded
        self.loaded: LoadedModel | None = None
        self.hidden = 0  # messages cleared off the screen with /clear
        self._saver = ResumeSaver(app)

    # -- guards ------------------------------------------------------------------

    def busy(self, doing: str) -> bool:
        """Refuse (with a note) what cannot happen while a reply streams."""
        if self.app.state == "generating":
            self.app.notify(f"A reply is being generated: press Esc to stop it before you {doing}.",
                            severity="warning", markup=False)
            return True
        return False

    def need_session(self) -> bool:
        """A model to talk to, and not one being swapped in under the conversation."""
        if self.app.state.startswith("loading"):
            self.app.notify("The model is still loading.", severity="warning", markup=False)
            return False
        if self.session is None:
            self.app.notify("No model is loaded: use /model NAME_OR_PATH.", severity="warning", markup=False)
            return False
        return True

    # -- the model ---------------------------------------------------------------

    def model_loaded(self, loaded: LoadedModel) -> None:
        """Talk to `loaded` from now on (a first session, or the same one switched), and close the old model."""
        old, self.loaded = self.loaded, loaded
        try:
            if self.session is None:
                self.session = new_session(loaded, self.settings, self.store, self.conversation, warn=self._warn)
            else:
                self.session.switch_model(loaded.engine, loaded.template, loaded.label)
        except AlpacaChatError as exc:
            self.app.report(exc)
        if old is not None and old.engine is not loaded.engine:
            old.engine.close()
        self.app.status.model = loaded.display_name
        self.app.status.ctx_total = loaded.engine.n_ctx
        self.show_adapters()

    def show_adapters(self) -> None:
        """The status bar names the LoRA adapters on."""
        engine = self.loaded.engine if self.loaded is not None else None
        self.app.status.adapters = format_adapters(getattr(engine, "adapters", ()))

    def _warn(self, text: str) -> None:
        self.app.notify(text, severity="warning", timeout=10, markup=False)

    def update_context(self) -> None:
        status = self.app.status
        if self.session is None:
            status.ctx_used = 0
            return
        try:
            status.ctx_used = self.session.context_tokens()
        except AlpacaChatError as exc:
            self.app.report(exc)

    def resume(self, leaving=None) -> None:
        """Save the session left behind (if any), then restore the current one's KV state, in workers."""
        if self.session is not None:
            self._saver.resume(self.session, leaving)

    def save_state(self) -> None:
        """Save the current conversation's KV state (after a reply is shown, or before leaving it)."""
        if self.session is not None:
            self._saver.save(self.session)

    # -- which conversation --------------------------------------------------------

    async def show(self, conversation) -> None:
        """Put a saved conversation's messages on screen (None: an empty one)."""
        rows = []
        if conversation is not None and self.store is not None:
            try:
                rows = kept_rows(self.store.messages(conversation.id))
            except AlpacaChatError as exc:
                self.app.report(exc)
        self.hidden = 0
        await self.app.transcript.show(rows)
        self.app.prompt.prompt_history = [r.content for r in rows if r.role == "user"]

    async def open(self, conversation) -> None:
        if self.busy("switch conversations"):
            return
        app = self.app
        self.conversation = conversation
        app.prompt.end_editing()
        await self.show(conversation)
        if self.loaded is not None:
            leaving = self.session
            try:
                self.session = new_session(self.loaded, self.settings, self.store, conversation, warn=self._warn)
            except AlpacaChatError as exc:
                app.report(exc)
            self.show_adapters()
            self.resume(leaving if leaving is not self.session else None)
            if conversation is not None and conversation.model and conversation.model != self.loaded.label \
                    and not app.state.startswith("loading"):
                app.load(conversation.model)  # restore the conversation's model
        app.status.tokens_per_s = 0.0
        self.update_context()
        await app.sidebar_ctl.refresh()

    async def new(self) -> None:
        if self.busy("start a new conversation"):
            return
        app = self.app
        self.conversation = None
        app.prompt.end_editing()
        await self.show(None)
        if self.session is not None:
            self.save_state()  # the conversation left behind
            self.session.start_new()
        app.status.tokens_per_s = 0.0
        self.update_context()
        await app.sidebar_ctl.refresh()
        app.prompt.focus()

    async def changed(self) -> None:
        """The saved conversation changed: follow it in the sidebar."""
        if self.store is not None and self.session is not None and self.session.conversation_id is not None:
            try:
                self.conversation = self.store.get_conversation(self.session.conversation_id)
            except AlpacaChatError as exc:
                self.app.report(exc)
        await self.app.sidebar_ctl.refresh()

    def reread(self, conversation_id: int) -> None:
        """The store changed a conversation (renamed): follow it if it is the one on screen."""
        if self.conversation is not None and self.conversation.id == conversation_id:
            self.conversation = self.store.get_conversation(conversation_id)

    def export_id(self) -> int | None:
        """The saved conversation to export, if any."""
        conversation_id = self.session.conversation_id if self.session else None
        return conversation_id or (self.conversation.id if self.conversation else None)

    async def clear_screen(self) -> None:
        self.hidden += len(self.app.transcript.messages)
        await self.app.transcript.clear()

    async def show_memory_start(self) -> None:
        """Move the divider to where the model's memory starts now."""
        await self.app.transcript.set_memory_start(self.session.memory_start - self.hidden)

    # -- exchanges -----------------------------------------------------------------

    async def submit(self, text: str) -> None:
        """A message typed in the box (not a command): send it, or send it again if it was being edited."""
        prompt = self.app.prompt
        if self.busy("send another message") or not self.need_session():
            return
        prompt.remember(text)
        prompt.clear()
        if prompt.editing:
            prompt.end_editing()
            if not await self.rewind():
                return
        await self.send(text[1:] if text.startswith("//") else text)

    async def send(self, text: str, input: str = "") -> None:
        app = self.app
        await app.transcript.add_user(f"{text}\n\n{input}" if input else text)
        view = await app.transcript.add_reply()
        app.set_state("generating")
        session = self.session
        app.stream.start(view, lambda cancel: session.send(text, input=input, cancel=cancel))

    async def rewind(self):
        """Take back the last exchange in the session, the store and the transcript."""
        try:
            user = self.session.rewind()
        except AlpacaChatError as exc:
            self.app.report(exc)
            return None
        if user is None:
            self.app.notify("There is no message to take back yet.", severity="warning")
            return None
        await self.app.transcript.remove_last_exchange()
        return user

    async def regenerate(self) -> None:
        if self.busy("regenerate") or not self.need_session():
            return
        user = await self.rewind()
        if user is not None:
            await self.send(user.content, user.input)

    def edit_last(self) -> None:
        if self.busy("edit") or not self.need_session():
            return
        last = next((m for m in reversed(self.session.messages) if m.role == "user"), None)
        if last is None:
            self.app.notify("There is no message to edit yet.", severity="warning")
            return
        self.app.prompt.start_editing(last.flattened_content())
