"""Instant resume: time to first token of the next turn in a new process, with and without the saved KV state.

    python benchmarks/bench_resume.py [--model PATH_OR_NAME] [--sizes 2000 4000] [--kv-type f16|q8_0]

For a conversation of about N tokens (one run each, the bundled model by default):
  - resumed: `alpaca-chat -c --prompt ... --json` in a new process, with the state saved by the turn before;
    its time to first token counts the restore (read, checks, llama_state_seq_set_data) too
  - cold: the same turn in a copy of the same history with --no-kv-cache (today's behaviour)
  - live: the same two turns in one in-process session that never closed
Prints resumed/live (target <= 1.5) and resumed/cold (target <= 0.05), the save's cost against the
reply's wall time (target <= 5 %) in total (what `--prompt` waits for before it exits) and the part of it
that held the engine (what line mode and the app wait for: they write the file in a thread), and state
bytes per token (with --kv-type's cache, f16 by default).

On the quiet 2-core machine, bundled model, f16 without flash attention, the state file read while the
model loads: at 2,000 tokens resumed 290 ms (restore 100), cold 16.3 s, live 212 ms: resumed/live 1.36,
resumed/cold 0.018; at 4,000 tokens 1.59 and 0.010. Saves 312-415 ms at 2,000 tokens (engine held 79-82 ms),
648-757 ms at 4,000 (held 150-157): 1.5-30 % of the reply in total, 0.3-6.2 % held (the high ends after
a 32-token reply). Before (quiet, flash attention on, the state copied three times, read after the
model): resumed/live 1.32 and 1.17, resumed/cold 0.078 and 0.056, saves 350-853 ms = 2.2-25 %.

Then, for both cache types (`--sizes` with no sizes: only this): llama.cpp's state bytes per token of a
conversation of about 2000 tokens, and q8_0's quality against f16, teacher-forced over the first 500 tokens
of the converter's evaluation text (convert/eval_sample.txt): mean KL divergence and top-1 agreement.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from alpaca_chat.config import KV_TYPES
from alpaca_chat.conversation import Message, SamplingParams
from alpaca_chat.engine import Engine
from alpaca_chat.models import resolve_model
from alpaca_chat.session import ChatSession
from alpaca_chat.store import Store
from alpaca_chat.templates import resolve_template
from convert.evaluate import sample_text

N_CTX = 8192
MAX_TOKENS = 32
TOKENS_PER_FACT = 21  # about, for this model's tokenizer
Q1, Q2 = "Where does Nube12 live?", "And what does Nube40 eat?"
QUALITY_TOKENS = 500


def facts(n: int) -> str:
    foods = ["grass", "hay", "clover", "leaves", "barley"]
    return " ".join(
        f"Fact {i}: the llama called Nube{i} lives in valley {i * 7 % 13} and eats {foods[i % 5]} every morning."
        for i in range(n)
    )


def cli(home: Path, model: str, prompt: str, *extra: str) -> tuple[dict, str]:
    env = {**os.environ, "ALPACA_CHAT_HOME": str(home)}
    proc = subprocess.run(
        [sys.executable, "-m", "alpaca_chat", "-m", model, "-c", "--prompt", prompt, "--json", "--temp", "0",
         "-n", str(MAX_TOKENS), "--ctx", str(N_CTX), "--verbose", *extra],
        capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, check=True,
    )
    return json.loads(proc.stdout), proc.stderr


def ttft(result: dict) -> float:
    return result["stats"]["time_to_first_token_s"] + result.get("kv_restore_s", 0.0)


def wall(result: dict) -> float:
    s = result["stats"]
    return ttft(result) + s["generated_tokens"] / max(s["generation_tokens_per_s"], 1e-9)


def save_ms(stderr: str) -> tuple[float, float]:
    """The last save's total time (file written) and the part of it the engine was held, in ms."""
    found = re.findall(r"saved KV state: \d+ tokens, [\d.]+ MB in (\d+) ms \(engine held (\d+) ms", stderr)
    return (float(found[-1][0]), float(found[-1][1])) if found else (float("nan"), float("nan"))


def live_ttft(model_path: Path, history: list[Message], kv_type: str) -> float:
    with Engine(model_path, n_ctx=N_CTX, kv_type=kv_type) as engine:
        template = resolve_template("auto", engine.chat_template, engine.bos_token, engine.eos_token)
        session = ChatSession(engine, template, model_label="live", history=history,
                              sampling=SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
        for question in (Q1, Q2):
            reply = session.send(question)
            for _ in reply:
                pass
        return reply.stats.time_to_first_token_s


def run(model_spec: str | None, size: int, kv_type: str) -> None:
    model_path = resolve_model(model_spec).path
    kv = ("--kv-type", kv_type)
    with tempfile.TemporaryDirectory() as tmp:
        home, cold_home = Path(tmp) / "home", Path(tmp) / "cold"
        os.environ["ALPACA_CHAT_HOME"] = str(home)
        with Store() as store:
            conversation = store.create_conversation(model=str(model_path), template="auto")
            store.add_message(conversation.id, "user", "Remember these facts. " + facts(size // TOKENS_PER_FACT))
            store.add_message(conversation.id, "assistant", "I will remember them.")
            history = [Message(m.role, m.content) for m in store.messages(conversation.id)]
        first, err1 = cli(home, str(model_path), Q1, *kv)  # cold, and saves the state
        shutil.copytree(home, cold_home)
        resumed, err2 = cli(home, str(model_path), Q2, *kv)
        cold, _ = cli(cold_home, str(model_path), Q2, "--no-kv-cache", *kv)
        live = live_ttft(model_path, history, kv_type)
        state = home / "data" / "kv" / f"{conversation.id}.kv"
        size_bytes = state.stat().st_size
        saved_tokens = int(re.findall(r"saved KV state: (\d+) tokens", err2)[-1])
    rs = resumed["stats"]
    print(f"\n== about {size} tokens, {kv_type} KV cache: next prompt {rs['prompt_tokens']} tokens, "
          f"{rs['cached_tokens']} restored")
    print(f"  TTFT resumed {ttft(resumed) * 1000:8.0f} ms  (restore {resumed['kv_restore_s'] * 1000:.0f} ms"
          f" + first token {rs['time_to_first_token_s'] * 1000:.0f} ms)")
    print(f"  TTFT cold    {ttft(cold) * 1000:8.0f} ms  (cached {cold['stats']['cached_tokens']})")
    print(f"  TTFT live    {live * 1000:8.0f} ms")
    print(f"  resumed/live {ttft(resumed) / live:6.2f}   (target <= 1.5)")
    print(f"  resumed/cold {ttft(resumed) / ttft(cold):6.3f}   (target <= 0.05)")
    for name, result, err in (("turn 1", first, err1), ("turn 2", resumed, err2)):
        total, held = (ms / 1000 for ms in save_ms(err))
        print(f"  save after {name}: {total * 1000:.0f} ms = {total / wall(result) * 100:.1f} % of the reply's "
              f"{wall(result):.2f} s (target <= 5 %); of it the engine held {held * 1000:.0f} ms = "
              f"{held / wall(result) * 100:.1f} %")
    print(f"  state file {size_bytes / 1e6:.1f} MB for {saved_tokens} tokens = "
          f"{size_bytes / max(saved_tokens, 1) / 1024:.1f} KiB/token ({kv_type} KV cache)")


def state_and_logits(model_path: Path, kv_type: str) -> tuple[float, np.ndarray]:
    """llama.cpp's state bytes per token of a ~2000-token conversation, and teacher-forced logits."""
    with Engine(model_path, n_ctx=N_CTX, kv_type=kv_type) as engine:
        prompt = engine.tokenize(facts(2000 // TOKENS_PER_FACT))
        for _ in engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1)):
            pass
        payload, held = engine.state()
        logits = engine.sequence_logits(engine.tokenize(sample_text())[:QUALITY_TOKENS])
    return len(payload) / len(held), logits


def kl_and_top1(reference: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """Mean KL(reference || logits) in nats, and how often both rank the same token first."""

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    ref, other = log_softmax(reference), log_softmax(logits)
    kl = np.sum(np.exp(ref) * (ref - other), axis=-1)
    return float(kl.mean()), float((ref.argmax(-1) == other.argmax(-1)).mean())


def kv_type_report(model_spec: str | None) -> None:
    model_path = resolve_model(model_spec).path
    measured = {kv_type: state_and_logits(model_path, kv_type) for kv_type in KV_TYPES}
    (f16, reference), (q8, logits) = measured["f16"], measured["q8_0"]
    kl, top1 = kl_and_top1(reference, logits)
    print(f"\n== KV cache types ({model_path.name})")
    print(f"  state f16  {f16:8.0f} bytes/token ({f16 / 1024:.1f} KiB)")
    print(f"  state q8_0 {q8:8.0f} bytes/token ({q8 / 1024:.1f} KiB) = {q8 / f16:.3f} x f16")
    print(f"  q8_0 vs f16 over {len(logits)} tokens of eval_sample.txt: mean KL {kl:.5f} nats, "
          f"top-1 agreement {top1:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF path or registry name (default: the bundled model)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[2000, 4000],
                        help="conversation sizes to time resuming (none: only the KV cache type report)")
    parser.add_argument("--kv-type", choices=KV_TYPES, default="f16", help="the KV cache type of the timed runs")
    args = parser.parse_args()
    for size in args.sizes:
        run(args.model, size, args.kv_type)
    kv_type_report(args.model)


if __name__ == "__main__":
    main()
