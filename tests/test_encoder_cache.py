"""Live passes reuse the audio encoder's finished windows: the cached encode equals a full one, and sessions free it.

The encodes run through the real model (tiny checkpoints loaded by the worker's loader, fast path on) on real
speech (the committed meeting fixture), the way a live pass feeds them: `asr.processor` on the utterance so far,
then the thinker's `get_audio_features`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qwen_asr_worker import encoder_cache, models
from qwen_asr_worker.audio import SAMPLE_RATE, load_audio
from qwen_asr_worker.encoder_cache import EncoderCache
from qwen_asr_worker.testing.checkpoints import TINY_ASR, build_asr_checkpoint
from tests.conftest import SENTENCE, SPEECH_DIR, Harness, serving
from tests.test_live import config, messages, split

WINDOW_SECONDS = 8.0  # n_window_infer (800 mel frames) of the checkpoints' encoder
# Pass lengths as a live session makes them: under one window, at and around window edges, odd lengths, three
# windows; each pass is the utterance so far.
LENGTHS = [3.0, 7.99, 8.0, 8.01, 10.0, 12.345, 15.99, 16.0, 18.5, 24.0, 25.3]


@pytest.fixture(scope="module")
def meeting() -> np.ndarray:
    return load_audio(str(SPEECH_DIR / "meeting.opus"))


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights, not hand-wired: an encoder with two layers and a decoder whose tokens say nothing planned."""
    dims = dataclasses.replace(TINY_ASR, deterministic=False, encoder_layers=2)
    return build_asr_checkpoint(tmp_path_factory.mktemp("random") / "asr", dims=dims, seed=3)


def _model(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    asr = models.load_asr(
        str(path),
        device="cpu",
        dtype=dtype,
        attn_implementation="sdpa",
        max_inference_batch_size=8,
        max_new_tokens=32,
    )
    assert encoder_cache.install(asr)
    return asr


def _encode(asr: Any, samples: np.ndarray, cache: EncoderCache | None) -> torch.Tensor:
    """The audio tokens a pass over `samples` gives, through the processor and the thinker as `generate` runs
    them."""
    prompt = asr._build_text_prompt(context="", force_language=None)
    inputs = asr.processor(text=[prompt], audio=[samples], return_tensors="pt", padding=True)
    features = inputs["input_features"].to(asr.model.dtype)
    with torch.inference_mode(), encoder_cache.use(asr, [cache]):
        return asr.model.thinker.get_audio_features(features, feature_attention_mask=inputs["feature_attention_mask"])


@pytest.mark.parametrize("which", ["scripted", "random"])
def test_cached_passes_equal_full_encodes(
    which: str, checkpoints: dict[str, Path], random_checkpoint: Path, meeting: np.ndarray
) -> None:
    asr = _model(checkpoints["asr"] if which == "scripted" else random_checkpoint)
    cache = EncoderCache()
    worst = 0.0
    for seconds in LENGTHS:
        samples = meeting[: round(seconds * SAMPLE_RATE)]
        hits = cache.hits
        cached = _encode(asr, samples, cache)
        full = _encode(asr, samples, None)
        assert cached.shape == full.shape, seconds
        scale = float(full.abs().max())
        worst = max(worst, float((cached - full).abs().max()) / scale)
        # every whole window of the previous pass is reused when its frames did not change
        assert len(cache) == int(seconds // WINDOW_SECONDS), seconds
        if seconds >= 2 * WINDOW_SECONDS:
            assert cache.hits > hits, seconds
    assert worst <= 1e-5, worst  # float32 rounding: the rest of the frames is encoded as a shorter input
    assert cache.hits >= 8 and cache.misses >= 3


def test_a_changed_frame_is_encoded_again(checkpoints: dict[str, Path], meeting: np.ndarray) -> None:
    """A window whose frames changed (here, louder audio arriving raises the feature clamp) is not reused."""
    asr = _model(checkpoints["asr"])
    cache = EncoderCache()
    quiet = meeting[: 17 * SAMPLE_RATE] * 0.01
    quiet[: 2 * SAMPLE_RATE] = 0.0  # digital silence: its frames sit at the clamp, 80 dB under the loudest
    _encode(asr, quiet, cache)
    assert len(cache) == 2
    louder = np.concatenate([quiet, meeting[17 * SAMPLE_RATE : 19 * SAMPLE_RATE] * 10.0])
    hits = cache.hits
    cached = _encode(asr, louder, cache)
    assert cache.hits == hits  # the clamp moved: window 0's silent frames changed, so nothing was reused
    torch.testing.assert_close(cached, _encode(asr, louder, None), rtol=1e-5, atol=1e-6)


def test_bf16_cached_passes_match(checkpoints: dict[str, Path], meeting: np.ndarray) -> None:
    asr = _model(checkpoints["asr"], torch.bfloat16)
    cache = EncoderCache()
    for seconds in (9.0, 17.0, 20.5):
        samples = meeting[: round(seconds * SAMPLE_RATE)]
        cached = _encode(asr, samples, cache)
        full = _encode(asr, samples, None)
        torch.testing.assert_close(cached.float(), full.float(), rtol=2e-2, atol=2e-2 * float(full.abs().max()))
    assert cache.hits >= 2


def test_prefilled_prefix_passes_give_the_same_tokens(random_checkpoint: Path, meeting: np.ndarray) -> None:
    """Passes as a session makes them (growing audio, a growing finalized prefix) through `prefill_cache.generate`
    give the greedy tokens of a plain `generate` on the same prompt, while reusing most of each prompt."""
    from qwen_asr_worker import prefill_cache

    asr = _model(random_checkpoint)
    cached = prefill_cache.PassCache()
    prefix = ""
    for seconds in (6.0, 9.0, 12.0, 16.5, 18.0, 24.2):
        samples = meeting[: round(seconds * SAMPLE_RATE)]
        prompt = asr._build_text_prompt(context="", force_language="English") + prefix
        inputs = asr.processor(text=[prompt], audio=[samples], return_tensors="pt", padding=True)
        inputs = inputs.to(asr.model.dtype)
        reused = cached.reused_tokens
        with torch.inference_mode():
            fast = prefill_cache.generate(asr, inputs, cached, 12).sequences
            plain = asr.model.generate(**inputs, max_new_tokens=12).sequences
        assert torch.equal(fast, plain), seconds
        assert seconds == 6.0 or cached.reused_tokens > reused  # after the first pass: the preamble at least
        prefix += asr.processor.batch_decode(plain[:, inputs["input_ids"].shape[1] :][:, :3])[0]
    assert cached.reused_tokens > 2 * 104  # whole encoder windows' audio tokens too, not only the preamble
    assert cached.accepted_tokens > 0  # the previous pass's answer was checked as a draft, not decoded again


@pytest.mark.parametrize("right", [0, 2, 5])
def test_a_wrong_draft_is_cut_where_greedy_disagrees(random_checkpoint: Path, meeting: np.ndarray, right: int) -> None:
    """A draft whose first `right` tokens are greedy's and whose rest is wrong: those are kept, the rest is
    decoded, and the tokens are a plain `generate`'s."""
    from qwen_asr_worker import prefill_cache

    asr = _model(random_checkpoint)
    prompt = asr._build_text_prompt(context="", force_language="English")
    inputs = asr.processor(text=[prompt], audio=[meeting[: 9 * SAMPLE_RATE]], return_tensors="pt", padding=True)
    inputs = inputs.to(asr.model.dtype)
    ids = inputs["input_ids"]
    with torch.inference_mode():
        plain = asr.model.generate(**inputs, max_new_tokens=12).sequences
    answer = plain[0, ids.shape[1] :]
    assert len(answer) > right
    after_audio = int(torch.nonzero(ids[0] == asr.model.thinker.config.audio_token_id).flatten()[-1]) + 1
    tokenizer = asr.processor.tokenizer
    special = prefill_cache.special_ids(tokenizer)
    # Wrong tokens that are plain text (a special one would end the draft before them).
    others = [t for t in range(len(tokenizer)) if t not in special and t not in answer.tolist()]
    wrong = torch.tensor(others[:4], dtype=answer.dtype)
    cached = prefill_cache.PassCache()
    cached.text = torch.cat([ids[0, after_audio:], answer[:right], wrong])
    with torch.inference_mode():
        fast = prefill_cache.generate(asr, inputs, cached, 12).sequences
    assert torch.equal(fast, plain)
    assert cached.accepted_tokens == right and cached.drafted_tokens == right + len(wrong)


@pytest.mark.parametrize(
    ("setting", "greedy"),
    [
        ({}, True),
        ({"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}, True),
        ({"do_sample": True}, False),
        ({"num_beams": 2}, False),
        ({"repetition_penalty": 1.1}, False),
        ({"no_repeat_ngram_size": 3}, False),
        ({"suppress_tokens": [5]}, False),
        ({"min_new_tokens": 4}, False),
    ],
)
def test_only_plain_greedy_configs_take_drafts(setting: dict[str, Any], greedy: bool) -> None:
    """A draft is checked by argmax: only where `generate` itself picks the argmax (no sampling, beams or logits
    processor in the checkpoint's generation config)."""
    from transformers import GenerationConfig

    from qwen_asr_worker import prefill_cache

    assert prefill_cache.plain_greedy(GenerationConfig(**setting)) is greedy
    assert prefill_cache.plain_greedy(None)


def test_a_penalising_config_gets_no_draft(random_checkpoint: Path, meeting: np.ndarray) -> None:
    """With a repetition penalty in the generation config, passes decode without drafts and still give
    `generate`'s tokens."""
    from qwen_asr_worker import prefill_cache

    asr = _model(random_checkpoint)
    asr.model.thinker.generation_config.repetition_penalty = 1.3
    cached = prefill_cache.PassCache()
    prompt = asr._build_text_prompt(context="", force_language="English")
    for seconds in (6.0, 9.0):  # the second pass's prompt text begins the first's answer: a draft, if allowed
        audio = [meeting[: round(seconds * SAMPLE_RATE)]]
        inputs = asr.processor(text=[prompt], audio=audio, return_tensors="pt", padding=True)
        inputs = inputs.to(asr.model.dtype)
        with torch.inference_mode():
            fast = prefill_cache.generate(asr, inputs, cached, 12).sequences
            plain = asr.model.generate(**inputs, max_new_tokens=12).sequences
        assert torch.equal(fast, plain)
    assert cached.drafted_tokens == 0


@pytest.fixture
def live_random(random_checkpoint: Path) -> Iterator[Harness]:
    with serving() as served:
        assert served.load(random_checkpoint, "max_new_tokens:24", "vad:off", "batch_window_ms:5").success
        yield served


def _session(harness: Harness, samples: np.ndarray) -> tuple[list[str], Any]:
    requests = iter([config(chunk_seconds="2", max_utterance_seconds="30"), *messages(samples, seconds=0.5)])
    return split(list(harness.stub.AudioTranscriptionLive(requests, timeout=300)))


def test_live_text_is_the_same_with_and_without_reuse(live_random: Harness, meeting: np.ndarray) -> None:
    """Greedy tokens of a random decoder are sensitive to any change in its input: the deltas and the final
    text of a session are identical with the encoder cache on and off."""
    samples = meeting[: 34 * SAMPLE_RATE]  # an utterance cut at the 30-s cap, then a second one
    model = live_random.engine.current
    assert model.encoder_reuse
    with_cache = _session(live_random, samples)
    model.encoder_reuse = False
    try:
        without = _session(live_random, samples)
    finally:
        model.encoder_reuse = True
    assert with_cache[0] == without[0]
    assert with_cache[1].text == without[1].text and with_cache[1].text


def test_sessions_free_their_windows_at_commit_and_close(harness: Harness, checkpoints: dict[str, Path]) -> None:
    from qwen_asr_worker.live import LiveConfig, LiveSession
    from qwen_asr_worker.options import LiveSettings

    assert harness.load(checkpoints["asr"], "vad:off", "max_new_tokens:48").success
    model = harness.engine.current
    settings = LiveSettings(chunk_seconds=2.0, max_utterance_seconds=20.0)
    session = LiveSession(model, LiveConfig(None, SAMPLE_RATE, settings), lambda: False)
    samples = load_audio(str(SPEECH_DIR / "meeting.opus"))
    assert session.pass_cache is not None
    cache = session.pass_cache.encoder
    held = 0
    for i in range(0, 19 * SAMPLE_RATE, SAMPLE_RATE):
        session.feed(samples[i : i + SAMPLE_RATE])
        if session.due:
            session.step()
        held = max(held, len(cache))
    assert held == 2 and cache.hits > 0  # two whole windows of the open utterance, reused by later passes
    assert session.pass_cache.reused_tokens > 0 and session.pass_cache.cache is not None
    assert session.pass_cache.held_bytes() > session.pass_cache.encoder.held_bytes()  # the kept keys count too
    for i in range(19 * SAMPLE_RATE, 22 * SAMPLE_RATE, SAMPLE_RATE):  # past the 20-s cap: committed
        session.feed(samples[i : i + SAMPLE_RATE])
        session.step()
    assert len(cache) <= 1  # the committed utterance's windows are gone; at most the new one's first
    session.close()
    assert len(cache) == 0 and session.pass_cache.held_bytes() == 0 and session.pass_cache.cache is None
    assert session.result().text.startswith(SENTENCE)
