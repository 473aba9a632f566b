"""The activations entering every weight matrix, read inside llama.cpp through its eval callback.

This is what `llama-imatrix` does: llama.cpp's graph scheduler asks a
callback (`cb_eval`, `ggml_backend_sched_eval_callback`) about every node
before computing it. We answer yes for matrix products (MUL_MAT, and MUL_MAT_ID
for the experts of a mixture) whose first operand is one of the model's weight
tensors; once the node is computed we read its second operand, the
activations (F32, one row per token), and add up the squares of each input
column. For MUL_MAT_ID the routing ids (its third operand) say which expert
each row went to, so each expert gets its own sums and counts.

The names are the GGUF's own, because they are llama.cpp's tensors. Any GGUF
llama.cpp can run works, quantized ones included, and no torch is needed.

ctypes sees `struct ggml_tensor` with the layout of ggml.h (checked at run time
against `ggml_tensor_overhead()`), and the op numbers come from `ggml_op_name`,
so no enum value is hard-coded.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import numpy as np

from alpaca_chat.errors import ConversionError

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
_GGML_OBJECT_SIZE = 32  # struct ggml_object in ggml.c: offs, size, next, type, padding[4]
_GGML_TYPE_F32 = 0
_GGML_TYPE_I32 = 26


class ImatrixError(ConversionError):
    """The importance matrix cannot be computed (unreadable model, text too short, llama.cpp failure)."""


class GgmlTensor(ctypes.Structure):
    """`struct ggml_tensor` (ggml/include/ggml.h)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


@dataclass
class _Ggml:
    """The few libggml functions the collector calls, and the op numbers it looks for."""

    lib: ctypes.CDLL
    mul_mat: int
    mul_mat_id: int


_ggml_cache: list[_Ggml] = []


def _ggml() -> _Ggml:
    if _ggml_cache:
        return _ggml_cache[0]
    import alpaca_chat.engine  # noqa: F401 - first: it sets up the OpenMP environment llama_cpp loads with
    from llama_cpp._ggml import libggml as lib  # llama-cpp-python's handle on libggml

    lib.ggml_op_name.argtypes = [ctypes.c_int]
    lib.ggml_op_name.restype = ctypes.c_char_p
    lib.ggml_tensor_overhead.argtypes = []
    lib.ggml_tensor_overhead.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None

    expected = lib.ggml_tensor_overhead() - _GGML_OBJECT_SIZE
    if ctypes.sizeof(GgmlTensor) != expected:
        raise ImatrixError(
            f"this llama.cpp build's ggml_tensor is {expected} bytes, not the {ctypes.sizeof(GgmlTensor)} "
            "of the ggml.h the importance matrix reader follows"
        )
    ops: dict[str, int] = {}
    # MUL_MAT and MUL_MAT_ID come early in enum ggml_op; never read past a few dozen names.
    for op in range(1, 64):
        name = lib.ggml_op_name(op)
        if name in (b"MUL_MAT", b"MUL_MAT_ID"):
            ops[name.decode()] = op
        if len(ops) == 2:
            break
    if len(ops) != 2:
        raise ImatrixError("cannot find llama.cpp's MUL_MAT operations in this build of ggml")
    _ggml_cache.append(_Ggml(lib, ops["MUL_MAT"], ops["MUL_MAT_ID"]))
    return _ggml_cache[0]


def weight_name(raw: bytes) -> str:
    """`CUDA0#blk.0.attn_k.weight#0` -> `blk.0.attn_k.weight` (the scheduler's copies name their source)."""
    name = raw.decode("utf-8", errors="replace")
    if "#" in name:
        name = name.split("#")[1]
    return name


@dataclass
class Collected:
    """Per weight matrix: sums of squared activations per input column, and how many rows were summed.

    `sums[name]` is float64 [n_mat, n_cols] (n_mat is the number of experts for a
    mixture's stacked weights, else 1), `counts[name]` int64 [n_mat].
    """

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, other: Collected) -> None:
        for name, sums in other.sums.items():
            if name in self.sums:
                self.sums[name] += sums
                self.counts[name] += other.counts[name]
            else:
                self.sums[name] = sums.copy()
                self.counts[name] = other.counts[name].copy()


class Collector:
    """The eval callback: `callback` goes into llama_context_params.cb_eval.

    An exception inside the callback (KeyboardInterrupt included) stops the
    graph computation and is kept in `error`, for the caller to raise after
    llama_decode returns.
    """

    def __init__(self, weights: set[str]):
        self.ggml = _ggml()
        import llama_cpp

        self.weights = weights
        self.data = Collected()
        self.error: BaseException | None = None
        self._names: dict[bytes, str | None] = {}
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_node)

    def _on_node(self, pointer, ask: bool, _user_data) -> bool:
        try:
            node = GgmlTensor.from_address(pointer)
            if ask:
                return self._wanted(node)
            self._collect(node)
            return True
        except BaseException as exc:  # noqa: BLE001 - raised again by the caller, after llama_decode
            if self.error is None:
                self.error = exc
            return False

    def _name(self, tensor: GgmlTensor) -> str | None:
        raw = tensor.name
        if raw not in self._names:
            name = weight_name(raw)
            self._names[raw] = name if name in self.weights else None
        return self._names[raw]

    def _wanted(self, node: GgmlTensor) -> bool:
        if node.op not in (self.ggml.mul_mat, self.ggml.mul_mat_id) or not node.src[0] or not node.src[1]:
            return False
        src1 = GgmlTensor.from_address(node.src[1])
        return src1.type == _GGML_TYPE_F32 and self._name(GgmlTensor.from_address(node.src[0])) is not None

    def _collect(self, node: GgmlTensor) -> None:
        src0 = GgmlTensor.from_address(node.src[0])
        name = self._name(src0)
        x = self._array(GgmlTensor.from_address(node.src[1]), np.float32)  # [ne3, ne2, ne1, ne0]
        if node.op == self.ggml.mul_mat_id:
            ids = self._array(GgmlTensor.from_address(node.src[2]), np.int32)[0, 0]  # [n_tokens, n_ids]
            self._collect_experts(name, int(src0.ne[2]), x[0], ids)
        else:
            self._collect_dense(name, src0, x)

    def _collect_dense(self, name: str, src0: GgmlTensor, x: np.ndarray) -> None:
        ne02, ne03 = int(src0.ne[2]), int(src0.ne[3])
        n_mat = ne02 * ne03
        sums, counts = self._entry(name, n_mat, x.shape[-1])
        # One batch's sums in float32 (a few hundred rows), added up across batches in float64.
        if n_mat == 1:
            rows = x.reshape(-1, x.shape[-1])
            sums[0] += np.einsum("ij,ij->j", rows, rows)
        else:  # a 3-D weight in a plain product: each matrix gets the rows broadcast to it
            for i3 in range(x.shape[0]):
                for i2 in range(x.shape[1]):
                    rows = x[i3, i2]
                    sums[(i3 % ne03) * ne02 + (i2 % ne02)] += np.einsum("ij,ij->j", rows, rows)
        counts += x.shape[0] * x.shape[1] * x.shape[2] // n_mat

    def _collect_experts(self, name: str, n_experts: int, x: np.ndarray, ids: np.ndarray) -> None:
        """x: [n_tokens, ne11, n_cols] (ne11 is 1 where each token's row is shared by its experts),
        ids: [n_tokens, n_used], the experts each token was routed to."""
        n_tokens, n_used = ids.shape
        if x.shape[0] != n_tokens:
            raise ImatrixError(f"{name}: {x.shape[0]} activation rows for {n_tokens} routed tokens")
        if ids.size and (ids.min() < 0 or ids.max() >= n_experts):
            raise ImatrixError(f"{name}: an expert id outside 0..{n_experts - 1}")
        sums, counts = self._entry(name, n_experts, x.shape[-1])
        rows = x[:, np.arange(n_used) % x.shape[1], :].reshape(-1, x.shape[-1])
        experts = ids.reshape(-1)
        order = np.argsort(experts, kind="stable")
        experts, rows = experts[order], rows[order]
        present, starts = np.unique(experts, return_index=True)
        sums[present] += np.add.reduceat(rows * rows, starts, axis=0)
        counts += np.bincount(experts, minlength=n_experts)

    def _entry(self, name: str, n_mat: int, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
        data = self.data
        if name not in data.sums:
            data.sums[name] = np.zeros((n_mat, n_cols), dtype=np.float64)
            data.counts[name] = np.zeros(n_mat, dtype=np.int64)
        sums = data.sums[name]
        if sums.shape != (n_mat, n_cols):
            raise ImatrixError(f"{name}: activations of shape {(n_mat, n_cols)}, then {sums.shape}")
        return sums, data.counts[name]

    def _array(self, tensor: GgmlTensor, dtype) -> np.ndarray:
        """A numpy view (a copy where the data is not in host memory) in ggml's dimension order reversed."""
        expected = _GGML_TYPE_F32 if dtype is np.float32 else _GGML_TYPE_I32
        if tensor.type != expected:
            raise ImatrixError(f"{tensor.name.decode(errors='replace')}: unexpected ggml type {tensor.type}")
        lib = self.ggml.lib
        nbytes = lib.ggml_nbytes(ctypes.addressof(tensor))
        if tensor.buffer and not lib.ggml_backend_buffer_is_host(tensor.buffer):
            buffer = np.empty(nbytes, dtype=np.uint8)
            lib.ggml_backend_tensor_get(ctypes.addressof(tensor), buffer.ctypes.data, 0, nbytes)
        else:
            buffer = (ctypes.c_char * nbytes).from_address(tensor.data)
        return np.ndarray(
            shape=tuple(int(n) for n in reversed(tensor.ne)),
            dtype=dtype,
            buffer=buffer,
            strides=tuple(int(n) for n in reversed(tensor.nb)),
        )
