"""Log-probabilities of generated tokens (the API's `logprobs`): from a row of raw logits, the
chosen token's log-probability and the most likely alternatives. The model's own distribution,
before temperature, top-k/p or a grammar reshape it, as OpenAI and llama-server report it."""

from dataclasses import dataclass

# OpenAI's ceiling for top_logprobs.
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its id, its bytes, its log-probability, and the `top` alternatives
    (token id, bytes, log-probability), most likely first."""

    token: int
    piece: bytes
    logprob: float
    top: tuple[tuple[int, bytes, float], ...] = ()


def log_softmax_pick(logits, token: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
    """`token`'s log-probability under softmax(`logits`) and the `top_n` most likely (id, log-probability)."""
    import numpy as np

    row = np.asarray(logits, dtype=np.float64)
    peak = row.max()
    log_total = peak + np.log(np.exp(row - peak).sum())
    top: list[tuple[int, float]] = []
    if top_n > 0:
        top_n = min(top_n, row.size)
        best = np.argpartition(-row, top_n - 1)[:top_n]
        best = best[np.argsort(-row[best], kind="stable")]
        top = [(int(i), float(row[i] - log_total)) for i in best]
    return float(row[token] - log_total), top


def token_logprob(row_pointer, n_vocab: int, token: int, top_n: int, piece) -> TokenLogprob:
    """The TokenLogprob of `token` from llama.cpp's logits row at `row_pointer` (n_vocab floats, read in
    place); `piece(token)` gives a token's bytes."""
    import ctypes

    import numpy as np

    row = np.ctypeslib.as_array(ctypes.cast(row_pointer, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,))
    logprob, top = log_softmax_pick(row, token, top_n)
    return TokenLogprob(token, piece(token), logprob, tuple((t, piece(t), lp) for t, lp in top))
