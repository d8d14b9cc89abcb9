"""The int8 decode kernel (`kernels/int8_matmul.c`): compiled on this machine on first use, cached, called with ctypes.

`quantization:int8` halves the bytes a decode step reads, but torch's weight-only int8 kernel streams them at about
0.8 of the memory bandwidth, so int8 was barely faster than packed bf16. The C kernel stores each weight matrix in
blocks that are one sequential stream and reaches about the bandwidth `torch.sum` does (see the source's comment).

It is compiled here rather than shipped, with `-march=native`, because its vector code (AVX-512 or AVX2) must match
the CPU it runs on, and a C compiler is cheap to have where torch already is; compiling takes under a second and the
result is cached per source, compiler and CPU. Its OpenMP loop runs on the OpenMP runtime torch has loaded (linked
by path), so the process keeps one thread pool. Without a compiler, without AVX2, or without that runtime, `load()`
says why and the caller keeps torch's kernel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "int8_matmul.c"
ROWS, CHUNK = 4, 16  # the blocked layout's shape; must match the source
MAX_KERNEL_ROWS = 48  # rows of x up to which the kernel beats unpacking the weights for a general product (measured)
_UNPACK_ROWS = 16384  # output rows unpacked at a time for a general product (32 MiB in bf16 for K = 1024)


@dataclass(frozen=True)
class Kernel:
    """The loaded kernel library."""

    lib: ctypes.CDLL
    vector_bits: int
    path: Path

    @staticmethod
    def fits(out_features: int, in_features: int) -> bool:
        """Whether a weight of this shape can take the blocked layout."""
        return out_features % ROWS == 0 and in_features % CHUNK == 0

    @staticmethod
    def block(weight: torch.Tensor) -> torch.Tensor:
        """An int8 (N, K) weight in the kernel's blocked layout (a new contiguous tensor, shape (N, K))."""
        n, k = weight.shape
        return weight.reshape(n // ROWS, ROWS, k // CHUNK, CHUNK).transpose(1, 2).contiguous().reshape(n, k)

    def matmul(self, x: torch.Tensor, blocked: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """`(x @ W.T) * scale` for a contiguous 2-D bf16/fp32 `x`, the blocked int8 `W` and float32 `scale`."""
        rows, n = x.shape[0], blocked.shape[0]
        if rows > MAX_KERNEL_ROWS:
            return self._general(x, blocked, scale)
        out = torch.empty(rows, n, dtype=x.dtype)
        status = self.lib.qa_int8_matmul(
            x.data_ptr(), x.dtype == torch.bfloat16, blocked.data_ptr(), scale.data_ptr(), out.data_ptr(),
            rows, n, x.shape[1], torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("the int8 kernel could not allocate its float32 copy of the input")
        return out

    def unpack(self, blocked: torch.Tensor, row0: int, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows `[row0, row0 + rows)` of the blocked weight as their integer values, row-major, in `dtype`."""
        out = torch.empty(rows, blocked.shape[1], dtype=dtype)
        self.lib.qa_int8_unpack(
            blocked.data_ptr(), dtype == torch.bfloat16, out.data_ptr(), blocked.shape[1], row0, rows,
            torch.get_num_threads(),
        )  # fmt: skip
        return out

    def _general(self, x: torch.Tensor, blocked: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Many rows of x (a prompt): unpack the weight a slice at a time and let a general matrix product run."""
        n = blocked.shape[0]
        out = torch.empty(x.shape[0], n, dtype=x.dtype)
        for row0 in range(0, n, _UNPACK_ROWS):
            rows = min(_UNPACK_ROWS, n - row0)
            out[:, row0 : row0 + rows] = torch.nn.functional.linear(x, self.unpack(blocked, row0, rows, x.dtype))
        return out.mul_(scale.to(x.dtype))


@functools.cache
def load() -> tuple[Kernel | None, str]:
    """The kernel, or None and why it cannot run here. Compiles once per machine (cached), loads once per process."""
    try:
        return build(), ""
    except KernelUnavailable as exc:
        return None, str(exc)


class KernelUnavailable(Exception):
    """The kernel cannot be built or run here; the message says why."""


def build(march: str = "native") -> Kernel:
    """Compile (unless cached) and load the kernel for `-march=<march>`; `load()` is this, once, for the CPU here.

    Raises:
        KernelUnavailable: no C compiler, no OpenMP runtime in the process, or no AVX2/AVX-512 code for `march`.
    """
    openmp = _openmp_runtime()
    compiler = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"no C compiler ({compiler!r}: {type(exc).__name__}); install gcc or set CC") from exc
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.stdout.encode(), _cpu_flags().encode(), openmp.encode(), march.encode()):
        key.update(part)
    path = _cache_dir() / f"int8_matmul-{key.hexdigest()[:16]}.so"
    if not path.exists():
        _compile(compiler, openmp, march, path)
    lib = ctypes.CDLL(str(path))
    lib.qa_int8_vector_bits.restype = ctypes.c_int
    lib.qa_int8_matmul.restype = ctypes.c_int
    lib.qa_int8_matmul.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
    ]  # fmt: skip
    lib.qa_int8_unpack.restype = None
    lib.qa_int8_unpack.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
    ]  # fmt: skip
    bits = lib.qa_int8_vector_bits()
    if bits == 0:
        raise KernelUnavailable(f"no AVX-512 or AVX2+FMA code for -march={march} (the CPU has neither)")
    return Kernel(lib, bits, path)


def _compile(compiler: str, openmp: str, march: str, path: Path) -> None:
    """Build the shared library at `path` (atomically: concurrent workers may build it at once)."""
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        obj, lib = Path(work) / "int8_matmul.o", Path(work) / path.name
        # Linking the runtime torch loaded, by path and without -fopenmp, keeps one OpenMP thread pool.
        steps = (
            [compiler, "-O3", f"-march={march}", "-fopenmp", "-fPIC", "-c", str(SOURCE), "-o", str(obj)],
            [compiler, "-shared", str(obj), openmp, "-o", str(lib)],
        )
        for step in steps:
            try:
                done = subprocess.run(step, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as exc:
                raise KernelUnavailable(f"compiling the int8 kernel failed ({type(exc).__name__}: {exc})") from exc
            if done.returncode != 0:
                first = (done.stderr.strip().splitlines() or ["no message"])[0]
                raise KernelUnavailable(f"compiling the int8 kernel failed ({first})")
        os.replace(lib, path)
    log.info("compiled the int8 kernel into %s", path)


def _openmp_runtime() -> str:
    """The path of torch's OpenMP runtime as this process has it loaded (from /proc/self/maps). Other packages
    (scikit-learn, via librosa) may have loaded their own copy; torch's is the one its threads run on."""
    loaded = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                name = line.rsplit("/", 1)[-1].strip()
                if name.startswith(("libgomp", "libiomp5")) and "/" in line:
                    loaded.append(line[line.index("/") :].strip())
    except OSError:
        pass
    home = Path(torch.__file__).resolve().parent
    for path in loaded:
        if Path(path).resolve().is_relative_to(home) or Path(path).parent.name == "torch.libs":
            return path
    if loaded:
        return loaded[0]
    raise KernelUnavailable("torch has no OpenMP runtime loaded in this process")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _cache_dir() -> Path:
    """`$XDG_CACHE_HOME/qwen-asr-worker` (or ~/.cache/...), else a per-user folder in the temp directory."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    for candidate in (Path(base) / "qwen-asr-worker", Path(tempfile.gettempdir()) / f"qwen-asr-worker-{os.getuid()}"):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
            if os.access(candidate, os.W_OK):
                return candidate
        except OSError:
            continue
    raise KernelUnavailable("no writable cache folder for the compiled kernel (set XDG_CACHE_HOME)")
