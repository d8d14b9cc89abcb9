"""A request's audio is read in pieces: spilled to a temporary file or in memory, the windows, texts and word times
are the same, and only the windows queued ahead are held."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import backend_pb2
from qwen_asr_worker import chunking, pipeline, planning, vad
from qwen_asr_worker.audio import DecodingAudio, load_audio
from qwen_asr_worker.chunking import plan_speech_windows, plan_windows
from qwen_asr_worker.options import WorkerOptions
from qwen_asr_worker.spool import SpooledAudio
from qwen_asr_worker.vad import SpeechRegion
from tests.audio_fixtures import speech_like, write_audio
from tests.conftest import SENTENCE, Harness

GAPS = [(176.5, 178.0), (354.0, 355.5), (531.0, 532.5)]


def _spooled(samples: np.ndarray, spill: int | None = 0, block: int = 7919) -> SpooledAudio:
    """The samples as a SpooledAudio appended in odd-sized blocks; spill 0 puts them on disk at once."""
    audio = SpooledAudio(spill_bytes=spill)
    for start in range(0, len(samples), block):
        audio.append(samples[start : start + block])
    return audio.finish()


@settings(max_examples=40, deadline=None)
@given(
    length=st.integers(0, 9000),
    frame=st.integers(1, 700),
    block=st.integers(1, 5000),
    begin=st.integers(0, 400),
)
def test_frame_energies_do_not_depend_on_the_read_block(length: int, frame: int, block: int, begin: int) -> None:
    """Blockwise frame energies equal one pass over the stretch, bit for bit, whatever the block."""
    samples = np.random.default_rng(length).standard_normal(length).astype(np.float32)
    begin = min(begin, length)
    usable = (length - begin) // frame * frame
    rows = samples[begin : begin + usable].reshape(-1, frame)
    whole = np.einsum("ij,ij->i", rows, rows).astype(np.float64) / frame
    saved = chunking._ENERGY_BLOCK
    chunking._ENERGY_BLOCK = block
    try:
        np.testing.assert_array_equal(chunking._frame_energy(samples, frame, begin, length), whole)
    finally:
        chunking._ENERGY_BLOCK = saved


def test_windows_are_planned_the_same_from_a_spooled_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 10-minute file tiled from the temporary file, read in 64-kB blocks, gets the in-memory file's cuts; so do
    speech regions that start mid-file and are longer than a window."""
    samples = speech_like(600.0, 16000, GAPS)
    expected = plan_windows(samples, max_seconds=180.0)
    regions = [
        SpeechRegion(12_345, 16000 * 400, 20_000, 16000 * 399),
        SpeechRegion(16000 * 401, len(samples), 16000 * 402, len(samples)),
    ]
    expected_speech = plan_speech_windows(samples, regions, max_seconds=60.0)
    monkeypatch.setattr(chunking, "_ENERGY_BLOCK", 16384)
    with _spooled(samples) as audio:
        assert audio.on_disk
        assert plan_windows(audio, max_seconds=180.0) == expected
        assert len(expected) == 4
        assert plan_speech_windows(audio, regions, max_seconds=60.0) == expected_speech
    assert len(expected_speech) > 6


@pytest.mark.parametrize("seconds", [0.01, 3.3, 61.7])
def test_vad_probabilities_are_the_same_read_ahead_in_pieces(seconds: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Silero's probabilities from a spilled file, read a few frames per row at a time (many refills, a last partial
    frame), equal those from the whole array in memory, bit for bit."""
    samples = speech_like(seconds, 16000, [(0.5, 1.5)] if seconds > 2 else [])
    samples = samples[: len(samples) - 77] if len(samples) > 1000 else samples
    expected = vad.frame_probabilities(samples)
    monkeypatch.setattr(vad, "READ_BYTES", 3 * 512 * 4 * 12)  # 3 frames for 12 rows: a refill every few steps
    with _spooled(samples) as audio:
        np.testing.assert_array_equal(vad.frame_probabilities(audio), expected)
    assert len(expected) == -(-len(samples) // 512)


@pytest.fixture(scope="module")
def ten_minutes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bounded") / "ten-minutes.flac"
    return write_audio(path, speech_like(600.0, 44100, [(a, b) for a, b in GAPS]), 44100, "flac")


def _load(harness: Harness, checkpoints: dict[str, Path], *options: str) -> None:
    assert harness.load(checkpoints["asr"], f"forced_aligner:{checkpoints['aligner']}", *options).success


def test_a_spilled_request_gives_the_same_result(
    harness: Harness, checkpoints: dict[str, Path], ten_minutes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same file with its decoded audio in memory and in a temporary file: the same text, segments and word
    times, and the temporary file was really used."""
    _load(harness, checkpoints, "vad:false")
    in_memory = harness.transcribe(ten_minutes, timestamp_granularities=["word"])
    spilled: list[bool] = []
    real_decode = pipeline.decode_audio

    def spy(path: str, spill_bytes: int | None = None) -> DecodingAudio:
        decoding = real_decode(path, spill_bytes=spill_bytes)
        real_available = decoding.available

        def available(needed: int) -> int:
            got = real_available(needed)
            if decoding.complete and not spilled:
                spilled.append(decoding.on_disk)
            return got

        decoding.available = available  # type: ignore[method-assign]
        return decoding

    monkeypatch.setattr(pipeline, "SPILL_BYTES", 1 << 20)
    monkeypatch.setattr(pipeline, "decode_audio", spy)
    on_disk = harness.transcribe(ten_minutes, timestamp_granularities=["word"])
    assert spilled == [True]
    assert on_disk.text == in_memory.text == " ".join([SENTENCE] * 4)
    assert on_disk.duration == in_memory.duration
    assert [(s.text, s.start, s.end, [(w.text, w.start, w.end) for w in s.words]) for s in on_disk.segments] == [
        (s.text, s.start, s.end, [(w.text, w.start, w.end) for w in s.words]) for s in in_memory.segments
    ]


def test_only_the_windows_queued_ahead_are_held(
    harness: Harness, checkpoints: dict[str, Path], ten_minutes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With windows of up to 60 s and max_batch_size 2, a 10-minute file never has more than three windows queued
    (the awaited one and two ahead), nor more than two batches' audio, and every window is still transcribed."""
    _load(harness, checkpoints, "vad:false", "chunk_seconds:60", "max_batch_size:2", "max_batch_seconds:120")
    model = harness.engine.current
    queued: dict[int, int] = {}  # id of a queued window's future: its samples
    most = [0, 0]
    real_submit = model.batcher.submit

    def submit(samples: np.ndarray, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        future = real_submit(samples, *args, **kwargs)
        queued[id(future)] = len(samples)
        most[0] = max(most[0], len(queued))
        most[1] = max(most[1], sum(queued.values()))
        future.add_done_callback(lambda done: queued.pop(id(done)))
        return future

    monkeypatch.setattr(model.batcher, "submit", submit)
    result = harness.transcribe(ten_minutes)
    assert model.windows_transcribed == 11  # cuts fall in the quietest point before each 60-s limit
    assert result.text == " ".join([SENTENCE] * 11)
    assert 2 <= most[0] <= 3
    assert most[1] <= 2 * 120 * 16000


def test_plan_request_reads_a_spooled_file_as_an_array() -> None:
    """VAD and window planning together, from a spilled file: the in-memory windows (real speech, twice over)."""
    speech = load_audio(str(Path(__file__).parent / "fixtures" / "speech" / "meeting.opus"))
    samples = np.concatenate([speech, np.zeros(16000 * 5, np.float32), speech])
    opts = WorkerOptions(chunk_seconds=20.0)
    expected = planning.plan_request(samples, opts)
    with _spooled(samples) as audio:
        assert planning.plan_request(audio, opts) == expected
    assert len(expected) >= 2


def test_diarization_reads_a_spooled_file_in_windows() -> None:
    """The embedded diarizer on the meeting fixture from a spilled file: the in-memory turns, exactly."""
    from qwen_asr_worker.diarization import DiarizeSettings, EmbeddedDiarizer, load_encoder

    samples = load_audio(str(Path(__file__).parent / "fixtures" / "speech" / "meeting.opus"))
    diarizer = EmbeddedDiarizer(load_encoder())
    expected = diarizer(samples, DiarizeSettings())
    with _spooled(samples) as audio:
        assert audio.on_disk
        assert diarizer(audio, DiarizeSettings()) == expected
    assert len({turn.speaker for turn in expected}) >= 2


def test_a_streams_first_window_is_transcribed_before_the_file_is_decoded(
    harness: Harness, checkpoints: dict[str, Path], ten_minutes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streamed 10-minute file: its first window reaches the model, and its first delta is sent, while the file
    is still decoding; the deltas join to the text a plain request gets."""
    _load(harness, checkpoints, "vad:false")
    whole = harness.transcribe(ten_minutes)
    model = harness.engine.current
    decodings: list[DecodingAudio] = []
    real_decode = pipeline.decode_audio
    submitted: list[bool] = []  # for each window: whether the file had been decoded to its end
    real_submit = model.batcher.submit

    def decode(path: str, spill_bytes: int | None = None) -> DecodingAudio:
        decodings.append(real_decode(path, spill_bytes=spill_bytes))
        return decodings[-1]

    def submit(samples: np.ndarray, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        submitted.append(decodings[-1].complete)
        return real_submit(samples, *args, **kwargs)

    real_events = pipeline.RequestRun.events
    at_deltas: list[bool] = []  # for each delta the worker sent: whether the file had been decoded to its end

    def events(run: pipeline.RequestRun):  # type: ignore[no-untyped-def]
        for item in real_events(run):
            if isinstance(item, str):
                at_deltas.append(decodings[-1].complete)
            yield item

    monkeypatch.setattr(pipeline, "decode_audio", decode)
    monkeypatch.setattr(model.batcher, "submit", submit)
    monkeypatch.setattr(pipeline.RequestRun, "events", events)
    request = backend_pb2.TranscriptRequest(dst=str(ten_minutes))
    messages = list(harness.stub.AudioTranscriptionStream(request, timeout=120))
    assert submitted[0] is False and len(submitted) == 4
    assert at_deltas[0] is False and len(at_deltas) == 4
    assert "".join(m.delta for m in messages[:-1]) == messages[-1].final_result.text == whole.text
    assert messages[-1].final_result.duration == pytest.approx(whole.duration)


def test_a_stream_damaged_midway_fails_there_and_the_worker_serves_on(
    harness: Harness, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    """A NaN 100 s into a 200-s file: the stream sends the deltas of the windows before it, then INVALID_ARGUMENT
    naming the problem; the next request is served."""
    _load(harness, checkpoints, "vad:false", "chunk_seconds:20")
    samples = speech_like(200.0, 16000, [])
    samples[100 * 16000] = np.nan
    path = write_audio(tmp_path / "nan.wav", samples, 16000, "wav", subtype="FLOAT")
    deltas: list[str] = []
    with pytest.raises(grpc.RpcError) as failure:
        for message in harness.stub.AudioTranscriptionStream(backend_pb2.TranscriptRequest(dst=str(path)), timeout=120):
            deltas.append(message.delta)
    assert failure.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "NaN or infinite" in (failure.value.details() or "")
    assert deltas and all(deltas)
    good = write_audio(tmp_path / "good.wav", speech_like(30.0, 16000, []), 16000, "wav")
    assert harness.transcribe(good).text
