"""Fuzzing GGUF headers against gguf_check and llama.cpp (shared by tests/test_gguf_fuzz.py and
benchmarks/fuzz_gguf.py).

A case is a mutant of a real GGUF: some header bytes patched, or the file cut short. Every case goes
through the chat's own loading path in a worker process: `check_gguf` first, and whatever it accepts
is loaded by llama.cpp, a one-message prompt is rendered with the file's template and a few tokens
are decoded. A worker runs many cases in turn, patching one copy of the file in place and restoring
it after each. If the worker dies or stops reporting, the case it was on is run again alone in a
fresh worker, so a crash or a hang is pinned on one case, and the campaign goes on after it.

Outcomes: `rejected` (one-line error from gguf_check), `refused` (a typed error from the engine or
the template, one line), `ok` (decoded), and the failures: `traceback` (any other exception, or a
message that is not one line), `crash` (the process died), `hang` (no report within the timeout).
"""

from __future__ import annotations

import json
import math
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

FAILURES = ("traceback", "crash", "hang")
ROOT = Path(__file__).resolve().parents[1]

# GGUF value types (gguf.GGUFValueType) and the struct format of each scalar.
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}


@dataclass
class Case:
    label: str
    patches: list[tuple[int, str]] = field(default_factory=list)  # (offset, hex bytes)
    truncate: int | None = None  # keep only this many bytes


@dataclass
class Field:
    key: str
    type_at: int  # offset of the value type
    vtype: int
    value_at: int  # offset of the value (for an array: of its element type)


@dataclass
class Layout:
    size: int
    fields: list[Field]
    tensor_infos: list[tuple[int, int]]  # (start, end) of each tensor's info
    header_end: int  # end of the tensor infos


def read_layout(path: Path) -> Layout:
    """Where every metadata value and tensor info sits in a (valid) GGUF."""
    with open(path, "rb") as f:
        data = f.read(64 << 20)
    pos = 24
    _, _, n_tensors, n_kv = struct.unpack_from("<4sIQQ", data, 0)

    def string(p):
        (n,) = struct.unpack_from("<Q", data, p)
        return data[p + 8 : p + 8 + n].decode("utf-8", "replace"), p + 8 + n

    fields = []
    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", data, pos)
        fields.append(Field(key, pos, vtype, pos + 4))
        pos += 4
        if vtype == STRING:
            _, pos = string(pos)
        elif vtype == ARRAY:
            etype, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if etype == STRING:
                for _ in range(count):
                    _, pos = string(pos)
            else:
                pos += count * struct.calcsize(_FMT[etype])
        else:
            pos += struct.calcsize(_FMT[vtype])
    infos = []
    for _ in range(n_tensors):
        start = pos
        _, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", data, pos)
        pos += 4 + 8 * n_dims + 4 + 8
        infos.append((start, pos))
    return Layout(path.stat().st_size, fields, infos, pos)


# -- the systematic part ------------------------------------------------------------------------------

_EXTREME_INTS = (0, 2**31 - 1, 2**31, 2**32 - 1)
_EXTREME_FLOATS = (math.nan, math.inf, -math.inf, 0.0, -1.0, 3.4e38, 1e-38)


def _encode(vtype: int, value) -> bytes:
    return struct.pack("<I", vtype) + struct.pack(_FMT[vtype], value)


def extreme_values(vtype: int) -> list[tuple[str, bytes]]:
    """(label, type + value bytes) of the same width as a value of `vtype`, so the file keeps its layout."""
    width = struct.calcsize(_FMT[vtype])
    if width == 4:
        out = [(str(v), _encode(U32, v)) for v in _EXTREME_INTS]
        out += [(str(v), _encode(I32, v)) for v in (-1, -(2**31))]
        out += [(repr(v), _encode(F32, v)) for v in _EXTREME_FLOATS]
        return out
    if width == 8:
        out = [(str(v), _encode(U64, v)) for v in (*_EXTREME_INTS, 2**63, 2**64 - 1)]
        out += [(str(v), _encode(I64, v)) for v in (-1, -(2**63))]
        out += [(repr(v), _encode(F64, v)) for v in _EXTREME_FLOATS]
        return out
    if width == 2:
        return [(str(v), _encode(U16, v)) for v in (0, 2**15, 2**16 - 1)] + [("-1", _encode(I16, -1))]
    return [(str(v), _encode(U8, v)) for v in (0, 2, 255)] + [("-1", _encode(I8, -1))]


def systematic_cases(layout: Layout) -> list[Case]:
    """Every scalar numeric hyperparameter x extreme values (NaN, Inf, negatives included)."""
    cases = []
    for f in layout.fields:
        if f.vtype in (STRING, ARRAY):
            continue
        for label, raw in extreme_values(f.vtype):
            cases.append(Case(f"{f.key}={label}", [(f.type_at, raw.hex())]))
    return cases


# -- the random part ------------------------------------------------------------------------------------

_INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF)


def random_cases(layout: Layout, count: int, seed: int) -> list[Case]:
    """Header mutations aimed at the structure (values, types, counts, tensor infos) and truncations."""
    rng = random.Random(seed)
    scalars = [f for f in layout.fields if f.vtype not in (STRING, ARRAY)]
    arrays = [f for f in layout.fields if f.vtype == ARRAY]
    cases = []
    for n in range(count):
        roll = rng.random()
        if roll < 0.06:
            cut = rng.randrange(layout.header_end) if rng.random() < 0.7 else rng.randrange(layout.size)
            cases.append(Case(f"random#{n}: truncated at {cut}", truncate=cut))
            continue
        if roll < 0.30:
            f = rng.choice(scalars)
            at, where = f.value_at + rng.randrange(struct.calcsize(_FMT[f.vtype])), f.key
        elif roll < 0.40:
            f = rng.choice(layout.fields)
            at, where = f.type_at + rng.randrange(4), f"type of {f.key}"
        elif roll < 0.50:
            f = rng.choice(arrays)
            at, where = f.value_at + rng.randrange(12), f"array header of {f.key}"
        elif roll < 0.55:
            at, where = rng.randrange(24), "file header"
        elif roll < 0.80:
            start, end = rng.choice(layout.tensor_infos)
            at, where = rng.randrange(start, end), "tensor infos"
        else:
            at, where = rng.randrange(layout.header_end), "anywhere in the header"
        if rng.random() < 0.5:
            mask = bytes([1 << rng.randrange(8)])
            cases.append(Case(f"random#{n}: bit flip at {at} ({where})", [(at, "xor" + mask.hex())]))
        else:
            width = rng.choice((1, 2, 4, 8))
            value = rng.choice(_INTERESTING) if rng.random() < 0.6 else rng.getrandbits(64)
            raw = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
            cases.append(Case(f"random#{n}: {width} bytes {raw.hex()} at {at} ({where})", [(at, raw.hex())]))
    return cases


# -- the worker (a child process) -----------------------------------------------------------------------


def _apply(work: Path, case: Case) -> list[tuple[int, bytes]]:
    """Patch `work` in place; return what to write back."""
    undo = []
    with open(work, "r+b") as f:
        for at, raw in case.patches:
            if raw.startswith("xor"):
                mask = bytes.fromhex(raw[3:])
                f.seek(at)
                old = f.read(len(mask))
                new = bytes(a ^ b for a, b in zip(old, mask))
            else:
                new = bytes.fromhex(raw)
                f.seek(at)
                old = f.read(len(new))
            undo.append((at, old))
            f.seek(at)
            f.write(new[: len(old)])
    return undo


def _restore(work: Path, undo: list[tuple[int, bytes]]) -> None:
    with open(work, "r+b") as f:
        for at, old in reversed(undo):
            f.seek(at)
            f.write(old)


def _one_line(message: str) -> bool:
    return bool(message) and "\n" not in message and "\r" not in message and len(message) < 1000


def run_case(path: Path, n_tokens: int = 2) -> tuple[str, str]:
    """What the chat does with a model file: check, load, render a prompt, decode a few tokens."""
    from alpaca_chat import gguf_check, loading
    from alpaca_chat.config import Settings
    from alpaca_chat.conversation import Message, SamplingParams
    from alpaca_chat.errors import AlpacaChatError

    try:
        gguf_check.check_gguf(path)
    except AlpacaChatError as exc:
        return ("rejected" if _one_line(str(exc)) else "traceback"), str(exc)
    try:
        loaded = loading.load_model(str(path), Settings(threads=2))
        try:
            prompt = loaded.template.render([Message("system", "Be brief."), Message("user", "Hi!")])
            sampling = SamplingParams(temperature=0.0, max_tokens=n_tokens)
            text = "".join(loaded.engine.generate(prompt, sampling, stop_strings=loaded.template.stop_strings))
        finally:
            loaded.engine.close()
    except AlpacaChatError as exc:
        return ("refused" if _one_line(str(exc)) else "traceback"), str(exc)
    except Exception as exc:  # noqa: BLE001 - exactly what the fuzzer is looking for
        return "traceback", f"{type(exc).__name__}: {exc}"
    return "ok", repr(text)


def run_quantize_case(path: Path) -> tuple[str, str]:
    """What `alpaca-convert quantize` does with a file: check it, then llama.cpp's quantizer (to Q8_0)."""
    from alpaca_chat import gguf_check
    from alpaca_chat.errors import AlpacaChatError
    from convert.quantize import quantize

    try:
        gguf_check.check_gguf(path)
    except AlpacaChatError as exc:
        return ("rejected" if _one_line(str(exc)) else "traceback"), str(exc)
    out = path.with_name("quantized.gguf")
    try:
        quantize(path, out, "Q8_0", threads=1)
    except AlpacaChatError as exc:
        return ("refused" if _one_line(str(exc)) else "traceback"), str(exc)
    except Exception as exc:  # noqa: BLE001
        return "traceback", f"{type(exc).__name__}: {exc}"
    finally:
        out.unlink(missing_ok=True)
    return "ok", ""


RUNNERS = {"chat": run_case, "quantize": run_quantize_case}


def worker_main(base: str, work: str, cases_file: str, start: int, stop: int, mode: str = "chat") -> None:
    """Run cases[start:stop] on `work` (a copy of `base`), one report line per case on stdout."""
    import resource

    # A safety net for the machine, far above what any accepted file may use (check_memory guards that).
    limit = 16 << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # Reports go to the original stdout; anything native code prints goes to stderr instead.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    cases = [Case(**c) for c in json.loads(Path(cases_file).read_text())]
    work_path = Path(work)
    for i in range(start, stop):
        case = cases[i]
        print(f"start {i}", file=out, flush=True)
        if case.truncate is not None:
            cut = work_path.with_name("truncated.gguf")
            with open(base, "rb") as src, open(cut, "wb") as dst:
                remaining = case.truncate
                while remaining > 0:
                    chunk = src.read(min(remaining, 8 << 20))
                    if not chunk:
                        break
                    dst.write(chunk)
                    remaining -= len(chunk)
            outcome, detail = RUNNERS[mode](cut)
            cut.unlink()
        else:
            undo = _apply(work_path, case)
            try:
                outcome, detail = RUNNERS[mode](work_path)
            finally:
                _restore(work_path, undo)
        print(json.dumps({"i": i, "outcome": outcome, "detail": detail[:300]}), file=out, flush=True)


# -- the runner (the parent) -----------------------------------------------------------------------------


@dataclass
class Report:
    counts: Counter = field(default_factory=Counter)
    failures: list[dict] = field(default_factory=list)
    outcomes: dict[str, str] = field(default_factory=dict)  # case label -> outcome
    seconds: float = 0.0

    @property
    def cases(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        parts = ", ".join(f"{k} {self.counts[k]}" for k in ("rejected", "refused", "ok", *FAILURES))
        return f"{self.cases} cases in {self.seconds:.0f} s: {parts}"


class _Worker:
    def __init__(self, base: Path, work: Path, cases_file: Path, start: int, stop: int, mode: str):
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); import gguf_fuzzing as g;"
            " g.worker_main(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), sys.argv[7])"
        )
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(Path(__file__).parent), str(base), str(work), str(cases_file), str(start), str(stop), mode],
            stdout=subprocess.PIPE, stderr=self.stderr, cwd=ROOT, start_new_session=True,
            # ggml's abort would attach gdb for a backtrace first, which looks like a hang.
            env={**os.environ, "GGML_NO_BACKTRACE": "1"},
        )
        self.buffer = b""

    def next_line(self, timeout: float) -> bytes | None:
        """The next report line; None on EOF or timeout (then see `proc.poll()`)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode("utf-8", "replace")


def _run_range(base, work, cases_file, start, stop, timeout, on_result, mode) -> tuple[int, str | None]:
    """Run cases[start:stop] in one worker. Returns (index reached, failure kind or None)."""
    worker = _Worker(base, work, cases_file, start, stop, mode)
    current, i = None, start
    try:
        while i < stop:
            line = worker.next_line(timeout)
            if line is None:
                if worker.proc.poll() is None:
                    return (current if current is not None else i), "hang"
                worker.proc.wait()
                return (current if current is not None else i), "crash"
            text = line.decode("utf-8", "replace")
            if text.startswith("start "):
                current = int(text.split()[1])
                continue
            result = json.loads(text)
            on_result(result)
            current, i = None, result["i"] + 1
        worker.proc.wait(timeout=timeout)
        if "Traceback" in worker.stderr_text():
            return i, "traceback"
        return i, None
    finally:
        worker.kill()
        worker.stderr.close()


def run_campaign(base: Path, cases: list[Case], *, workdir: Path, batch: int = 200, timeout: float = 60.0,
                 progress=None, mode: str = "chat") -> Report:
    """Run every case; a worker that dies or stalls has its case re-run alone to attribute it."""
    started = time.monotonic()
    report = Report()
    work = workdir / "mutant.gguf"
    cases_file = workdir / "cases.json"
    cases_file.write_text(json.dumps([asdict(c) for c in cases]))

    def record(result):
        report.counts[result["outcome"]] += 1
        report.outcomes[cases[result["i"]].label] = result["outcome"]
        if result["outcome"] in FAILURES:
            report.failures.append({"case": cases[result["i"]].label, **result})
        if progress:
            progress(report)

    i = 0
    while i < len(cases):
        shutil.copyfile(base, work)  # fresh: a dead worker may have left a patch in place
        stop = min(len(cases), i + batch)
        reached, failure = _run_range(base, work, cases_file, i, stop, timeout, record, mode)
        if failure is None:
            i = stop
            continue
        if failure == "traceback" and reached >= stop:  # a traceback outside any case
            report.counts["traceback"] += 1
            report.failures.append({"case": f"worker for cases {i}..{stop - 1}", "outcome": "traceback"})
            i = stop
            continue
        # Attribute: the case alone, in a fresh worker on a fresh copy.
        shutil.copyfile(base, work)
        _, alone = _run_range(base, work, cases_file, reached, reached + 1, timeout, record, mode)
        if alone is not None:
            report.counts[alone] += 1
            report.outcomes[cases[reached].label] = alone
            report.failures.append({"case": cases[reached].label, "outcome": alone, "i": reached})
        else:  # fine alone: still a failure of the batch, reported as such
            report.counts[failure] += 1
            report.failures.append({"case": cases[reached].label, "outcome": f"{failure} (only after other cases)"})
        i = reached + 1
    report.seconds = time.monotonic() - started
    return report


def campaign_cases(base: Path, n_random: int, seed: int) -> list[Case]:
    layout = read_layout(base)
    return systematic_cases(layout) + random_cases(layout, n_random, seed)
