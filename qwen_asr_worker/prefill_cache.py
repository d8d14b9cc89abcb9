"""A live pass that prefills only what changed since the session's previous pass.

Each live pass prompts the model with the whole open utterance: the system and user preamble, one audio token per
80 ms of audio, then the answer's start (the language and the text finalized so far). Most of that prompt is the
previous pass's: the preamble and the audio of every encoder window that did not change (`encoder_cache`). The
decoder is causal, so its keys and values for a prompt's first tokens depend on those tokens alone; a session
keeps them (`PassCache`) and the next pass prefills from the first token that differs.

What is kept is decided by comparison, not by assumption: the kept prefix ends at the first token id that differs
from the stored ones, and never past the audio of the encoder windows this pass reused (an audio token's
embedding is its window's encoder output, equal exactly when the window's frames are). What follows is prefilled
by the decoder (`thinker.model`) on the stored cache; the prompt's last token is left to `generate`, which then
decodes as it always does. The result equals a full prefill up to float rounding (the prefilled rows are a
shorter input to the same products): the tests check greedy tokens against passes without the cache.

qwen-asr's thinker computes its rotary positions with a state kept from its previous call (`rope_deltas`); a
prompt of one unpadded sequence has sequential positions, so the pass sets that state to zero before decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import encoder_cache
from .encoder_cache import EncoderCache


@dataclass
class PassCache:
    """One live session's reusable work: its encoder windows and the decoder's keys and values of its last
    pass's stable prompt prefix (`ids`, that many positions of `cache`)."""

    encoder: EncoderCache = field(default_factory=EncoderCache)
    cache: Any = None
    ids: torch.Tensor | None = None
    reused_tokens: int = 0  # prompt tokens not prefilled again, over the session
    prefilled_tokens: int = 0  # prompt tokens prefilled

    def clear(self) -> None:
        """Forget everything (a commit, the session's end, the audio's start moved)."""
        self.encoder.clear()
        self.cache = None
        self.ids = None

    def held_bytes(self) -> int:
        """Bytes of cached encoder windows and key/value positions."""
        total = self.encoder.held_bytes()
        if self.cache is not None:
            for layer in getattr(self.cache, "layers", ()):
                for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                    if isinstance(tensor, torch.Tensor):
                        total += tensor.numel() * tensor.element_size()
        return total


def generate(asr: Any, inputs: Any, cached: PassCache, max_new_tokens: int) -> torch.Tensor:
    """`asr.model.generate` for one live pass's prompt (`inputs`, the processor's output for one sequence), with
    `cached` from the session's previous pass; returns the generated sequences as `generate` does."""
    from transformers.cache_utils import DynamicCache

    from . import decode_step

    thinker = asr.model.thinker
    ids: torch.Tensor = inputs["input_ids"]
    total = ids.shape[1]
    with torch.inference_mode(), encoder_cache.use(asr, [cached.encoder]):
        audio = thinker.get_audio_features(
            inputs["input_features"], feature_attention_mask=inputs["feature_attention_mask"]
        )
    audio_token = thinker.config.audio_token_id
    positions = torch.nonzero(ids[0] == audio_token).flatten()
    first_audio = int(positions[0]) if len(positions) else total
    per_window = _tokens_per_window(thinker)
    stable_audio = first_audio + cached.encoder.last_reused * per_window  # tokens whose inputs are unchanged
    keep = 0
    if cached.cache is not None and cached.ids is not None:
        limit = min(cached.ids.shape[1], stable_audio, total - 1)
        same = (cached.ids[0, :limit] == ids[0, :limit]).to(torch.int8)
        keep = int(same.argmin()) if not bool(same.all()) else limit
    if keep == 0 or cached.cache is None:
        cache = DynamicCache()
        layer_class = decode_step.growing_layer_class()
        spare = max_new_tokens + 1
        cache.layer_class_to_replicate = lambda: layer_class(spare)
        keep = 0
    else:
        cache = cached.cache
        cache.crop(keep)
    # Prefill [keep, total - 1) on the cache: embeddings with the audio features scattered in.
    with torch.inference_mode():
        embeds = thinker.get_input_embeddings()(ids[:, keep : total - 1])
        mask = ids[:, keep : total - 1] == audio_token
        skipped = int((positions < keep).sum())
        if bool(mask.any()):
            embeds = embeds.clone()
            embeds[mask] = audio[skipped : skipped + int(mask.sum())].to(embeds.dtype)
        where = torch.arange(keep, total - 1, device=ids.device)
        thinker.model(
            inputs_embeds=embeds,
            attention_mask=torch.ones((1, total - 1), dtype=torch.long, device=ids.device),
            position_ids=where.view(1, 1, -1).expand(3, 1, -1),
            past_key_values=cache,
            use_cache=True,
            cache_position=where,
        )
    cached.reused_tokens += keep
    cached.prefilled_tokens += total - keep
    thinker.rope_deltas = torch.zeros((1, 1), dtype=torch.long, device=ids.device)
    out = asr.model.generate(
        input_ids=ids,
        attention_mask=inputs["attention_mask"],
        past_key_values=cache,
        max_new_tokens=max_new_tokens,
    )
    # Keep the prefix the next pass can share: the preamble and the audio of this pass's whole encoder windows.
    stable = min(first_audio + len(cached.encoder) * per_window, total - 1)
    cache.crop(stable)
    cached.cache, cached.ids = cache, ids[:, :stable].clone()
    return out


def _tokens_per_window(thinker: Any) -> int:
    tower = thinker.audio_tower
    chunk = 2 * int(tower.n_window)
    frames = chunk
    for _ in range(3):
        frames = (frames - 1) // 2 + 1
    return (int(tower.n_window_infer) // chunk) * frames
