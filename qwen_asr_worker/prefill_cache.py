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

The pass's answer mostly repeats the previous pass's (where the checkpoint's generation config decodes greedily; one
that samples, searches beams or penalises repeats gets no drafts, `plain_greedy`): its last `rollback_tokens` were
left open, and with a little more audio the model usually writes them again. So the previous pass's tokens after
this prompt's text are a draft: one decoder call over the prompt's last token and the draft gives the greedy choice
after each draft token, the draft is kept up to the first token where that choice differs, and `generate` goes on
from there (it computes the next token itself, so where and how it stops is untouched). Each kept draft token saves
a decode step; the tokens are greedy's, up to the float rounding of a several-row call against one-row steps.

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
    text: torch.Tensor | None = None  # the last pass's token ids after its audio: prompt text, then its answer
    reused_tokens: int = 0  # prompt tokens not prefilled again, over the session
    prefilled_tokens: int = 0  # prompt tokens prefilled
    drafted_tokens: int = 0  # tokens of earlier answers checked in one call instead of decoded one by one
    accepted_tokens: int = 0  # of those, the ones greedy decoding chose again

    def clear(self) -> None:
        """Forget everything (a commit, the session's end, the audio's start moved)."""
        self.encoder.clear()
        self.cache = None
        self.ids = None
        self.text = None

    def held_bytes(self) -> int:
        """Bytes of cached encoder windows and key/value positions (with a growing layer's spare capacity)."""
        total = self.encoder.held_bytes()
        if self.cache is not None:
            for layer in getattr(self.cache, "layers", ()):
                if hasattr(layer, "held_bytes"):  # a growing layer: its buffers, spare room included
                    total += layer.held_bytes()
                    continue
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
    after_audio = int(positions[-1]) + 1 if len(positions) else 0
    greedy = plain_greedy(getattr(thinker, "generation_config", None))
    draft = _draft(asr, cached.text, ids[0, after_audio:], max_new_tokens - 1) if greedy else None
    sequence = ids
    if draft is not None:
        accepted = _verify(thinker, ids, draft, cache)
        cached.drafted_tokens += len(draft)
        cached.accepted_tokens += accepted
        # The cache ends before the last kept token: `generate` runs it and picks what follows.
        sequence = torch.cat([ids, draft[:accepted].view(1, -1)], dim=1)
        cache.crop(sequence.shape[1] - 1)
    thinker.rope_deltas = torch.zeros((1, 1), dtype=torch.long, device=ids.device)
    out = asr.model.generate(
        input_ids=sequence,
        attention_mask=torch.ones_like(sequence),
        past_key_values=cache,
        max_new_tokens=max_new_tokens - (sequence.shape[1] - total),
    )
    cached.text = out.sequences[0, after_audio:].clone()
    # Keep the prefix the next pass can share: the preamble and the audio of this pass's whole encoder windows.
    stable = min(first_audio + len(cached.encoder) * per_window, total - 1)
    cache.crop(stable)
    cached.cache, cached.ids = cache, ids[:, :stable].clone()
    return out


# Generation settings under which `generate` picks each token as the logits' argmax, as `_verify` does.
_NEUTRAL = {
    "do_sample": (None, False),
    "num_beams": (None, 1),
    "num_beam_groups": (None, 1),
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "bad_words_ids": (None, []),
    "suppress_tokens": (None, []),
    "begin_suppress_tokens": (None, []),
    "sequence_bias": (None, {}),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
}


def plain_greedy(config: Any) -> bool:
    """Whether `generate` with this generation config chooses every token as the argmax of the model's logits:
    no sampling, beams or logits processor that could pick another (a checkpoint's `generation_config.json` may
    set them). Only then is a draft checked by argmax the tokens `generate` would write."""
    if config is None:
        return True
    return all(getattr(config, name, None) in values for name, values in _NEUTRAL.items())


_MAX_DRAFT = 16  # draft tokens checked at most: the open tail is `rollback_tokens` (5) long by default


def special_ids(tokenizer: Any) -> set[int]:
    """The tokenizer's special token ids (end of text and padding among them): a draft stops before any."""
    return {*tokenizer.all_special_ids, tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}


def _draft(asr: Any, previous: torch.Tensor | None, text: torch.Tensor, most: int) -> torch.Tensor | None:
    """The previous pass's answer past this prompt's `text` (the token ids after its audio), when its tokens
    begin with exactly these: up to `most` and `_MAX_DRAFT` tokens, stopping before any special token (an end
    of text among them), or None."""
    if previous is None or len(previous) <= len(text) or not torch.equal(previous[: len(text)], text):
        return None
    tail = previous[len(text) : len(text) + min(most, _MAX_DRAFT)]
    special = torch.tensor(sorted(special_ids(asr.processor.tokenizer)), device=tail.device)
    stops = torch.nonzero(torch.isin(tail, special)).flatten()
    if len(stops):
        tail = tail[: int(stops[0])]
    return tail if len(tail) else None


def _verify(thinker: Any, ids: torch.Tensor, draft: torch.Tensor, cache: Any) -> int:
    """Run the prompt's last token and the draft but its last through the decoder on `cache` (which holds the
    rest of the prompt); return how many draft tokens greedy decoding would choose, in order."""
    total, count = ids.shape[1], len(draft)
    tokens = torch.cat([ids[0, total - 1 :], draft[:-1]]).view(1, -1)
    where = torch.arange(total - 1, total - 1 + count, device=ids.device)
    with torch.inference_mode():
        hidden = thinker.model(
            inputs_embeds=thinker.get_input_embeddings()(tokens),
            attention_mask=torch.ones((1, total - 1 + count), dtype=torch.long, device=ids.device),
            position_ids=where.view(1, 1, -1).expand(3, 1, -1),
            past_key_values=cache,
            use_cache=True,
            cache_position=where,
        ).last_hidden_state
        chosen = thinker.lm_head(hidden[0]).argmax(-1)  # 2-D: every position's logits, not only the last
    same = (chosen == draft).to(torch.int8)
    return len(draft) if bool(same.all()) else int(same.argmin())


def _tokens_per_window(thinker: Any) -> int:
    tower = thinker.audio_tower
    chunk = 2 * int(tower.n_window)
    frames = chunk
    for _ in range(3):
        frames = (frames - 1) // 2 + 1
    return (int(tower.n_window_infer) // chunk) * frames
