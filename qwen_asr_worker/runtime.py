"""Where and how the models run: device and dtype choice, and the memory figures `Status` reports.

Kept apart from the engine because these are facts about the machine, decided once per load and easy to test
on their own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
from pathlib import Path

import psutil
import torch

from .errors import InvalidRequest

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bfloat16 arithmetic (AVX-512 BF16 or AMX), where bf16 beats fp32."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def pick_device(requested: str, cuda_required: bool) -> str:
    """Resolve the `device` option: CUDA when available, else MPS where present, else CPU.

    Raises:
        InvalidRequest: CUDA was asked for (option or `CUDA=true`) on a machine without a usable GPU.
    """
    has_cuda = torch.cuda.is_available()
    if (cuda_required or requested.startswith("cuda")) and not has_cuda:
        raise InvalidRequest(
            "CUDA was requested (CUDA: true or device:cuda) but no CUDA GPU is available to this process "
            f"(torch {torch.__version__}, cuda build: {torch.version.cuda or 'no'}); "
            "remove CUDA: true / set device:cpu, or install a CUDA build of torch (see README)"
        )
    if requested != "auto":
        if requested == "mps" and not torch.backends.mps.is_available():
            raise InvalidRequest("device:mps was requested but MPS is not available; use device:auto or cpu")
        return "cuda:0" if requested == "cuda" else requested
    if has_cuda:
        return "cuda:0"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(requested: str, device: str) -> tuple[torch.dtype, str]:
    """Resolve `torch_dtype`; `auto` is bf16 on a GPU or a CPU with native bf16, else fp32.

    Returns the dtype and a short reason for the log line.
    """
    if requested != "auto":
        return _DTYPES[requested], "set by torch_dtype"
    if device.startswith("cuda"):
        return torch.bfloat16, "auto: CUDA GPU"
    if device == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16, "auto: CPU has AVX-512 BF16/AMX"
    return torch.float32, f"auto: no fast bf16 on {device}"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def module_bytes(module: torch.nn.Module | None) -> int:
    """Bytes held by a module's parameters and buffers (shared tensors counted once)."""
    if module is None:
        return 0
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        key = tensor.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    # Weights packed for oneDNN (fast_decode) are opaque tensors outside parameters(); they carry their size.
    return total + sum(int(getattr(m, "weight_bytes", 0)) for m in module.modules())


def rss_bytes() -> int:
    """Resident memory of this process."""
    return psutil.Process(os.getpid()).memory_info().rss


def cuda_allocated_bytes() -> int:
    """Bytes allocated by torch on the current CUDA device (0 without CUDA)."""
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def trim_heap() -> None:
    """Hand the free pages of glibc's heaps back to the OS (malloc_trim).

    Called after every model call: a forward pass allocates and frees activations of many sizes, and glibc
    keeps the freed memory for reuse, fragmented. Without this, resident memory crept up by ~30 MB per 180-s
    window over an hour-long file; with it, it stays level (see the bench, figure 7).
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def release_memory() -> None:
    """Give freed memory back to the OS: Python's gc, glibc's heap (malloc_trim) and torch's CUDA cache."""
    import gc

    gc.collect()
    trim_heap()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
