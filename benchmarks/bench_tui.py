"""The full-screen app vs the engine alone, headless (App.run_test), in one run.

    python benchmarks/bench_tui.py [--model PATH_OR_NAME] [--rounds 4] [--tokens 300]

Prints:
  - generation tok/s seen by the app while it renders the streamed Markdown,
    as a ratio of the same session and prompt driven with no UI at all
    (target >= 0.95). Each round runs both back to back, in alternating
    order, so that load from other processes hits both alike; the headline is
    the median of the per-round ratios. Best-of-N per side (as timeit does)
    is printed too, but one lucky run on either side moves it.
  - key-press-to-screen latency while a reply streams: from a key event being
    posted to the first screen update that shows the typed character
    (median and worst; target <= 50 ms), and the same with the app idle
Absolute numbers on a shared machine are noise; compare within one run.
"""

import argparse
import asyncio
import statistics
from dataclasses import replace
import threading
import time

from textual import events

from alpaca_chat.config import Settings
from alpaca_chat.conversation import SamplingParams
from alpaca_chat.engine import Engine, physical_cores
from alpaca_chat.loading import LoadedModel, choose_template
from alpaca_chat.models import parse_quant, resolve_model
from alpaca_chat.session import ChatSession
from alpaca_chat.tui.app import ChatApp

PROMPT = "Explain Python lists in detail with many examples in Markdown code blocks."
SIZE = (120, 40)


def engine_alone(loaded: LoadedModel, sampling: SamplingParams) -> tuple[float, int]:
    """The same session and prompt with no UI, in a fresh thread as the app's worker is.

    (On a loaded machine llama.cpp can run several times slower from the main
    thread than from a new one; the app generates in a worker thread, so the
    baseline does too.)
    """
    result = []

    def run():
        loaded.engine.reset()
        session = ChatSession(loaded.engine, loaded.template, model_label=loaded.label, sampling=sampling)
        reply = session.send(PROMPT)
        for _ in reply:
            pass
        result.append((reply.stats.generation_tokens_per_s, reply.stats.generated_tokens))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result[0]


class ScreenClock:
    """Timestamps every screen update the app makes (headless: composed, not written)."""

    def __init__(self, app):
        self.app, self.updates = app, []
        original = app._display

        def display(screen, renderable):
            if renderable is not None:
                self.updates.append((time.perf_counter(), app.prompt.text))
            return original(screen, renderable)

        app._display = display

    async def latency(self, key: str, expect: str, timeout: float = 2.0) -> float:
        """Post a key press; return seconds until an update shows the prompt text `expect`."""
        start = time.perf_counter()
        seen_from = len(self.updates)
        self.app.post_message(events.Key(key, key))
        while time.perf_counter() - start < timeout:
            for stamp, text in self.updates[seen_from:]:
                if text == expect:
                    return stamp - start
            await asyncio.sleep(0.0005)
        raise TimeoutError(f"key {key!r} never reached the screen")


async def through_app(loaded: LoadedModel, sampling: SamplingParams, measure_keys: bool):
    """One reply in the headless app; returns (tok/s, tokens, key latencies while generating)."""
    loaded.engine.reset()
    app = ChatApp(Settings(sampling=sampling), None, loader=lambda spec: loaded)
    latencies = []
    async with app.run_test(size=SIZE) as pilot:
        while app.state != "ready":
            await pilot.pause(0.01)
        clock = ScreenClock(app)
        app.prompt.load_text(PROMPT)
        started, cpu = time.perf_counter(), time.thread_time()
        await pilot.press("enter")
        typed = ""
        while app.state == "generating" or app.last_stats is None:
            await asyncio.sleep(0.1)
            if measure_keys and app.state == "generating":
                typed += "x"
                latencies.append(await clock.latency("x", typed))
        ui_share = (time.thread_time() - cpu) / (time.perf_counter() - started)
        stats = app.last_stats
        await app.action_quit()
    return stats.generation_tokens_per_s, stats.generated_tokens, latencies, ui_share


async def idle_latency(loaded: LoadedModel, presses: int = 20) -> list[float]:
    app = ChatApp(Settings(), None, loader=lambda spec: loaded)
    async with app.run_test(size=SIZE) as pilot:
        while app.state != "ready":
            await pilot.pause(0.01)
        clock = ScreenClock(app)
        result, typed = [], ""
        for _ in range(presses):
            typed += "x"
            result.append(await clock.latency("x", typed))
            await asyncio.sleep(0.05)
        await app.action_quit()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model to benchmark (default: the bundled SmolLM2-135M)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=160, help="max tokens per reply")
    ap.add_argument("--threads", type=int, default=physical_cores())
    args = ap.parse_args()
    resolved = resolve_model(args.model)
    print(f"model: {resolved.path}\nthreads: {args.threads}, rounds: {args.rounds}, terminal: {SIZE[0]}x{SIZE[1]}\n")

    engine = Engine(resolved.path, n_ctx=2048, n_threads=args.threads)
    loaded = LoadedModel(engine, choose_template(engine, "auto", resolved.template), label=resolved.name,
                         name=resolved.name, quant=resolved.quant or parse_quant(resolved.path.name))
    # Greedy: every run generates the same tokens, so only the plumbing differs.
    sampling = SamplingParams(temperature=0, max_tokens=args.tokens)
    alone, in_app, ui_shares = [], [], []
    engine_alone(loaded, sampling)  # warm-up
    for i in range(args.rounds):
        for run in ("alone", "app") if i % 2 == 0 else ("app", "alone"):  # alternate who goes first
            if run == "alone":
                tps, n = engine_alone(loaded, sampling)
                alone.append(tps)
                note = ""
            else:
                tps, n, _, ui_share = asyncio.run(through_app(loaded, sampling, measure_keys=False))
                in_app.append(tps)
                ui_shares.append(ui_share)
                note = f" (UI thread busy {ui_share:.0%} of the time)"
            print(f"  round {i + 1} {run:>5}: {n} tokens, {tps:.1f} tok/s{note}")
    # Key presses in their own runs, with longer replies: typing is extra work the ratio leaves out.
    long_reply = replace(sampling, max_tokens=max(args.tokens, 400))
    latencies = []
    for _ in range(2):
        latencies += asyncio.run(through_app(loaded, long_reply, measure_keys=True))[2]
    idle = asyncio.run(idle_latency(loaded))
    engine.close()

    paired = statistics.median(a / b for a, b in zip(in_app, alone))
    print(f"\ngeneration: app {statistics.median(in_app):.1f} tok/s, engine alone {statistics.median(alone):.1f} tok/s "
          f"(medians); median per-round ratio {paired:.3f} (target >= 0.95)")
    print(f"best of {args.rounds}: app {max(in_app):.1f} tok/s, engine alone {max(alone):.1f} tok/s, "
          f"ratio {max(in_app) / max(alone):.3f}")
    print(f"UI thread CPU while streaming: {statistics.median(ui_shares):.1%} of one core (median)")
    if latencies:
        latencies.sort()
        p95 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.95))]
        print(f"key press to screen while generating ({len(latencies)} presses): median "
              f"{statistics.median(latencies) * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms, "
              f"max {latencies[-1] * 1000:.1f} ms (target <= 50 ms)")
    print(f"key press to screen, idle: median {statistics.median(idle) * 1000:.1f} ms, "
          f"max {max(idle) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
