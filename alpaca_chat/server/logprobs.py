"""Generated tokens' log-probabilities in OpenAI's two shapes: chat completions' `logprobs.content`
(one object per token, with its bytes and alternatives) and legacy completions' parallel lists
(`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`). Pure: engine.logprobs.TokenLogprob in,
JSON-ready dicts out."""

from alpaca_chat.engine.logprobs import TokenLogprob


def _token(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    """{"content": [...], "refusal": None} for a chat choice or chunk."""
    content = [{"token": _token(e.piece), "logprob": e.logprob, "bytes": list(e.piece),
                "top_logprobs": [{"token": _token(piece), "logprob": lp, "bytes": list(piece)}
                                 for _, piece, lp in e.top]}
               for e in entries]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[TokenLogprob], offset: int = 0) -> dict:
    """The legacy shape; `offset`: where the first entry's text starts in the completion."""
    tokens, offsets = [], []
    for e in entries:
        offsets.append(offset)
        tokens.append(_token(e.piece))
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{_token(piece): lp for _, piece, lp in e.top} for e in entries],
            "text_offset": offsets}
