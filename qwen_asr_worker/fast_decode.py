"""Faster token-by-token decoding on CPU, with the same math as qwen-asr's stock transformers path.

On a CPU a Qwen3-ASR request's time goes to decoding: every token reads the decoder's weights once (28 layers and
the output projection, 1.19 GB in bf16), so the floor is memory bandwidth. The stock path runs well above it.
Profiling one decode step showed where, and each change below removes one cause:

* **Linear layers.** `F.linear` on bf16 weights runs a matrix-vector product at about 60 % of the bandwidth
  oneDNN reaches with the same weights reordered into its blocked layout once ("prepacked"); the result is the same
  to the bit. The decoder's linear layers (attention, MLP, output projection) are replaced by modules that hold
  only the packed weight: the original tensor is released, and where it was memory-mapped from the checkpoint its
  pages are handed back too, so memory does not double. The audio encoder, which runs once per window on many
  frames, keeps its stock layers.
* **Key/value cache.** transformers' dynamic cache appends each token with `torch.cat`, copying every layer's
  whole cache every step. A cache that grows in place (capacity doubling) writes one position per step, in the
  model's dtype.
* **Attention for one query.** transformers repeats every key/value head for the query heads that share it (a copy
  of the whole cache per layer per step) and calls SDPA with one query. Here the query heads of a group become one
  query sequence of that group's key/value head, so SDPA reads the cache's view in place, without repeats: for a
  180-s window (about 2400 cached positions) a step reads the bf16 cache once, which is also half the memory of
  the float32 cache this used before (a bf16 batched matmul on the view would copy it every step instead).
  Prompts (more than one query) still take transformers' SDPA path. With `attn_implementation:eager` neither this
  nor the in-place cache is used.
* **One decode step per layer in fewer operators.** After the above, a step still spent milliseconds outside the
  matrix products, in small operators and module calls. For steps that add one token, each decoder layer runs
  `_DecodeLayer`: the stacked q/k/v product is split once, the query and key heads are normalized and rotated as
  one tensor, and no module sits between the products. The operators and values are the stock layer's, so the
  result is the same to the bit (tested on random weights); it saved about 3 ms a token (37.1 to 34.0 ms on a
  10-s clip, alternated runs in one process). Where our compiled kernels load (`cpu_kernels`), the operators
  between the products run in C instead, in three calls (the norms, the rotary embedding, the cache write and the
  attention): the same roundings with float32 sums in their own order, so within rounding of the stock layer;
  measured in one process, the layers' time outside their products went from about 6 to 3-3.7 ms a token.
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

from . import cpu_kernels, runtime

log = logging.getLogger(__name__)

ATTENTION = "qwen_asr_worker_decode"
_GROWTH = 256  # spare key/value positions allocated beyond what a cache needs when it grows


class PackedLinear(nn.Module):
    """A linear layer whose weight is held only in oneDNN's packed layout (float32 or bfloat16)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = linear.bias
        self.weight_bytes = linear.weight.numel() * linear.weight.element_size()  # opaque tensors have no size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ W.T + b`, as `nn.Linear`."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed (oneDNN)"


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and one scale per output channel; activations stay in their dtype.

    With `kernel` (and a shape it takes), the weight is stored in that kernel's blocked layout and multiplied by it;
    otherwise it stays row-major for torch's weight-only int8 kernel. The int8 values are the same either way; the
    kernel keeps the scales in float32, torch's kernel in the activations' dtype."""

    def __init__(self, linear: nn.Linear, kernel: cpu_kernels.Kernels | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        scale = weight.float().abs().amax(dim=1).clamp(min=1e-12) / 127.0
        quantized = torch.round(weight.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.kernel = kernel if kernel is not None and kernel.fits(*quantized.shape) else None
        if self.kernel is not None:
            self.register_buffer("weight_int8", self.kernel.block(quantized))
            self.register_buffer("scale", scale)  # float32: the kernel scales its float32 sums
        else:
            self.register_buffer("weight_int8", quantized)
            self.register_buffer("scale", scale.to(weight.dtype))  # torch's kernel wants the activations' dtype
        self.bias = linear.bias
        self.weight_bytes = quantized.numel() + self.scale.numel() * self.scale.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ (q * scale).T + b`."""
        flat = x.reshape(-1, x.shape[-1])
        if self.kernel is not None:
            out = self.kernel.int8_matmul(flat.contiguous(), self.weight_int8, self.scale)
        else:
            if flat.dtype != self.scale.dtype:
                flat = flat.to(self.scale.dtype)
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        how = f"blocked, {self.kernel.vector_bits}-bit kernel" if self.kernel is not None else "torch's kernel"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel ({how})"


_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # linears that always read the same input


class _Group:
    """Linear layers that are always called in a row on the same input (an attention block's q, k, v; an MLP's
    gate and up): their weights are stacked into one packed matrix, so one call reads them all. Each member's call
    returns its slice of that one product, computed when the first member sees a new input."""

    def __init__(self, linears: list[nn.Linear], factory: Callable[[nn.Linear], nn.Module]) -> None:
        self.sizes = [linear.out_features for linear in linears]
        self.linear = factory(_linear(torch.cat([linear.weight.detach() for linear in linears])))
        self._input: torch.Tensor | None = None
        self._outputs: tuple[torch.Tensor, ...] = ()

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self._input is not x:
            self._outputs = self.linear(x).split(self.sizes, dim=-1)
            self._input = x
        out = self._outputs[index]
        if index == len(self.sizes) - 1:
            self._input, self._outputs = None, ()
        return out


class _Member(nn.Module):
    """One linear layer of a `_Group`, standing where the original was."""

    def __init__(self, group: _Group, index: int) -> None:
        super().__init__()
        self.group, self.index = group, index
        self.fused = group.linear  # registered, so the packed weight shows in the module tree
        self.out_features = group.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This member's slice of the group's product."""
        return self.group.output(x, self.index)


def kernels_available(dtype: torch.dtype, quantization: str) -> str:
    """Why the fast path cannot run here ("" when it can): each private operator is tried on a tiny input and
    must match `F.linear`."""
    weight = torch.randn(8, 16).to(dtype)
    x = torch.randn(2, 16).to(dtype)
    expected = torch.nn.functional.linear(x, weight)
    try:
        if quantization == "int8":
            got = Int8Linear(_linear(weight))(x)
            tolerance = 0.05 * float(expected.abs().max()) + 1e-3
        else:
            got = PackedLinear(_linear(weight))(x)
            tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-4
    except (AttributeError, RuntimeError, NotImplementedError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'missing operator'}"
    if got.shape != expected.shape or float((got.float() - expected.float()).abs().max()) > tolerance:
        return "the packed kernel's result differs from F.linear"
    return ""


def _cpu_kernels(dtype: torch.dtype) -> cpu_kernels.Kernels | None:
    """Our compiled decode kernels, the int8 product checked against `F.linear` on a tiny input, or None (and a log
    line saying why)."""
    kernel, why = cpu_kernels.load()
    if kernel is not None:
        weight = torch.randn(8, 32).to(dtype)
        x = torch.randn(3, 32).to(dtype)
        expected = torch.nn.functional.linear(x, weight).float()
        got = Int8Linear(_linear(weight), kernel)(x).float()
        if float((got - expected).abs().max()) > 0.05 * float(expected.abs().max()) + 1e-3:
            kernel, why = None, "its result differs from F.linear"
    if kernel is None:
        log.warning("CPU decode kernels unavailable (%s); using torch's operators and int8 kernel", why)
    return kernel


def _linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def accelerate_decoder(model: nn.Module, *, device: str, dtype: torch.dtype, quantization: str = "none") -> str:
    """Apply the fast decode path to a loaded `Qwen3ASRForConditionalGeneration` in place; return what was done.

    On CPU: packed (or int8) decoder linears, the in-place key/value cache and single-query attention. On every
    device: prefill logits for the last position only. If the operators are missing or wrong (checked on a tiny
    input first), the stock path stays and the reason is returned and logged; an error while converting after that
    check propagates, and LoadModel reports it.
    """
    thinker = model.thinker
    try:
        return _accelerate(thinker, device, dtype, quantization)
    finally:  # on whatever output projection is in place by then
        thinker.lm_head.register_forward_pre_hook(_last_position)


def _accelerate(thinker: nn.Module, device: str, dtype: torch.dtype, quantization: str) -> str:
    if device != "cpu":
        return "stock decode (not a CPU); prefill logits for the last position only"
    if dtype not in (torch.bfloat16, torch.float32):
        return f"stock decode ({dtype} has no packed CPU kernel); prefill logits for the last position only"
    problem = kernels_available(dtype, quantization)
    if problem:
        log.warning("fast CPU decode unavailable (%s); using the stock transformers path", problem)
        return f"stock decode ({problem})"
    kernels = _cpu_kernels(dtype)
    factory: Callable[[nn.Linear], nn.Module] = PackedLinear
    kind = "oneDNN-packed"
    if quantization == "int8":
        factory = functools.partial(Int8Linear, kernel=kernels)
        kind = f"int8 per-channel ({f'blocked {kernels.vector_bits}-bit kernel' if kernels else 'torch kernel'})"
    mapped = _mapped_ranges()
    replaced: list[nn.Linear] = []
    for owner in list(thinker.model.modules()):
        for names in _FUSED:
            members = [getattr(owner, name, None) for name in names]
            if all(isinstance(m, nn.Linear) and m.bias is None for m in members):
                group = _Group(members, factory)  # type: ignore[arg-type]
                for index, name in enumerate(names):
                    setattr(owner, name, _Member(group, index))
                replaced += members  # type: ignore[arg-type]
        for name, child in list(owner.named_children()):
            if isinstance(child, nn.Linear):
                setattr(owner, name, factory(child))
                replaced.append(child)
    head = thinker.lm_head
    tied = head.weight is thinker.model.embed_tokens.weight
    if not tied or _in_ranges(head.weight, mapped):
        # A tied output projection shares the embedding matrix; packing it is free only when its pages can go back.
        thinker.lm_head = factory(head)
        if tied and isinstance(thinker.lm_head, PackedLinear):
            thinker.lm_head.weight_bytes = 0  # Status counts the matrix once, as the embedding's parameter
        replaced.append(head)
    released = sum(_release(linear.weight) for linear in replaced if _in_ranges(linear.weight, mapped))
    del replaced
    runtime.trim_heap()  # the stacked copies made while packing
    attention = "in-place key/value cache, single-query attention"
    if _install_decode_attention(thinker):
        _install_growing_cache(thinker)  # its buffers are for our attention, which reads their views in place
        if _install_decode_layers(thinker, kernels):
            attention += f", one-step decoder layers ({'C' if kernels else 'torch'} operators)"
    else:
        attention = f"{thinker.model.config._attn_implementation} attention and cache as they were"
    return (
        f"fast CPU decode: {kind} decoder linears ({released / 2**20:.0f} MiB of mapped checkpoint pages returned), "
        f"{attention}, last-position prefill logits"
    )


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


# --- attention for a single query --------------------------------------------------------------------------
def _install_decode_attention(thinker: nn.Module) -> bool:
    """Route the decoder's attention through `_decode_attention` (SDPA for prompts); only when it was SDPA:
    `attn_implementation:eager` keeps transformers' eager attention (and the stock cache). Returns whether done."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = thinker.model.config
    if config._attn_implementation not in ("sdpa", ATTENTION):
        return False
    AttentionInterface.register(ATTENTION, _decode_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    config._attn_implementation = ATTENTION
    return True


def _decode_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Grouped-query attention for one new token per sequence; anything else goes to transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    # The query heads that share a key/value head become that head's query sequence: no repeated keys, and SDPA
    # reads the cache's view (the first positions of each head) in place, in the cache's dtype.
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    mask = None
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :length].reshape(batch, 1, 1, length)
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2), None


# --- a key/value cache that grows in place ---------------------------------------------------------------------
def _install_growing_cache(thinker: nn.Module) -> None:
    from transformers.cache_utils import DynamicCache

    generate = thinker.generate

    layer_class = _growing_layer_class()

    def generate_with_growing_cache(*args: Any, **kwargs: Any) -> Any:
        beams = kwargs.get("num_beams") or getattr(thinker.generation_config, "num_beams", 1) or 1
        if kwargs.get("past_key_values") is None and beams == 1:  # beam search reorders caches: stock path
            spare = int(kwargs.get("max_new_tokens") or _GROWTH) + 1
            cache = DynamicCache()
            cache.layer_class_to_replicate = lambda: layer_class(spare)  # called with no arguments, per layer
            kwargs["past_key_values"] = cache
        return generate(*args, **kwargs)

    thinker.generate = generate_with_growing_cache


def _growing_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A dynamic cache layer that writes new positions into spare capacity instead of concatenating. The first
        allocation holds the prompt and `spare` more positions (generation's token budget), so a normal request
        never grows it; past that, capacity doubles."""

        def __init__(self, spare: int = _GROWTH) -> None:
            super().__init__()
            self._spare = spare

        def lazy_initialization(self, key_states: torch.Tensor) -> None:
            super().lazy_initialization(key_states)
            self._key_buffer: torch.Tensor | None = None
            self._value_buffer: torch.Tensor | None = None
            self._length = 0

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict[str, Any] | None = None
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states)
            new = key_states.shape[-2]
            end = self._length + new
            if self._key_buffer is None:
                self._grow(key_states, value_states, end + self._spare)
            elif end > self._key_buffer.shape[-2]:
                self._grow(key_states, value_states, end + max(_GROWTH, end))
            assert self._key_buffer is not None and self._value_buffer is not None
            first = self._length == 0
            self._key_buffer[:, :, self._length : end] = key_states
            self._value_buffer[:, :, self._length : end] = value_states
            self._length = end
            self.keys = self._key_buffer[:, :, :end]
            self.values = self._value_buffer[:, :, :end]
            if first:  # the prompt: SDPA's fast kernels want contiguous inputs, and these are the same values
                return key_states, value_states
            return self.keys, self.values

        def open_slot(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
            """The key and value buffers, with room made for one more position, and that position, for a caller
            that writes it in place (then `close_slot`); None before the prompt has filled the cache."""
            if not self.is_initialized or self._key_buffer is None or self._value_buffer is None:
                return None
            if self._length + 1 > self._key_buffer.shape[-2]:
                self._grow(self._key_buffer, self._value_buffer, self._length + 1 + max(_GROWTH, self._length + 1))
            return self._key_buffer, self._value_buffer, self._length

        def close_slot(self) -> None:
            """The position `open_slot` gave has been written."""
            assert self._key_buffer is not None and self._value_buffer is not None
            self._length += 1
            self.keys = self._key_buffer[:, :, : self._length]
            self.values = self._value_buffer[:, :, : self._length]

        def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
            def bigger(old: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
                shape = (*like.shape[:-2], capacity, like.shape[-1])
                buffer = torch.empty(shape, dtype=like.dtype, device=like.device)
                if old is not None and self._length:
                    buffer[:, :, : self._length] = old[:, :, : self._length]
                return buffer

            self._key_buffer = bigger(self._key_buffer, key_states)
            self._value_buffer = bigger(self._value_buffer, value_states)

        def _materialize(self) -> None:
            """After an operation that replaced `keys`/`values` (crop, batch selection, reset), restart from them."""
            if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
                self._key_buffer = self._value_buffer = None
                self._length = 0
                return
            self._key_buffer, self._value_buffer = self.keys.contiguous(), self.values.contiguous()
            self._length = self.keys.shape[-2]

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            super().reorder_cache(beam_idx)
            self._materialize()

        def reset(self) -> None:
            super().reset()
            if self.is_initialized:
                self._length = 0

        def crop(self, max_length: int) -> None:
            super().crop(max_length)
            self._materialize()

        def batch_repeat_interleave(self, repeats: int) -> None:
            super().batch_repeat_interleave(repeats)
            self._materialize()

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            super().batch_select_indices(indices)
            self._materialize()

    return GrowingLayer


# --- a decoder layer for one new token per sequence --------------------------------------------------------------
def _install_decode_layers(thinker: nn.Module, kernels: cpu_kernels.Kernels | None) -> int:
    """Give every decoder layer that has the stacked products a `_DecodeLayer` forward; returns how many got one."""
    done = 0
    for layer in thinker.model.layers:
        step = _DecodeLayer.build(layer, kernels)
        if step is not None:
            layer.forward = step  # an instance attribute: `nn.Module.__call__` finds it before the class's
            done += 1
    return done


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """qwen-asr's RMSNorm, operator for operator (float32 statistics, the weight applied in the input's dtype)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class _DecodeLayer:
    """A decoder layer's forward for a step that adds one token per sequence; anything else goes to the stock one.

    The stock layer calls 15 modules and about 90 operators per step. This calls the 4 linear products and, with
    our compiled `kernels`, three calls for the norms and the attention between them (`decode_ops.c`: rounded
    where torch rounds, float32 sums in their own order). Without them it runs the torch operators between the
    products: q, k and v are split from their stacked product, and the query and key heads go through RMSNorm and
    the rotary embedding as one tensor (both act on each head on its own; their weights are stacked to match), so
    the values are the stock ones to the bit."""

    def __init__(self, layer: nn.Module, qkv: _Group, gate_up: _Group, kernels: cpu_kernels.Kernels | None) -> None:
        from qwen_asr.core.transformers_backend.modeling_qwen3_asr import rotate_half

        attn = layer.self_attn
        self.stock = layer.forward
        self.attn = attn
        self.rotate_half = rotate_half  # the stock rotary embedding's, applied to query and key heads at once
        self.heads = qkv.sizes[0] // attn.head_dim
        self.kv_heads = qkv.sizes[1] // attn.head_dim
        self.dim = attn.head_dim
        self.qkv, self.gate_up = qkv, gate_up
        self.kernels = kernels
        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.head_norm = torch.cat(
            [attn.q_norm.weight.expand(self.heads, -1), attn.k_norm.weight.expand(self.kv_heads, -1)]
        )
        self.head_eps = attn.q_norm.variance_epsilon
        self.o_proj, self.down_proj = attn.o_proj, layer.mlp.down_proj
        act = layer.mlp.act_fn
        # transformers' SiLUActivation (what `hidden_act: silu` gives) is F.silu in a module; call it directly.
        silu = type(act) is nn.SiLU or type(act).__name__ == "SiLUActivation"
        self.act: Callable[[torch.Tensor], torch.Tensor] = torch.nn.functional.silu if silu else act

    @classmethod
    def build(cls, layer: nn.Module, kernels: cpu_kernels.Kernels | None = None) -> _DecodeLayer | None:
        """The step for `layer`, or None where it lacks what the step relies on (stacked q/k/v and gate/up, one
        epsilon for the query and key norms)."""
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            return None
        qkv = _stacked(attn.q_proj, attn.k_proj, attn.v_proj)
        gate_up = _stacked(mlp.gate_proj, mlp.up_proj)
        if qkv is None or gate_up is None or attn.q_norm.variance_epsilon != attn.k_norm.variance_epsilon:
            return None
        return cls(layer, qkv, gate_up, kernels)

    def __call__(  # the stock forward's parameters, in its order
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = False,
        cache_position: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if hidden_states.shape[1] != 1 or past_key_values is None or position_embeddings is None:
            return self.stock(
                hidden_states,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                cache_position=cache_position,
                position_embeddings=position_embeddings,
                **kwargs,
            )
        if self.kernels is not None:
            out = self._with_kernels(self.kernels, hidden_states, position_embeddings, attention_mask, past_key_values)
            if out is not None:
                return out
        batch, heads, kv_heads, dim = hidden_states.shape[0], self.heads, self.kv_heads, self.dim
        x = _rms_norm(hidden_states, self.input_norm.weight, self.input_norm.variance_epsilon)
        q_k, v = self.qkv.linear(x).split([(heads + kv_heads) * dim, kv_heads * dim], dim=-1)
        q_k = _rms_norm(q_k.view(batch, 1, heads + kv_heads, dim), self.head_norm, self.head_eps)
        cos, sin = position_embeddings
        head_cos, head_sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (batch, 1, 1, dim): the same for every head
        q_k = (q_k * head_cos) + (self.rotate_half(q_k) * head_sin)
        query, key = q_k[:, :, :heads].transpose(1, 2), q_k[:, :, heads:].transpose(1, 2)
        value = v.view(batch, 1, kv_heads, dim).transpose(1, 2)
        cache_kwargs = {"sin": sin, "cos": cos, "cache_position": cache_position}
        key, value = past_key_values.update(key, value, self.attn.layer_idx, cache_kwargs)
        out, _ = _decode_attention(self.attn, query, key, value, attention_mask, scaling=self.attn.scaling)
        hidden_states = hidden_states + self.o_proj(out.reshape(batch, 1, heads * dim))
        x = _rms_norm(hidden_states, self.post_norm.weight, self.post_norm.variance_epsilon)
        gate, up = self.gate_up.linear(x).split(self.gate_up.sizes, dim=-1)
        return hidden_states + self.down_proj(self.act(gate) * up)

    def _with_kernels(
        self,
        kernels: cpu_kernels.Kernels,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Any,
    ) -> torch.Tensor | None:
        """The step with our compiled operators between the products; None where they do not apply (the torch
        operators run instead): another dtype, a cache or mask they do not know, non-contiguous input, shapes other
        than the ones the C code reads. The cache is written only once that is decided."""
        layers = getattr(past_key_values, "layers", ())
        cache = layers[self.attn.layer_idx] if self.attn.layer_idx < len(layers) else None
        if (
            hidden_states.dtype not in (torch.bfloat16, torch.float32)
            or not hidden_states.is_contiguous()
            or not hasattr(cache, "open_slot")
            or (attention_mask is not None and (attention_mask.dtype != torch.bool or attention_mask.dim() != 4))
            or any(w.dtype != hidden_states.dtype for w in (self.input_norm.weight, self.post_norm.weight))
            or self.head_norm.dtype != hidden_states.dtype
        ):
            return None
        batch, dtype = hidden_states.shape[0], hidden_states.dtype
        cos, sin = (t.contiguous() for t in position_embeddings)
        slot = cache.open_slot()  # may grow the buffers: harmless if the torch operators run after all
        if slot is None:
            return None
        key_buffer, value_buffer, position = slot
        keep = None
        if attention_mask is not None:  # (batch, 1, 1, >= length), True where attended
            keep = attention_mask[:, 0, 0, : position + 1].contiguous()
        # The C code reads every tensor in the hidden states' dtype and at these shapes; anything else (torch would
        # broadcast a batch-1 cos, say) takes the torch operators rather than a read past the end.
        if (
            cos.shape != (batch, 1, self.dim)
            or sin.shape != cos.shape
            or cos.dtype != dtype
            or sin.dtype != dtype
            or key_buffer.dtype != dtype
            or key_buffer.shape[:2] != (batch, self.kv_heads)
            or key_buffer.shape[3] != self.dim
            or value_buffer.shape != key_buffer.shape
            or not key_buffer.is_contiguous()
            or not value_buffer.is_contiguous()
            or (keep is not None and keep.shape != (batch, position + 1))
        ):
            return None
        x = kernels.rms_norm(hidden_states, self.input_norm.weight, self.input_norm.variance_epsilon)
        qkv = self.qkv.linear(x)
        if qkv.shape != (batch, 1, (self.heads + 2 * self.kv_heads) * self.dim) or not qkv.is_contiguous():
            raise RuntimeError(f"the stacked q/k/v product has shape {tuple(qkv.shape)}; the layer expects another")
        attended = kernels.attend(
            qkv, self.head_norm, self.head_eps, cos, sin, (key_buffer, value_buffer), position, keep,
            self.attn.scaling, self.heads,
        )  # fmt: skip
        cache.close_slot()
        projected = self.o_proj(attended.view(batch, 1, -1))
        norm = self.post_norm
        summed, x = kernels.add_rms_norm(hidden_states, projected, norm.weight, norm.variance_epsilon)
        gate, up = self.gate_up.linear(x).split(self.gate_up.sizes, dim=-1)
        return summed + self.down_proj(self.act(gate) * up)


def _stacked(*members: nn.Module) -> _Group | None:
    """The `_Group` these modules are, in this order, or None."""
    if not all(isinstance(m, _Member) for m in members):
        return None
    group = members[0].group  # type: ignore[union-attr]
    if len(group.sizes) != len(members):
        return None
    if any(m.group is not group or m.index != i for i, m in enumerate(members)):  # type: ignore[union-attr]
        return None
    return group
