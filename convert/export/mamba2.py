"""Mamba-2 mixers: llama.cpp's ssm_* hyperparameters and tensors from a checkpoint's Mamba-2 layers.

A Mamba-2 mixer (transformers' `...MambaLayer`: Granite 4, Bamba, Falcon-H1 name them alike)
holds in_proj, a depthwise conv1d, dt_bias, A_log, D, a gated RMS norm and out_proj.
llama.cpp wants:
- conv1d's [channels, 1, kernel] weight as [channels, kernel];
- A itself, -exp(A_log), as a [heads, 1] column (D too), so that they broadcast per head;
- the gated norm's weight as [groups, inner / groups]: it normalizes each group on its own;
- dt_bias under the name ssm_dt.bias.

-exp is computed in float64 and rounded once to float32: the exact value, as transformers
computes A in float32 at run time. llama.cpp's converter uses torch's float32 exp, which
is off by one unit in the last place on about 1 % of inputs (and, on a bf16 checkpoint,
computes it in bf16, keeping 8 bits of it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import gguf
import numpy as np

from alpaca_chat.errors import ConversionError

_T = gguf.MODEL_TENSOR
# The mixer's tensors that llama.cpp reshapes or computes, by the end of their checkpoint name.
RESHAPED = ("conv1d.weight", "A_log", "D", "norm.weight")


@dataclass(frozen=True)
class Mamba2Dims:
    """The sizes of one Mamba-2 mixer, as config.json gives them."""

    d_model: int
    n_heads: int
    head_dim: int
    n_groups: int
    d_state: int
    d_conv: int

    @property
    def d_inner(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def conv_channels(self) -> int:
        """conv1d runs over x, B and C: the inner size plus a B and a C per group."""
        return self.d_inner + 2 * self.n_groups * self.d_state

    @property
    def in_proj_rows(self) -> int:
        """in_proj makes the gate z, the conv input (x, B, C) and one dt per head."""
        return self.d_inner + self.conv_channels + self.n_heads

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_ssm_conv_kernel(self.d_conv)
        writer.add_ssm_state_size(self.d_state)
        writer.add_ssm_group_count(self.n_groups)
        writer.add_ssm_inner_size(self.d_inner)
        # llama.cpp reads the number of heads from the time-step rank key.
        writer.add_ssm_time_step_rank(self.n_heads)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint shape of each mixer tensor, by the end of its name (rows first)."""
        return {
            "in_proj.weight": (self.in_proj_rows, self.d_model),
            "conv1d.weight": (self.conv_channels, 1, self.d_conv),
            "conv1d.bias": (self.conv_channels,),
            "dt_bias": (self.n_heads,),
            "A_log": (self.n_heads,),
            "D": (self.n_heads,),
            "norm.weight": (self.d_inner,),
            "out_proj.weight": (self.d_model, self.d_inner),
        }


def granite_mamba2_dims(hparams: dict) -> Mamba2Dims:
    """The mixer sizes from transformers' `mamba_*` keys (Granite 4, Bamba), checked as transformers does."""
    hidden = int(_key(hparams, "hidden_size"))
    n_heads = int(_key(hparams, "mamba_n_heads"))
    expand = int(hparams.get("mamba_expand") or 2)
    head_dim = hparams.get("mamba_d_head")
    if head_dim in (None, "auto"):  # transformers' default: the inner size over the heads
        head_dim = expand * hidden // n_heads
    dims = Mamba2Dims(
        d_model=hidden,
        n_heads=n_heads,
        head_dim=int(head_dim),
        n_groups=int(hparams.get("mamba_n_groups") or 1),
        d_state=int(_key(hparams, "mamba_d_state")),
        d_conv=int(hparams.get("mamba_d_conv") or 4),
    )
    if dims.d_inner != expand * hidden:
        raise ConversionError(
            f"config.json's mamba_n_heads × mamba_d_head = {dims.d_inner} is not mamba_expand × hidden_size "
            f"= {expand * hidden}: the config is inconsistent"
        )
    if dims.d_inner % dims.n_groups or dims.n_heads % dims.n_groups:
        raise ConversionError(f"config.json's mamba_n_groups ({dims.n_groups}) does not divide the heads")
    return dims


def negative_exp(data: np.ndarray) -> np.ndarray:
    """A = -exp(A_log) as float32, for every SSM family (Mamba-2, gated DeltaNet).

    A float32 tensor (bf16 checkpoints are widened to it exactly) goes through torch's float32 exp,
    bit for bit what llama.cpp's converter computes. Without torch (export does not need it), and for
    float16 or float64 tensors, numpy's exp in float64, rounded once: correctly rounded, which torch's
    float32 exp is not always (one float32 ulp apart in about 1 % of values)."""
    if data.dtype == np.float32:
        try:
            import torch
        except ImportError:
            pass
        else:
            return (-torch.exp(torch.from_numpy(np.ascontiguousarray(data)))).numpy()
    return (-np.exp(data.astype(np.float64))).astype(np.float32)


def reshaped_tensor(suffix: str, data: np.ndarray, dims: Mamba2Dims) -> np.ndarray:
    """A reshaped or computed mixer tensor (`suffix` one of RESHAPED), as llama.cpp wants it."""
    transform: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "conv1d.weight": lambda x: x.reshape(dims.conv_channels, dims.d_conv),
        "A_log": lambda x: negative_exp(x).reshape(dims.n_heads, 1),
        "D": lambda x: x.reshape(dims.n_heads, 1),
        "norm.weight": lambda x: x.reshape(dims.n_groups, dims.d_inner // dims.n_groups),
    }
    return np.ascontiguousarray(transform[suffix](data))


def unreshaped_tensor(suffix: str, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The checkpoint tensor `reshaped_tensor` made `data` from: A_log = log(-A), the rest reshaped."""
    if suffix == "A_log":
        data = np.log(-data.astype(np.float64)).astype(np.float32)
    return np.ascontiguousarray(data.reshape(shape))


def gguf_kind(suffix: str) -> tuple[gguf.MODEL_TENSOR, str]:
    """llama.cpp's tensor kind and name suffix for a mixer tensor ending in `suffix`."""
    kinds = {
        "in_proj.weight": (_T.SSM_IN, ".weight"),
        "conv1d.weight": (_T.SSM_CONV1D, ".weight"),
        "conv1d.bias": (_T.SSM_CONV1D, ".bias"),
        "dt_bias": (_T.SSM_DT, ".bias"),
        "A_log": (_T.SSM_A, ""),  # no suffix: llama.cpp names A and D bare
        "D": (_T.SSM_D, ""),
        "norm.weight": (_T.SSM_NORM, ".weight"),
        "out_proj.weight": (_T.SSM_OUT, ".weight"),
    }
    if suffix not in kinds:
        raise ConversionError(f"unexpected Mamba-2 tensor {suffix!r}")
    return kinds[suffix]


def required(bid: int) -> list[str]:
    """The GGUF names llama.cpp needs for a Mamba-2 layer (conv1d's bias is optional)."""
    names = []
    for suffix in ("in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight"):
        kind, end = gguf_kind(suffix)
        names.append(gguf.TENSOR_NAMES[kind].format(bid=bid) + end)
    return names


def check_time_step_limit(hparams: dict) -> None:
    """llama.cpp never clamps dt: a checkpoint that does (time_step_limit other than 0..inf) is refused."""
    limit = hparams.get("time_step_limit")
    if limit is None:
        return
    low, high = (_as_float(x) for x in limit)
    if low > 0.0 or not math.isinf(high):
        raise ConversionError(
            f"config.json's time_step_limit is {list(limit)}: llama.cpp does not clamp the Mamba-2 time step, "
            "so this model would run differently there"
        )


def _as_float(value) -> float:
    # transformers 5 writes infinity as {"__float__": "Infinity"}; released configs as Infinity.
    if isinstance(value, dict) and "__float__" in value:
        return float(value["__float__"])
    return float(value)


def _key(hparams: dict, key: str):
    if hparams.get(key) is None:
        raise ConversionError(f"config.json has no {key}")
    return hparams[key]
