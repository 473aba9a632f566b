"""The full-screen Textual chat app (`alpaca-chat` in a terminal)."""


def run_app(settings, store=None, saved=None, *, verbose: bool = False) -> int:
    """Run the app until the user quits; the model loads inside it."""
    from alpaca_chat.tui.app import ChatApp

    app = ChatApp(settings, store, saved, verbose=verbose)
    try:
        app.run()
    finally:
        if app.chats.loaded is not None:
            app.chats.loaded.engine.close()
        if store is not None:
            store.close()
    return app.return_code or 0
