"""A scripted stand-in for the engine: the `ChatEngine` protocol, and nothing of llama.cpp.

    engine = FakeEngine()
    engine.enqueue(["Hello", " there"])            # the next reply, in deltas
    engine.enqueue(["slow"] * 100, delay=0.01)      # one delta every 10 ms
    engine.enqueue(["a", "b"], error=EngineError("boom"))   # fails after its deltas
    gate = engine.enqueue(["a", "b"], gated=True).gate
    gate.release(1)                                 # lets one delta through

Tokens are words (whitespace-split), so context budgeting is easy to reason about.

With `stateful=True` it also keeps a KV state as the real engine does (the tokens of the last
prompt; `snapshot`/`restore`), and a restore can be held until the test lets it go:

    engine = FakeEngine(model_path=path, stateful=True)
    engine.restore_gate.clear()     # restores wait; engine.restoring is set when one starts
"""

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from alpaca_chat.conversation import GenerationStats
from alpaca_chat.engine import StateSnapshot, common_prefix
from alpaca_chat.errors import EngineError, ModelNotFoundError
from alpaca_chat.loading import LoadedModel
from alpaca_chat.lora_spec import AdapterSpec, parse_lora_arg
from alpaca_chat.templates import chatml_template

FAKE_TOKENS_PER_S = 42.0


@dataclass
class Script:
    deltas: list[str]
    delay: float = 0.0
    error: Exception | None = None
    gate: threading.Semaphore | None = None  # one permit per delta
    started: threading.Event = field(default_factory=threading.Event)


class FakeGeneration:
    def __init__(self, script: Script, prompt_tokens: int, cancel: threading.Event | None):
        self.stats = GenerationStats(prompt_tokens=prompt_tokens, stop_reason="eos")
        self.text = ""
        self._script, self._cancel, self._i = script, cancel, 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        script = self._script
        script.started.set()
        if self._i < len(script.deltas):
            while script.gate is not None and not script.gate.acquire(timeout=0.01):
                if self._cancelled():
                    break
        if self._cancelled():
            self.stats.stop_reason = "cancelled"
            self._finish()
        if self._i >= len(script.deltas):
            if script.error is not None:
                raise script.error
            self._finish()
        if script.delay:
            time.sleep(script.delay)
        delta = script.deltas[self._i]
        self._i += 1
        self.stats.generated_tokens += 1
        self.text += delta
        return delta

    def _cancelled(self) -> bool:
        return self._cancel is not None and self._cancel.is_set()

    def _finish(self):
        self.stats.generation_tokens_per_s = FAKE_TOKENS_PER_S
        raise StopIteration

    def close(self) -> None:
        pass


class FakeEngine:
    bos_token = ""
    eos_token = "<|im_end|>"
    chat_template = None
    kv_type = "f16"

    def __init__(self, n_ctx: int = 2048, *, model_path: str | Path = "fake.gguf", stateful: bool = False):
        self.n_ctx = n_ctx
        self.model_path = Path(model_path)
        self.supports_state = stateful
        self.scripts: deque[Script] = deque()
        self.prompts: list[str] = []
        self.closed = False
        self.lock = threading.Lock()
        self._cached: list[int] = []
        self.restores: list[list[int]] = []
        self.restore_gate = threading.Event()
        self.restore_gate.set()
        self.restoring = threading.Event()
        self._adapters: tuple = ()
        self.adapter_errors: dict[str, Exception] = {}
        self.adapter_calls: list[tuple] = []

    def enqueue(self, deltas, *, delay=0.0, error=None, gated=False) -> Script:
        script = Script(list(deltas), delay, error, threading.Semaphore(0) if gated else None)
        self.scripts.append(script)
        return script

    def tokenize(self, text: str) -> list[int]:
        return [len(word) for word in text.split()]

    def generate(self, prompt, sampling, *, stop_strings=(), cancel=None) -> FakeGeneration:
        self.prompts.append(prompt)
        if self.supports_state:
            self._cached = self.tokenize(prompt)
        script = self.scripts.popleft() if self.scripts else Script(["ok"])
        return FakeGeneration(script, len(self.tokenize(prompt)), cancel)

    @property
    def cached_tokens(self) -> list[int]:
        return list(self._cached)

    def common_prefix(self, tokens: list[int]) -> int:
        return common_prefix(self._cached, tokens)

    def snapshot(self) -> StateSnapshot:
        if not self.supports_state:
            raise EngineError("this fake engine keeps no state")
        return StateSnapshot(memoryview(b"fake state " + bytes(len(self._cached))), list(self._cached),
                             adapter_key=self.adapter_key)

    def restore(self, data, tokens: list[int]) -> None:
        if not self.supports_state:
            raise EngineError("this fake engine keeps no state")
        self.restoring.set()
        assert self.restore_gate.wait(10)
        self.restores.append(list(tokens))
        self._cached = list(tokens)

    def reset(self) -> None:
        self._cached = []

    # LoRA adapters: any existing file loads unless `adapter_errors[name]` says otherwise; the key is
    # the names and scales, and a changed set empties the cache as the real engine's does.
    @property
    def adapters(self) -> tuple:
        return self._adapters

    @property
    def adapter_key(self) -> str:
        return "+".join(sorted(f"{s.name}*{s.scale!r}" for s in self._adapters if s.scale != 0.0))

    def set_adapters(self, specs) -> None:
        specs = tuple(s if isinstance(s, AdapterSpec) else parse_lora_arg(s) for s in specs)
        for spec in specs:
            if spec.name in self.adapter_errors:
                raise self.adapter_errors[spec.name]
            if not spec.path.is_file():
                raise ModelNotFoundError(f"LoRA adapter not found: {spec.path}")
        before = self.adapter_key
        self._adapters = specs
        self.adapter_calls.append(specs)
        if self.adapter_key != before:
            self._cached = []

    def close(self) -> None:
        self.closed = True


def fake_loaded(engine: FakeEngine | None = None, name: str = "fake-model", quant: str = "Q4_0") -> LoadedModel:
    engine = engine or FakeEngine()
    return LoadedModel(engine, chatml_template(engine.bos_token, engine.eos_token), label=name, name=name, quant=quant)
