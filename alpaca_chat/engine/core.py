"""`Engine`: one loaded model and one llama.cpp context, driven through llama-cpp-python's
low-level bindings (llama_decode and llama.cpp's native sampler chain) rather than
`Llama.create_completion`: the high-level path does per-token work in Python that costs
~15% of generation speed on small models.

What a generated token goes through is `step.SequenceStep`'s; how several requests share the
context is `parallel.py`'s; the public surface is written down in `protocol.py`.
"""

import contextlib
import ctypes
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import llama_cpp

from alpaca_chat.config import KV_TYPES
from alpaca_chat.conversation import GenerationStats, SamplingParams
from alpaca_chat.engine.adapters import Adapters, AdapterSpec
from alpaca_chat.engine.context import new_context
from alpaca_chat.engine.generation import Generation, common_prefix
from alpaca_chat.engine.hardware import model_load_params, physical_cores
from alpaca_chat.engine import sequence_state as _sequence_state
from alpaca_chat.engine.llama_log import configure_logging
from alpaca_chat.engine.logprobs import TokenLogprob, token_logprob
from alpaca_chat.engine.metadata import read_metadata
from alpaca_chat.engine.snapshot import StateSnapshot
from alpaca_chat.engine.step import SequenceStep
from alpaca_chat.errors import EngineError, UsageError
from alpaca_chat.engine.parallel import ParallelRequest, ParallelResult, ParallelRun, Segment

# How many recent tokens the repeat penalty looks at (llama.cpp's default).
REPEAT_PENALTY_LAST_N = 64
DEFAULT_N_CTX = 4096
DEFAULT_N_BATCH = 512


class Engine:
    """One loaded model and one context. One generation at a time; state copies wait for it."""

    supports_state = True

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        n_batch: int = DEFAULT_N_BATCH,
        n_seq_max: int = 1,
        exact: bool = False,
        kv_type: str = "f16",
        verbose: bool = False,
        eval_callback=None,
        adapters=(),
    ):
        if kv_type not in KV_TYPES:
            raise UsageError(f"kv_type must be {' or '.join(KV_TYPES)}, not {kv_type!r}")
        configure_logging(verbose)
        llama_cpp.llama_backend_init()
        self.model_path = Path(model_path)
        self.n_threads = n_threads or physical_cores()
        self._model = llama_cpp.llama_model_load_from_file(str(self.model_path).encode(), model_load_params())
        if not self._model:
            raise EngineError(f"llama.cpp could not load {self.model_path} (run with --verbose for its log)")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self._model)
        self.n_batch = n_batch
        self.n_seq_max = max(1, n_seq_max)
        self.exact = exact
        # The KV cache's element type; it is part of a saved state's key, so states of another type are ignored.
        self.kv_type = "f32" if exact else kv_type
        try:
            self._ctx = new_context(self._model, n_ctx=n_ctx or min(DEFAULT_N_CTX, self.n_ctx_train),
                                    n_batch=n_batch, n_threads=self.n_threads, n_seq_max=self.n_seq_max,
                                    kv_type=self.kv_type, label=self.model_path.name, eval_callback=eval_callback)
        except EngineError:
            llama_cpp.llama_model_free(self._model)  # e.g. a /model switch that failed: no leak
            raise
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        # llama.cpp caps a batch at the context it was asked for (before padding it): a larger chunk aborts.
        self.n_batch = min(n_batch, llama_cpp.llama_n_batch(self._ctx))
        self._eval_callback = eval_callback  # llama.cpp calls it as long as the context lives
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        # Tokens whose keys/values are in the KV cache (sequence 0), in order: the shared prefix
        # of the next prompt is not evaluated again.
        self._cached: list[int] = []
        self._piece_buf = ctypes.create_string_buffer(256)
        self._lock = threading.Lock()
        # A KV state snapshot's buffer, held by one snapshot at a time (see snapshot()).
        self._state_buf = None
        self._state_lock = threading.Lock()
        self.metadata = read_metadata(self._model)
        self._adapters = Adapters(self._model, self._ctx, self.model_path)
        if adapters:
            try:
                self.set_adapters(adapters)
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            if getattr(self, "_adapters", None):
                self._adapters.close()  # before the model, which would free them too
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            self._ctx = self._model = None
        self._state_buf = None  # a snapshot still held keeps it alive through its memoryview

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextlib.contextmanager
    def _held(self, *, wait: bool) -> Iterator[None]:
        """Hold the engine: wait for a running generation (state copies are short), or refuse."""
        if not self._lock.acquire(blocking=wait):
            raise EngineError("the engine is already generating")
        try:
            yield
        finally:
            self._lock.release()

    # -- LoRA adapters (adapters.py) ----------------------------------------------

    def set_adapters(self, specs) -> None:
        """Apply these adapters (AdapterSpecs or "FILE[:SCALE]") instead of the current set, without
        reloading the model; each file is checked and loaded once. On an error the previous set stays.
        A changed set empties the KV cache: nothing computed under one set is reused under another."""
        with self._held(wait=True):
            if self._adapters.apply(specs):
                self.reset()

    @property
    def adapters(self) -> tuple[AdapterSpec, ...]:
        """The active adapters, in the order they were given."""
        return self._adapters.active

    @property
    def adapter_key(self) -> str:
        """What the context computes with, beyond the model: content hashes and scales ("" for none)."""
        return self._adapters.key

    # -- vocabulary ----------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        raw = llama_cpp.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8", errors="replace") if raw else None

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        raw = llama_cpp.llama_vocab_get_text(self._vocab, token)
        return raw.decode("utf-8", errors="replace") if raw else ""

    @property
    def bos_token(self) -> str:
        return self.token_text(llama_cpp.llama_vocab_bos(self._vocab))

    @property
    def eos_token(self) -> str:
        return self.token_text(llama_cpp.llama_vocab_eos(self._vocab))

    @property
    def add_bos(self) -> bool:
        return bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))

    @property
    def bos_id(self) -> int:
        return llama_cpp.llama_vocab_bos(self._vocab)

    def tokenize(self, text: str) -> list[int]:
        """Tokens for a rendered prompt: special tokens parsed, BOS added once."""
        add_bos = self.add_bos and not (self.bos_token and text.startswith(self.bos_token))
        return self.tokenize_raw(text, add_special=add_bos, parse_special=True)

    def tokenize_raw(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """llama_tokenize as it is: the vocabulary's BOS/EOS added or not, special tokens parsed or not."""
        data = text.encode("utf-8")
        capacity = len(data) + 16
        tokens = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), tokens, capacity, add_special, parse_special)
        if n < 0:
            raise EngineError(f"tokenization failed ({n})")
        return list(tokens[:n])

    def token_piece(self, token: int, special: bool = False) -> bytes:
        """The bytes a generated token stands for (part of a UTF-8 character, possibly); control
        tokens are empty unless `special` (then their text, e.g. "<|im_end|>")."""
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece_buf, len(self._piece_buf), 0, special)
        if n < 0:
            self._piece_buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece_buf, len(self._piece_buf), 0, special)
        return self._piece_buf.raw[:n]

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    # -- sampling --------------------------------------------------------------

    def new_sampler(self, sampling: SamplingParams, history: list[int]):
        """A sampler chain for `sampling` that has seen the prompt's last tokens (the repeat
        penalty's window); free it with `free_sampler`."""
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        for sampler in self._sampler_stages(sampling):
            llama_cpp.llama_sampler_chain_add(chain, sampler)
        if sampling.repeat_penalty != 1.0:  # the only stage that looks at history
            for token in history[-REPEAT_PENALTY_LAST_N:]:
                llama_cpp.llama_sampler_accept(chain, token)
        if sampling.grammar:  # first in the chain, after the history (a grammar must not see the prompt)
            from alpaca_chat.engine.grammar import add_grammar_stage
            add_grammar_stage(chain, self._vocab, sampling.grammar)
        return chain

    def _sampler_stages(self, sampling: SamplingParams) -> list:
        stages = []
        if sampling.repeat_penalty != 1.0:
            stages.append(llama_cpp.llama_sampler_init_penalties(self.n_vocab, REPEAT_PENALTY_LAST_N,
                                                                 sampling.repeat_penalty, 0.0, 0.0))
        if sampling.temperature <= 0:
            return stages + [llama_cpp.llama_sampler_init_greedy()]
        if sampling.top_k > 0:
            stages.append(llama_cpp.llama_sampler_init_top_k(sampling.top_k))
        seed = sampling.seed if sampling.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
        return stages + [
            llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1),
            llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1),
            llama_cpp.llama_sampler_init_temp(sampling.temperature),
            llama_cpp.llama_sampler_init_dist(seed),
        ]

    def sample(self, sampler, idx: int) -> int:
        """The next token from the logits at batch index `idx` (-1: the last evaluated)."""
        return llama_cpp.llama_sampler_sample(sampler, self._ctx, idx)

    @staticmethod
    def free_sampler(sampler) -> None:
        llama_cpp.llama_sampler_free(sampler)

    # -- generation ------------------------------------------------------------

    def generate(
        self,
        prompt: str | list[int],
        sampling: SamplingParams,
        *,
        stop_strings: tuple[str, ...] = (),
        cancel: threading.Event | None = None,
    ) -> Generation:
        """Stream the reply to a rendered prompt, reusing the cached prefix."""
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not tokens:
            raise EngineError("the prompt is empty")
        if len(tokens) >= self.n_ctx:
            raise EngineError(f"the prompt is {len(tokens)} tokens; the context holds {self.n_ctx}")
        stats = GenerationStats(prompt_tokens=len(tokens))
        return Generation(self._stream(tokens, sampling, stop_strings, cancel, stats), stats)

    def _stream(self, tokens, sampling, stop_strings, cancel, stats) -> Iterator[str]:
        with self._held(wait=False):
            step = SequenceStep(self, sampling, tokens, stop_strings, stats)
            try:
                yield from self._run(step, tokens, cancel)
            finally:
                step.close()

    def _run(self, step: SequenceStep, tokens: list[int], cancel) -> Iterator[str]:
        cached = step.stats.cached_tokens = self._reuse_prefix(tokens)
        self._decode(tokens[cached:], cached)
        step.prompt_evaluated(len(tokens) - cached)
        pos = len(tokens)
        while not step.finished:
            if cancel is not None and cancel.is_set():
                text = step.end("cancelled")
            elif pos >= self.n_ctx:
                text = step.end("context_full")
            else:
                text, token = step.advance(-1)
                if token is not None:
                    self._decode_one(token, pos)
                    pos += 1
            if text:
                yield text

    def generate_parallel(
        self,
        next_request: Callable[[], ParallelRequest | None],
        *,
        cancel: threading.Event | None = None,
    ) -> Iterator[ParallelResult]:
        """Run requests up to `n_seq_max` at a time, yielding each result as it completes.

        `next_request` is called whenever a sequence is free; None means no more for
        now. The KV cache is cleared before and after (the chat's cached prefix is lost).
        """
        with self._held(wait=False):
            self.reset()
            try:
                yield from ParallelRun(self, next_request, cancel).results()
            finally:
                self.reset()

    # -- evaluation --------------------------------------------------------------

    def sequence_logits(self, tokens: list[int], start: int = 0):
        """float32 [len(tokens) - start, n_vocab]: next-token logits after each prefix from `start` on,
        the whole sequence in one batch (n_batch must hold it). Only the rows asked for are computed:
        the output projection over the vocabulary is a large part of the cost. Clears the cache."""
        import numpy as np

        if not 0 <= start < len(tokens) <= min(self.n_ctx, self.n_batch):
            raise EngineError(f"cannot evaluate {len(tokens)} tokens in a {self.n_ctx}-token context")
        with self._held(wait=False):
            self.reset()
            for i, token in enumerate(tokens):
                self._put(i, token, i, 0, i >= start)
            self._run_batch(len(tokens), f"evaluate {self.model_path.name}")
            n_rows = len(tokens) - start
            pointer = ctypes.cast(llama_cpp.llama_get_logits(self._ctx), ctypes.POINTER(ctypes.c_float))
            rows = np.ctypeslib.as_array(pointer, shape=(n_rows * self.n_vocab,)).reshape(n_rows, self.n_vocab).copy()
            self.reset()
        return rows

    def logits_at(self, idx: int) -> list[float]:
        """The logits at batch index `idx` of the last evaluated batch (-1: its last row)."""
        row = llama_cpp.llama_get_logits_ith(self._ctx, idx)
        return row[: self.n_vocab]

    def token_logprob(self, idx: int, token: int, top_n: int = 0) -> TokenLogprob:
        """`token`'s log-probability at batch index `idx` and the `top_n` likeliest (engine.logprobs)."""
        row = llama_cpp.llama_get_logits_ith(self._ctx, idx)
        return token_logprob(row, self.n_vocab, token, top_n, lambda t: self.token_piece(t, special=True))

    def decode_segments(self, segments: list[Segment], on_last: Callable[[Segment, int], None]) -> None:
        """Evaluate each segment's tokens in its own sequence, packing segments into shared
        batches; `on_last(segment, batch index)` runs while that segment's last logits are
        readable (before the next llama_decode overwrites them)."""
        pending: list[tuple[Segment, int]] = []
        n = 0
        for seg in segments:
            for offset, token in enumerate(seg.tokens):
                if n == self.n_batch:
                    self._decode_pending(n, pending, on_last)
                    pending, n = [], 0
                last = offset == len(seg.tokens) - 1
                self._put(n, token, seg.start_pos + offset, seg.seq, last)
                if last:
                    pending.append((seg, n))
                n += 1
        if n:
            self._decode_pending(n, pending, on_last)

    def _decode_pending(self, n_tokens: int, pending, on_last) -> None:
        self._run_batch(n_tokens, "evaluate a batch")
        for seg, idx in pending:
            on_last(seg, idx)

    def drop_sequence(self, seq: int) -> None:
        """Forget a parallel sequence's cells in the KV cache."""
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx), seq, -1, -1)

    def trim_sequence(self, seq: int, keep: int) -> bool:
        """Keep a parallel sequence's first `keep` cells; False if llama.cpp cannot (then it is dropped whole)."""
        if llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx), seq, keep, -1):
            return True
        self.drop_sequence(seq)
        return False

    def sequence_state(self, seq: int) -> memoryview:
        """A copy of a parallel sequence's KV state (sequence_state.py; the batching thread's)."""
        return _sequence_state.sequence_state(self, seq)

    def load_sequence(self, seq: int, data, tokens: list[int]) -> None:
        """Load a `sequence_state` into sequence `seq`, which then holds `tokens` (validated data only)."""
        _sequence_state.load_sequence(self, seq, data, tokens)

    def _put(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch = self._batch
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits

    def _run_batch(self, n_tokens: int, doing: str) -> None:
        self._batch.n_tokens = n_tokens
        status = llama_cpp.llama_decode(self._ctx, self._batch)
        if status != 0:
            raise EngineError(f"llama.cpp failed to {doing} (llama_decode returned {status})")

    def _decode(self, tokens: list[int], start_pos: int) -> None:
        """Evaluate tokens at positions start_pos.. in sequence 0, logits only for the last one."""
        for offset in range(0, len(tokens), self.n_batch):
            chunk = tokens[offset : offset + self.n_batch]
            last = offset + len(chunk) == len(tokens)
            for i, token in enumerate(chunk):
                self._put(i, token, start_pos + offset + i, 0, last and i == len(chunk) - 1)
            self._run_batch(len(chunk), "evaluate the prompt")
            self._cached.extend(chunk)

    def _decode_one(self, token: int, pos: int) -> None:
        self._put(0, token, pos, 0, True)
        self._run_batch(1, "generate")
        self._cached.append(token)

    # -- the KV cache (sequence 0) and its state (instant resume) ------------------

    def _reuse_prefix(self, tokens: list[int]) -> int:
        """Keep the KV cache for the common prefix; return how many tokens are reused."""
        # At least one token must be evaluated to get logits for the next sample.
        common = min(common_prefix(tokens, self._cached), len(tokens) - 1)
        memory = llama_cpp.llama_get_memory(self._ctx)
        if not llama_cpp.llama_memory_seq_rm(memory, 0, common, -1):
            llama_cpp.llama_memory_clear(memory, True)
            common = 0
        del self._cached[common:]
        return common

    def reset(self) -> None:
        """Forget the KV cache (e.g. to measure a cold prompt)."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        self._cached.clear()

    @property
    def cached_tokens(self) -> list[int]:
        """The tokens whose keys/values the KV cache holds (sequence 0), in order."""
        return list(self._cached)

    def common_prefix(self, tokens: list[int]) -> int:
        """How many leading tokens of `tokens` the KV cache already holds."""
        return common_prefix(tokens, self._cached)

    def state(self) -> tuple[bytes, list[int]]:
        """Sequence 0's KV state (a copy of its own) and the tokens it holds."""
        with self.snapshot() as snap:
            return bytes(snap.data), snap.tokens

    def snapshot(self) -> StateSnapshot:
        """Sequence 0's KV state (llama_state_seq_get_data) in a buffer of its own.

        The engine is free again as soon as this returns: only the copy out of llama.cpp holds it
        (waiting for a running generation to finish first). The buffer stays the snapshot's until
        it is released (`with`, or `release()`, from any thread), so a file can be written from it
        while the engine generates; a second snapshot waits for that. Released, the buffer is freed:
        for a large model a state is gigabytes, too much to keep between replies.
        """
        self._state_lock.acquire()  # before the engine: a snapshot never waits on the engine holding this
        try:
            with self._held(wait=True):
                size = llama_cpp.llama_state_seq_get_size(self._ctx, 0)
                self._state_buf = (ctypes.c_uint8 * size)()
                written = llama_cpp.llama_state_seq_get_data(self._ctx, self._state_buf, size, 0)
                if written != size:
                    raise EngineError(f"llama.cpp wrote {written} of {size} bytes of KV state")
                tokens = list(self._cached)
            return StateSnapshot(memoryview(self._state_buf).cast("B")[:size].toreadonly(), tokens,
                                 self._release_state_buffer, adapter_key=self.adapter_key)
        except BaseException:
            self._state_lock.release()
            raise

    def _release_state_buffer(self) -> None:
        self._state_buf = None
        self._state_lock.release()

    def restore(self, data, tokens: list[int]) -> None:
        """Load a state from `snapshot()` into sequence 0; the cache then holds `tokens`.

        `data` is any bytes-like object; a writable one (kvcache reads states into a bytearray) is
        handed to llama.cpp without a copy. The caller has validated it (kvcache.py); on failure
        the cache is left empty.
        """
        if not tokens or len(tokens) >= self.n_ctx:
            raise EngineError(f"a KV state of {len(tokens)} tokens does not fit a {self.n_ctx}-token context")
        data = memoryview(data).cast("B")
        with self._held(wait=True):
            self.reset()
            try:
                buf = (ctypes.c_uint8 * len(data)).from_buffer(data)
            except TypeError:  # read-only (bytes)
                buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
            read = llama_cpp.llama_state_seq_set_data(self._ctx, buf, len(data), 0)
            if read != len(data):
                self.reset()
                raise EngineError(f"llama.cpp refused the KV state ({read} of {len(data)} bytes read)")
            self._cached = list(tokens)
