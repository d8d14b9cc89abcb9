"""The forced aligner's lifecycle and the timestamped results, with tiny real checkpoints for both models."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

import backend_pb2
from qwen_asr_worker import models
from tests.conftest import SENTENCE, SENTENCE_WORDS, Harness, wait_until

NS = 1_000_000_000


def _load(harness: Harness, checkpoints: dict[str, Path], *options: str) -> None:
    result = harness.load(checkpoints["asr"], f"forced_aligner:{checkpoints['aligner']}", *options)
    assert result.success, result.message


def _words(result: backend_pb2.TranscriptResult) -> list[backend_pb2.TranscriptWord]:
    return [w for seg in result.segments for w in seg.words]


def _check_times(result: backend_pb2.TranscriptResult) -> None:
    limit = round(result.duration * NS)
    previous_end = 0
    for seg in result.segments:
        assert 0 <= seg.start <= seg.end <= limit
        if seg.words:
            assert (seg.start, seg.end) == (seg.words[0].start, seg.words[-1].end)
        for word in seg.words:
            assert previous_end <= word.start <= word.end <= limit
            previous_end = word.end


def test_aligner_absent_until_first_timestamp_request(harness: Harness, checkpoints, audio) -> None:
    _load(harness, checkpoints)
    model = harness.engine.current
    assert model is not None and not model.aligner_attached
    assert harness.transcribe(audio["wav"]).text == SENTENCE
    assert not model.aligner_attached
    assert harness.status().memory.breakdown["aligner_weights"] == 0

    base_before = model.asr.model
    out = harness.transcribe(audio["wav"], timestamp_granularities=["word"])
    assert model.aligner_attached and model.aligner_loads == 1
    assert model.asr.model is base_before  # attached in place: the base model is the same object
    assert harness.status().memory.breakdown["aligner_weights"] > 0
    assert out.text == SENTENCE
    assert [w.text for w in _words(out)] == SENTENCE_WORDS
    assert [s.text for s in out.segments] == ["Hello world.", "This is a test."]
    _check_times(out)


def test_segment_granularity_has_no_words(harness: Harness, checkpoints, audio) -> None:
    _load(harness, checkpoints)
    out = harness.transcribe(audio["wav"], timestamp_granularities=["segment"])
    assert [s.text for s in out.segments] == ["Hello world.", "This is a test."]
    assert not _words(out)
    _check_times(out)
    both = harness.transcribe(audio["wav"], timestamp_granularities=["segment", "word"])
    assert [w.text for w in _words(both)] == SENTENCE_WORDS


def test_concurrent_first_requests_load_once(harness: Harness, checkpoints, audio) -> None:
    _load(harness, checkpoints)
    model = harness.engine.current
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: harness.transcribe(audio["wav"], timestamp_granularities=["word"]), range(8)))
    assert model.aligner_loads == 1
    for out in results:
        assert [w.text for w in _words(out)] == SENTENCE_WORDS
        _check_times(out)


def test_plain_requests_do_not_wait_for_the_aligner_load(
    harness: Harness, checkpoints, audio, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = models.load_aligner
    loading = threading.Event()

    def slow_load(*args: object, **kwargs: object) -> object:
        loading.set()
        time.sleep(4.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "load_aligner", slow_load)
    _load(harness, checkpoints)
    with ThreadPoolExecutor(1) as pool:
        timed = pool.submit(harness.transcribe, audio["wav"], timestamp_granularities=["word"])
        assert loading.wait(30)
        started = time.monotonic()
        assert harness.transcribe(audio["wav"]).text == SENTENCE
        plain_seconds = time.monotonic() - started
        assert not timed.done()  # the aligner is still loading
        assert plain_seconds < 3.0
        assert [w.text for w in _words(timed.result(timeout=60))] == SENTENCE_WORDS


def test_failing_aligner_gives_clear_error_and_retries(
    harness: Harness, checkpoints, audio, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = models.load_aligner
    attempts: list[int] = []

    def flaky(*args: object, **kwargs: object) -> object:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("disk read error on model.safetensors")
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "load_aligner", flaky)
    _load(harness, checkpoints)
    with pytest.raises(grpc.RpcError) as info:
        harness.transcribe(audio["wav"], timestamp_granularities=["word"])
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "could not be loaded" in info.value.details() and "disk read error" in info.value.details()
    assert harness.transcribe(audio["wav"]).text == SENTENCE
    out = harness.transcribe(audio["wav"], timestamp_granularities=["word"])
    assert len(attempts) == 2
    assert [w.text for w in _words(out)] == SENTENCE_WORDS


def test_bad_aligner_path(harness: Harness, checkpoints, audio, tmp_path: Path) -> None:
    assert harness.load(checkpoints["asr"], f"forced_aligner:{tmp_path}").success
    with pytest.raises(grpc.RpcError) as info:
        harness.transcribe(audio["wav"], timestamp_granularities=["word"])
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "has no config.json" in info.value.details()
    assert harness.transcribe(audio["wav"]).text == SENTENCE


def test_aligner_relative_to_model_path(harness: Harness, checkpoints, audio) -> None:
    aligner = checkpoints["aligner"]
    result = harness.load(checkpoints["asr"], f"forced_aligner:{aligner.name}", ModelPath=str(aligner.parent))
    assert result.success
    assert len(_words(harness.transcribe(audio["wav"], timestamp_granularities=["word"]))) == 6


def test_forced_aligner_none_disables_timestamps(harness: Harness, checkpoints, audio) -> None:
    assert harness.load(checkpoints["asr"], "forced_aligner:none").success
    with pytest.raises(grpc.RpcError) as info:
        harness.transcribe(audio["wav"], timestamp_granularities=["segment"])
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "forced_aligner" in info.value.details()
    assert harness.transcribe(audio["wav"]).text == SENTENCE


def test_preload_aligner(harness: Harness, checkpoints) -> None:
    _load(harness, checkpoints, "preload_aligner:true")
    assert harness.engine.current.aligner_attached
    assert harness.status().memory.breakdown["aligner_weights"] > 0


def test_idle_unload_detaches_and_next_request_reloads(harness: Harness, checkpoints, audio) -> None:
    _load(harness, checkpoints, "aligner_idle_unload:1")
    model = harness.engine.current
    harness.transcribe(audio["wav"], timestamp_granularities=["word"])
    assert model.aligner_attached
    assert wait_until(lambda: harness.status().memory.breakdown["aligner_weights"] == 0, timeout=15)
    assert not model.aligner_attached
    assert harness.transcribe(audio["wav"]).text == SENTENCE
    out = harness.transcribe(audio["wav"], timestamp_granularities=["word"])
    assert model.aligner_loads == 2
    assert len(_words(out)) == 6


def test_free_releases_both(harness: Harness, checkpoints, audio) -> None:
    _load(harness, checkpoints)
    model = harness.engine.current
    harness.transcribe(audio["wav"], timestamp_granularities=["word"])
    assert harness.stub.Free(backend_pb2.HealthMessage()).success
    breakdown = harness.status().memory.breakdown
    assert breakdown["base_model_weights"] == 0 and breakdown["aligner_weights"] == 0
    assert model.asr is None


def test_silence_with_timestamps_is_empty_not_an_error(harness: Harness, checkpoints, audio) -> None:
    assert harness.load(checkpoints["silent"], f"forced_aligner:{checkpoints['aligner']}").success
    out = harness.transcribe(audio["wav"], timestamp_granularities=["word"])
    assert out.text == ""
    assert list(out.segments) == []
    assert harness.transcribe(audio["wav"]).segments == []
