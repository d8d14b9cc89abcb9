"""Faster token-by-token decoding on CPU, with the same math as qwen-asr's stock transformers path.

On a CPU a Qwen3-ASR request's time goes to decoding: every token reads the decoder's weights once (28 layers and
the output projection, 1.19 GB in bf16), so the floor is memory bandwidth. The stock path runs well above it.
Profiling one decode step showed where; `accelerate_decoder` applies each remedy to a loaded model:

* **Linear layers** (`decode_linears`): packed for oneDNN (or, for bf16 where oneDNN packs none, our blocked bf16
  kernel), or int8, q/k/v and gate/up stacked. The originals are
  released, and where they were memory-mapped from the checkpoint their pages are handed back too (here), so
  memory does not double. The audio encoder, which runs once per window on many frames, keeps its stock layers,
  except where bf16 weights compute in float32 (`bf16_weights_pay()`): there its linears are bf16-blocked too.
* **The decode step** (`decode_step`): a key/value cache that grows in place, attention for a single query without
  copying the cache, and each decoder layer's one-token step as one function (with our compiled operators between
  its products where `cpu_kernels` builds).
* **Prefill logits.** The output projection ran over every prompt position; generation reads only the last one.
  It now sees the last position only (on every device: that part is not CPU-specific).

Opt-in `quantization:int8` stores the decoder's linear weights as int8 with one float scale per output channel
(symmetric, round to nearest): half the bytes per token. They are multiplied by our blocked kernel
(`cpu_kernels`, compiled on this machine), or by torch's weight-only int8 kernel where that cannot be built. Its
accuracy cannot be measured without the real weights; see the README.

Everything here uses torch operators that are private (`torch.ops.mkldnn._linear_pointwise`,
`aten._weight_int8pack_mm`); torch is pinned, and `accelerate_decoder` checks that they exist and work before it
changes anything, falling back to the stock path with one log line.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import cpu_kernels, decode_step, runtime
from .decode_linears import Bf16Linear, Int8Linear, PackedLinear, linear_from, replace_linears

log = logging.getLogger(__name__)


def kernels_available(dtype: torch.dtype, quantization: str) -> str:
    """Why the fast path's linear layers cannot run here ("" when they can): each private operator is tried on a
    tiny input and must match `F.linear`. For bf16 on a CPU where oneDNN cannot pack it (no AVX-512 and no
    AVX-NE-CONVERT), our blocked bf16 kernel stands in when it builds and agrees."""
    return _linear_route(dtype, quantization)[0]


def _linear_route(dtype: torch.dtype, quantization: str) -> tuple[str, cpu_kernels.Kernels | None]:
    """Why the fast path's linears cannot run here ("" when they can), and our bf16 kernel where it stands in for
    oneDNN's packing (None where oneDNN packs, or int8 runs)."""
    problem = _packed_problem(dtype, quantization)
    if problem and dtype == torch.bfloat16 and quantization == "none":
        blocked = bf16_kernel()
        if blocked is not None:
            return "", blocked
    return problem, None


def _packed_problem(dtype: torch.dtype, quantization: str) -> str:
    """Why oneDNN's packed (or torch's int8) linears cannot run here in `dtype` ("" when they can)."""
    weight = torch.randn(8, 16).to(dtype)
    x = torch.randn(2, 16).to(dtype)
    expected = torch.nn.functional.linear(x, weight)
    try:
        if quantization == "int8":
            got = Int8Linear(linear_from(weight))(x)
            tolerance = 0.05 * float(expected.abs().max()) + 1e-3
        else:
            got = PackedLinear(linear_from(weight))(x)
            tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-4
    except (AttributeError, RuntimeError, NotImplementedError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'missing operator'}"
    if got.shape != expected.shape or float((got.float() - expected.float()).abs().max()) > tolerance:
        return "the packed kernel's result differs from F.linear"
    return ""


@functools.cache
def bf16_kernel() -> cpu_kernels.Kernels | None:
    """Our compiled kernels when their bf16 product builds here and matches `F.linear` on a tiny input, else None."""
    kernel, _ = cpu_kernels.load()
    if kernel is None:
        return None
    weight, x = torch.randn(8, 32).bfloat16(), torch.randn(3, 32)
    expected = torch.nn.functional.linear(x, weight.float())
    got = Bf16Linear(linear_from(weight), kernel)(x)
    return kernel if float((got - expected).abs().max()) <= 1e-4 * float(expected.abs().max()) + 1e-6 else None


def _cpu_kernels(dtype: torch.dtype) -> cpu_kernels.Kernels | None:
    """Our compiled decode kernels, the int8 product checked against `F.linear` on a tiny input, or None (and a log
    line saying why)."""
    kernel, why = cpu_kernels.load()
    if kernel is not None:
        weight = torch.randn(8, 32).to(dtype)
        x = torch.randn(3, 32).to(dtype)
        expected = torch.nn.functional.linear(x, weight).float()
        got = Int8Linear(linear_from(weight), kernel)(x).float()
        if float((got - expected).abs().max()) > 0.05 * float(expected.abs().max()) + 1e-3:
            kernel, why = None, "its result differs from F.linear"
    if kernel is None:
        log.warning("CPU decode kernels unavailable (%s); using torch's operators and int8 kernel", why)
    return kernel


def bf16_weights_pay() -> bool:
    """Whether, on this CPU, bf16 weights with float32 compute (`accelerate_decoder(compute=torch.float32)`) is
    the way to run `torch_dtype:auto`: oneDNN packs no bf16 here (no AVX-512, no AVX-NE-CONVERT), so torch's bf16
    operators are slow, while our blocked bf16 kernel builds and agrees (AVX2 and FMA)."""
    return bool(_packed_problem(torch.bfloat16, "none")) and bf16_kernel() is not None


def accelerate_decoder(
    model: nn.Module,
    *,
    device: str,
    dtype: torch.dtype,
    quantization: str = "none",
    compute: torch.dtype | None = None,
) -> str:
    """Apply the fast decode path to a loaded `Qwen3ASRForConditionalGeneration` in place; return what was done.

    On CPU: packed (or int8) decoder linears, the in-place key/value cache and single-query attention. On every
    device: prefill logits for the last position only. If the operators are missing or wrong (checked on a tiny
    input first), the stock path stays and the reason is returned and logged; an error while converting after that
    check propagates, and LoadModel reports it.

    `compute=torch.float32` on a model loaded in bf16 (where `bf16_weights_pay()`): every linear layer of the
    decoder, the output projection and the audio encoder keeps its bf16 weight in our blocked layout (int8 with
    `quantization:int8`), the embedding table stays bf16, and everything else, the activations and the key/value
    cache run in float32: bf16's memory and bytes per token, float32's speed on a CPU without native bf16.
    """
    thinker = model.thinker
    try:
        if compute is not None and compute != dtype:
            return _accelerate_bf16_weights(thinker, device, dtype, compute, quantization)
        return _accelerate(thinker, device, dtype, quantization)
    finally:  # on whatever output projection is in place by then
        thinker.lm_head.register_forward_pre_hook(_last_position)


def _accelerate_bf16_weights(
    thinker: nn.Module, device: str, dtype: torch.dtype, compute: torch.dtype, quantization: str
) -> str:
    blocked = bf16_kernel() if device == "cpu" else None
    if dtype != torch.bfloat16 or compute != torch.float32 or blocked is None:
        raise ValueError(
            f"bf16 weights with {compute} compute need a CPU model loaded in bf16 and our bf16 kernel "
            f"(device {device}, dtype {dtype}, kernel {'built' if blocked else 'unavailable'})"
        )
    kernels = _cpu_kernels(compute)
    factory: Callable[[nn.Linear], nn.Module] = functools.partial(Bf16Linear, kernel=blocked)
    kind = f"bf16 blocked ({blocked.vector_bits}-bit kernel)"
    if quantization == "int8":
        factory, kind = _int8_linears(kernels)
    released = _swap_linears(thinker, factory, encoder=functools.partial(Bf16Linear, kernel=blocked))
    attention = _install_decode_step(thinker, kernels)
    return (
        f"fast CPU decode, float32 compute on bf16 weights: {kind} decoder linears and output projection, bf16 "
        f"blocked audio encoder linears, bf16 embedding table ({released / 2**20:.0f} MiB of mapped checkpoint pages "
        f"returned), {attention}, last-position prefill logits"
    )


def _swap_linears(
    thinker: nn.Module,
    factory: Callable[[nn.Linear], nn.Module],
    encoder: Callable[[nn.Linear], nn.Module] | None = None,
) -> int:
    """The decoder's linears and the output projection by `factory`'s modules, handing back the mapped checkpoint
    pages of the weights they replace; returns the bytes handed back.

    With `encoder`, the audio encoder's linears by its modules too, and everything left in bf16 computes in float32
    (`_compute_in_float32`); the output projection is then always replaced, since a tied `nn.Linear` would take
    the bf16 embedding table to float32 with it. Otherwise a tied output projection is replaced only where its
    pages can go back (it shares the embedding's matrix)."""
    mapped = _mapped_ranges()
    replaced = replace_linears(thinker.model, factory)
    head = thinker.lm_head
    tied = head.weight is thinker.model.embed_tokens.weight
    if encoder is not None or not tied or _in_ranges(head.weight, mapped):
        thinker.lm_head = factory(head)
        if tied and _in_ranges(head.weight, mapped) and isinstance(thinker.lm_head, PackedLinear | Bf16Linear):
            thinker.lm_head.weight_bytes = 0  # Status counts the matrix once, as the embedding's parameter
        replaced.append(head)
    if encoder is not None:
        replaced += replace_linears(thinker.audio_tower, encoder)
    released = sum(_release(linear.weight) for linear in replaced if _in_ranges(linear.weight, mapped))
    del replaced
    if encoder is not None:
        released += _compute_in_float32(thinker, mapped)
    runtime.trim_heap()  # the stacked copies made while packing
    return released


def _compute_in_float32(thinker: nn.Module, mapped: list[tuple[int, int]]) -> int:
    """Every parameter and buffer left in bf16 (norms, convolutions, biases, rotary tables) to float32, except the
    embedding table, which stays bf16 and hands its rows on as float32 (a lookup reads a few rows; a float32 copy
    would hold 0.6 GB). The mapped checkpoint pages of what was converted go back. Returns the bytes released."""
    text = thinker.model
    embedding = text.embed_tokens
    old = [t for t in [*thinker.parameters(), *thinker.buffers()] if _in_ranges(t, mapped)]
    old = [t.detach() for t in old if t is not embedding.weight and t.dtype == torch.bfloat16]
    del text._modules["embed_tokens"]
    try:
        thinker.float()
    finally:
        text._modules["embed_tokens"] = embedding
    embedding.register_forward_hook(_to_float32)
    released = sum(_release(tensor) for tensor in old)
    del old
    return released


def _to_float32(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    return output.float()


def _accelerate(thinker: nn.Module, device: str, dtype: torch.dtype, quantization: str) -> str:
    if device != "cpu":
        return "stock decode (not a CPU); prefill logits for the last position only"
    if dtype not in (torch.bfloat16, torch.float32):
        return f"stock decode ({dtype} has no packed CPU kernel); prefill logits for the last position only"
    problem, blocked = _linear_route(dtype, quantization)
    if problem:
        log.warning("fast CPU decode unavailable (%s); using the stock transformers path", problem)
        return f"stock decode ({problem})"
    kernels = _cpu_kernels(dtype)
    factory: Callable[[nn.Linear], nn.Module] = PackedLinear
    kind = "oneDNN-packed"
    if blocked is not None:
        factory = functools.partial(Bf16Linear, kernel=blocked)
        kind = f"bf16 blocked ({blocked.vector_bits}-bit kernel; oneDNN packs no bf16 on this CPU)"
    elif quantization == "int8":
        factory, kind = _int8_linears(kernels)
    released = _swap_linears(thinker, factory)
    attention = _install_decode_step(thinker, kernels)
    return (
        f"fast CPU decode: {kind} decoder linears ({released / 2**20:.0f} MiB of mapped checkpoint pages returned), "
        f"{attention}, last-position prefill logits"
    )


def _int8_linears(kernels: cpu_kernels.Kernels | None) -> tuple[Callable[[nn.Linear], nn.Module], str]:
    """The int8 linear factory (our blocked kernel, else torch's) and how the load line names it."""
    how = f"blocked {kernels.vector_bits}-bit kernel" if kernels else "torch kernel"
    return functools.partial(Int8Linear, kernel=kernels), f"int8 per-channel ({how})"


def _install_decode_step(thinker: nn.Module, kernels: cpu_kernels.Kernels | None) -> str:
    """The in-place cache, single-query attention and one-step layers where the decoder takes them; says what."""
    if not decode_step.install_decode_attention(thinker):
        return f"{thinker.model.config._attn_implementation} attention and cache as they were"
    decode_step.install_growing_cache(thinker)  # its buffers are for our attention, which reads their views
    attention = "in-place key/value cache, single-query attention"
    if decode_step.install_decode_layers(thinker, kernels):
        attention += f", one-step decoder layers ({'C' if kernels else 'torch'} operators)"
    return attention


def _last_position(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Forward pre-hook on the output projection: only the last position's logits are ever read."""
    hidden = args[0]
    if hidden.dim() == 3 and hidden.shape[1] > 1:
        return (hidden[:, -1:, :], *args[1:])
    return args


# --- handing back the pages of mapped weights ------------------------------------------------------------------
_MADV_DONTNEED = 4


def _release(tensor: torch.Tensor) -> int:
    """Drop the resident pages of a tensor memory-mapped from a checkpoint file. The mapping is private and
    unmodified, so the kernel would re-read the pages from the file if anything touched them again (a tied
    embedding looking up a row); nothing else does. Returns the bytes released."""
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if end <= start:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) != 0:
        return 0
    return end - start


def _mapped_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process that map a safetensors file (from /proc/self/maps)."""
    ranges = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[5].endswith(".safetensors"):
                    low, high = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((low, high))
    except OSError:
        return []
    return ranges


def _in_ranges(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    if tensor.device.type != "cpu":
        return False
    address = tensor.data_ptr()
    return any(low <= address < high for low, high in ranges)
