"""One sequence's token step, shared by single and parallel generation.

Whoever drives llama.cpp (Engine.generate for one sequence, parallel.ParallelRun for several)
evaluates the tokens; this object does everything else a generated token goes through: sampling,
first-token timing, end of generation, UTF-8 assembly, stop strings, the token limit, and the
closing statistics. So a reply ends for the same reason with the same text however it was run.
"""

import codecs
import time

from alpaca_chat.conversation import GenerationStats, SamplingParams, StopStringFilter


class SequenceStep:
    """Turns the logits of one sequence into text, a token at a time.

    `advance(idx)` samples from the logits at batch index `idx` and returns the text to show and
    the token to evaluate next (None once the sequence has ended). `end(reason)` stops it early
    (cancelled, context full) and returns the text still held back. The sampler is freed when the
    step ends, or by `close()` if it is abandoned.
    """

    def __init__(self, engine, sampling: SamplingParams, prompt: list[int], stop_strings: tuple[str, ...] = (),
                 stats: GenerationStats | None = None, logprobs: int | None = None):
        """`logprobs`: None, or how many alternatives each generated token's `last_logprob` names."""
        self.engine = engine
        self.logprobs = logprobs
        self.last_logprob = None  # engine.logprobs.TokenLogprob of the token `advance` last generated
        self.max_tokens = sampling.max_tokens
        self.stats = stats or GenerationStats(prompt_tokens=len(prompt))
        self.stats.stop_reason = "length"
        self.started = time.perf_counter()
        self._prompt_done = self.started
        self._stops = StopStringFilter(stop_strings)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._sampler = engine.new_sampler(sampling, prompt)
        self.finished = False
        if self.max_tokens <= 0:
            self.end("length")

    def prompt_evaluated(self, evaluated: int) -> None:
        """The prompt's tokens (`evaluated` of them, the rest reused from the cache) are in."""
        self._prompt_done = time.perf_counter()
        self.stats.prompt_tokens_per_s = evaluated / max(self._prompt_done - self.started, 1e-9)

    def advance(self, idx: int) -> tuple[str, int | None]:
        stats = self.stats
        token = self.engine.sample(self._sampler, idx)
        if stats.generated_tokens == 0:
            stats.time_to_first_token_s = time.perf_counter() - self.started
        if self.engine.is_end_of_generation(token):
            return self.end("eos"), None
        stats.generated_tokens += 1
        if self.logprobs is not None:
            self.last_logprob = self.engine.token_logprob(idx, token, self.logprobs)
        text = self._stops.feed(self._utf8.decode(self.engine.token_piece(token)))
        if self._stops.stopped:
            return text + self.end("stop_string"), None
        if stats.generated_tokens >= self.max_tokens:
            return text + self.end("length"), None
        return text, token

    def end(self, reason: str) -> str:
        """Stop here for `reason`; returns the text held back until now (an incomplete character, a
        possible start of a stop string)."""
        if self.finished:
            return ""
        self.finished = True
        self.stats.stop_reason = reason
        tail = self._stops.feed(self._utf8.decode(b"", final=True)) + self._stops.flush()
        elapsed = time.perf_counter() - self._prompt_done
        self.stats.generation_tokens_per_s = self.stats.generated_tokens / max(elapsed, 1e-9)
        self.close()
        return tail

    def close(self) -> None:
        """Free the sampler (idempotent)."""
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            self.engine.free_sampler(sampler)
