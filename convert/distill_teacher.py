"""The teacher of a distillation: an HF checkpoint or a GGUF, its top-k logits cached on disk.

    teacher = open_teacher(spec, n_ctx=...)       HF directory/hub id, or a GGUF through alpaca_chat's engine
    check_same_vocabulary(teacher, tokenizer)     UsageError when the student's vocabulary differs
    cache = TeacherCache(root, key)               safetensors blocks, reused by epochs and resumes
    cache.fill(teacher, examples, top_k)          runs the teacher only on examples not cached yet

The cache holds, for each example, the teacher's k largest next-token logits and their
token ids at every trained position (where the next token has a label), in row order.
Its key is a hash of the teacher's files, k and every example's tokens and labels, so
another teacher, another k or other data never reads a stale cache. Blocks of examples
are written atomically as they are done: an interrupted teacher pass resumes at the
first missing block.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alpaca_chat.errors import UsageError
from convert import data as datamod

BLOCK = 64  # examples per cache file
PROBE_TEXT = "The quick brown fox, 12 apples and a café: def f(x): return x + 1\n"


def trained_positions(example: datamod.Example) -> np.ndarray:
    """Positions p whose next token (p + 1) is trained on: where the loss and the teacher's logits are taken."""
    labels = np.asarray(example.labels)
    return np.nonzero(labels[1:] != datamod.IGNORE_INDEX)[0]


class HFTeacher:
    """An HF checkpoint; its weights load on first use, after the cheap checks (vocabulary)."""

    def __init__(self, path: Path):
        from convert import model_loading

        self.path = path
        self.tokenizer = model_loading.load_tokenizer(path)
        self.n_vocab = int(model_loading.load_model_config(path).get_text_config().vocab_size)
        self._model = None

    @property
    def model(self):
        if self._model is None:
            from convert import model_loading

            self._model = model_loading.load_model(self.path, "cpu")
            self._model.eval()
        return self._model

    def identity(self) -> dict:
        return {"kind": "hf", "files": _files_identity(sorted(self.path.glob("*.safetensors")) + [self.path / "config.json"])}

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def logits(self, ids: Sequence[int], positions: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([list(ids)]), use_cache=False)
        return out.logits[0, torch.as_tensor(positions)].float().numpy()

    def sample(self, prompt: str, *, max_tokens: int, seed: int) -> str:
        import torch

        ids = self.tokenizer(prompt, return_tensors="pt")
        torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(**ids, do_sample=True, temperature=0.8, top_p=0.95, max_new_tokens=max_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    def close(self) -> None:
        self._model = None


class GGUFTeacher:
    """A GGUF teacher through alpaca_chat's engine (its public calls): a quantized teacher is cheap on a CPU."""

    def __init__(self, path: Path, n_ctx: int):
        from alpaca_chat.engine import Engine, physical_cores
        from alpaca_chat.errors import EngineError

        self.path = path
        try:
            self.engine = Engine(path, n_ctx=n_ctx, n_threads=physical_cores(), n_batch=n_ctx)
        except EngineError as exc:
            raise UsageError(f"--teacher: {exc}") from None
        self.n_vocab = self.engine.n_vocab

    def identity(self) -> dict:
        return {"kind": "gguf", "files": _files_identity([self.path])}

    def tokenize(self, text: str) -> list[int]:
        return self.engine.tokenize_raw(text, add_special=False, parse_special=False)

    def logits(self, ids: Sequence[int], positions: np.ndarray) -> np.ndarray:
        start = int(positions[0])
        rows = self.engine.sequence_logits(list(ids), start)
        return rows[positions - start]

    def sample(self, prompt: str, *, max_tokens: int, seed: int) -> str:
        from alpaca_chat.conversation import SamplingParams

        sampling = SamplingParams(temperature=0.8, seed=seed, max_tokens=max_tokens)
        return "".join(self.engine.generate(prompt, sampling))

    def close(self) -> None:
        self.engine.close()


def open_teacher(spec: str, *, n_ctx: int):
    from convert import gguf_base, model_loading

    if gguf_base.is_gguf_spec(spec):
        return GGUFTeacher(_resolve_gguf(spec), n_ctx)
    return HFTeacher(model_loading.resolve_base(spec))


def _resolve_gguf(spec: str) -> Path:
    from alpaca_chat.models import resolve_model

    from alpaca_chat.errors import AlpacaChatError

    try:
        return Path(resolve_model(spec).path)
    except AlpacaChatError as exc:
        raise UsageError(f"--teacher: {str(exc).splitlines()[0]}") from None


def _files_identity(files: list[Path]) -> list:
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()]


def check_same_vocabulary(teacher, student_tokenizer, student_vocab: int) -> None:
    """The teacher's logits index the student's vocabulary: same size, same ids for the same text."""
    if teacher.n_vocab != student_vocab:
        raise UsageError(f"the teacher's vocabulary has {teacher.n_vocab} tokens and the student's {student_vocab}: "
                         "distillation needs the same vocabulary (the same tokenizer)")
    theirs = teacher.tokenize(PROBE_TEXT)
    ours = student_tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if theirs != ours:
        raise UsageError("the teacher and the student tokenize the same text differently: distillation needs "
                         "the same tokenizer")


# -- the cache -------------------------------------------------------------------


def cache_key(teacher_identity: dict, top_k: int, examples: Sequence[datamod.Example]) -> str:
    digest = hashlib.sha256(json.dumps({"teacher": teacher_identity, "top_k": top_k}, sort_keys=True).encode())
    for example in examples:
        digest.update(np.asarray(example.input_ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(example.labels, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:24]


@dataclass
class TeacherCache:
    """Top-k teacher logits per example, in safetensors files of BLOCK examples under `root/key`."""

    root: Path
    key: str

    @property
    def dir(self) -> Path:
        return self.root / self.key

    def _block(self, b: int) -> Path:
        return self.dir / f"block-{b:05d}.safetensors"

    def missing_blocks(self, n_examples: int) -> list[int]:
        return [b for b in range(-(-n_examples // BLOCK)) if not self._block(b).is_file()]

    def fill(self, teacher, examples: Sequence[datamod.Example], top_k: int, progress=None) -> int:
        """Run the teacher on the examples of every missing block; returns how many examples it ran on."""
        from safetensors.numpy import save_file

        from convert.atomic import atomic_output

        self.dir.mkdir(parents=True, exist_ok=True)
        ran = 0
        for b in self.missing_blocks(len(examples)):
            values, ids, counts = [], [], []
            for example in examples[b * BLOCK:(b + 1) * BLOCK]:
                positions = trained_positions(example)
                counts.append(len(positions))
                if len(positions):
                    top_values, top_ids = top_k_of(teacher.logits(example.input_ids, positions), top_k)
                    values.append(top_values)
                    ids.append(top_ids)
                ran += 1
            tensors = {
                "values": np.concatenate(values) if values else np.zeros((0, top_k), np.float32),
                "ids": np.concatenate(ids) if ids else np.zeros((0, top_k), np.int32),
                "counts": np.asarray(counts, dtype=np.int64),
            }
            with atomic_output(self._block(b)) as tmp:
                save_file(tensors, str(tmp))
            if progress:
                progress(min((b + 1) * BLOCK, len(examples)), len(examples))
        return ran

    def load(self, n_examples: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(values [n, k] float32, ids [n, k] int64) per example."""
        from safetensors.numpy import load_file

        out = []
        for b in range(-(-n_examples // BLOCK)):
            block = load_file(str(self._block(b)))
            offsets = np.concatenate([[0], np.cumsum(block["counts"])])
            for i in range(len(block["counts"])):
                lo, hi = offsets[i], offsets[i + 1]
                out.append((block["values"][lo:hi].astype(np.float32), block["ids"][lo:hi].astype(np.int64)))
        return out[:n_examples]


def top_k_of(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest logits of each row (float32) and their token ids (int32), largest first."""
    k = min(k, logits.shape[-1])
    ids = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
    values = np.take_along_axis(logits, ids, axis=-1)
    order = np.argsort(-values, axis=-1, kind="stable")
    return np.take_along_axis(values, order, -1).astype(np.float32), np.take_along_axis(ids, order, -1).astype(np.int32)
