"""Generation settings made once at load: the per-second token budget, and no library warning per request."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from qwen_asr_worker.testing.checkpoints import build_asr_checkpoint
from tests.conftest import SENTENCE, Harness

LONG = "Alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa"


def test_token_budget_scales_with_the_window(harness: Harness, tmp_path: Path, audio: dict) -> None:
    checkpoint = build_asr_checkpoint(tmp_path / "long", sentence=LONG)
    assert harness.load(checkpoint, "max_tokens_per_second:0.5").success
    model = harness.engine.current
    assert model is not None
    # 16 tokens for the language prefix, then half a token per second of audio, never above max_new_tokens (48).
    assert [model.token_budget(s * 16000) for s in (2, 10, 60, 600)] == [17, 21, 46, 48]
    short = harness.transcribe(audio["wav"]).text  # 2 s: 17 tokens, three of them the prefix
    assert short and LONG.startswith(short) and len(short) < len(LONG)
    longer = harness.transcribe(audio["long"]).text  # 30 s: 31 tokens
    assert LONG.startswith(longer) and len(short) < len(longer)

    assert harness.load(checkpoint, "max_tokens_per_second:200").success
    assert harness.transcribe(audio["wav"]).text == LONG


def test_without_a_rate_the_budget_is_max_new_tokens(harness: Harness, checkpoints: dict[str, Path]) -> None:
    assert harness.load(checkpoints["asr"]).success
    model = harness.engine.current
    assert model is not None and model.token_budget(16000) == model.token_budget(3600 * 16000) == 48


def test_no_transformers_warning_per_request(
    harness: Harness, checkpoints: dict[str, Path], audio: dict, caplog: pytest.LogCaptureFixture
) -> None:
    from transformers.utils import logging as hf_logging

    assert harness.load(checkpoints["asr"]).success
    hf_logging.enable_propagation()  # transformers' own handler writes to a stream pytest captured at import
    try:
        with caplog.at_level(logging.WARNING, logger="transformers"):
            for _ in range(2):
                assert harness.transcribe(audio["wav"]).text == SENTENCE
            assert not [r for r in caplog.records if "pad_token_id" in r.getMessage()]
            # The control: without the pad token set at load, transformers warns on every request.
            model = harness.engine.current
            assert model is not None and model.asr is not None
            model.asr.model.thinker.generation_config.pad_token_id = None
            harness.transcribe(audio["wav"])
            assert [r for r in caplog.records if "pad_token_id" in r.getMessage()]
    finally:
        hf_logging.disable_propagation()


def test_one_log_line_per_request(
    harness: Harness, checkpoints: dict[str, Path], audio: dict, caplog: pytest.LogCaptureFixture
) -> None:
    assert harness.load(checkpoints["asr"]).success
    with caplog.at_level(logging.INFO, logger="qwen_asr_worker"):
        harness.transcribe(audio["wav"], language="en")
        with pytest.raises(Exception, match="not found"):
            harness.transcribe("/no/such.wav")
    done = [r.getMessage() for r in caplog.records if r.getMessage().startswith("transcribed")]
    assert len(done) == 1
    assert "2.0 s of audio in 1 window" in done[0] and "timestamps none" in done[0] and "language en" in done[0]
    assert "realtime" in done[0] and "skipped" not in done[0]  # vad:off in these tests: nothing to skip
    failed = [r.getMessage() for r in caplog.records if "failed after" in r.getMessage()]
    assert len(failed) == 1 and "AudioTranscription failed after" in failed[0] and "INVALID_ARGUMENT" in failed[0]
