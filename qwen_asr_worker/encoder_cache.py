"""The audio encoder's attention windows, and reusing its finished windows between a live session's passes.

Windows. Qwen3-ASR's audio encoder is built to attend within windows of `n_window_infer` mel frames (8 s): it
computes their bounds (`cu_seqlens`) and hands them to the attention, where FlashAttention-2 and qwen-asr's vLLM
backend use them. qwen-asr's transformers backend with `sdpa` or `eager` attention drops them (its block mask,
`_prepare_attention_mask`, is never called), so every frame attends to the whole input: a long window costs
attention quadratic in its length, and the encoding of the first seconds changes when audio is added.
`windowed_attention` gives those implementations the windows the model names (option `encoder_attention`,
default `windowed`; `full` keeps qwen-asr's transformers behaviour).

Reuse. A live pass re-runs the model over the whole open utterance, and so re-encodes all of its audio, though most
of it was encoded by the pass before. With windowed attention that work is reusable exactly:

- the encoder convolves the log-mel frames in chunks of `2 * n_window` frames (1 s), each chunk alone, with
  positions that restart in every chunk;
- its attention is block-diagonal over windows of `n_window_infer` frames, and everything after the attention
  works token by token.

So the encoder's output for the frames of one whole window `[k * W, (k + 1) * W)` is a function of those frames
alone, and encoding the frames from a window boundary on gives the same tokens as the same stretch of a full
encode. A window is reused only when its frames are *equal* to the ones it was encoded from (`torch.equal`): the
feature extractor clamps every frame to 80 dB below the utterance's loudest, and the frames at the end of the
audio depend on its padding, so a frame can change when audio arrives; comparing the frames themselves makes the
reuse exact whatever caused a change. What remains is rounding: the remaining frames go through the same layers
as a shorter input, and the CPU's matrix products may sum a row in another order for another row count (the tests
measure it; greedy tokens are unchanged).

The cache belongs to one live session (`EncoderCache`), holds the windows of its open utterance only, and is
emptied at each commit and when the session ends. `install` wraps the model's audio tower once; a batch tells it
which cache each of its audios uses (`use`), in the order `get_audio_features` encodes them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F

_ATTRIBUTE = "_qwen_asr_worker_encoder_cache"


def windowed_attention(asr: Any) -> int:
    """Make the audio encoder's `sdpa`/`eager` attention attend within the windows `cu_seqlens` names, as its
    FlashAttention-2 path does. Returns how many attention layers changed (0 where the model has another shape,
    or uses FlashAttention-2, which windows already)."""
    tower = getattr(getattr(getattr(asr, "model", None), "thinker", None), "audio_tower", None)
    if tower is None:
        return 0
    changed = 0
    for layer in getattr(tower, "layers", ()):
        attention = getattr(layer, "self_attn", None)
        needed = ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "scaling", "config")
        if attention is None or not all(hasattr(attention, name) for name in needed):
            return 0
        if attention.config._attn_implementation == "flash_attention_2":
            return 0
        if not isinstance(attention.forward, _WindowedAttention):
            attention.forward = _WindowedAttention(attention)
        changed += 1
    return changed


def is_windowed(asr: Any) -> bool:
    """Whether the model's audio encoder attends within its windows (`windowed_attention` applied, or
    FlashAttention-2)."""
    tower = getattr(getattr(getattr(asr, "model", None), "thinker", None), "audio_tower", None)
    layers = list(getattr(tower, "layers", ()))
    if not layers:
        return False
    attentions = [getattr(layer, "self_attn", None) for layer in layers]
    if all(getattr(getattr(a, "config", None), "_attn_implementation", "") == "flash_attention_2" for a in attentions):
        return True
    return all(isinstance(getattr(a, "forward", None), _WindowedAttention) for a in attentions)


class _WindowedAttention:
    """One encoder attention layer's forward, attending within each `[cu_seqlens[i], cu_seqlens[i + 1])`."""

    def __init__(self, attention: Any) -> None:
        self.attention = attention
        self.original = attention.forward

    def __call__(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if cu_seqlens is None or attention_mask is not None:
            return self.original(hidden_states, cu_seqlens=cu_seqlens, attention_mask=attention_mask, **kwargs)
        a = self.attention
        length = hidden_states.shape[0]
        heads = a.num_heads
        q, k, v = (
            proj(hidden_states).reshape(length, heads, -1).transpose(0, 1) for proj in (a.q_proj, a.k_proj, a.v_proj)
        )
        out = torch.empty_like(q)
        bounds = [int(b) for b in cu_seqlens]
        sizes = [hi - lo for lo, hi in pairwise(bounds)]
        # the whole windows (all but maybe the last) as one batch, then the rest one by one
        whole = 0
        while whole < len(sizes) and sizes[whole] == sizes[0]:
            whole += 1
        if whole:
            span, width = bounds[whole], sizes[0]

            def batched(t: torch.Tensor) -> torch.Tensor:
                return t[:, :span].reshape(heads, whole, width, -1).transpose(0, 1)

            done = F.scaled_dot_product_attention(batched(q), batched(k), batched(v), scale=a.scaling)
            out[:, :span] = done.transpose(0, 1).reshape(heads, span, -1)
        for lo, hi in pairwise(bounds[whole:]):
            out[:, lo:hi] = F.scaled_dot_product_attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], scale=a.scaling)
        return a.out_proj(out.transpose(0, 1).reshape(length, -1))


class EncoderCache:
    """One session's finished encoder windows: for window k, the frames it was encoded from and its tokens."""

    def __init__(self) -> None:
        self._windows: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.hits = 0  # windows reused
        self.misses = 0  # whole windows encoded
        self.last_reused = 0  # windows the latest encode reused

    def __len__(self) -> int:
        return len(self._windows)

    def clear(self) -> None:
        """Forget every window (a commit, the session's end)."""
        self._windows = []
        self.last_reused = 0

    def held_bytes(self) -> int:
        """Bytes the cached frames and tokens take."""
        return sum(f.numel() * f.element_size() + t.numel() * t.element_size() for f, t in self._windows)

    def reusable(self, frames: torch.Tensor, window: int) -> int:
        """How many leading whole windows of `frames` (mel bins x frames) equal cached ones."""
        count = 0
        while count < len(self._windows) and (count + 1) * window <= frames.shape[1]:
            cached, _ = self._windows[count]
            if not torch.equal(cached, frames[:, count * window : (count + 1) * window]):
                break
            count += 1
        return count

    def tokens(self, count: int) -> list[torch.Tensor]:
        """The cached tokens of the first `count` windows."""
        return [tokens for _, tokens in self._windows[:count]]

    def store(self, frames: torch.Tensor, tokens: torch.Tensor, first: int, window: int, per_window: int) -> None:
        """Keep the whole windows of `frames` from window `first` on, with their slice of `tokens` (the encoder's
        output for those frames), replacing what the cache held from `first` on."""
        del self._windows[first:]
        whole = frames.shape[1] // window
        for k in range(first, whole):
            lo = (k - first) * per_window
            self._windows.append(
                (frames[:, k * window : (k + 1) * window].clone(), tokens[lo : lo + per_window].clone())
            )


class _Wrapped:
    """The audio tower's forward, with a queue of caches for the audios of the batch being run."""

    def __init__(self, tower: Any) -> None:
        self.tower = tower
        self.original = tower.forward
        self.window = int(tower.n_window_infer)  # mel frames per attention window
        chunk = 2 * int(tower.n_window)
        self.per_window = (self.window // chunk) * _after_cnn(chunk)
        self.pending: list[EncoderCache | None] = []
        self.lock = threading.Lock()

    def __call__(self, input_features: torch.Tensor, feature_lens: torch.Tensor | None = None, **kwargs: Any) -> Any:
        cache = self.pending.pop(0) if self.pending else None
        if cache is None or feature_lens is None or len(feature_lens) != 1:
            return self.original(input_features, feature_lens=feature_lens, **kwargs)
        frames = input_features[:, : int(feature_lens[0])]
        reused = cache.reusable(frames, self.window)
        cache.hits += reused
        cache.last_reused = reused
        start = reused * self.window
        parts = cache.tokens(reused)
        if start < frames.shape[1]:
            rest = frames[:, start:]
            output = self.original(rest, feature_lens=torch.tensor([rest.shape[1]], device=feature_lens.device))
            fresh = output.last_hidden_state
            cache.misses += rest.shape[1] // self.window
            cache.store(frames, fresh, reused, self.window, self.per_window)
            parts.append(fresh)
        else:
            output = None
        tokens = torch.cat(parts, dim=0)
        if output is None:
            from transformers.modeling_outputs import BaseModelOutput

            return BaseModelOutput(last_hidden_state=tokens)
        output.last_hidden_state = tokens
        return output


def _after_cnn(frames: int) -> int:
    """Tokens the encoder's three stride-2 convolutions make of `frames` mel frames."""
    for _ in range(3):
        frames = (frames - 1) // 2 + 1
    return frames


def install(asr: Any) -> bool:
    """Wrap the model's audio tower for `use` (once). Returns False where reuse would not be exact (an encoder
    attending to its whole input) or the tower is not the expected one: then passes encode everything."""
    thinker = getattr(getattr(asr, "model", None), "thinker", None)
    tower = getattr(thinker, "audio_tower", None)
    if tower is None or not hasattr(tower, "n_window_infer") or not hasattr(tower, "n_window"):
        return False
    if not is_windowed(asr):
        return False
    if getattr(tower, _ATTRIBUTE, None) is None:
        wrapped = _Wrapped(tower)
        tower.forward = wrapped
        setattr(tower, _ATTRIBUTE, wrapped)
    return True


@contextmanager
def use(asr: Any, caches: Sequence[EncoderCache | None]) -> Iterator[None]:
    """Within this block, the model's audio tower encodes the batch's audios with `caches` (one per audio, in
    batch order; None encodes in full). One batch at a time."""
    tower = asr.model.thinker.audio_tower
    wrapped: _Wrapped | None = getattr(tower, _ATTRIBUTE, None)
    if wrapped is None or not any(c is not None for c in caches):
        yield
        return
    with wrapped.lock:
        wrapped.pending = list(caches)
        try:
            yield
        finally:
            wrapped.pending = []
