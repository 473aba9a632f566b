"""The only module that imports llama_cpp: load a GGUF, tokenize, stream tokens (parallel.py
schedules parallel sequences through it).

It drives llama.cpp through llama-cpp-python's low-level bindings (llama_decode
and llama.cpp's native sampler chain) rather than `Llama.create_completion`:
the high-level path does per-token work in Python that costs ~15% of
generation speed on small models.
"""

import codecs
import contextlib
import ctypes
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

# llama.cpp's threads meet at an OpenMP barrier many times per token, and by
# default libgomp waits there by spinning 300,000 times before it sleeps. That
# buys nothing on an idle machine, but when anything else wants the cores (a
# browser, a fine-tune) the spinning threads starve the ones they wait for:
# beside a 2-thread torch job on 2 cores, 1-3 tok/s instead of 35-40 with 1,000
# spins. libgomp reads this as llama_cpp loads it: it must be set before.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import llama_cpp  # noqa: E402 - after GOMP_SPINCOUNT

from alpaca_chat.config import KV_TYPES
from alpaca_chat.conversation import GenerationStats, SamplingParams, StopStringFilter
from alpaca_chat.errors import EngineError, UsageError
from alpaca_chat.parallel import ParallelRequest, ParallelResult, ParallelRun, Segment  # noqa: F401 - re-exported

# How many recent tokens the repeat penalty looks at (llama.cpp's default).
REPEAT_PENALTY_LAST_N = 64
DEFAULT_N_CTX = 4096
DEFAULT_N_BATCH = 512
# The KV cache's element type per `kv_type` (config.KV_TYPES): q8_0 halves the cache and its saved states.
_GGML_KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}
# Flash attention per KV cache type ("f32": the engine's exact mode). llama.cpp's default, "auto", turns
# it on for f16 on a CPU, and its CPU kernel is slow where a chat spends its time: a few new tokens on top
# of a long cache. Measured on the 2-core machine, bundled model: 20 new tokens after 2,446 cached 160 ms
# with it off against 732 ms on (a follow-up turn's, or a resumed one's, time to first token); one
# generated token at 2,466 in the context 28.7 ms against 51.5; generation 45-49 tok/s against 31-32 at
# 1,000 tokens of context, 47-53 against 40-42 at 500. It wins only on a short context (60 tokens:
# 73 tok/s against 60) and on a cold prompt (evaluated about 15% faster). f16 runs without it.
# llama.cpp reads a quantized V cache only inside its flash-attention kernel: q8_0 needs it on.
# For comparisons at F32 precision (the converter's tests) it is off: its CPU kernel rounds to F16.
_FLASH_ATTN = {
    "f16": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
    "q8_0": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "f32": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


def flash_attention(kv_type: str = "f16", *, parallel: bool = False) -> int:
    """llama.cpp's `flash_attn_type` for a KV cache type: every context the engine makes uses it (and
    benchmarks/bench_engine.py's reference loop, so that both run the same attention kernel).

    A context of parallel sequences (the self-instruct teacher) keeps it on with f16 too: with it a
    sequence's logits do not depend on where its rows lie in a shared batch. Without it llama.cpp's
    f16 matrix kernels round a row by its offset in the batch (KL 0.00075 measured at one offset),
    enough to change a greedy reply after a dozen tokens, so K requests at once would not give what
    each gives alone."""
    if parallel and kv_type == "f16":
        return llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    return _FLASH_ATTN[kv_type]

_GGML_LOG_LEVEL_ERROR = 4  # ggml_log_level: NONE, DEBUG, INFO, WARN, ERROR, CONT
_log_state = {"verbose": False, "callback": None, "listener": None}


def _on_llama_log(level: int, text: bytes, _user_data) -> None:
    """The one llama.cpp log callback of the process (the converter listens through it too)."""
    message = text.decode("utf-8", errors="replace")
    if _log_state["verbose"]:
        sys.stderr.write(message)
        sys.stderr.flush()
    listener = _log_state["listener"]
    if listener is not None:
        listener(level, message)


def configure_logging(verbose: bool | None) -> None:
    """Route llama.cpp's log through us: silent unless verbose (None: leave verbosity as it is).

    A log callback (instead of redirecting file descriptors, as llama-cpp-python's
    verbose=False does) never swallows the output of a running full-screen app.
    """
    if verbose is not None:
        _log_state["verbose"] = verbose
    if _log_state["callback"] is None:
        # Keep a reference: ctypes callbacks are freed with their Python object.
        _log_state["callback"] = llama_cpp.llama_log_callback(_on_llama_log)
    llama_cpp.llama_log_set(_log_state["callback"], ctypes.c_void_p(0))


@contextlib.contextmanager
def log_listener(listener: Callable[[int, str], None]) -> Iterator[None]:
    """Also pass each llama.cpp log line to `listener(level, text)` (e.g. a quantizer's failure reason)."""
    configure_logging(None)
    previous, _log_state["listener"] = _log_state["listener"], listener
    try:
        yield
    finally:
        _log_state["listener"] = previous


@contextlib.contextmanager
def _logged_errors() -> Iterator[list[str]]:
    """The error lines llama.cpp logs inside the block (why a call returned NULL)."""
    errors: list[str] = []
    outer = _log_state["listener"]

    def listen(level: int, text: str) -> None:
        if outer is not None:
            outer(level, text)
        if level == _GGML_LOG_LEVEL_ERROR and text.strip():
            errors.append(text.strip())

    with log_listener(listen):
        yield errors


def model_load_params():
    """llama.cpp's model parameters for CPU inference: every load goes through here.

    Where llama.cpp was built with AMX kernels and the CPU has AMX, its AMX
    weight layout is refused (`use_extra_bufts` off): ggml's AMX matmul
    segfaults on some of these machines, inside llama_decode, on the bundled
    model's very first prompt (llama.cpp issue 20824, closed unfixed). The
    plain AVX-512 kernels run instead; the CPU repack layouts go with it.
    """
    params = llama_cpp.llama_model_default_params()
    params.use_mmap = True
    params.n_gpu_layers = 0
    if _amx_kernels_active():
        params.use_extra_bufts = False
    return params


def _amx_kernels_active() -> bool:
    return b"AMX_INT8 = 1" in (llama_cpp.llama_print_system_info() or b"")


def physical_cores() -> int:
    """Physical cores usable by this process: llama.cpp slows down on hyperthreads."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        cores = set()
        physical_id = core_id = None
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    physical_id = value.strip()
                elif key == "core id":
                    core_id = value.strip()
                    cores.add((physical_id, core_id))
        if cores:
            return max(1, min(len(cores), usable))
    except OSError:
        pass
    return max(1, usable)


class Generation:
    """An iterator of text deltas; `stats` is complete once it is exhausted."""

    def __init__(self, deltas: Iterator[str], stats: GenerationStats):
        self._deltas = deltas
        self.stats = stats
        self.text = ""

    def __iter__(self):
        return self

    def __next__(self) -> str:
        delta = next(self._deltas)
        self.text += delta
        return delta

    def close(self) -> None:
        """Stop early (e.g. on KeyboardInterrupt) and leave the engine consistent."""
        self._deltas.close()


class Engine:
    """One loaded model and one context. Not thread-safe: one generation at a time."""

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
    ):
        if kv_type not in KV_TYPES:
            raise UsageError(f"kv_type must be {' or '.join(KV_TYPES)}, not {kv_type!r}")
        configure_logging(verbose)
        llama_cpp.llama_backend_init()
        self.model_path = Path(model_path)
        self.n_threads = n_threads or physical_cores()
        self._model = self._load_model()
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        n_ctx_train = llama_cpp.llama_model_n_ctx_train(self._model)
        self.n_ctx_train = n_ctx_train
        self.n_batch = n_batch
        self.n_seq_max = max(1, n_seq_max)
        self.exact = exact
        # The KV cache's element type; it is part of a saved state's key, so states of another type are ignored.
        self.kv_type = "f32" if exact else kv_type
        try:
            self._ctx = self._new_context(n_ctx or min(DEFAULT_N_CTX, n_ctx_train))
        except EngineError:
            llama_cpp.llama_model_free(self._model)  # e.g. a /model switch that failed: no leak
            raise
        self.n_ctx = llama_cpp.llama_n_ctx(self._ctx)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        # Tokens whose keys/values are in the KV cache, in order: the shared prefix
        # of the next prompt is not evaluated again.
        self._cached: list[int] = []
        self._piece_buf = ctypes.create_string_buffer(256)
        self._lock = threading.Lock()
        # A KV state snapshot's buffer, held by one snapshot at a time (see snapshot()).
        self._state_buf = None
        self._state_lock = threading.Lock()
        self.metadata = self._read_metadata()

    # -- loading -----------------------------------------------------------

    def _load_model(self):
        model = llama_cpp.llama_model_load_from_file(str(self.model_path).encode(), model_load_params())
        if not model:
            raise EngineError(f"llama.cpp could not load {self.model_path} (run with --verbose for its log)")
        return model

    def _new_context(self, n_ctx: int):
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = self.n_batch
        params.n_ubatch = self.n_batch
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads
        params.no_perf = True
        if self.n_seq_max > 1:
            # Parallel sequences share one pool of n_ctx cells (instead of n_ctx / n_seq_max
            # each), so a long request can use what short ones leave free.
            params.n_seq_max = self.n_seq_max
            params.kv_unified = True
        self._set_kv_cache_type(params)
        with _logged_errors() as errors:
            ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not ctx:
            why = f": {errors[-1]}" if errors else " (run with --verbose for its log)"
            raise EngineError(
                f"llama.cpp could not create a {n_ctx}-token context with a {self.kv_type} KV cache"
                f" for {self.model_path.name}{why}"
            )
        return ctx

    def _set_kv_cache_type(self, params) -> None:
        """The KV cache's element type and, with it, flash attention (see _FLASH_ATTN: off for f16)."""
        if self.exact:
            # For comparisons at F32 precision (the converter's tests): llama.cpp's default KV
            # cache and its CPU flash-attention kernel both round to F16.
            params.type_k = params.type_v = llama_cpp.GGML_TYPE_F32
        else:
            params.type_k = params.type_v = _GGML_KV_TYPES[self.kv_type]
        params.flash_attn_type = flash_attention(self.kv_type, parallel=self.n_seq_max > 1)

    def _read_metadata(self) -> dict[str, str]:
        buf = ctypes.create_string_buffer(4096)
        meta = {}
        for i in range(llama_cpp.llama_model_meta_count(self._model)):
            if llama_cpp.llama_model_meta_key_by_index(self._model, i, buf, len(buf)) < 0:
                continue
            key = buf.value.decode("utf-8", errors="replace")
            if llama_cpp.llama_model_meta_val_str_by_index(self._model, i, buf, len(buf)) < 0:
                continue
            meta[key] = buf.value.decode("utf-8", errors="replace")
        return meta

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            self._ctx = self._model = None
        self._state_buf = None  # a snapshot still held keeps it alive through its memoryview

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- model facts -------------------------------------------------------

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

    def tokenize(self, text: str) -> list[int]:
        """Tokens for a rendered prompt: special tokens parsed, BOS added once."""
        add_bos = llama_cpp.llama_vocab_get_add_bos(self._vocab) and not (
            self.bos_token and text.startswith(self.bos_token)
        )
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

    @property
    def add_bos(self) -> bool:
        return bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))

    @property
    def bos_id(self) -> int:
        return llama_cpp.llama_vocab_bos(self._vocab)

    def sequence_logits(self, tokens: list[int], start: int = 0):
        """float32 [len(tokens) - start, n_vocab]: next-token logits after each prefix from `start` on,
        the whole sequence in one batch (n_batch must hold it). Only the rows asked for are computed:
        the output projection over the vocabulary is a large part of the cost. Clears the cache."""
        import numpy as np

        if not 0 <= start < len(tokens) <= min(self.n_ctx, self.n_batch):
            raise EngineError(f"cannot evaluate {len(tokens)} tokens in a {self.n_ctx}-token context")
        with self._exclusive():
            self.reset()
            batch = self._batch
            batch.n_tokens = len(tokens)
            for i, token in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = i >= start
            status = llama_cpp.llama_decode(self._ctx, batch)
            if status != 0:
                raise EngineError(f"llama.cpp failed to evaluate {self.model_path.name} (llama_decode returned {status})")
            n_rows = len(tokens) - start
            pointer = ctypes.cast(llama_cpp.llama_get_logits(self._ctx), ctypes.POINTER(ctypes.c_float))
            rows = np.ctypeslib.as_array(pointer, shape=(n_rows * self.n_vocab,)).reshape(n_rows, self.n_vocab).copy()
            self.reset()
        return rows

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def _piece(self, token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        if n < 0:
            self._piece_buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        return self._piece_buf.raw[:n]

    # -- evaluation --------------------------------------------------------

    def _decode(self, tokens: list[int], start_pos: int) -> None:
        """Evaluate tokens at positions start_pos.., logits only for the last one."""
        batch = self._batch
        for offset in range(0, len(tokens), self.n_batch):
            chunk = tokens[offset : offset + self.n_batch]
            batch.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = start_pos + offset + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = False
            batch.logits[len(chunk) - 1] = offset + len(chunk) == len(tokens)
            status = llama_cpp.llama_decode(self._ctx, batch)
            if status != 0:
                raise EngineError(f"llama.cpp failed to evaluate the prompt (llama_decode returned {status})")
            self._cached.extend(chunk)

    def _decode_one(self, token: int, pos: int) -> None:
        batch = self._batch
        batch.n_tokens = 1
        batch.token[0] = token
        batch.pos[0] = pos
        batch.n_seq_id[0] = 1
        batch.seq_id[0][0] = 0
        batch.logits[0] = True
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise EngineError(f"llama.cpp failed while generating (llama_decode returned {status})")
        self._cached.append(token)

    def _reuse_prefix(self, tokens: list[int]) -> int:
        """Keep the KV cache for the common prefix; return how many tokens are reused."""
        common = 0
        limit = min(len(tokens), len(self._cached))
        while common < limit and tokens[common] == self._cached[common]:
            common += 1
        # At least one token must be evaluated to get logits for the next sample.
        common = min(common, len(tokens) - 1)
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

    # -- KV state (instant resume) --------------------------------------------

    @property
    def cached_tokens(self) -> list[int]:
        """The tokens whose keys/values the KV cache holds (sequence 0), in order."""
        return list(self._cached)

    def common_prefix(self, tokens: list[int]) -> int:
        """How many leading tokens of `tokens` the KV cache already holds."""
        n, limit = 0, min(len(tokens), len(self._cached))
        while n < limit and tokens[n] == self._cached[n]:
            n += 1
        return n

    def state(self) -> tuple[bytes, list[int]]:
        """Sequence 0's KV state (a copy of its own) and the tokens it holds."""
        with self.snapshot() as snap:
            return bytes(snap.data), snap.tokens

    def snapshot(self) -> "StateSnapshot":
        """Sequence 0's KV state (llama_state_seq_get_data) in a buffer of its own.

        The engine is free again as soon as this returns: only the copy out of llama.cpp holds it
        (waiting for a running generation to finish first). The buffer stays the snapshot's until
        it is released (`with`, or `release()`, from any thread), so a file can be written from it
        while the engine generates; a second snapshot waits for that. Released, the buffer is freed:
        for a large model a state is gigabytes, too much to keep between replies.
        """
        self._state_lock.acquire()  # before the engine: a snapshot never waits on the engine holding this
        try:
            with self._exclusive_wait():
                size = llama_cpp.llama_state_seq_get_size(self._ctx, 0)
                self._state_buf = (ctypes.c_uint8 * size)()
                written = llama_cpp.llama_state_seq_get_data(self._ctx, self._state_buf, size, 0)
                if written != size:
                    raise EngineError(f"llama.cpp wrote {written} of {size} bytes of KV state")
                tokens = list(self._cached)
            return StateSnapshot(memoryview(self._state_buf).cast("B")[:size].toreadonly(), tokens,
                                 self._release_state_buffer)
        except BaseException:
            self._state_lock.release()
            raise

    def _release_state_buffer(self) -> None:
        self._state_buf = None
        self._state_lock.release()

    def restore(self, data, tokens: list[int]) -> None:
        """Load a state from `state()` or `snapshot()` into sequence 0; the cache then holds `tokens`.

        `data` is any bytes-like object; a writable one (kvcache reads states into a bytearray) is
        handed to llama.cpp without a copy. The caller has validated it (kvcache.py); on failure
        the cache is left empty.
        """
        if not tokens or len(tokens) >= self.n_ctx:
            raise EngineError(f"a KV state of {len(tokens)} tokens does not fit a {self.n_ctx}-token context")
        data = memoryview(data).cast("B")
        with self._exclusive_wait():
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

    def _exclusive_wait(self):
        """Hold the engine, waiting for a running generation to finish (state copies are short)."""
        engine = self

        class _Held:
            def __enter__(self):
                engine._lock.acquire()

            def __exit__(self, *exc):
                engine._lock.release()

        return _Held()

    def _sampler(self, sampling: SamplingParams):
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda s: llama_cpp.llama_sampler_chain_add(chain, s)  # noqa: E731
        if sampling.repeat_penalty != 1.0:
            add(
                llama_cpp.llama_sampler_init_penalties(
                    self.n_vocab, REPEAT_PENALTY_LAST_N, sampling.repeat_penalty, 0.0, 0.0
                )
            )
        if sampling.temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
            return chain
        if sampling.top_k > 0:
            add(llama_cpp.llama_sampler_init_top_k(sampling.top_k))
        add(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
        add(llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1))
        add(llama_cpp.llama_sampler_init_temp(sampling.temperature))
        seed = sampling.seed if sampling.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED
        add(llama_cpp.llama_sampler_init_dist(seed))
        return chain

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

    def new_sampler(self, sampling: SamplingParams, history: list[int]):
        """A sampler chain for `sampling` that has seen the prompt's last tokens (the repeat
        penalty's window); free it with `free_sampler`."""
        sampler = self._sampler(sampling)
        for token in history[-REPEAT_PENALTY_LAST_N:]:
            llama_cpp.llama_sampler_accept(sampler, token)
        return sampler

    def sample(self, sampler, idx: int) -> int:
        """The next token from the logits at batch index `idx` (-1: the last evaluated)."""
        return llama_cpp.llama_sampler_sample(sampler, self._ctx, idx)

    @staticmethod
    def free_sampler(sampler) -> None:
        llama_cpp.llama_sampler_free(sampler)

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def drop_sequence(self, seq: int) -> None:
        """Forget a parallel sequence's cells in the KV cache."""
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx), seq, -1, -1)

    def _stream(self, tokens, sampling, stop_strings, cancel, stats) -> Iterator[str]:
        if not self._lock.acquire(blocking=False):
            raise EngineError("the engine is already generating")
        sampler = self.new_sampler(sampling, tokens)
        try:
            yield from self._run(tokens, sampling, stop_strings, cancel, stats, sampler)
        finally:
            llama_cpp.llama_sampler_free(sampler)
            self._lock.release()

    def _run(self, tokens, sampling, stop_strings, cancel, stats, sampler) -> Iterator[str]:
        started = time.perf_counter()
        stats.cached_tokens = self._reuse_prefix(tokens)
        self._decode(tokens[stats.cached_tokens :], stats.cached_tokens)
        prompt_done = time.perf_counter()
        evaluated = len(tokens) - stats.cached_tokens
        stats.prompt_tokens_per_s = evaluated / max(prompt_done - started, 1e-9)

        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopStringFilter(stop_strings)
        stats.stop_reason = "length"
        pos = len(tokens)
        while stats.generated_tokens < sampling.max_tokens:
            if cancel is not None and cancel.is_set():
                stats.stop_reason = "cancelled"
                break
            token = llama_cpp.llama_sampler_sample(sampler, self._ctx, -1)
            if stats.generated_tokens == 0:
                stats.time_to_first_token_s = time.perf_counter() - started
            if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                stats.stop_reason = "eos"
                break
            stats.generated_tokens += 1
            text = stops.feed(utf8.decode(self._piece(token)))
            if text:
                yield text
            if stops.stopped:
                stats.stop_reason = "stop_string"
                break
            if pos >= self.n_ctx:
                stats.stop_reason = "context_full"
                break
            self._decode_one(token, pos)
            pos += 1
        tail = stops.feed(utf8.decode(b"", final=True)) + stops.flush()
        if tail:
            yield tail
        elapsed = time.perf_counter() - prompt_done
        stats.generation_tokens_per_s = stats.generated_tokens / max(elapsed, 1e-9)

    # -- parallel sequences ----------------------------------------------------------
    #
    # Several independent requests decode together: each has its own sequence id in
    # the KV cache and its own sampler, and one llama_decode evaluates a token of
    # every running request. On a CPU a batch of K tokens costs far less than K
    # single-token steps (the weights are read once per batch).

    def next_token_logits(self, prompts: list[list[int]]) -> list[list[float]]:
        """Next-token logits after each prompt, all prompts evaluated in shared batches.

        Each prompt is its own sequence, so none can see another: the result must
        match evaluating each prompt alone (up to batched-kernel rounding).
        """
        if len(prompts) > self.n_seq_max:
            raise EngineError(f"{len(prompts)} prompts, but the context holds {self.n_seq_max} sequences")
        if sum(len(p) for p in prompts) > self.n_ctx:
            raise EngineError(f"the prompts are {sum(len(p) for p in prompts)} tokens; the context holds {self.n_ctx}")
        with self._exclusive():
            self.reset()
            logits: dict[int, list[float]] = {}
            segments = [Segment(seq, list(tokens), 0) for seq, tokens in enumerate(prompts)]
            self._decode_segments(segments, lambda seg, idx: logits.__setitem__(seg.seq, self._logits_at(idx)))
            self.reset()
        return [logits[seq] for seq in range(len(prompts))]

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
        with self._exclusive():
            self.reset()
            try:
                yield from ParallelRun(self, next_request, cancel).results()
            finally:
                self.reset()

    def _exclusive(self):
        engine = self

        class _Held:
            def __enter__(self):
                if not engine._lock.acquire(blocking=False):
                    raise EngineError("the engine is already generating")

            def __exit__(self, *exc):
                engine._lock.release()

        return _Held()

    def _logits_at(self, idx: int) -> list[float]:
        row = llama_cpp.llama_get_logits_ith(self._ctx, idx)
        return row[: self.n_vocab]

    def _decode_segments(self, segments: list[Segment], on_last: Callable[[Segment, int], None]) -> None:
        """Evaluate each segment's tokens in its own sequence, packing segments into shared
        batches; `on_last(segment, batch index)` runs while that segment's last logits are
        readable (before the next llama_decode overwrites them)."""
        batch = self._batch
        pending: list[tuple[Segment, int]] = []
        n = 0
        for seg in segments:
            for offset, token in enumerate(seg.tokens):
                if n == self.n_batch:
                    self._decode_batch(n, pending, on_last)
                    pending, n = [], 0
                batch.token[n] = token
                batch.pos[n] = seg.start_pos + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seg.seq
                last = offset == len(seg.tokens) - 1
                batch.logits[n] = last
                if last:
                    pending.append((seg, n))
                n += 1
        if n:
            self._decode_batch(n, pending, on_last)

    def _decode_batch(self, n_tokens: int, pending, on_last) -> None:
        self._batch.n_tokens = n_tokens
        status = llama_cpp.llama_decode(self._ctx, self._batch)
        if status != 0:
            raise EngineError(f"llama.cpp failed to evaluate a batch (llama_decode returned {status})")
        for seg, idx in pending:
            on_last(seg, idx)


class StateSnapshot:
    """A KV state copied out of llama.cpp (`Engine.snapshot()`): `data` (a read-only memoryview of the
    engine's state buffer) and the `tokens` it holds, valid until `release()`; a context manager."""

    def __init__(self, data: memoryview, tokens: list[int], release: Callable[[], None]):
        self.data, self.tokens = data, tokens
        self._release: Callable[[], None] | None = release
        self._release_lock = threading.Lock()

    def release(self) -> None:
        """Hand the buffer back to the engine (idempotent); `data` is unusable afterwards."""
        with self._release_lock:
            release, self._release = self._release, None
        if release is None:
            return
        try:
            self.data.release()  # a use after this raises instead of reading the next state
        except BufferError:
            pass  # something still exports it (e.g. numpy): that is its caller's business
        release()

    def __enter__(self) -> "StateSnapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
