"""One decode step (one new token per sequence) on the fast CPU path: attention for a single query, a key/value
cache that grows in place, and each decoder layer's step as one function.

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
  `DecodeLayer`: the stacked q/k/v product is split once, the query and key heads are normalized and rotated as
  one tensor, and no module sits between the products. The operators and values are the stock layer's, so the
  result is the same to the bit (tested on random weights); it saved about 3 ms a token (37.1 to 34.0 ms on a
  10-s clip, alternated runs in one process). Where our compiled kernels load (`cpu_kernels`), the operators
  between the products run in C instead, in three calls (the norms, the rotary embedding, the cache write and the
  attention): the same roundings with float32 sums in their own order, so within rounding of the stock layer;
  measured in one process, the layers' time outside their products went from about 6 to 3-3.7 ms a token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import cpu_kernels
from .decode_linears import LinearGroup, stacked

ATTENTION = "qwen_asr_worker_decode"
_GROWTH = 256  # spare key/value positions allocated beyond what a cache needs when it grows


# --- attention for a single query --------------------------------------------------------------------------
def install_decode_attention(thinker: nn.Module) -> bool:
    """Route the decoder's attention through `decode_attention` (SDPA for prompts); only when it was SDPA:
    `attn_implementation:eager` keeps transformers' eager attention (and the stock cache). Returns whether done."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = thinker.model.config
    if config._attn_implementation not in ("sdpa", ATTENTION):
        return False
    AttentionInterface.register(ATTENTION, decode_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    config._attn_implementation = ATTENTION
    return True


def decode_attention(
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
def install_growing_cache(thinker: nn.Module) -> None:
    from transformers.cache_utils import DynamicCache

    generate = thinker.generate

    layer_class = growing_layer_class()

    def generate_with_growing_cache(*args: Any, **kwargs: Any) -> Any:
        beams = kwargs.get("num_beams") or getattr(thinker.generation_config, "num_beams", 1) or 1
        if kwargs.get("past_key_values") is None and beams == 1:  # beam search reorders caches: stock path
            spare = int(kwargs.get("max_new_tokens") or _GROWTH) + 1
            cache = DynamicCache()
            cache.layer_class_to_replicate = lambda: layer_class(spare)  # called with no arguments, per layer
            kwargs["past_key_values"] = cache
        return generate(*args, **kwargs)

    thinker.generate = generate_with_growing_cache


def growing_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A dynamic cache layer that writes new positions into spare capacity instead of concatenating. The first
        allocation holds the prompt and `spare` more positions (generation's token budget), so a normal request
        never grows it; past that, capacity doubles."""

        def __init__(self, spare: int = _GROWTH) -> None:
            super().__init__()
            self._spare = spare
            self._key_buffer: torch.Tensor | None = None
            self._value_buffer: torch.Tensor | None = None
            self._length = 0

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
            if self._key_buffer is None or self._value_buffer is None or not self.get_seq_length():
                self._materialize()
                return
            # The kept positions are the buffers' first ones: shorten in place and keep the spare capacity (a
            # copy here would leave the next step no room, and that step would copy again).
            self._length = self.get_seq_length()
            self.keys = self._key_buffer[:, :, : self._length]
            self.values = self._value_buffer[:, :, : self._length]

        def held_bytes(self) -> int:
            """Bytes this layer holds: its buffers with their spare room, or else its keys and values."""
            tensors = (
                (self._key_buffer, self._value_buffer) if self._key_buffer is not None else (self.keys, self.values)
            )
            return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

        def batch_repeat_interleave(self, repeats: int) -> None:
            super().batch_repeat_interleave(repeats)
            self._materialize()

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            super().batch_select_indices(indices)
            self._materialize()

    return GrowingLayer


# --- a decoder layer for one new token per sequence --------------------------------------------------------------
def install_decode_layers(thinker: nn.Module, kernels: cpu_kernels.Kernels | None) -> int:
    """Give every decoder layer that has the stacked products a `DecodeLayer` forward; returns how many got one."""
    done = 0
    for layer in thinker.model.layers:
        step = DecodeLayer.build(layer, kernels)
        if step is not None:
            layer.forward = step  # an instance attribute: `nn.Module.__call__` finds it before the class's
            done += 1
    return done


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """qwen-asr's RMSNorm, operator for operator (float32 statistics, the weight applied in the input's dtype)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class DecodeLayer:
    """A decoder layer's forward for a step that adds one token per sequence; anything else goes to the stock one.

    The stock layer calls 15 modules and about 90 operators per step. This calls the 4 linear products and, with
    our compiled `kernels`, three calls for the norms and the attention between them (`decode_ops.c`: rounded
    where torch rounds, float32 sums in their own order). Without them it runs the torch operators between the
    products: q, k and v are split from their stacked product, and the query and key heads go through RMSNorm and
    the rotary embedding as one tensor (both act on each head on its own; their weights are stacked to match), so
    the values are the stock ones to the bit."""

    def __init__(
        self, layer: nn.Module, qkv: LinearGroup, gate_up: LinearGroup, kernels: cpu_kernels.Kernels | None
    ) -> None:
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
    def build(cls, layer: nn.Module, kernels: cpu_kernels.Kernels | None = None) -> DecodeLayer | None:
        """The step for `layer`, or None where it lacks what the step relies on (stacked q/k/v and gate/up, one
        epsilon for the query and key norms)."""
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            return None
        qkv = stacked(attn.q_proj, attn.k_proj, attn.v_proj)
        gate_up = stacked(mlp.gate_proj, mlp.up_proj)
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
        x = rms_norm(hidden_states, self.input_norm.weight, self.input_norm.variance_epsilon)
        q_k, v = self.qkv.linear(x).split([(heads + kv_heads) * dim, kv_heads * dim], dim=-1)
        q_k = rms_norm(q_k.view(batch, 1, heads + kv_heads, dim), self.head_norm, self.head_eps)
        cos, sin = position_embeddings
        head_cos, head_sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (batch, 1, 1, dim): the same for every head
        q_k = (q_k * head_cos) + (self.rotate_half(q_k) * head_sin)
        query, key = q_k[:, :, :heads].transpose(1, 2), q_k[:, :, heads:].transpose(1, 2)
        value = v.view(batch, 1, kv_heads, dim).transpose(1, 2)
        cache_kwargs = {"sin": sin, "cos": cos, "cache_position": cache_position}
        key, value = past_key_values.update(key, value, self.attn.layer_idx, cache_kwargs)
        out, _ = decode_attention(self.attn, query, key, value, attention_mask, scaling=self.attn.scaling)
        hidden_states = hidden_states + self.o_proj(out.reshape(batch, 1, heads * dim))
        x = rms_norm(hidden_states, self.post_norm.weight, self.post_norm.variance_epsilon)
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
