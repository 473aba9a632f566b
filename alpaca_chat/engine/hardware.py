"""What this machine offers llama.cpp: physical cores, and whether its AMX kernels may run."""

import os

import llama_cpp


def model_load_params():
    """llama.cpp's model parameters for CPU inference: every load goes through here.

    Where llama.cpp was built with AMX kernels and the CPU has AMX, its AMX
    weight layout is refused (`use_extra_bufts` off): ggml's AMX matmul
    segfaults on some of these machines, inside llama_decode, on the bundled
    model's very first prompt (llama.cpp issue 20824, closed unfixed). The
    plain AVX-512 kernels run instead; the CPU repack layouts go with it.
    """
    params = llama_cpp.llama_model_default_params()
    params.use_mmap = True
    params.n_gpu_layers = 0
    if amx_kernels_active():
        params.use_extra_bufts = False
    return params


def amx_kernels_active() -> bool:
    return b"AMX_INT8 = 1" in (llama_cpp.llama_print_system_info() or b"")


def physical_cores() -> int:
    """Physical cores usable by this process: llama.cpp slows down on hyperthreads."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        cores = _cpuinfo_cores()
    except OSError:
        cores = set()
    return max(1, min(len(cores), usable)) if cores else max(1, usable)


def _cpuinfo_cores() -> set[tuple[str | None, str]]:
    cores = set()
    physical_id = None
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "physical id":
                physical_id = value.strip()
            elif key == "core id":
                cores.add((physical_id, value.strip()))
    return cores
