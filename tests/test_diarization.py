"""Speaker diarization: the embedded pipeline on the committed meeting fixture (four espeak-ng voices, known
turns), the option, the lazy load, and the `Diarize` and `VAD` rpcs on an in-process server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

import backend_pb2
from qwen_asr_worker import diarization
from qwen_asr_worker.audio import SAMPLE_RATE, load_audio
from qwen_asr_worker.diarization import DiarizeSettings, EmbeddedDiarizer, SpeechWindow, load_encoder, plan_windows
from qwen_asr_worker.errors import InvalidRequest
from qwen_asr_worker.options import OptionsError, parse_options
from qwen_asr_worker.speakers import Turn, score
from tests.conftest import SPEECH_DIR, Harness, serving, wait_until

MEETING = SPEECH_DIR / "meeting.opus"
LAYOUT = json.loads((SPEECH_DIR / "layout.json").read_text(encoding="utf-8"))["meeting.opus"]
REFERENCE = [Turn(start, end, speaker) for start, end, speaker in LAYOUT["turns"]]
ON = ["max_new_tokens:48", "batch_window_ms:5", "vad:on", "diarization:on"]


@pytest.fixture(scope="module")
def meeting() -> np.ndarray:
    return load_audio(str(MEETING))


@pytest.fixture(scope="module")
def diarizer() -> EmbeddedDiarizer:
    return EmbeddedDiarizer(load_encoder())


def _code(call: pytest.ExceptionInfo[grpc.RpcError]) -> tuple[grpc.StatusCode, str]:
    return call.value.code(), call.value.details()


# --- the pipeline -------------------------------------------------------------------------------------------


def test_meeting_speakers_are_found(meeting: np.ndarray, diarizer: EmbeddedDiarizer) -> None:
    turns = diarizer(meeting, DiarizeSettings())
    assert len({t.speaker for t in turns}) == 4
    assert turns[0].speaker == "SPEAKER_00"
    result = score(REFERENCE, turns)
    assert result.confusion / result.total < 0.05, result  # who spoke: nearly every second right
    assert result.der < 0.15, result  # missed speech is mostly the overlaps, which one label per time cannot hold


def test_turn_labels_follow_the_reference_speakers(meeting: np.ndarray, diarizer: EmbeddedDiarizer) -> None:
    turns = diarizer(meeting, DiarizeSettings())
    names = {}
    for ref in REFERENCE:
        middle = (ref.start + ref.end) / 2
        found = next((t.speaker for t in turns if t.start <= middle < t.end), None)
        if ref.duration > 2.0:  # every long turn is found, with one label per reference speaker
            assert found is not None
            assert names.setdefault(ref.speaker, found) == found
    assert len(set(names.values())) == len(names) == 4


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_num_speakers_forces_the_count(meeting: np.ndarray, diarizer: EmbeddedDiarizer, count: int) -> None:
    turns = diarizer(meeting, DiarizeSettings(num_speakers=count))
    assert len({t.speaker for t in turns}) == count


def test_min_and_max_speakers_bound_the_count(meeting: np.ndarray, diarizer: EmbeddedDiarizer) -> None:
    assert len({t.speaker for t in diarizer(meeting, DiarizeSettings(max_speakers=2))}) == 2
    assert len({t.speaker for t in diarizer(meeting, DiarizeSettings(min_speakers=5))}) == 5
    assert len({t.speaker for t in diarizer(meeting, DiarizeSettings(min_speakers=2, max_speakers=6))}) == 4


def test_thresholds_and_durations_are_honoured(meeting: np.ndarray, diarizer: EmbeddedDiarizer) -> None:
    assert len({t.speaker for t in diarizer(meeting, DiarizeSettings(clustering_threshold=1.5))}) == 1
    long_only = diarizer(meeting, DiarizeSettings(min_duration_on=2.0))
    assert long_only and min(t.duration for t in long_only) >= 2.0
    bridged = diarizer(meeting, DiarizeSettings(min_duration_off=30.0, num_speakers=1))
    assert len(bridged) == 1


def test_silence_and_empty_audio_have_no_turns(diarizer: EmbeddedDiarizer) -> None:
    assert diarizer(np.zeros(5 * SAMPLE_RATE, np.float32), DiarizeSettings()) == []
    assert diarizer(np.zeros(0, np.float32), DiarizeSettings()) == []


def test_a_speaker_keeps_one_label_across_a_long_file(meeting: np.ndarray, diarizer: EmbeddedDiarizer) -> None:
    """The meeting four times over: more windows than are clustered at once, one label per speaker throughout."""
    original = diarization.MAX_CLUSTERED
    diarization.MAX_CLUSTERED = 60  # the meeting has about 50 windows: four copies need the nearest-centre pass
    try:
        turns = diarizer(np.tile(meeting, 4), DiarizeSettings())
    finally:
        diarization.MAX_CLUSTERED = original
    length = len(meeting) / SAMPLE_RATE
    reference = [Turn(t.start + k * length, t.end + k * length, t.speaker) for k in range(4) for t in REFERENCE]
    result = score(reference, turns)
    assert len({t.speaker for t in turns}) == 4
    assert result.confusion / result.total < 0.05, result


@pytest.mark.parametrize(
    ("runs", "expected"),
    [
        ([(0, 8000)], [[(0, 8000)]]),  # 0.5 s: one window
        ([(100, 2100)], [[(0, 8000)]]),  # too short: widened to half a second, inside the file
        ([(0, 24000)], [[(0, 24000)]]),  # exactly one window
        ([(0, 40000)], [[(0, 24000), (12000, 36000), (16000, 40000)]]),  # the last window ends at the run's end
    ],
)
def test_plan_windows(runs: list[tuple[int, int]], expected: list) -> None:
    planned = plan_windows(runs, 48000)
    assert [[(w.start, w.end) for w in run] for run in planned] == expected


def test_run_turns_change_midway_between_window_centres() -> None:
    windows = [SpeechWindow(0, 24000), SpeechWindow(12000, 36000), SpeechWindow(24000, 48000)]
    turns = diarization.run_turns(0.0, 3.0, windows, ["a", "a", "b"])
    assert turns == [Turn(0.0, 1.875, "a"), Turn(1.875, 3.0, "b")]  # centres 1.5 and 2.25


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"num_speakers": -1}, "num_speakers"),
        ({"max_speakers": 1000}, "max_speakers"),
        ({"min_speakers": 4, "max_speakers": 2}, "min_speakers (4) is above max_speakers (2)"),
        ({"num_speakers": 5, "max_speakers": 3}, "num_speakers (5) is outside"),
        ({"clustering_threshold": float("nan")}, "clustering_threshold"),
        ({"clustering_threshold": 3.0}, "cosine distance"),
        ({"min_duration_on": -1.0}, "min_duration_on"),
        ({"min_duration_off": float("inf")}, "min_duration_off"),
    ],
)
def test_bad_settings_are_named(fields: dict, named: str) -> None:
    with pytest.raises(InvalidRequest, match="bad diarization request") as caught:
        DiarizeSettings(**fields)
    assert named in str(caught.value)


# --- the option -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "parsed"),
    [("on", "on"), ("true", "on"), ("off", None), ("none", None), ("pipelines/pyannote", "pipelines/pyannote")],
)
def test_diarization_option(value: str, parsed: str | None) -> None:
    assert parse_options([f"diarization:{value}"]).diarization == parsed
    assert parse_options([]).diarization is None


def test_diarization_option_needs_a_value() -> None:
    with pytest.raises(OptionsError, match="no value"):
        parse_options(["diarization:"])


def test_a_missing_pipeline_folder_fails_the_load(harness: Harness, checkpoints: dict[str, Path]) -> None:
    result = harness.load(checkpoints["asr"], "diarization:no/such/pipeline")
    assert not result.success
    assert "no/such/pipeline" in result.message and "diarization:on" in result.message


def test_a_pyannote_folder_without_pyannote_fails_the_load(
    harness: Harness, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "pipeline"
    folder.mkdir()
    (folder / "config.yaml").write_text("pipeline: {}\n", encoding="utf-8")
    result = harness.load(checkpoints["asr"], f"diarization:{folder}")
    assert not result.success
    assert "pyannote.audio is not installed" in result.message and "make install DIARIZATION=pyannote" in result.message


def test_missing_weights_fail_the_load_with_the_install_command(
    harness: Harness, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(diarization, "WEIGHTS_DISTRIBUTION", "no-such-distribution")
    result = harness.load(checkpoints["asr"], "diarization:on")
    assert not result.success
    assert "Resemblyzer" in result.message and "make install" in result.message


# --- transcripts with speakers --------------------------------------------------------------------------


@pytest.fixture
def diarized(checkpoints: dict[str, Path]) -> Iterator[Harness]:
    """A server with the English model, its aligner and diarization on."""
    with serving() as served:
        result = served.load(checkpoints["asr"], *ON, f"forced_aligner:{checkpoints['aligner']}")
        assert result.success, result.message
        yield served


def test_diarization_loads_on_first_use_and_status_counts_it(diarized: Harness) -> None:
    model = diarized.engine.current
    assert model is not None and not model.diarizer_attached
    assert "diarization_weights" not in diarized.status().memory.breakdown
    diarized.transcribe(MEETING)  # diarize=false: nothing loads
    assert not model.diarizer_attached
    diarized.transcribe(MEETING, diarize=True)
    assert model.diarizer_attached and model.diarizer_loads == 1
    assert diarized.status().memory.breakdown["diarization_weights"] > 1_000_000
    diarized.transcribe(MEETING, diarize=True)
    assert model.diarizer_loads == 1  # once


def test_every_segment_carries_a_speaker(diarized: Harness) -> None:
    for granularities in ([], ["segment"], ["word"]):
        result = diarized.transcribe(MEETING, diarize=True, timestamp_granularities=granularities)
        assert result.segments
        assert all(s.speaker.startswith("SPEAKER_") for s in result.segments), granularities
    plain = diarized.transcribe(MEETING, diarize=False, timestamp_granularities=["word"])
    assert {s.speaker for s in plain.segments} == {""}


def test_words_take_the_speaker_of_their_turn(diarized: Harness) -> None:
    result = diarized.transcribe(MEETING, diarize=True, timestamp_granularities=["word"])
    diarized_turns = diarized.engine.diarize(diarization_request()).turns
    for segment in result.segments:
        for word in segment.words:
            middle = (word.start + word.end) / 2e9
            covering = [t.speaker for t in diarized_turns if t.start <= middle < t.end]
            if covering:
                assert covering == [segment.speaker]


def diarization_request(**fields: object):
    from qwen_asr_worker.engine import DiarizationRequest

    return DiarizationRequest(path=str(MEETING), **fields)


def test_stream_final_result_carries_speakers(diarized: Harness) -> None:
    request = backend_pb2.TranscriptRequest(dst=str(MEETING), diarize=True, timestamp_granularities=["segment"])
    final = [r.final_result for r in diarized.stub.AudioTranscriptionStream(request, timeout=120) if r.final_result]
    assert final and final[-1].segments
    assert all(s.speaker.startswith("SPEAKER_") for s in final[-1].segments)


def test_free_releases_the_diarizer_and_idle_unload_drops_it(checkpoints: dict[str, Path]) -> None:
    with serving() as served:
        assert served.load(checkpoints["asr"], *ON, "aligner_idle_unload:1").success
        model = served.engine.current
        served.transcribe(MEETING, diarize=True)
        assert model.diarizer_attached
        assert wait_until(lambda: not model.diarizer_attached, timeout=15)
        served.transcribe(MEETING, diarize=True)
        assert model.diarizer_loads == 2  # loaded again on the next request
        served.stub.Free(backend_pb2.HealthMessage(), timeout=10)
        assert not model.diarizer_attached


# --- the Diarize rpc --------------------------------------------------------------------------------------


def test_diarize_rpc(diarized: Harness) -> None:
    reply = diarized.stub.Diarize(backend_pb2.DiarizeRequest(dst=str(MEETING), threads=4), timeout=120)
    assert reply.num_speakers == 4
    assert reply.duration == pytest.approx(LAYOUT["duration"], abs=0.05)
    assert [s.id for s in reply.segments] == list(range(len(reply.segments)))
    assert reply.segments[0].speaker == "SPEAKER_00"
    assert all(s.text == "" for s in reply.segments)
    hypothesis = [Turn(s.start, s.end, s.speaker) for s in reply.segments]
    assert score(REFERENCE, hypothesis).der < 0.15


def test_diarize_rpc_honours_every_hint(diarized: Harness) -> None:
    def call(**fields: object) -> backend_pb2.DiarizeResponse:
        return diarized.stub.Diarize(backend_pb2.DiarizeRequest(dst=str(MEETING), **fields), timeout=120)

    assert call(num_speakers=2).num_speakers == 2
    assert call(max_speakers=3).num_speakers == 3
    assert call(min_speakers=5).num_speakers == 5
    assert call(clustering_threshold=1.5).num_speakers == 1
    assert min(s.end - s.start for s in call(min_duration_on=2.0).segments) >= 2.0
    assert len(call(num_speakers=1, min_duration_off=30.0).segments) == 1
    assert call(language="de").language == "de"


def test_diarize_rpc_include_text(diarized: Harness) -> None:
    reply = diarized.stub.Diarize(backend_pb2.DiarizeRequest(dst=str(MEETING), include_text=True), timeout=120)
    texts = [s.text for s in reply.segments if s.text]
    assert texts  # the scripted checkpoint says its sentence in every window; each piece lands in one turn
    assert reply.language == "en"
    transcript = diarized.transcribe(MEETING, timestamp_granularities=["word"]).text
    assert " ".join(texts).split() == transcript.split()


def test_diarize_rpc_errors(harness: Harness, checkpoints: dict[str, Path]) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        harness.stub.Diarize(backend_pb2.DiarizeRequest(dst=str(MEETING)), timeout=30)
    assert _code(caught)[0] is grpc.StatusCode.FAILED_PRECONDITION  # no model
    assert harness.load(checkpoints["asr"], "vad:on").success
    with pytest.raises(grpc.RpcError) as caught:
        harness.stub.Diarize(backend_pb2.DiarizeRequest(dst=str(MEETING)), timeout=30)
    code, message = _code(caught)
    assert code is grpc.StatusCode.FAILED_PRECONDITION and "diarization:on" in message
    assert harness.load(checkpoints["asr"], *ON).success
    for fields, named in [
        ({"num_speakers": -2}, "num_speakers"),
        ({"min_speakers": 3, "max_speakers": 2}, "above max_speakers"),
        ({"clustering_threshold": float("nan")}, "clustering_threshold"),
        ({"dst": ""}, "dst is empty"),
        ({"dst": "/no/such/file.wav"}, "/no/such/file.wav"),
        ({"language": "klingon"}, "klingon"),
    ]:
        request = backend_pb2.DiarizeRequest(dst=str(MEETING))
        request.MergeFrom(backend_pb2.DiarizeRequest(**fields))
        if "dst" in fields:
            request.dst = fields["dst"]
        with pytest.raises(grpc.RpcError) as caught:
            harness.stub.Diarize(request, timeout=30)
        code, message = _code(caught)
        assert code is grpc.StatusCode.INVALID_ARGUMENT and named in message, (fields, message)
    with pytest.raises(grpc.RpcError) as caught:
        harness.stub.Diarize(backend_pb2.DiarizeRequest(dst=str(MEETING), ModelIdentity="other"), timeout=30)
    assert _code(caught)[0] is grpc.StatusCode.NOT_FOUND
    assert harness.stub.Diarize(backend_pb2.DiarizeRequest(dst=str(MEETING)), timeout=120).num_speakers == 4


# --- the VAD rpc ------------------------------------------------------------------------------------------


def test_vad_rpc_finds_the_speech(harness: Harness, checkpoints: dict[str, Path], meeting: np.ndarray) -> None:
    assert harness.load(checkpoints["asr"], "vad:on", "vad_min_silence_seconds:0.2").success
    reply = harness.stub.VAD(backend_pb2.VADRequest(audio=meeting.tolist()), timeout=60)
    found = [(s.start, s.end) for s in reply.segments]
    assert len(found) >= 10
    assert found == sorted(found) and all(a < b for a, b in found)
    for ref in REFERENCE:  # every utterance overlaps a found run
        assert any(a < ref.end and ref.start < b for a, b in found), ref
    assert found[0][0] == pytest.approx(REFERENCE[0].start, abs=0.1)
    merged = harness.load(checkpoints["asr"], "vad:on", "vad_min_silence_seconds:10").success
    assert merged and len(harness.stub.VAD(backend_pb2.VADRequest(audio=meeting.tolist()), timeout=60).segments) == 1
    silent = harness.stub.VAD(backend_pb2.VADRequest(audio=[0.0] * SAMPLE_RATE), timeout=60)
    assert list(silent.segments) == []
    assert list(harness.stub.VAD(backend_pb2.VADRequest(), timeout=60).segments) == []


def test_vad_rpc_errors(harness: Harness, checkpoints: dict[str, Path]) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        harness.stub.VAD(backend_pb2.VADRequest(audio=[0.0] * 100), timeout=30)
    assert _code(caught)[0] is grpc.StatusCode.FAILED_PRECONDITION
    assert harness.load(checkpoints["asr"]).success
    for bad in (float("nan"), float("inf")):
        with pytest.raises(grpc.RpcError) as caught:
            harness.stub.VAD(backend_pb2.VADRequest(audio=[0.0, bad, 0.0]), timeout=30)
        code, message = _code(caught)
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "non-finite" in message
    assert harness.stub.VAD(backend_pb2.VADRequest(audio=[0.0] * 1000), timeout=30) is not None  # still serving
