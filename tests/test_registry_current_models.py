"""The registry's current small models (issue 22): each parses, names a hub repo and a file or a
quantization, has a template and a size, and `alpaca-chat --list-models` shows it."""

import re
import subprocess
import sys

from alpaca_chat.models import load_registry

# Names checked against the hub's stored pages (see models/registry.toml).
CURRENT = {
    "gemma3-270m": "unsloth/gemma-3-270m-it-GGUF",
    "gemma3-1b": "bartowski/google_gemma-3-1b-it-GGUF",
    "qwen3-0.6b": "bartowski/Qwen_Qwen3-0.6B-GGUF",
    "smollm3-3b": "bartowski/HuggingFaceTB_SmolLM3-3B-GGUF",
    "lfm2.5-1.2b": "LiquidAI/LFM2.5-1.2B-Instruct-GGUF",
    "phi4-mini-reasoning": "bartowski/microsoft_Phi-4-mini-reasoning-GGUF",
    "qwen3.5-0.8b": "unsloth/Qwen3.5-0.8B-GGUF",
    "qwen3.5-2b": "unsloth/Qwen3.5-2B-GGUF",
    "gemma4-e2b": "unsloth/gemma-4-E2B-it-GGUF",
    "granite4-h-1b": "ibm-granite/granite-4.0-h-1b-GGUF",
    "lfm2-1.2b": "LiquidAI/LFM2-1.2B-GGUF",
    "phi4-mini": "bartowski/microsoft_Phi-4-mini-instruct-GGUF",
}


def test_current_models_are_registered_with_size_and_template():
    registry = load_registry()
    for name, repo in CURRENT.items():
        entry = registry[name]
        assert entry.repo == repo and not entry.bundled
        assert entry.template and entry.description and entry.size_hint
        assert re.fullmatch(r"\d+(\.\d+)? (MB|GB)", entry.size_hint), entry.size_hint
        assert entry.quant in ("Q4_0", "Q4_K_M"), name  # a file's quant is read from its name
        if entry.file:
            assert entry.file.endswith(".gguf") and entry.quant in entry.file


def test_list_models_shows_them(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "alpaca_chat", "--list-models"],
        capture_output=True, text=True, timeout=120,
        env={"HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
             "ALPACA_CHAT_HOME": str(tmp_path / "home")},
    )
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines()[1:] if line.strip()}
    for name, repo in CURRENT.items():
        assert repo in rows[name] and "not downloaded" in rows[name]
        assert f"~{load_registry()[name].size_hint}" in rows[name]
