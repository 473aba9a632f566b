"""The one place that builds a llama.cpp context: its size, threads, KV cache type and attention kernel."""

import llama_cpp

from alpaca_chat.engine.llama_log import logged_errors
from alpaca_chat.errors import EngineError

# The KV cache's element type per `kv_type` (config.KV_TYPES): q8_0 halves the cache and its saved states.
_GGML_KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0, "f32": llama_cpp.GGML_TYPE_F32}
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


def new_context(model, *, n_ctx: int, n_batch: int, n_threads: int, n_seq_max: int, kv_type: str, label: str,
                eval_callback=None):
    """A context on `model`; `kv_type` is f16, q8_0 or f32 (exact: F32 cache, no flash attention).

    `eval_callback` (a llama_cpp.ggml_backend_sched_eval_callback, kept alive by the caller) sees every
    node of the compute graph: the converter's importance matrix reads the activations through it."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = params.n_ubatch = n_batch
    params.n_threads = params.n_threads_batch = n_threads
    params.no_perf = True
    if n_seq_max > 1:
        # Parallel sequences share one pool of n_ctx cells (instead of n_ctx / n_seq_max
        # each), so a long request can use what short ones leave free.
        params.n_seq_max = n_seq_max
        params.kv_unified = True
    params.type_k = params.type_v = _GGML_KV_TYPES[kv_type]
    params.flash_attn_type = flash_attention(kv_type, parallel=n_seq_max > 1)
    if eval_callback is not None:
        params.cb_eval = eval_callback
        params.cb_eval_user_data = None
    with logged_errors() as errors:
        ctx = llama_cpp.llama_init_from_model(model, params)
    if not ctx:
        why = f": {errors[-1]}" if errors else " (run with --verbose for its log)"
        raise EngineError(f"llama.cpp could not create a {n_ctx}-token context with a {kv_type} KV cache for {label}{why}")
    return ctx
