"""`Generation`, the iterator of a reply being generated, and `common_prefix` of two token sequences."""

from collections.abc import Iterator

from alpaca_chat.conversation import GenerationStats


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share."""
    n, limit = 0, min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


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
