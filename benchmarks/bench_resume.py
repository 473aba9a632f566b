"""Instant resume: time to first token of the next turn in a new process, with and without the saved KV state.

    python benchmarks/bench_resume.py [--model PATH_OR_NAME] [--sizes 2000 4000]

For a conversation of about N tokens (one run each, the bundled model by default):
  - resumed: `alpaca-chat -c --prompt ... --json` in a new process, with the state saved by the turn before;
    its time to first token counts the restore (read, checks, llama_state_seq_set_data) too
  - cold: the same turn in a copy of the same history with --no-kv-cache (today's behaviour)
  - live: the same two turns in one in-process session that never closed
Prints resumed/live (target <= 1.5) and resumed/cold (target <= 0.05), the save's cost against the
reply's wall time (target <= 5 %), and state bytes per token.
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

from alpaca_chat.conversation import Message, SamplingParams
from alpaca_chat.engine import Engine
from alpaca_chat.models import resolve_model
from alpaca_chat.session import ChatSession
from alpaca_chat.store import Store
from alpaca_chat.templates import resolve_template

N_CTX = 8192
MAX_TOKENS = 32
TOKENS_PER_FACT = 21  # about, for this model's tokenizer
Q1, Q2 = "Where does Nube12 live?", "And what does Nube40 eat?"


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


def save_ms(stderr: str) -> float:
    found = re.findall(r"saved KV state: \d+ tokens, [\d.]+ MB in (\d+) ms", stderr)
    return float(found[-1]) if found else float("nan")


def live_ttft(model_path: Path, history: list[Message]) -> float:
    with Engine(model_path, n_ctx=N_CTX) as engine:
        template = resolve_template("auto", engine.chat_template, engine.bos_token, engine.eos_token)
        session = ChatSession(engine, template, model_label="live", history=history,
                              sampling=SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
        for question in (Q1, Q2):
            reply = session.send(question)
            for _ in reply:
                pass
        return reply.stats.time_to_first_token_s


def run(model_spec: str | None, size: int) -> None:
    model_path = resolve_model(model_spec).path
    with tempfile.TemporaryDirectory() as tmp:
        home, cold_home = Path(tmp) / "home", Path(tmp) / "cold"
        os.environ["ALPACA_CHAT_HOME"] = str(home)
        with Store() as store:
            conversation = store.create_conversation(model=str(model_path), template="auto")
            store.add_message(conversation.id, "user", "Remember these facts. " + facts(size // TOKENS_PER_FACT))
            store.add_message(conversation.id, "assistant", "I will remember them.")
            history = [Message(m.role, m.content) for m in store.messages(conversation.id)]
        first, err1 = cli(home, str(model_path), Q1)  # cold, and saves the state
        shutil.copytree(home, cold_home)
        resumed, err2 = cli(home, str(model_path), Q2)
        cold, _ = cli(cold_home, str(model_path), Q2, "--no-kv-cache")
        live = live_ttft(model_path, history)
        state = home / "data" / "kv" / f"{conversation.id}.kv"
        size_bytes = state.stat().st_size
        saved_tokens = int(re.findall(r"saved KV state: (\d+) tokens", err2)[-1])
    rs = resumed["stats"]
    print(f"\n== about {size} tokens: next prompt {rs['prompt_tokens']} tokens, {rs['cached_tokens']} restored")
    print(f"  TTFT resumed {ttft(resumed) * 1000:8.0f} ms  (restore {resumed['kv_restore_s'] * 1000:.0f} ms"
          f" + first token {rs['time_to_first_token_s'] * 1000:.0f} ms)")
    print(f"  TTFT cold    {ttft(cold) * 1000:8.0f} ms  (cached {cold['stats']['cached_tokens']})")
    print(f"  TTFT live    {live * 1000:8.0f} ms")
    print(f"  resumed/live {ttft(resumed) / live:6.2f}   (target <= 1.5)")
    print(f"  resumed/cold {ttft(resumed) / ttft(cold):6.3f}   (target <= 0.05)")
    for name, result, err in (("turn 1", first, err1), ("turn 2", resumed, err2)):
        cost = save_ms(err) / 1000
        print(f"  save after {name}: {cost * 1000:.0f} ms = {cost / wall(result) * 100:.1f} % of the reply's "
              f"{wall(result):.2f} s (target <= 5 %)")
    print(f"  state file {size_bytes / 1e6:.1f} MB for {saved_tokens} tokens = "
          f"{size_bytes / max(saved_tokens, 1) / 1024:.1f} KiB/token (f16 KV cache)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="GGUF path or registry name (default: the bundled model)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 4000])
    args = parser.parse_args()
    for size in args.sizes:
        run(args.model, size)


if __name__ == "__main__":
    main()
