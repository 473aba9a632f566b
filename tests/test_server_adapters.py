"""`alpaca-chat serve --lora NAME=FILE[:SCALE]` end to end: a real server process, the bundled model,
two real adapter GGUFs (written with the `gguf` package: strong random LoRAs on attention and MLP
weights, so that they change the greedy reply), and the real `openai` client.

Each model name answers with its own adapter set, alone or mixed with the others' concurrent
requests (sets are never mixed in one batch); the prompt cache, in memory and on disk, is never
shared between sets; a bad adapter stops the server at startup in one line, exit 1.
"""

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from adapter_helpers import random_pairs, write_adapter
from alpaca_chat.engine.adapter_check import BaseLayout
from test_server import _serve, assert_same_greedy_reply

# Long enough (> the prompt cache's 128-token minimum) that its state is saved when sets switch.
PROMPT = ("Here is a list of facts. " + " ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}."
                                                 for i in range(14)) + " Which fact is the most surprising?")


def _adapter(path, model_path, seed: int):
    layout = BaseLayout.of_model(model_path)
    names = [n for n in layout.tensors if n.endswith(("attn_v.weight", "ffn_down.weight"))]
    return write_adapter(path, layout.architecture, random_pairs(layout, names, rank=4, std=0.08, seed=seed),
                         alpha=4.0)


@pytest.fixture(scope="module")
def adapters(default_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapters")
    return _adapter(out / "a.gguf", default_model_path, 1), _adapter(out / "b.gguf", default_model_path, 2)


@pytest.fixture(scope="module")
def lora_server(default_model_path, tmp_path_factory, adapters):
    a, b = adapters
    yield from _serve(default_model_path, tmp_path_factory, "--parallel", "4", "--ctx", "2048",
                      "--lora", f"a={a}", "--lora", f"b={b}:0.5", "--history")


@pytest.fixture(scope="module")
def client(lora_server):
    return openai.OpenAI(base_url=lora_server + "/v1", api_key="none", max_retries=0, timeout=120)


def _ask(client, model: str, prompt: str = "Name three colors.", tokens: int = 8):
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=tokens, temperature=0)
    return reply.choices[0].message.content, reply.usage.prompt_tokens_details.cached_tokens, reply.model


def _tokens(client, model: str):
    """A greedy reply's tokens with their log-probabilities (compared by test_server's near-tie rule)."""
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Name three colors."}],
                                           max_tokens=8, temperature=0, logprobs=True, top_logprobs=5)
    return reply.choices[0].logprobs.content


def test_each_model_name_answers_with_its_adapters(client, lora_server):
    models = [m.id for m in client.models.list().data]
    base = models[0]
    assert models == [base, f"{base}+a", f"{base}+b"]
    alone = {model: _tokens(client, model) for model in models}
    texts = {model: "".join(t.token for t in tokens) for model, tokens in alone.items()}
    assert len(set(texts.values())) == 3, texts  # the adapters change the greedy reply, each its own way
    for model in models:  # switched back and forth, now from each set's cached cells
        assert_same_greedy_reply(_tokens(client, model), alone[model])
    assert _ask(client, f"{base}+a")[2] == f"{base}+a"

    # interleaved and concurrent: all answered (which set decodes which request: the next test)
    order = models * 3
    with ThreadPoolExecutor(len(order)) as pool:
        replies = list(pool.map(lambda m: _ask(client, m), order))
    assert all(text for text, _, _ in replies) and [model for _, _, model in replies] == order
    with urllib.request.urlopen(lora_server + "/health", timeout=10) as response:
        health = json.load(response)
    assert health["adapter_switches"] >= 4 and health["running"] == health["queued"] == 0


class _Recording:
    """The real engine, with every decode step's sequences and the adapter set they ran under recorded."""

    def __init__(self, engine):
        self._engine = engine
        self.steps: list[tuple[str, list]] = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def decode_segments(self, segments, on_token):
        self.steps.append((self._engine.adapter_key, [(s.seq, s.start_pos, list(s.tokens)) for s in segments]))
        return self._engine.decode_segments(segments, on_token)


def test_requests_of_different_adapter_sets_never_share_a_batch(default_model_path, adapters):
    """The scheduler on a real engine: twelve requests of three sets submitted at once, interleaved.
    Every step of every request runs under its own set's adapters, each set's requests are batched
    together (a set's turn takes all of its waiting requests), and the sets take turns in order."""
    import asyncio

    from alpaca_chat.conversation import SamplingParams
    from alpaca_chat.engine import Engine
    from alpaca_chat.lora_spec import AdapterSpec
    from alpaca_chat.server.adapters import Variant
    from alpaca_chat.server.scheduler import Scheduler

    with Engine(default_model_path, n_ctx=2048, n_seq_max=4) as engine:
        keys = {}
        variants = {"m": Variant("m", ()), "m+a": Variant("m+a", (AdapterSpec(adapters[0]),)),
                    "m+b": Variant("m+b", (AdapterSpec(adapters[1], 0.5),))}
        for name, variant in variants.items():
            engine.set_adapters(variant.adapters)
            keys[name] = engine.adapter_key
        engine.set_adapters(())
        recording = _Recording(engine)
        order = list(variants) * 4
        words = "Apples Rivers Clouds Engines Forests Mountains Oceans Planets Stones Trains Violins Windows".split()
        prompts = [engine.tokenize(f"{word} are request number {i}.") for i, word in enumerate(words)]
        assert len({p[0] for p in prompts}) == len(prompts)  # no shared prefix: each prompt is decoded whole

        async def run():
            scheduler = Scheduler(recording, variants=variants)
            scheduler.start()
            try:
                streams = [scheduler.submit(p, SamplingParams(temperature=0.0, max_tokens=6), variant=v)
                           for p, v in zip(prompts, order)]
                return [[d async for d in stream] for stream in streams], scheduler.switches
            finally:  # the engine must outlive the scheduler's thread
                await asyncio.to_thread(scheduler.stop)

        texts, switches = asyncio.run(run())

    assert all(texts) and switches == 2
    owner: dict[int, int] = {}  # sequence -> the request running in it
    turns = []
    for key, segments in recording.steps:
        for seq, pos, tokens in segments:
            if pos == 0:
                owner[seq] = prompts.index(tokens)
            assert keys[order[owner[seq]]] == key, "a request decoded under another set's adapters"
        if not turns or turns[-1] != key:
            turns.append(key)
    assert turns == [keys["m"], keys["m+a"], keys["m+b"]]


def test_the_prompt_cache_is_not_shared_between_adapter_sets(client, lora_server):
    base = client.models.list().data[0].id
    _ask(client, base, PROMPT)
    assert _ask(client, base, PROMPT)[1] > 100  # the base reuses its own cells
    on_a = _ask(client, f"{base}+a", PROMPT)
    # Not the base's cells, in memory or on disk. (That the adapter changes a reply is the first
    # test's; this prompt's 8-token answer can be the same with or without it.)
    assert on_a[1] == 0 and on_a[2] == f"{base}+a"
    assert _ask(client, f"{base}+a", PROMPT)[1] > 100  # its own, once computed
    assert _ask(client, f"{base}+b", PROMPT)[1] == 0
    # its cells were dropped when the sets switched: restored from its own state on disk
    assert _ask(client, base, PROMPT)[1] > 100
    data = Path(lora_server.env["XDG_DATA_HOME"])
    assert list(data.glob("**/kv/serve/*.kv")) and len(list(data.glob("**/kv/serve/lora-*/*.kv"))) >= 1


def test_history_records_the_adapter_set_of_the_model_asked(client, lora_server, adapters):
    base = client.models.list().data[0].id
    messages = [{"role": "user", "content": "adapter history probe"}]
    reply = client.chat.completions.create(model=f"{base}+b", messages=messages, max_tokens=4, temperature=0)
    messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                 {"role": "user", "content": "and a second turn"}]
    client.chat.completions.create(model=f"{base}+b", messages=messages, max_tokens=4, temperature=0)
    client.chat.completions.create(model=base, messages=messages, max_tokens=4, temperature=0)  # another one
    code = ("import json; from alpaca_chat.store import Store; s = Store(); print(json.dumps("
            "[[list(c.adapters), [m.content for m in s.messages(c.id)]] for c in s.list_conversations()]))")
    listed = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                       env=lora_server.env).stdout)
    probes = [(adapters_, texts) for adapters_, texts in listed if texts and texts[0] == "adapter history probe"]
    assert sorted((len(texts), [(a["path"], a["scale"]) for a in adapters_]) for adapters_, texts in probes) == [
        (4, []), (4, [(str(adapters[1]), 0.5)])]  # both turns of the +b chat in one conversation; the base's apart


def test_bad_adapters_stop_the_server_in_one_line(default_model_path, tmp_path, adapters):
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(adapters[0].read_bytes()[:5000])
    serve = [sys.executable, "-m", "alpaca_chat", "serve", "--model", str(default_model_path), "--port", "0"]
    for flags, code, words in ((["--lora", f"cut={truncated}"], 1, "cut.gguf"),
                               (["--lora", str(adapters[0])], 2, "NAME=FILE"),
                               (["--lora", f"a={adapters[0]}", "--lora", f"a={adapters[1]}"], 2, "differ")):
        result = subprocess.run(serve + flags, capture_output=True, text=True, timeout=120)
        assert result.returncode == code, result.stderr
        assert result.stderr.count("\n") == 1 and words in result.stderr and "Traceback" not in result.stderr
