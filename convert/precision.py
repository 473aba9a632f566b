"""Which float type the fine-tune computes in: `--precision auto|fp32|bf16|fp16`.

`auto` is bf16 on a CUDA GPU that supports it, and on a CPU with bf16
instructions (AVX512-BF16 or AMX-BF16, read from the CPU flags): there a
LoRA step under bf16 autocast runs 1.4-1.7x faster than fp32 at the same
loss. fp32 otherwise. Only the compute is autocast: the base weights, the
LoRA weights and the optimizer state stay fp32.

Torch-free, so the command line can resolve and show it cheaply.
"""

from __future__ import annotations

from pathlib import Path

from alpaca_chat.errors import UsageError

CHOICES = ("auto", "fp32", "bf16", "fp16")
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags (Linux); empty where they cannot be read."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def cpu_has_bf16(flags: set[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in _BF16_FLAGS)


def resolve_precision(choice: str, device: str, *, cuda_bf16: bool = False, flags: set[str] | None = None) -> str:
    """fp32, bf16 or fp16 for this device; UsageError for a choice it cannot run."""
    if choice not in CHOICES:
        raise UsageError(f"--precision: use one of {', '.join(CHOICES)}, not {choice!r}")
    if device == "cuda":
        if choice == "auto":
            return "bf16" if cuda_bf16 else "fp32"
        if choice == "bf16" and not cuda_bf16:
            raise UsageError("--precision bf16: this GPU does not support bf16; use fp16 or fp32")
        return choice
    if choice == "fp16":
        raise UsageError("--precision fp16 needs a CUDA GPU; on a CPU use bf16 (if it has it) or fp32")
    has_bf16 = cpu_has_bf16(flags)
    if choice == "auto":
        return "bf16" if has_bf16 else "fp32"
    if choice == "bf16" and not has_bf16:
        raise UsageError(
            "--precision bf16: this CPU has no bf16 instructions (AVX512-BF16 or AMX); use --precision fp32 or auto"
        )
    return choice
