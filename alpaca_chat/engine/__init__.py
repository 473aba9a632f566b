"""The only door to llama.cpp on the chat side: this package is the only one importing llama_cpp.

- `core.Engine`: one model, one context; tokenize, generate, evaluate, KV state (`generation.Generation`:
  a reply's iterator).
- `step.SequenceStep`: what a generated token goes through, for single and parallel generation.
- `context`: the one place that builds a llama.cpp context; `hardware`: cores and AMX;
  `llama_log`: llama.cpp's one log callback; `snapshot.StateSnapshot`: a KV state copied out.
- `adapters`: LoRA adapters applied at run time (`adapter_check` validates a file first).
- `protocol`: the public surface as typing.Protocols (`ChatEngine`, `EngineProtocol`).
"""

import os

# llama.cpp's threads meet at an OpenMP barrier many times per token, and by
# default libgomp waits there by spinning 300,000 times before it sleeps. That
# buys nothing on an idle machine, but when anything else wants the cores (a
# browser, a fine-tune) the spinning threads starve the ones they wait for:
# beside a 2-thread torch job on 2 cores, 1-3 tok/s instead of 35-40 with 1,000
# spins. libgomp reads this as llama_cpp loads it: it must be set before.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from alpaca_chat.engine.adapters import AdapterSpec, BaseLayout, check_adapter, parse_lora_arg  # noqa: E402
from alpaca_chat.engine.context import flash_attention  # noqa: E402 - after GOMP_SPINCOUNT
from alpaca_chat.engine.core import DEFAULT_N_BATCH, DEFAULT_N_CTX, Engine, Generation, common_prefix  # noqa: E402
from alpaca_chat.engine.hardware import model_load_params, physical_cores  # noqa: E402
from alpaca_chat.engine.llama_log import configure_logging, log_listener  # noqa: E402
from alpaca_chat.engine.protocol import ChatEngine, EngineProtocol  # noqa: E402
from alpaca_chat.engine.snapshot import StateSnapshot  # noqa: E402
from alpaca_chat.engine.step import SequenceStep  # noqa: E402
from alpaca_chat.engine.parallel import ParallelRequest, ParallelResult  # noqa: E402

__all__ = [
    "AdapterSpec", "BaseLayout", "check_adapter", "parse_lora_arg", "DEFAULT_N_BATCH", "DEFAULT_N_CTX", "ChatEngine", "Engine", "EngineProtocol", "Generation", "ParallelRequest",
    "ParallelResult", "SequenceStep", "StateSnapshot", "common_prefix", "configure_logging", "flash_attention",
    "log_listener", "model_load_params", "physical_cores",
]
