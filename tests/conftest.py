"""Shared fixtures: every test gets its own user dirs; the default model is found once."""

import pytest


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Pin all alpaca-chat user files (history db, config) to a per-test tmp dir."""
    home = tmp_path / "alpaca-home"
    monkeypatch.setenv("ALPACA_CHAT_HOME", str(home))
    # Never let a test reach the Hugging Face hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home
