"""Our CPU decode kernels (`kernels/*.c`): compiled on this machine on first use, cached, called with ctypes.

Three things in a CPU decode step were left that torch does not do well:

* `quantization:int8` halves the bytes a step reads, but torch's weight-only int8 kernel streams them at about 0.8
  of the memory bandwidth, so int8 was barely faster than packed bf16. `blocked_matmul.c` stores each weight matrix
  in blocks that are one sequential stream and reaches about the bandwidth `torch.sum` does.
* bf16 weights: oneDNN packs them only on CPUs with AVX-512 or AVX-NE-CONVERT. `blocked_matmul.c` multiplies them in
  the same blocked layout on any CPU with AVX2 and FMA, widening them to float32 in registers.
* Between its matrix products a decoder layer ran about sixty small torch operators per step, a few microseconds of
  dispatch each for a few kilobytes of work: milliseconds per token. `decode_ops.c` does most of them in three calls.

They are compiled here rather than shipped, with `-march=native`, because the vector code (AVX-512 or AVX2) must
match the CPU it runs on, and a C compiler is cheap to have where torch already is; compiling takes about a second
and the result is cached per source, compiler and CPU. The OpenMP loops run on the OpenMP runtime torch has loaded
(linked by path), so the process keeps one thread pool. Without a compiler, without AVX2, or without that runtime,
`load()` says why and the callers keep torch's operators.
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
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name("kernels") / name for name in ("blocked_matmul.c", "decode_ops.c"))
ROWS, CHUNK = 4, 16  # the blocked layout's shape; must match the source
MAX_KERNEL_ROWS = 48  # rows of x up to which the kernel beats unpacking the weights for a general product (measured)
_UNPACK_ROWS = 16384  # output rows unpacked at a time for a general product (64 MiB in float32 for K = 1024)


@dataclass(frozen=True)
class Kernels:
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
        """An int8 or bf16 (N, K) weight in the kernels' blocked layout (a new contiguous tensor, shape (N, K))."""
        n, k = weight.shape
        return weight.reshape(n // ROWS, ROWS, k // CHUNK, CHUNK).transpose(1, 2).contiguous().reshape(n, k)

    def int8_matmul(self, x: torch.Tensor, blocked: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """`(x @ W.T) * scale` for a contiguous 2-D bf16/fp32 `x`, the blocked int8 `W` and float32 `scale`.

        Raises:
            ValueError: the tensors are not what the kernel reads (it would read past them).
        """
        rows, n = x.shape[0], blocked.shape[0]
        if (
            not self._reads(x, blocked, torch.int8)
            or scale.dtype != torch.float32
            or not scale.is_contiguous()
            or scale.numel() != n
        ):
            raise ValueError(
                f"int8 kernel inputs: x {x.dtype} {tuple(x.shape)}, weight {blocked.dtype} {tuple(blocked.shape)}, "
                f"scale {scale.dtype} {tuple(scale.shape)}: need a contiguous bf16/fp32 x with the weight's width, "
                "a contiguous int8 weight and a float32 scale per row (was the model converted after loading?)"
            )
        if rows > MAX_KERNEL_ROWS:
            return self._general(x, blocked, x.dtype).mul_(scale.to(x.dtype))
        out = torch.empty(rows, n, dtype=x.dtype)
        status = self.lib.qa_int8_matmul(
            x.data_ptr(), _bf16(x), blocked.data_ptr(), scale.data_ptr(), out.data_ptr(),
            rows, n, x.shape[1], torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("the int8 kernel could not allocate its float32 copy of the input")
        return out

    def bf16_matmul(self, x: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        """`x @ W.T` for a contiguous 2-D bf16/fp32 `x` and the blocked bf16 `W`, in x's dtype: float32 products
        and sums, one rounding. Many rows (a prompt) go to a general float32 product over unpacked slices.

        Raises:
            ValueError: the tensors are not what the kernel reads (it would read past them).
        """
        if not self._reads(x, blocked, torch.bfloat16):
            raise ValueError(
                f"bf16 kernel inputs: x {x.dtype} {tuple(x.shape)}, weight {blocked.dtype} {tuple(blocked.shape)}: "
                "need a contiguous bf16/fp32 x with the weight's width and a contiguous bf16 weight whose shape the "
                "blocked layout takes (was the model converted after loading?)"
            )
        rows, n = x.shape[0], blocked.shape[0]
        if rows > MAX_KERNEL_ROWS:
            return self._general(x, blocked, torch.float32)
        out = torch.empty(rows, n, dtype=x.dtype)
        status = self.lib.qa_bf16_matmul(
            x.data_ptr(), _bf16(x), blocked.data_ptr(), out.data_ptr(), rows, n, x.shape[1], torch.get_num_threads()
        )
        if status != 0:
            raise MemoryError("the bf16 kernel could not allocate its float32 copy of the input")
        return out

    def _reads(self, x: torch.Tensor, blocked: torch.Tensor, weight_dtype: torch.dtype) -> bool:
        """Whether the kernels can read `x` and the blocked weight without reading past either."""
        return (
            x.dim() == 2
            and x.dtype in (torch.bfloat16, torch.float32)
            and x.is_contiguous()
            and x.shape[1] == blocked.shape[1]
            and blocked.dtype == weight_dtype
            and blocked.is_contiguous()
            and self.fits(*blocked.shape)
        )

    def unpack(self, blocked: torch.Tensor, row0: int, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows `[row0, row0 + rows)` of the blocked int8 or bf16 weight as their values, row-major, in `dtype`
        (bf16 or fp32; int8 as its integers)."""
        out = torch.empty(rows, blocked.shape[1], dtype=dtype)
        self.lib.qa_blocked_unpack(
            blocked.data_ptr(), _bf16(blocked), int(dtype == torch.bfloat16), out.data_ptr(), blocked.shape[1],
            row0, rows, torch.get_num_threads(),
        )  # fmt: skip
        return out

    def _general(self, x: torch.Tensor, blocked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`x @ W.T` (unscaled) for many rows of x (a prompt): the weight unpacked to `dtype` a slice at a time for a
        general matrix product in `dtype`; the result in x's dtype."""
        n = blocked.shape[0]
        out = torch.empty(x.shape[0], n, dtype=x.dtype)
        wide = x.to(dtype)
        for row0 in range(0, n, _UNPACK_ROWS):
            rows = min(_UNPACK_ROWS, n - row0)
            out[:, row0 : row0 + rows] = torch.nn.functional.linear(wide, self.unpack(blocked, row0, rows, dtype))
        return out

    # --- the operators between a decoder layer's products (decode_ops.c); tensors contiguous, bf16 or fp32 ---
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """qwen-asr's RMSNorm over the last dimension of `x`; `weight` is one row, or one row per row of `x`'s
        second-to-last dimension (the query and key heads' stacked norms)."""
        dim = x.shape[-1]
        out = torch.empty_like(x)
        rows, weight_rows = x.numel() // dim, weight.numel() // dim
        self.lib.qa_rms_norm(
            x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, dim, weight_rows, eps, _bf16(x)
        )  # fmt: skip
        return out

    def add_rms_norm(
        self, residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(residual + delta, RMSNorm(residual + delta))`: the residual sum and the next block's input."""
        dim = residual.shape[-1]
        summed, normed = torch.empty_like(residual), torch.empty_like(residual)
        self.lib.qa_add_rms_norm(
            residual.data_ptr(), delta.data_ptr(), summed.data_ptr(), normed.data_ptr(), weight.data_ptr(),
            residual.numel() // dim, dim, eps, _bf16(residual),
        )  # fmt: skip
        return summed, normed

    def attend(
        self,
        qkv: torch.Tensor,
        head_norm: torch.Tensor,
        eps: float,
        cos: torch.Tensor,
        sin: torch.Tensor,
        caches: tuple[torch.Tensor, torch.Tensor],
        position: int,
        keep: torch.Tensor | None,
        scaling: float,
        heads: int,
    ) -> torch.Tensor:
        """One token's attention block after the q/k/v product (see `qa_attend`): the new key and value go into the
        cache buffers (batch, kv_heads, capacity, dim) at `position`; returns (batch, heads * dim)."""
        key_cache, value_cache = caches
        batch, kv_heads, capacity, dim = key_cache.shape
        out = qkv.new_empty((batch, heads * dim))
        threads = torch.get_num_threads()
        queries = torch.empty(batch * heads * dim, dtype=torch.float32)
        scores = torch.empty(threads * (heads // kv_heads) * (position + 1), dtype=torch.float32)
        self.lib.qa_attend(
            qkv.data_ptr(), head_norm.data_ptr(), eps, cos.data_ptr(), sin.data_ptr(), key_cache.data_ptr(),
            value_cache.data_ptr(), capacity, position, None if keep is None else keep.data_ptr(), scaling,
            out.data_ptr(), batch, heads, kv_heads, dim, queries.data_ptr(), scores.data_ptr(), threads, _bf16(qkv),
        )  # fmt: skip
        return out


def _bf16(tensor: torch.Tensor) -> int:
    return int(tensor.dtype == torch.bfloat16)


@functools.cache
def load() -> tuple[Kernels | None, str]:
    """The kernels, or None and why they cannot run here. Compiled once per machine (cached), loaded once per
    process: for this CPU (`-march=native`), or for the CPU `QWEN_ASR_KERNEL_MARCH` names (e.g. `haswell`, to run
    the AVX2 code on an AVX-512 machine, as the benchmark does to measure an AVX2-only CPU's path)."""
    try:
        return build(os.environ.get("QWEN_ASR_KERNEL_MARCH") or "native"), ""
    except KernelUnavailable as exc:
        return None, str(exc)


class KernelUnavailable(Exception):
    """The kernel cannot be built or run here; the message says why."""


def build(march: str = "native") -> Kernels:
    """Compile (unless cached) and load the kernels for `-march=<march>`; `load()` is this, once, for the CPU here.

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
    for part in (*(source.read_bytes() for source in SOURCES), version.stdout.encode(), _cpu_flags().encode()):
        key.update(part)
    key.update(f"{openmp} {march}".encode())
    path = _cache_dir() / f"qwen_asr_kernels-{key.hexdigest()[:16]}.so"
    try:
        if not path.exists():
            _compile(compiler, openmp, march, path)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:  # a damaged cached file (a full disk, a killed build elsewhere): build it once more
            path.unlink(missing_ok=True)
            _compile(compiler, openmp, march, path)
            lib = ctypes.CDLL(str(path))
    except OSError as exc:  # a cache on a noexec mount, symbols the linked runtime lacks, no space left
        raise KernelUnavailable(f"the compiled kernels could not be loaded ({exc})") from exc
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.qa_int8_vector_bits.restype = i32
    lib.qa_int8_matmul.restype = i32
    lib.qa_int8_matmul.argtypes = [p, i32, p, p, p, i64, i64, i64, i32]
    lib.qa_bf16_matmul.restype = i32
    lib.qa_bf16_matmul.argtypes = [p, i32, p, p, i64, i64, i64, i32]
    signatures: dict[str, list[Any]] = {
        "qa_blocked_unpack": [p, i32, i32, p, i64, i64, i64, i32],
        "qa_rms_norm": [p, p, p, i64, i64, i64, f32, i32],
        "qa_add_rms_norm": [p, p, p, p, p, i64, i64, f32, i32],
        "qa_attend": [p, p, f32, p, p, p, p, i64, i64, p, f32, p, i64, i64, i64, i64, p, p, i32, i32],
    }
    for name, argtypes in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = None, argtypes
    bits = lib.qa_int8_vector_bits()
    if bits == 0:
        raise KernelUnavailable(f"no AVX-512 or AVX2+FMA code for -march={march} (the CPU has neither)")
    return Kernels(lib, bits, path)


def _compile(compiler: str, openmp: str, march: str, path: Path) -> None:
    """Build the shared library at `path` (atomically: concurrent workers may build it at once)."""
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        objects = [str(Path(work) / f"{source.stem}.o") for source in SOURCES]
        lib = Path(work) / path.name
        # No contraction of a*b + c into one rounding: the C operators round where torch's operators do.
        flags = ["-O3", f"-march={march}", "-ffp-contract=off", "-fopenmp", "-fPIC"]
        # Linking the runtime torch loaded, by path and without -fopenmp, keeps one OpenMP thread pool.
        steps = [
            *([compiler, *flags, "-c", str(source), "-o", obj] for source, obj in zip(SOURCES, objects, strict=True)),
            [compiler, "-shared", *objects, openmp, "-lm", "-o", str(lib)],
        ]
        for step in steps:
            try:
                done = subprocess.run(step, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as exc:
                raise KernelUnavailable(f"compiling the kernels failed ({type(exc).__name__}: {exc})") from exc
            if done.returncode != 0:
                first = (done.stderr.strip().splitlines() or ["no message"])[0]
                raise KernelUnavailable(f"compiling the kernels failed ({first})")
        os.replace(lib, path)
    log.info("compiled the CPU decode kernels into %s", path)


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
    for path in loaded:  # a torch linked to the system's runtime: not another package's bundled copy
        if "site-packages" not in path and ".libs/" not in path:
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
    """`$XDG_CACHE_HOME/qwen-asr-worker` (or ~/.cache/...), else a per-user folder in the temp directory. A folder
    someone else owns or can write to is passed over: a library planted there would run in this process."""
    candidates = [Path(tempfile.gettempdir()) / f"qwen-asr-worker-{os.getuid()}"]
    try:  # a container user without a home (an arbitrary uid) has no ~: the temp folder then
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        candidates.insert(0, Path(base) / "qwen-asr-worker")
    except RuntimeError:
        pass
    for candidate in candidates:
        try:
            candidate.mkdir(mode=0o700, parents=True, exist_ok=True)
            status = candidate.stat()
        except OSError:
            continue
        if status.st_uid == os.getuid() and not status.st_mode & 0o022 and os.access(candidate, os.W_OK):
            return candidate
    raise KernelUnavailable("no private writable cache folder for the compiled kernels (set XDG_CACHE_HOME)")
