"""alpaca-chat's engine vs a minimal llama-cpp-python decode loop, in one run.

    python benchmarks/bench_engine.py [--model PATH_OR_NAME] [--rounds 5]

The reference is the floor: llama_decode + llama.cpp's greedy (argmax) sampler and nothing else,
with the engine's load parameters and attention kernel, doing exactly the engine's work per token
(N samples, N - 1 decodes: the last token is never evaluated). It does not even turn tokens into text.

Prints, as ratios (ours / reference) of medians over interleaved rounds:
  - generation tok/s (target >= 0.97)
  - prompt processing tok/s (target >= 0.95)
  - `alpaca-chat --prompt ... --json --temp 0` against the same floor loop, each in a process of its
    own, measured from outside the same way (target >= 0.97)
  - time to first token at turn 10 vs turn 1 of one conversation (target <= 1.2)
  - startup overhead of `alpaca-chat --prompt hi --max-tokens 1` vs
    `python -c "import llama_cpp"` + model load (target < 300 ms)
Absolute times on a shared machine are noise; only same-run ratios mean anything.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import llama_cpp

from alpaca_chat.conversation import Message, SamplingParams
from alpaca_chat.engine import Engine, physical_cores
from alpaca_chat.models import resolve_model
from alpaca_chat.session import ChatSession
from alpaca_chat.templates import resolve_template

GEN_TOKENS = 128
PROMPT_WORDS = 300


class ReferenceLoop:
    """The floor: llama_decode + llama.cpp's greedy sampler, nothing else."""

    def __init__(self, path: str, n_threads: int, n_ctx: int = 2048, n_batch: int = 512):
        llama_cpp.llama_backend_init()
        # The engine's load parameters (AMX guard included) and attention kernel (flash attention
        # as the engine sets it for its default f16 cache), so both sides run the same kernels.
        from alpaca_chat.engine import flash_attention, model_load_params

        self.model = llama_cpp.llama_model_load_from_file(path.encode(), model_load_params())
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, n_batch
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.flash_attn_type = flash_attention("f16")
        cp.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_batch = n_batch

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        buf = (llama_cpp.llama_token * (len(data) + 8))()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, len(buf), True, True)
        return list(buf[:n])

    def run(self, tokens: list[int], n_gen: int) -> tuple[float, float]:
        """Return (prompt tok/s, generation tok/s) for a cold prompt + n_gen greedy tokens."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        smpl = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(smpl, llama_cpp.llama_sampler_init_greedy())
        t0 = time.perf_counter()
        for i in range(0, len(tokens), self.n_batch):
            chunk = tokens[i : i + self.n_batch]
            arr = (llama_cpp.llama_token * len(chunk))(*chunk)
            llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(arr, len(chunk)))
        t1 = time.perf_counter()
        one = (llama_cpp.llama_token * 1)()
        batch = llama_cpp.llama_batch_get_one(one, 1)
        for i in range(n_gen):
            one[0] = llama_cpp.llama_sampler_sample(smpl, self.ctx, -1)
            if i < n_gen - 1:  # as the engine: the last token is not evaluated
                llama_cpp.llama_decode(self.ctx, batch)
        t2 = time.perf_counter()
        llama_cpp.llama_sampler_free(smpl)
        return len(tokens) / (t1 - t0), n_gen / (t2 - t1)


def bench_throughput(path: str, rounds: int, threads: int) -> dict:
    engine = Engine(path, n_ctx=2048, n_threads=threads)
    ref = ReferenceLoop(path, threads)
    template = resolve_template("auto", engine.chat_template, engine.bos_token, engine.eos_token)
    text = template.render([Message("user", "Tell me a story about " + "a robot and a cat, " * (PROMPT_WORDS // 6))])
    tokens = engine.tokenize(text)
    # Greedy, no penalty: both sides run the same sampler, so only the plumbing differs.
    params = SamplingParams(temperature=0, repeat_penalty=1.0, max_tokens=GEN_TOKENS)
    ours_pp, ours_tg, ref_pp, ref_tg = [], [], [], []
    n_gen = GEN_TOKENS

    def run_ours():
        nonlocal n_gen
        engine.reset()
        gen = engine.generate(tokens, params)
        "".join(gen)
        n_gen = max(gen.stats.generated_tokens, 1)  # the reference makes exactly as many
        ours_pp.append(gen.stats.prompt_tokens_per_s)
        ours_tg.append(gen.stats.generation_tokens_per_s)

    def run_ref():
        pp, tg = ref.run(tokens, n_gen)
        ref_pp.append(pp)
        ref_tg.append(tg)

    for i in range(rounds):
        # Alternate who goes first: the second runner of a pair sees warmer caches.
        for run in (run_ours, run_ref) if i % 2 == 0 else (run_ref, run_ours):
            run()
    engine.close()
    return {
        "prompt_tokens": len(tokens),
        "ours_pp": statistics.median(ours_pp),
        "ref_pp": statistics.median(ref_pp),
        "ours_tg": statistics.median(ours_tg),
        "ref_tg": statistics.median(ref_tg),
    }


def bench_turns(path: str, threads: int, turns: int = 10) -> list[float]:
    """Time to first token per turn of one conversation with equal-length user messages."""
    engine = Engine(path, n_ctx=4096, n_threads=threads)
    template = resolve_template("auto", engine.chat_template, engine.bos_token, engine.eos_token)
    session = ChatSession(engine, template, model_label="bench",
                          sampling=SamplingParams(temperature=0, max_tokens=48))
    ttfts = []
    for i in range(turns):
        reply = session.send(f"Question number {i:02d}: name an animal and describe it in one sentence.")
        "".join(reply)
        ttfts.append(reply.stats.time_to_first_token_s)
    engine.close()
    return ttfts


def _median_wall(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_startup(path: str, runs: int) -> tuple[float, float]:
    ref_code = (
        "import llama_cpp, ctypes\n"
        "cb = llama_cpp.llama_log_callback(lambda *a: None)  # kept alive: llama.cpp calls it later\n"
        "llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))\n"
        "llama_cpp.llama_backend_init()\n"
        "mp = llama_cpp.llama_model_default_params()\n"
        "mp.use_extra_bufts = b'AMX_INT8 = 1' not in llama_cpp.llama_print_system_info()  # the engine's AMX guard\n"
        f"m = llama_cpp.llama_model_load_from_file({path!r}.encode(), mp)\n"
        "p = llama_cpp.llama_context_default_params(); p.n_ctx = 4096\n"
        "c = llama_cpp.llama_init_from_model(m, p)\n"
    )
    ref, ours = [], []
    for _ in range(runs):  # interleaved so drift hits both sides alike
        ref.append(_median_wall([sys.executable, "-c", ref_code], 1))
        ours.append(_median_wall([sys.executable, "-m", "alpaca_chat", "--model", path, "--prompt", "hi",
                                  "--max-tokens", "1", "--no-history"], 1))
    return statistics.median(ours), statistics.median(ref)


CLI_PROMPT = "Write a long story about a robot who learns to paint."


def _floor_child(path: str, threads: int, n_gen: int) -> None:
    """A process of its own running only the floor loop on the CLI's prompt: prints its generation tok/s."""
    ref = ReferenceLoop(path, threads, n_ctx=4096)
    engine = Engine(path, n_ctx=512, n_threads=threads)  # only to render and tokenize the prompt as the CLI does
    template = resolve_template("auto", engine.chat_template, engine.bos_token, engine.eos_token)
    tokens = engine.tokenize(template.render([Message("user", CLI_PROMPT)]))
    engine.close()
    print(ref.run(tokens, n_gen)[1])


def bench_cli(path: str, threads: int, runs: int, n_gen: int) -> tuple[float, float, float]:
    """`alpaca-chat --prompt ... --json` against the floor, each in its own process, alternating who goes
    first; both report generation tok/s timed from the end of the prompt to the last token."""
    ours, ref, ratios = [], [], []
    cli = [sys.executable, "-m", "alpaca_chat", "--model", path, "--prompt", CLI_PROMPT, "--json", "--temp", "0",
           "--max-tokens", str(n_gen), "--no-history", "--threads", str(threads)]
    floor = [sys.executable, __file__, "--floor-child", "--model", path, "--threads", str(threads),
             "--gen", str(n_gen)]
    for i in range(runs):
        pair = {}
        for side in ("ours", "ref") if i % 2 == 0 else ("ref", "ours"):
            out = subprocess.run(cli if side == "ours" else floor, check=True, capture_output=True, text=True,
                                 stdin=subprocess.DEVNULL).stdout
            if side == "ours":
                stats = json.loads(out)["stats"]
                pair[side] = stats["generation_tokens_per_s"] * stats["generated_tokens"] / n_gen  # same count
                n_done = stats["generated_tokens"]
            else:
                pair[side] = float(out.strip().splitlines()[-1])
        if n_done < n_gen:
            raise SystemExit(f"the CLI stopped after {n_done} tokens; pick a prompt that runs {n_gen}")
        ours.append(pair["ours"])
        ref.append(pair["ref"])
        ratios.append(pair["ours"] / pair["ref"])
    return statistics.median(ours), statistics.median(ref), statistics.median(ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model to benchmark (default: the bundled SmolLM2-135M)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=physical_cores())
    ap.add_argument("--gen", type=int, default=GEN_TOKENS, help=argparse.SUPPRESS)
    ap.add_argument("--floor-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--only-cli", action="store_true", help="only the CLI against the floor")
    args = ap.parse_args()
    path = str(resolve_model(args.model).path)
    if args.floor_child:
        return _floor_child(path, args.threads, args.gen)
    print(f"model: {path}\nthreads: {args.threads}, rounds: {args.rounds}\n")
    ours, ref, ratio = bench_cli(path, args.threads, args.rounds, GEN_TOKENS)
    print(f"alpaca-chat --prompt --json --temp 0 ({GEN_TOKENS} tokens): {ours:.1f} tok/s, floor loop {ref:.1f} tok/s, "
          f"median per-run ratio {ratio:.3f} (target >= 0.97)")
    if args.only_cli:
        return

    r = bench_throughput(path, args.rounds, args.threads)
    print(f"prompt processing ({r['prompt_tokens']} tokens): ours {r['ours_pp']:.1f} tok/s, "
          f"reference {r['ref_pp']:.1f} tok/s, ratio {r['ours_pp'] / r['ref_pp']:.3f} (target >= 0.95)")
    print(f"generation ({GEN_TOKENS} tokens): ours {r['ours_tg']:.1f} tok/s, "
          f"reference {r['ref_tg']:.1f} tok/s, ratio {r['ours_tg'] / r['ref_tg']:.3f} (target >= 0.97)")

    ttfts = bench_turns(path, args.threads)
    print(f"time to first token: turn 1 {ttfts[0] * 1000:.1f} ms, turn 10 {ttfts[-1] * 1000:.1f} ms, "
          f"ratio {ttfts[-1] / ttfts[0]:.3f} (target <= 1.2)")

    ours, ref = bench_startup(path, runs=max(3, args.rounds))
    print(f"startup: alpaca-chat --prompt hi --max-tokens 1 {ours * 1000:.0f} ms, "
          f"import llama_cpp + load {ref * 1000:.0f} ms, overhead {(ours - ref) * 1000:.0f} ms (target < 300 ms)")


if __name__ == "__main__":
    main()
