"""Soak, bounded in count and time, on loopback: 8 client threads × 50 requests mixing plain, `segment`, `word`,
streaming and bad requests. Nothing unexpected may fail, every good result must be right, the aligner must load
once, and memory must settle (RSS after the soak within 10 % of RSS after a warm-up at the same concurrency)."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

import backend_pb2
from tests.audio_fixtures import tone, write_audio
from tests.conftest import SENTENCE, SENTENCE_WORDS, Harness

THREADS = 8
REQUESTS_PER_THREAD = 50
WARMUP_PER_THREAD = 15  # RSS levels off after ~150 requests (allocator arenas, caches); no growth after
TIME_LIMIT_S = 120.0  # the soak takes ~20 s on 2 cores; a hang or a crawl fails instead of stalling CI
SEGMENTS = ["Hello world.", "This is a test."]
# 16 new tokens cover the tiny model's whole chain ("language English<asr_text>" and the sentence: 9 tokens).
# bf16: the aligner attaches while the other clients' requests run, and a bf16 load switches torch's
# process-wide default dtype for a moment (qwen_asr_worker.torch_state keeps forward passes out of it).
OPTIONS = ("max_new_tokens:16", "batch_window_ms:5", "max_batch_size:8", "torch_dtype:bf16")


@dataclass(frozen=True)
class Audio:
    """A file and its duration in seconds."""

    path: Path
    seconds: float


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> list[Audio]:
    """Short clips in several containers, rates and channel counts."""
    base = tmp_path_factory.mktemp("soak")
    return [
        Audio(write_audio(base / "a.wav", tone(2.0, 16000), 16000, "wav"), 2.0),
        Audio(write_audio(base / "b.flac", tone(1.0, 44100, 2), 44100, "flac"), 1.0),
        Audio(write_audio(base / "c.mp3", tone(1.5, 22050), 22050, "mp3"), 1.5),
        Audio(write_audio(base / "d.m4a", tone(3.0, 48000, 2), 48000, "m4a"), 3.0),
        Audio(write_audio(base / "e.wav", tone(0.3, 8000), 8000, "wav"), 0.3),
    ]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory, clips: list[Audio]) -> list[tuple[dict, grpc.StatusCode, str]]:
    """Bad requests with the status and message fragment each must get."""
    base = tmp_path_factory.mktemp("soak-bad")
    empty = base / "empty.wav"
    empty.write_bytes(b"")
    junk = base / "junk.mp3"
    junk.write_bytes(bytes(range(256)) * 16)
    good = str(clips[0].path)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    return [
        ({"dst": str(base / "missing.wav")}, invalid, "not found"),
        ({"dst": str(empty)}, invalid, "is empty"),
        ({"dst": str(junk)}, invalid, "could not decode"),
        ({"dst": "http://127.0.0.1:9/a.wav"}, invalid, "not a URL"),
        ({"dst": good, "language": "klingon"}, invalid, "unsupported language"),
        ({"dst": good, "timestamp_granularities": ["char"]}, invalid, "unknown timestamp granularity"),
        ({"dst": good, "ModelIdentity": "someone-else"}, grpc.StatusCode.NOT_FOUND, "model identity mismatch"),
        ({"dst": good, "translate": True}, invalid, "translation is not supported"),
    ]


def _check_segments(result: backend_pb2.TranscriptResult, words: bool) -> None:
    assert [s.text for s in result.segments] == SEGMENTS
    found = [w.text for s in result.segments for w in s.words]
    assert found == (SENTENCE_WORDS if words else [])
    limit = round(result.duration * 1e9)
    for seg in result.segments:
        assert 0 <= seg.start <= seg.end <= limit


def _job(
    harness: Harness, clips: list[Audio], bad_inputs: list[tuple[dict, grpc.StatusCode, str]], thread: int, i: int
) -> str:
    """Run request number `i` of client `thread`; raise AssertionError on anything unexpected. Returns its kind."""
    kind = ("plain", "segment", "word", "stream", "bad")[(thread + i) % 5]
    clip = clips[(thread * 7 + i) % len(clips)]
    if kind == "bad":
        fields, code, fragment = bad_inputs[(thread + i) % len(bad_inputs)]
        try:
            harness.stub.AudioTranscription(backend_pb2.TranscriptRequest(**fields), timeout=60)
        except grpc.RpcError as exc:
            assert exc.code() is code, (fields, exc.code(), exc.details())
            assert fragment in exc.details(), (fields, exc.details())
            return kind
        raise AssertionError(f"bad request {fields} succeeded")
    if kind == "stream":
        request = backend_pb2.TranscriptRequest(dst=str(clip.path), timestamp_granularities=["word"])
        messages = list(harness.stub.AudioTranscriptionStream(request, timeout=60))
        final = messages[-1].final_result
        assert messages[-1].HasField("final_result")
        assert "".join(m.delta for m in messages[:-1]) == final.text == SENTENCE
        _check_segments(final, words=True)
        result = final
    else:
        granularities = {"plain": [], "segment": ["segment"], "word": ["word"]}[kind]
        result = harness.transcribe(clip.path, timestamp_granularities=granularities)
        assert result.text == SENTENCE
        if kind == "plain":
            assert [s.text for s in result.segments] == [SENTENCE] and not result.segments[0].words
        else:
            _check_segments(result, words=kind == "word")
    assert result.language == "en"
    assert result.duration == pytest.approx(clip.seconds, abs=0.07)  # AAC adds up to a codec frame
    return kind


def _run(job: Callable[[int, int], str], per_thread: int) -> list[str]:
    """`per_thread` jobs on each of THREADS client threads; returns the kinds run, raising the first failure."""

    def client(thread: int) -> list[str]:
        return [job(thread, i) for i in range(per_thread)]

    with ThreadPoolExecutor(THREADS, thread_name_prefix="soak-client") as pool:
        futures = [pool.submit(client, t) for t in range(THREADS)]
        return [kind for future in futures for kind in future.result(timeout=TIME_LIMIT_S)]


def test_soak(
    harness: Harness,
    checkpoints: dict[str, Path],
    clips: list[Audio],
    bad_inputs: list[tuple[dict, grpc.StatusCode, str]],
) -> None:
    assert harness.load(checkpoints["asr"], f"forced_aligner:{checkpoints['aligner']}", *OPTIONS).success
    model = harness.engine.current
    assert model is not None

    def job(thread: int, i: int) -> str:
        return _job(harness, clips, bad_inputs, thread, i)

    # Warm-up at the soak's concurrency: the aligner attaches (once, while the other clients' requests run), the
    # allocator's per-thread arenas and torch's caches reach their working size.
    assert model.aligner_loads == 0
    _run(job, WARMUP_PER_THREAD)
    assert model.aligner_loads == 1
    warm_rss = harness.status().memory.total

    started = time.monotonic()
    kinds = _run(job, REQUESTS_PER_THREAD)
    elapsed = time.monotonic() - started

    assert len(kinds) == THREADS * REQUESTS_PER_THREAD
    assert {kind: kinds.count(kind) for kind in set(kinds)} == {
        kind: THREADS * REQUESTS_PER_THREAD // 5 for kind in ("plain", "segment", "word", "stream", "bad")
    }
    assert elapsed < TIME_LIMIT_S
    assert harness.engine.current is model and model.aligner_loads == 1
    status = harness.status()
    assert status.state == backend_pb2.StatusResponse.READY
    assert model.users == 0
    assert status.memory.total <= warm_rss * 1.10, (warm_rss, status.memory.total)
