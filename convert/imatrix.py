"""`alpaca-convert imatrix`: llama.cpp's importance matrix, made in the project.

For each weight matrix, the mean of the squared activations entering each of
its input columns over a calibration text; per expert for a mixture of
experts. llama.cpp's quantizer weighs each weight's rounding error by it
(`llama-quantize --imatrix`): the IQ1/IQ2/IQ3_XXS types and Q2_K_S need one,
and every K-quant is better with one.

The model runs in llama.cpp, as `llama-imatrix` runs it: the text is
tokenized and cut into chunks of `ctx` tokens (the first token of each chunk
replaced by BOS when the model adds one), each chunk is one batch with every
position's logits asked for (so that no row is dropped before the last
layer), and llama.cpp's eval callback hands us each product's input
(`imatrix_ggml`). The KV cache is F32 and flash attention off, so the
activations are those of an exact F32 forward pass on an F32 model.

Progress and ETA go to a callback. A run that stops (Ctrl+C, a crash, a
kill) resumes at the next rerun: the running sums are saved every
`SAVE_EVERY_S` seconds in the user cache directory, keyed by the model's and
the text's hashes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

from convert.imatrix_file import Imatrix, ImatrixFileError, read_imatrix, write_imatrix
from convert.imatrix_ggml import Collected, Collector, ImatrixError

DEFAULT_CTX = 512
CALIBRATION_FILE = "calibration.txt"
CALIBRATION_NAME = f"built-in calibration text ({CALIBRATION_FILE})"
SAVE_EVERY_S = 60.0

# done chunks, total chunks, seconds so far (of this run), chunks resumed from a previous run
Progress = Callable[[int, int, float, int], None]


def calibration_text() -> str:
    """The built-in calibration text: prose on many subjects, instructions and answers, code, tables,
    a few other languages. Disjoint from the evaluation text (convert/eval_sample.txt)."""
    return resources.files("convert").joinpath("builtin_data", CALIBRATION_FILE).read_text(encoding="utf-8")


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """Where computed importance matrices are kept: the user cache directory (ALPACA_CHAT_HOME/cache)."""
    home = os.environ.get("ALPACA_CHAT_HOME")
    if home:
        return Path(home).expanduser() / "cache" / "imatrix"
    import platformdirs

    return Path(platformdirs.user_cache_dir("alpaca-chat", appauthor=False)) / "imatrix"


# -- computing -----------------------------------------------------------------------


def compute(
    model: str | os.PathLike[str],
    text: str | None = None,
    *,
    text_name: str | None = None,
    ctx: int = DEFAULT_CTX,
    chunks: int | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
    model_sha256: str | None = None,
    resumable: bool = True,
) -> Imatrix:
    """The importance matrix of the GGUF `model` over `text` (default: the built-in calibration text)."""
    from alpaca_chat import gguf_check

    model = Path(model)
    info = gguf_check.check_gguf(model)
    if ctx < 8:
        raise ImatrixError(f"--ctx {ctx} is too small (at least 8 tokens per chunk)")
    if chunks is not None and chunks < 1:
        raise ImatrixError("--chunks must be at least 1")
    text_name = text_name or (CALIBRATION_NAME if text is None else "text")
    text = calibration_text() if text is None else text
    text_hash = text_sha256(text)
    model_sha256 = model_sha256 or file_sha256(model)
    weights = _weight_names(model)
    resume_path = _resume_path(model_sha256, text_hash, ctx) if resumable else None
    with _LlamaRun(model, ctx, threads, weights) as run:
        tokens = run.tokenize(text)
        pieces = split_chunks(tokens, ctx, run.bos if run.add_bos else None, chunks)
        if not pieces:
            raise ImatrixError(
                f"the calibration text is {len(tokens)} tokens, shorter than one chunk of {ctx}: "
                f"give a longer --text or a smaller --ctx"
            )
        result = Imatrix(Collected(), 0, ctx, [text_name], text_hash, model_sha256)
        done = _resume(resume_path, result, len(pieces)) if resume_path else 0
        resumed, started, saved = done, time.perf_counter(), time.perf_counter()
        if progress is not None:
            progress(done, len(pieces), 0.0, resumed)
        for chunk in pieces[done:]:
            result.data.add(run.collect(chunk))
            done += 1
            result.chunk_count = done
            if progress is not None:
                progress(done, len(pieces), time.perf_counter() - started, resumed)
            if resume_path and done < len(pieces) and time.perf_counter() - saved > SAVE_EVERY_S:
                resume_path.parent.mkdir(parents=True, exist_ok=True)
                write_imatrix(result, resume_path)
                saved = time.perf_counter()
    if resume_path is not None:
        resume_path.unlink(missing_ok=True)
    if not result.data.sums:
        raise ImatrixError(f"llama.cpp multiplied no weight matrix of {model.name} ({info.architecture})")
    return result


def compute_file(
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    text: str | None = None,
    **options,
) -> Imatrix:
    """`compute` for a GGUF or a Hugging Face checkpoint directory, written to `output` atomically.

    A checkpoint is exported to an F16 GGUF in a temp directory first (the
    tensor names are then the GGUF's, as the quantizer looks them up)."""
    from convert.atomic import check_writable

    output = Path(output)
    check_writable(output)
    with gguf_of(model) as path:
        imatrix = compute(path, text, **options)
    write_imatrix(imatrix, output)
    return imatrix


@contextmanager
def gguf_of(model: str | os.PathLike[str]):
    """The GGUF itself, or a checkpoint exported to F16 in a temp directory (deleted after)."""
    model = Path(model)
    if not model.is_dir():
        yield model
        return
    from convert.export import export

    with tempfile.TemporaryDirectory(prefix="alpaca-imatrix-") as tmp:
        yield export(model, Path(tmp) / f"{model.name}.F16.gguf", "f16").path


def _weight_names(model: Path) -> set[str]:
    """The model's weight matrices: the tensors of two or more dimensions."""
    from alpaca_chat.gguf_parse import parse_file

    return {t.name for t in parse_file(model).tensors if len(t.shape) >= 2}


def split_chunks(tokens: list[int], ctx: int, bos: int | None, limit: int | None = None) -> list[list[int]]:
    """Whole chunks of `ctx` tokens (the rest is dropped), each starting with BOS where the model adds one."""
    pieces = [list(tokens[i : i + ctx]) for i in range(0, len(tokens) - ctx + 1, ctx)]
    if bos is not None:
        for piece in pieces:
            piece[0] = bos
    return pieces[:limit] if limit else pieces


def _resume_path(model_sha256: str, text_hash: str, ctx: int) -> Path:
    return cache_dir() / "partial" / f"{model_sha256[:32]}-{text_hash[:16]}-{ctx}.gguf"


def _resume(path: Path, result: Imatrix, total: int) -> int:
    """Chunks done by an interrupted run on the same model, text and ctx (their sums go into `result`)."""
    if not path.exists():
        return 0
    try:
        previous = read_imatrix(path)
    except ImatrixFileError:
        return 0
    same = previous.text_sha256 == result.text_sha256 and previous.model_sha256 == result.model_sha256
    if not same or previous.chunk_size != result.chunk_size or not 0 < previous.chunk_count < total:
        return 0
    result.data.add(previous.data)
    result.chunk_count = previous.chunk_count
    return previous.chunk_count


# -- --imatrix auto: computed once per model, cached ------------------------------------

Note = Callable[[str], None]


def auto_imatrix(
    model: str | os.PathLike[str],
    *,
    threads: int | None = None,
    note: Note | None = None,
    progress: Progress | None = None,
) -> Path:
    """The importance matrix of the GGUF `model` on the built-in calibration text, from the cache
    (keyed by the model file's sha256 and the text's), computing it the first time."""
    model = Path(model)
    model_hash = file_sha256(model)
    text = calibration_text()
    path = cache_dir() / f"{model_hash[:32]}-{text_sha256(text)[:12]}-{DEFAULT_CTX}.imatrix.gguf"
    if path.exists():
        try:
            cached = read_imatrix(path)
            if cached.model_sha256 == model_hash:
                if note is not None:
                    note(f"importance matrix of {model.name}: {path} (cached)")
                return path
        except ImatrixFileError:
            pass  # damaged: computed again
    if note is not None:
        note(f"computing the importance matrix of {model.name} on the {CALIBRATION_NAME}; cached in {path.parent}")
    path.parent.mkdir(parents=True, exist_ok=True)
    imatrix = compute(model, threads=threads, progress=progress, model_sha256=model_hash)
    write_imatrix(imatrix, path)
    return path


# -- llama.cpp -------------------------------------------------------------------------


class _LlamaRun:
    """The engine on one model, exact (F32 KV cache, no flash attention), its eval callback the collector."""

    def __init__(self, model: Path, ctx: int, threads: int | None, weights: set[str]):
        from alpaca_chat.engine import Engine

        self.collector = Collector(weights)
        self.ctx_size = ctx
        # n_batch = ctx: a chunk is one batch, as llama-imatrix evaluates it.
        self.engine = Engine(model, n_ctx=ctx, n_batch=ctx, n_threads=threads, exact=True,
                             eval_callback=self.collector.callback)

    @property
    def add_bos(self) -> bool:
        return self.engine.add_bos

    @property
    def bos(self) -> int:
        return self.engine.bos_id

    def tokenize(self, text: str) -> list[int]:
        """As llama-imatrix: the vocabulary's BOS added, special tokens not parsed."""
        return self.engine.tokenize_raw(text, add_special=True, parse_special=False)

    def collect(self, chunk: list[int]) -> Collected:
        """Evaluate one chunk (one batch, every position's logits: the output matrix sees every row)
        and return what the callback collected."""
        collector = self.collector
        collector.data, collector.error = Collected(), None
        try:
            self.engine.sequence_logits(chunk, 0)
        finally:
            if collector.error is not None:  # why the callback stopped the graph, before llama.cpp's status
                raise collector.error
        return collector.data

    def close(self) -> None:
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

