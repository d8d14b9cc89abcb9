"""Long audio and streaming with the tiny checkpoints: windows, offsets, progressive deltas, cancellation."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

import backend_pb2
from qwen_asr_worker.audio import load_audio
from qwen_asr_worker.chunking import plan_windows
from tests.audio_fixtures import speech_like, write_audio
from tests.conftest import SENTENCE, SENTENCE_WORDS, Harness, wait_until

# Quiet gaps straddling each 180-s limit, within the 5-s search range before it.
GAPS = [(176.5, 178.0), (354.0, 355.5), (531.0, 532.5)]


@pytest.fixture(scope="module")
def ten_minutes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10-minute 16 kHz file: noise with quiet gaps near each 180-s window limit."""
    path = tmp_path_factory.mktemp("long") / "ten-minutes.wav"
    return write_audio(path, speech_like(600.0, 16000, GAPS), 16000, "wav")


def _load(harness: Harness, checkpoints: dict[str, Path], *options: str) -> None:
    assert harness.load(checkpoints["asr"], f"forced_aligner:{checkpoints['aligner']}", *options).success


def test_windows_are_cut_inside_the_gaps(ten_minutes: Path) -> None:
    windows = plan_windows(load_audio(str(ten_minutes)), max_seconds=180.0)
    assert len(windows) == 4
    for window, (gap_start, gap_end) in zip(windows, GAPS, strict=False):
        assert gap_start <= window.end / 16000 <= gap_end


def test_ten_minutes_same_text_with_and_without_timestamps(
    harness: Harness, checkpoints: dict[str, Path], ten_minutes: Path
) -> None:
    _load(harness, checkpoints)
    plain = harness.transcribe(ten_minutes)
    timed = harness.transcribe(ten_minutes, timestamp_granularities=["word"])
    assert plain.text == timed.text == " ".join([SENTENCE] * 4)
    assert plain.duration == pytest.approx(600.0)
    assert harness.engine.current.windows_transcribed == 8  # 4 windows, twice

    words = [w for seg in timed.segments for w in seg.words]
    assert [w.text for w in words] == SENTENCE_WORDS * 4
    starts = [w.start / 1e9 for w in words]
    assert starts == sorted(starts)
    # Each window's first word sits after the cut, i.e. its window offset was added.
    for k, (gap_start, _) in enumerate(GAPS, start=1):
        assert starts[6 * k] >= gap_start
    assert [s.text for s in timed.segments] == ["Hello world.", "This is a test."] * 4


def test_stream_deltas_arrive_before_the_end(harness: Harness, checkpoints: dict[str, Path], ten_minutes: Path) -> None:
    _load(harness, checkpoints, "max_new_tokens:300", "max_batch_size:2")
    arrivals: list[tuple[float, backend_pb2.TranscriptStreamResponse]] = []
    for message in harness.stub.AudioTranscriptionStream(
        backend_pb2.TranscriptRequest(dst=str(ten_minutes), timestamp_granularities=["segment"]), timeout=300
    ):
        arrivals.append((time.monotonic(), message))
    deltas = [m.delta for _, m in arrivals[:-1]]
    final = arrivals[-1][1]
    assert final.HasField("final_result")
    assert len(deltas) == 4
    assert "".join(deltas) == final.final_result.text == " ".join([SENTENCE] * 4)
    assert len(final.final_result.segments) == 8
    first_delta_at, final_at = arrivals[0][0], arrivals[-1][0]
    assert final_at - first_delta_at > 0.05  # the first delta did not wait for the other windows


def test_cancelling_a_stream_stops_the_work(
    harness: Harness, checkpoints: dict[str, Path], audio: dict[str, Path], ten_minutes: Path
) -> None:
    _load(harness, checkpoints, "max_new_tokens:300", "max_batch_size:1", "chunk_seconds:60")
    call = harness.stub.AudioTranscriptionStream(backend_pb2.TranscriptRequest(dst=str(ten_minutes)), timeout=300)
    first = next(call)
    assert first.delta == SENTENCE
    call.cancel()
    with pytest.raises(grpc.RpcError):
        list(call)
    model = harness.engine.current
    assert wait_until(lambda: harness.status().state == backend_pb2.StatusResponse.READY, timeout=30)
    assert model.windows_transcribed < 10  # 10 windows of 60 s; the rest were never run
    assert harness.transcribe(audio["wav"]).text == SENTENCE


def test_short_file_gives_one_delta(harness: Harness, checkpoints: dict[str, Path], audio: dict[str, Path]) -> None:
    _load(harness, checkpoints)
    messages = list(
        harness.stub.AudioTranscriptionStream(
            backend_pb2.TranscriptRequest(dst=str(audio["wav"]), timestamp_granularities=["word"]), timeout=60
        )
    )
    assert [m.delta for m in messages[:-1]] == [SENTENCE]
    words = [w.text for s in messages[-1].final_result.segments for w in s.words]
    assert words == SENTENCE_WORDS


def test_the_heap_is_trimmed_after_every_model_call(
    harness: Harness, checkpoints: dict[str, Path], ten_minutes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Freed activations go back to the OS after each window's model call, so memory does not creep over a long
    file (the bench measures the effect on full-size models)."""
    from qwen_asr_worker import runtime

    _load(harness, checkpoints, "preload_aligner:true", "max_batch_seconds:180")
    trims: list[float] = []
    monkeypatch.setattr(runtime, "trim_heap", lambda: trims.append(time.monotonic()))
    batches = harness.engine.current.batcher.batch_sizes
    before = sum(batches.values())
    harness.transcribe(ten_minutes, timestamp_granularities=["word"])
    asr_calls = sum(batches.values()) - before
    assert asr_calls == 4  # one 180-s window per call (max_batch_seconds)
    # and one alignment call per window (the aligner keeps the same bound), and once after planning the windows
    assert len(trims) == 1 + asr_calls + 4


def test_a_long_files_windows_decode_together_by_default(
    harness: Harness, checkpoints: dict[str, Path], ten_minutes: Path
) -> None:
    """max_batch_seconds defaults to two full windows: a 10-minute file's four windows take two model calls."""
    _load(harness, checkpoints)
    batches = harness.engine.current.batcher.batch_sizes
    before = dict(batches)
    assert harness.transcribe(ten_minutes).text == " ".join([SENTENCE] * 4)
    assert {size: n - before.get(size, 0) for size, n in batches.items() if n - before.get(size, 0)} == {2: 2}
