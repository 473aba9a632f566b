"""One parallel sequence's KV state, copied out of llama.cpp and back (the server's prompt cache).

`Engine.sequence_state` / `Engine.load_sequence` call these; they are the per-sequence kin of
`Engine.snapshot` / `Engine.restore` (sequence 0, the chat's), without the engine's lock: the
one thread that runs a continuous batch calls them between its decode steps.
"""

import ctypes

import llama_cpp

from alpaca_chat.errors import EngineError


def sequence_state(engine, seq: int) -> memoryview:
    """A copy of sequence `seq`'s KV state (llama_state_seq_get_data) in a buffer of its own."""
    size = llama_cpp.llama_state_seq_get_size(engine._ctx, seq)
    if size <= 0:
        raise EngineError(f"sequence {seq} has no KV state to copy")
    buf = (ctypes.c_uint8 * size)()
    written = llama_cpp.llama_state_seq_get_data(engine._ctx, buf, size, seq)
    if written != size:
        raise EngineError(f"llama.cpp wrote {written} of {size} bytes of sequence {seq}'s KV state")
    return memoryview(buf).cast("B").toreadonly()


def load_sequence(engine, seq: int, data, tokens: list[int]) -> None:
    """Load a state from `sequence_state` (of any sequence) into sequence `seq`, which then holds
    `tokens`. The caller has validated `data` (kvcache.py); on failure the sequence is left empty."""
    if not tokens or len(tokens) >= engine.n_ctx:
        raise EngineError(f"a KV state of {len(tokens)} tokens does not fit a {engine.n_ctx}-token context")
    data = memoryview(data).cast("B")
    engine.drop_sequence(seq)
    try:
        buf = (ctypes.c_uint8 * len(data)).from_buffer(data)
    except TypeError:  # read-only (bytes)
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    read = llama_cpp.llama_state_seq_set_data(engine._ctx, buf, len(data), seq)
    if read != len(data):
        engine.drop_sequence(seq)
        raise EngineError(f"llama.cpp refused the KV state ({read} of {len(data)} bytes read)")
