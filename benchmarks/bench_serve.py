"""`alpaca-chat serve` against llama-cpp-python's `llama_cpp.server`, same model, same requests.

    pip install fastapi pydantic-settings sse-starlette starlette-context   # llama_cpp.server's deps
    python benchmarks/bench_serve.py [--model PATH] [--tokens 64] [--clients 8] [--targets 1,2,3,4] [--anchor-first]

Each server runs alone (one after the other), with the same threads and context, and is asked:
  1. one streaming client: time to first token and tokens/s (target: ours >= 0.95x the anchor's);
  2. `--clients` concurrent streaming clients: aggregate tokens/s and p50/p99 time to first token
     (target: >= 1.5x the anchor's, and >= 85 % of the batching ceiling);
  3. a 10-turn chat sent as full history each turn: turn 10's time to first token / turn 1's
     (target <= 1.3);
  4. (ours only) a 2,000-token chat, the server restarted, then its next turn: time to first token
     with the prompt cache restored / re-evaluating it on a server without one (target <= 0.1).
     `--only-restart` runs this one alone.
The batching ceiling is measured in the same run, in-process, with the engine: K x one sequence's
tokens/s x (cost of a 1-sequence decode step / cost of a K-sequence step).
`--targets` picks what to measure (1 and 2 always go together); `--anchor-first` runs the anchor
before ours (alternate between runs). The load average before and after is reported.
Absolute numbers on a shared machine are noise; compare within one run.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import openai

PROMPT = "Write a long story about a robot who learns to paint. Once upon a time,"
QUESTIONS = ["What is the capital of France?", "And of Italy?", "Name a river there.", "How long is it?",
             "Which sea does it reach?", "Name a city on it.", "What is it famous for?", "Any food?",
             "A dish from there?", "Thanks, summarize."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], port: int, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **env} if env else None)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server did not start: {' '.join(command)}")


def stream_one(client, model: str, prompt: str, tokens: int) -> tuple[float, int, float]:
    """(time to first token, tokens, seconds from first token to the end) of one streamed completion."""
    started = time.perf_counter()
    first, count = None, 0
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0,
                                           stream=True):
        if chunk.choices and chunk.choices[0].text:
            count += 1
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    return first - started, count, end - first


def measure(base: str, model: str, tokens: int, clients: int, chat: bool = True) -> dict:
    client = openai.OpenAI(base_url=base + "/v1", api_key="bench", max_retries=0, timeout=600)
    stream_one(client, model, "Hello", 4)  # warm up
    singles = [stream_one(client, model, PROMPT + f" ({i})", tokens) for i in range(3)]
    ttft_1 = statistics.median(s[0] for s in singles)
    tps_1 = statistics.median((s[1] - 1) / s[2] for s in singles if s[2] > 0)

    results = [None] * clients
    def run(i):
        results[i] = stream_one(client, model, PROMPT + f" [{i}]", tokens)
    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ttfts = sorted(r[0] for r in results)
    aggregate = sum(r[1] for r in results) / wall
    report = {"ttft_1": ttft_1, "tps_1": tps_1, "aggregate_tps": aggregate, "ttft_p50": statistics.median(ttfts),
              "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))]}
    if not chat:
        return report

    history, turn_ttft = [], []
    for question in QUESTIONS:
        history.append({"role": "user", "content": question})
        started = time.perf_counter()
        first, text = None, []
        for chunk in client.chat.completions.create(model=model, messages=history, max_tokens=24, temperature=0,
                                                    stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text.append(chunk.choices[0].delta.content)
        turn_ttft.append((first or time.perf_counter()) - started)
        history.append({"role": "assistant", "content": "".join(text)})
    return {**report, "turn10_over_turn1": turn_ttft[-1] / turn_ttft[0]}


def chat_ttft(base: str, model: str, messages: list[dict]) -> tuple[float, str, int, int]:
    """(time to first token, reply, prompt tokens cached, prompt tokens) of one streamed chat turn."""
    client = openai.OpenAI(base_url=base + "/v1", api_key="bench", max_retries=0, timeout=600)
    started, first, text, cached, prompt = time.perf_counter(), None, [], 0, 0
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            prompt = chunk.usage.prompt_tokens
            cached = (chunk.usage.prompt_tokens_details.cached_tokens or 0) if chunk.usage.prompt_tokens_details else 0
    return (first or time.perf_counter()) - started, "".join(text), cached, prompt


def restart_ttft(model: str, threads: int, target_tokens: int = 2000) -> dict:
    """Target 4: a long chat's next turn after a restart, prompt cache restored vs re-evaluated."""
    import tempfile

    facts = " ".join(f"Note {i}: the {w} near town {i % 13} was measured on day {i % 29}." for i, w in
                     enumerate(["river", "bridge", "tower", "market", "forest", "harbour", "school"] * 30))
    served = [sys.executable, "-m", "alpaca_chat", "serve", "--model", model, "--parallel", "4", "--ctx", "4096",
              "--threads", str(threads)]
    name = os.path.basename(model)
    with tempfile.TemporaryDirectory() as home:
        def run(messages, *flags):
            port = free_port()
            proc = start(served + ["--port", str(port), *flags], port, {"ALPACA_CHAT_HOME": home})
            try:
                return chat_ttft(f"http://127.0.0.1:{port}", name, messages)
            finally:
                proc.terminate()  # a graceful stop: the idle sequences' states are saved
                proc.wait()

        history = [{"role": "user", "content": facts[: int(target_tokens * 2.85)] + "\nWhich notes mention a river?"}]
        ttft_1, reply, _, _ = run(history)
        history += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And a tower?"}]
        restored, reply_restored, cached, prompt_tokens = run(history)
        fresh, reply_fresh, cached_fresh, _ = run(history, "--prompt-cache-mb", "0")
    return {"turn1_ttft": ttft_1, "restored_ttft": restored, "reevaluated_ttft": fresh,
            "restored_cached_tokens": cached, "reevaluated_cached_tokens": cached_fresh,
            "same_reply": reply_restored == reply_fresh, "restored_over_reevaluated": restored / fresh,
            "prompt_tokens": prompt_tokens}


def batching_ceiling(model_path: str, k: int, threads: int | None) -> dict:
    """One sequence's tokens/s and the cost ratio of 1- vs k-sequence decode steps, in-process."""
    from alpaca_chat.engine import Engine
    from alpaca_chat.engine.parallel import Segment

    with Engine(model_path, n_ctx=4096, n_seq_max=k, n_threads=threads) as engine:
        prompt = engine.tokenize(PROMPT)
        engine.decode_segments([Segment(s, prompt, 0) for s in range(k)], lambda seg, idx: None)

        def steps(n_seq: int, rounds: int = 24) -> float:
            pos = len(prompt)
            for s in range(k):  # back to the prompt: positions must follow on
                engine.trim_sequence(s, pos)
            started = time.perf_counter()
            for r in range(rounds):
                engine.decode_segments([Segment(s, [prompt[-1]], pos + r) for s in range(n_seq)],
                                       lambda seg, idx: None)
            return (time.perf_counter() - started) / rounds

        one = min(steps(1) for _ in range(3))
        many = min(steps(k) for _ in range(3))
    return {"step_1_s": one, "step_k_s": many, "ceiling_factor": k * one / many}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a .gguf path (default: the bundled model)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-anchor", action="store_true")
    p.add_argument("--only-restart", action="store_true", help="measure target 4 alone (= --targets 4)")
    p.add_argument("--targets", default="1,2,3,4", help="which targets to measure (default 1,2,3,4)")
    p.add_argument("--anchor-first", action="store_true", help="run llama_cpp.server before ours")
    args = p.parse_args()
    from alpaca_chat.engine import physical_cores
    from alpaca_chat.models import resolve_model

    targets = {"4"} if args.only_restart else set(args.targets.split(","))
    model = str(resolve_model(args.model).path)
    threads = args.threads or physical_cores()
    report = {"model": os.path.basename(model), "threads": threads, "clients": args.clients, "tokens": args.tokens,
              "load_before": os.getloadavg()}
    if "4" in targets:
        report["restart"] = restart_ttft(model, threads)
    if not targets & {"1", "2", "3"}:
        report["load_after"] = os.getloadavg()
        print(json.dumps(report, indent=2))
        return 0

    chat = "3" in targets
    ours_cmd = [sys.executable, "-m", "alpaca_chat", "serve", "--model", model, "--parallel", str(args.clients),
                "--ctx", "4096", "--threads", str(threads)]
    anchor_cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--n_ctx", "4096",
                  "--n_threads", str(threads), "--interrupt_requests", "False"]
    runs = [("ours", ours_cmd, os.path.basename(model))]
    if not args.skip_anchor:
        runs.insert(0 if args.anchor_first else 1, ("anchor", anchor_cmd, model))
    report["first"] = runs[0][0]
    for name, command, model_id in runs:
        port = free_port()
        proc = start(command + ["--port", str(port)], port)
        try:
            report[name] = measure(f"http://127.0.0.1:{port}", model_id, args.tokens, args.clients, chat)
        finally:
            proc.terminate()
            proc.wait()
    report["ceiling"] = batching_ceiling(model, args.clients, threads)
    ours = report["ours"]
    ours["ceiling_tps"] = report["ceiling"]["ceiling_factor"] * ours["tps_1"]
    ours["of_ceiling"] = ours["aggregate_tps"] / ours["ceiling_tps"]
    if "anchor" in report:
        anchor = report["anchor"]
        report["ratios"] = {"ttft_1": ours["ttft_1"] / anchor["ttft_1"], "tps_1": ours["tps_1"] / anchor["tps_1"],
                            "aggregate_tps": ours["aggregate_tps"] / anchor["aggregate_tps"]}
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
