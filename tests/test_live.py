"""Live transcription (AudioTranscriptionLive): tiny checkpoints, the real Silero VAD, real speech fixtures.

The tiny model writes its fixed sentence for any audio it hears, so each utterance it is given comes back as that
sentence, and a pass that continues an answer finishes that sentence from where the answer stopped.
"""

from __future__ import annotations

import functools
import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import soxr
from hypothesis import given, settings
from hypothesis import strategies as st

import backend_pb2
from qwen_asr_worker.audio import SAMPLE_RATE, load_audio
from qwen_asr_worker.engine import Engine, LoadSpec
from qwen_asr_worker.errors import InvalidRequest
from qwen_asr_worker.live import LiveConfig, check_sample_rate
from qwen_asr_worker.options import LiveSettings, OptionsError, parse_live_params, parse_options
from qwen_asr_worker.vad import StreamingVad, frame_probabilities
from tests.conftest import CJK_SENTENCE, SENTENCE, SENTENCE_WORDS, SPEECH_DIR, Harness, serving, wait_until

LAYOUT: dict[str, dict] = json.loads((SPEECH_DIR / "layout.json").read_text(encoding="utf-8"))
ON = ["max_new_tokens:48", "batch_window_ms:5", "vad:on"]
NS = 1_000_000_000


def config(language: str = "", sample_rate: int = 0, **params: str) -> backend_pb2.TranscriptLiveRequest:
    """The first message of a session."""
    return backend_pb2.TranscriptLiveRequest(
        config=backend_pb2.TranscriptLiveConfig(language=language, sample_rate=sample_rate, params=params)
    )


def audio_message(samples: np.ndarray) -> backend_pb2.TranscriptLiveRequest:
    """One audio message."""
    return backend_pb2.TranscriptLiveRequest(audio=backend_pb2.TranscriptLiveAudio(pcm=samples.tolist()))


def messages(
    samples: np.ndarray, seconds: float = 0.5, rate: int = SAMPLE_RATE
) -> Iterator[backend_pb2.TranscriptLiveRequest]:
    """`samples` as audio messages of `seconds` each."""
    step = round(seconds * rate)
    for i in range(0, len(samples), step):
        yield audio_message(samples[i : i + step])


def run_live(
    harness: Harness, samples: np.ndarray, first: backend_pb2.TranscriptLiveRequest | None = None, **kw: float
) -> list[backend_pb2.TranscriptLiveResponse]:
    """A whole session: config, the audio, close; every response."""
    requests = iter([first or config(), *messages(samples, **kw)])
    return list(harness.stub.AudioTranscriptionLive(requests, timeout=120))


def split(responses: list[backend_pb2.TranscriptLiveResponse]) -> tuple[list[str], backend_pb2.TranscriptResult]:
    """The deltas and the final result; checks the ack comes first and the final result last, alone."""
    assert responses[0].ready and not responses[0].delta and not responses[0].HasField("final_result")
    *middle, last = responses[1:]
    assert last.HasField("final_result") and not last.delta and not last.ready
    assert all(not r.ready and not r.HasField("final_result") and not r.eou and not r.eob for r in middle)
    return [r.delta for r in middle], last.final_result


@functools.cache
def speech(name: str) -> np.ndarray:
    """A committed speech fixture at 16 kHz (shared: never modify it)."""
    return load_audio(str(SPEECH_DIR / name))


def continuous_speech(seconds: float) -> np.ndarray:
    """Speech with no pause as long as `vad_min_silence_seconds`: the quiet fixture's speech, repeated."""
    start, end = LAYOUT["quiet.opus"]["speech"][0]
    piece = speech("quiet.opus")[round(start * SAMPLE_RATE) : round(end * SAMPLE_RATE)]
    return np.tile(piece, int(np.ceil(seconds * SAMPLE_RATE / len(piece))))[: round(seconds * SAMPLE_RATE)]


def code_of(call: Iterator[backend_pb2.TranscriptLiveResponse]) -> tuple[grpc.StatusCode, str]:
    """Drain a call that must fail; its status code and message."""
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    return info.value.code(), info.value.details()


# --- params and sample rates ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, LiveSettings()),
        ({"chunk_seconds": "1.5"}, LiveSettings(chunk_seconds=1.5)),
        ({"rollback_tokens": "0", "unfixed_chunks": "0"}, LiveSettings(rollback_tokens=0, unfixed_chunks=0)),
        ({"words": "true"}, LiveSettings(words=True)),
        ({" Words ": "FALSE"}, LiveSettings(words=False)),
        ({"max_utterance_seconds": "12"}, LiveSettings(max_utterance_seconds=12.0)),
    ],
)
def test_live_params_parse(params: dict[str, str], expected: LiveSettings) -> None:
    assert parse_live_params(params) == expected


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"chunk": "2"}, "unknown live transcription param 'chunk'; valid params: chunk_seconds, max_utterance"),
        ({"chunk_seconds": "0"}, "expected a number >= 0.2 and <= 30"),
        ({"chunk_seconds": "nan"}, "expected a number >= 0.2"),
        ({"rollback_tokens": "-1"}, "expected an integer in [0, 100]"),
        ({"unfixed_chunks": "two"}, "expected an integer in [0, 100]"),
        ({"words": "maybe"}, "expected true or false"),
        ({"max_utterance_seconds": "1"}, "expected a number >= 2"),
        ({"chunk_seconds": "10", "max_utterance_seconds": "5"}, "is longer than max_utterance_seconds"),
        ({"words": "true", "WORDS": "false"}, "is given twice"),
    ],
)
def test_live_params_reject_with_the_valid_values(params: dict[str, str], message: str) -> None:
    with pytest.raises(OptionsError, match="^.*" + message.replace("[", r"\[").replace("]", r"\]")):
        parse_live_params(params)


@pytest.mark.parametrize(("rate", "expected"), [(0, 16000), (8000, 8000), (44100, 44100), (384000, 384000)])
def test_sample_rate_zero_means_16k(rate: int, expected: int) -> None:
    assert check_sample_rate(rate) == expected


@pytest.mark.parametrize("rate", [-1, -16000, 1, 3999, 384001])
def test_implausible_sample_rates_are_refused(rate: int) -> None:
    with pytest.raises(InvalidRequest, match=f"sample_rate {rate} is not supported; send 4000-384000 Hz"):
        check_sample_rate(rate)


@settings(deadline=None, max_examples=25)
@given(cuts=st.lists(st.integers(0, 3 * SAMPLE_RATE), max_size=8))
def test_streaming_vad_scores_each_frame_once_as_the_whole_run_does(cuts: list[int]) -> None:
    samples = speech("quiet.opus")[: 3 * SAMPLE_RATE]
    bounds = [0, *sorted(cuts), len(samples)]
    vad = StreamingVad()
    got = np.concatenate([vad.feed(samples[a:b]) for a, b in itertools.pairwise(bounds)])
    whole = frame_probabilities(samples[: len(samples) // 512 * 512])
    assert len(got) == len(whole)
    # Each call re-settles the state on the second before it (as the file path's rows do): decisions agree.
    assert np.mean((got > 0.5) == (whole > 0.5)) > 0.95


# --- the stream ---------------------------------------------------------------------------------------------
def test_ready_first_then_deltas_that_join_to_the_final_text_which_matches_the_file_path(
    harness: Harness, checkpoints: dict[str, Path]
) -> None:
    harness.load(checkpoints["asr"], *ON)
    deltas, final = split(run_live(harness, speech("gap.opus")))
    file_result = harness.transcribe(SPEECH_DIR / "gap.opus")
    assert final.text == "".join(deltas) == file_result.text == f"{SENTENCE} {SENTENCE}"
    assert all(deltas)
    assert final.language == "en"
    assert final.duration == pytest.approx(LAYOUT["gap.opus"]["duration"], abs=0.01)
    # One segment per utterance, spanning its speech (the last runs to the stream's end: its pause is short).
    spans = [(s.start / NS, s.end / NS) for s in final.segments]
    for (start, end), (speech_start, speech_end) in zip(spans, LAYOUT["gap.opus"]["speech"], strict=True):
        assert speech_start - 0.1 <= start <= speech_start + 0.1
        assert speech_end - 0.1 <= end <= LAYOUT["gap.opus"]["duration"]
    assert [s.text for s in final.segments] == [SENTENCE, SENTENCE]


def test_words_of_each_committed_utterance_in_stream_time(harness: Harness, checkpoints: dict[str, Path]) -> None:
    harness.load(checkpoints["asr"], *ON, f"forced_aligner:{checkpoints['aligner']}")
    responses = run_live(harness, speech("gap.opus"), config(words="true"))
    deltas, final = split(responses)
    words = [w for r in responses for w in r.words]
    assert [w.text for w in words] == SENTENCE_WORDS * 2
    starts = [w.start for w in words]
    assert starts == sorted(starts) and all(w.start <= w.end for w in words)
    (first, _), (second, _) = LAYOUT["gap.opus"]["speech"]
    assert all(first - 0.5 <= w.start / NS < first + 2.0 for w in words[:6])  # nanoseconds from the stream's start
    assert all(second - 0.5 <= w.start / NS < second + 2.0 for w in words[6:])
    assert [[w.text for w in s.words] for s in final.segments] == [SENTENCE_WORDS, SENTENCE_WORDS]
    assert "".join(deltas) == final.text


def test_degenerate_word_times_stay_in_their_utterance(
    harness: Harness, checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real aligner, its times set to 0 for the second committed utterance (QwenLM/Qwen3-ASR issue 55): those
    words are spread over that utterance's speech, after the silence, never back to the stream's start."""
    from qwen_asr import Qwen3ForcedAligner
    from qwen_asr.inference.qwen3_forced_aligner import ForcedAlignItem, ForcedAlignResult

    real, calls = Qwen3ForcedAligner.align, []

    def align(self: Qwen3ForcedAligner, audio: object, text: object, language: object) -> list[ForcedAlignResult]:
        results = real(self, audio=audio, text=text, language=language)
        calls.append(len(results))
        if len(calls) != 2:
            return results
        return [ForcedAlignResult([ForcedAlignItem(it.text, 0, 0) for it in r.items]) for r in results]

    monkeypatch.setattr(Qwen3ForcedAligner, "align", align)
    harness.load(checkpoints["asr"], *ON, f"forced_aligner:{checkpoints['aligner']}")
    words = [w for r in run_live(harness, speech("gap.opus"), config(words="true")) for w in r.words]
    assert len(calls) == 2 and [w.text for w in words] == SENTENCE_WORDS * 2
    (first, _), (second, second_end) = LAYOUT["gap.opus"]["speech"]
    assert all(first - 0.5 <= w.start / NS < first + 2.0 for w in words[:6])  # the first utterance as aligned
    starts = [w.start for w in words[6:]]
    assert starts == sorted(set(starts))  # spread, not stacked
    assert all(second - 0.5 <= w.start / NS <= w.end / NS <= second_end + 1.0 for w in words[6:])


def test_cjk_deltas_join_without_spaces(harness: Harness, checkpoints: dict[str, Path]) -> None:
    harness.load(checkpoints["cjk"], *ON)
    for language in ("", "zh"):
        deltas, final = split(run_live(harness, speech("gap.opus"), config(language=language)))
        assert "".join(deltas) == final.text == CJK_SENTENCE * 2
        assert final.language == "zh"


def test_partial_text_is_finalized_before_the_utterance_ends_and_never_retracted(
    harness: Harness, checkpoints: dict[str, Path]
) -> None:
    """Continuous speech, fed in 0.5-s steps with unfixed_chunks 0 and rollback 2: text goes out while the
    utterance is still open, every delta extends what was sent, and the sentence is never repeated."""
    harness.load(checkpoints["asr"], *ON)
    samples = continuous_speech(12.0)
    sent = 0
    lock = threading.Lock()

    def requests() -> Iterator[backend_pb2.TranscriptLiveRequest]:
        nonlocal sent
        yield config(chunk_seconds="1", unfixed_chunks="0", rollback_tokens="2")
        for message in messages(samples, 0.25):
            yield message
            with lock:
                sent += len(message.audio.pcm)
            time.sleep(0.02)

    seen: list[tuple[str, int]] = []
    for response in harness.stub.AudioTranscriptionLive(requests(), timeout=120):
        with lock:
            seen.append((response.delta, sent))
    deltas = [d for d, _ in seen[1:-1]]
    final = "".join(deltas)
    assert final == SENTENCE
    assert len(deltas) >= 2  # finalized in pieces
    assert seen[1][1] < len(samples)  # the first piece came before the audio ended
    assert all(final.startswith("".join(deltas[:i])) for i in range(len(deltas) + 1))


def test_silence_sends_nothing_and_calls_no_model(harness: Harness, checkpoints: dict[str, Path]) -> None:
    harness.load(checkpoints["asr"], *ON)
    for name in ("silence.flac", "noise.opus"):
        deltas, final = split(run_live(harness, speech(name)))
        assert deltas == [] and final.text == "" and list(final.segments) == []
        assert final.duration == pytest.approx(LAYOUT[name]["duration"], abs=0.01)
    model = harness.engine.current
    assert model is not None and model.windows_transcribed == 0


def test_an_utterance_is_committed_at_its_pause_before_the_stream_ends(
    harness: Harness, checkpoints: dict[str, Path]
) -> None:
    """The sender holds back the second utterance until the first is complete: that happens only if the pause
    commits it."""
    harness.load(checkpoints["asr"], *ON)
    samples = speech("gap.opus")
    second = round((LAYOUT["gap.opus"]["speech"][1][0] - 0.5) * SAMPLE_RATE)
    first_done = threading.Event()
    held_back = []

    def requests() -> Iterator[backend_pb2.TranscriptLiveRequest]:
        yield config()
        yield from messages(samples[:second])
        held_back.append(first_done.wait(timeout=60))
        yield from messages(samples[second:])

    text = ""
    for response in harness.stub.AudioTranscriptionLive(requests(), timeout=120):
        text += response.delta
        if text == SENTENCE:
            first_done.set()
    assert held_back == [True]
    assert text == f"{SENTENCE} {SENTENCE}"


@pytest.mark.parametrize(("cap", "seconds"), [("30", 70.0), ("8", 20.0)])
def test_speech_without_a_pause_is_committed_at_max_utterance_seconds(
    harness: Harness, checkpoints: dict[str, Path], cap: str, seconds: float
) -> None:
    harness.load(checkpoints["asr"], *ON)
    params = {} if cap == "30" else {"max_utterance_seconds": cap}
    deltas, final = split(run_live(harness, continuous_speech(seconds), config(**params), seconds=1.0))
    lengths = [(s.end - s.start) / NS for s in final.segments]
    assert len(lengths) == int(np.ceil(seconds / float(cap)))
    assert all(length <= float(cap) + 0.05 for length in lengths)
    assert final.text == " ".join([SENTENCE] * len(lengths)) == "".join(deltas)


def test_vad_off_counts_every_frame_as_speech(harness: Harness, checkpoints: dict[str, Path]) -> None:
    harness.load(checkpoints["asr"], "vad:off")
    deltas, final = split(run_live(harness, speech("silence.flac"), config(max_utterance_seconds="5")))
    assert final.text == " ".join([SENTENCE] * len(final.segments)) == "".join(deltas)
    assert len(final.segments) == int(np.ceil(LAYOUT["silence.flac"]["duration"] / 5))


def test_other_sample_rates_are_resampled(harness: Harness, checkpoints: dict[str, Path]) -> None:
    harness.load(checkpoints["asr"], *ON)
    at_48k = soxr.resample(speech("gap.opus"), SAMPLE_RATE, 48000)
    deltas, final = split(run_live(harness, at_48k, config(sample_rate=48000), rate=48000))
    assert final.text == f"{SENTENCE} {SENTENCE}" == "".join(deltas)
    assert final.duration == pytest.approx(len(at_48k) / 48000, abs=1e-3)
    spans = [s.start / NS for s in final.segments]
    assert spans[1] == pytest.approx(LAYOUT["gap.opus"]["speech"][1][0], abs=0.1)


def test_closing_without_sending_anything_ends_quietly(harness: Harness, checkpoints: dict[str, Path]) -> None:
    harness.load(checkpoints["asr"], *ON)
    assert list(harness.stub.AudioTranscriptionLive(iter([]), timeout=30)) == []
    deltas, final = split(list(harness.stub.AudioTranscriptionLive(iter([config()]), timeout=30)))
    assert deltas == [] and final.text == "" and final.duration == 0.0


# --- errors ---------------------------------------------------------------------------------------------
BAD_STREAMS = {
    "audio before config": (
        [audio_message(np.zeros(1600, np.float32))],
        "the first message of a live transcription stream must carry the config",
    ),
    "a second config": ([config(), config()], "message 2 carries a second config"),
    "an empty message": ([config(), backend_pb2.TranscriptLiveRequest()], "message 2 is empty"),
    "NaN": (
        [config(), audio_message(np.array([0.0, np.nan], np.float32))],
        "audio message 1 has non-finite samples",
    ),
    "infinity": (
        [config(), audio_message(np.zeros(10, np.float32)), audio_message(np.array([np.inf], np.float32))],
        "audio message 2 has non-finite samples",
    ),
    "a negative sample rate": ([config(sample_rate=-16000)], "sample_rate -16000 is not supported"),
    "an unknown param": ([config(chunk="2")], "unknown live transcription param 'chunk'; valid params:"),
    "a bad param value": ([config(rollback_tokens="-3")], "expected an integer in [0, 100]"),
    "an unknown language": ([config(language="klingon")], "klingon"),
}


@pytest.mark.parametrize("case", BAD_STREAMS)
def test_bad_streams_are_invalid_argument_and_the_worker_keeps_serving(
    harness: Harness, checkpoints: dict[str, Path], case: str
) -> None:
    harness.load(checkpoints["asr"], *ON)
    requests, message = BAD_STREAMS[case]
    code, details = code_of(harness.stub.AudioTranscriptionLive(iter(requests), timeout=30))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert message in details
    deltas, final = split(run_live(harness, speech("quiet.opus")))
    assert final.text == SENTENCE == "".join(deltas)
    assert wait_until(lambda: harness.engine.status().state.value == "ready", timeout=10)


def test_no_model_is_failed_precondition(harness: Harness) -> None:
    code, details = code_of(harness.stub.AudioTranscriptionLive(iter([config()]), timeout=30))
    assert code is grpc.StatusCode.FAILED_PRECONDITION and "call LoadModel first" in details


def test_live_off_is_unimplemented_as_localai_expects(harness: Harness, checkpoints: dict[str, Path]) -> None:
    harness.load(checkpoints["asr"], *ON, "live:off")
    code, details = code_of(harness.stub.AudioTranscriptionLive(iter([config()]), timeout=30))
    assert code is grpc.StatusCode.UNIMPLEMENTED and "live transcription unsupported" in details
    assert harness.transcribe(SPEECH_DIR / "quiet.opus").text == SENTENCE


def test_words_without_an_aligner_is_failed_precondition(harness: Harness, checkpoints: dict[str, Path]) -> None:
    harness.load(checkpoints["asr"], *ON, "forced_aligner:none")
    code, details = code_of(harness.stub.AudioTranscriptionLive(iter([config(words="true")]), timeout=30))
    assert code is grpc.StatusCode.FAILED_PRECONDITION and "forced_aligner:none" in details


def test_cancelling_frees_the_session_at_once(harness: Harness, checkpoints: dict[str, Path]) -> None:
    harness.load(checkpoints["asr"], *ON)
    stop = threading.Event()

    def requests() -> Iterator[backend_pb2.TranscriptLiveRequest]:
        yield config()
        yield from messages(continuous_speech(6.0))
        stop.wait(60)  # never closes: only the cancel ends it

    call = harness.stub.AudioTranscriptionLive(requests(), timeout=120)
    assert next(call).ready
    assert wait_until(lambda: harness.engine.status().state.value == "busy", timeout=10)
    call.cancel()
    assert wait_until(lambda: harness.engine.status().state.value == "ready", timeout=5)
    stop.set()
    model = harness.engine.current
    assert model is not None and model.users == 0
    _, final = split(run_live(harness, speech("quiet.opus")))
    assert final.text == SENTENCE


def test_sessions_and_file_requests_at_once(checkpoints: dict[str, Path]) -> None:
    with serving() as harness:
        harness.load(checkpoints["asr"], "max_new_tokens:48", "vad:on", "batch_window_ms:50")
        results: dict[str, str] = {}
        errors: list[BaseException] = []

        def live(name: str) -> None:
            try:
                _, final = split(run_live(harness, speech("gap.opus"), seconds=0.25))
                results[name] = final.text
            except BaseException as exc:  # reported below
                errors.append(exc)

        def file(name: str) -> None:
            try:
                results[name] = harness.transcribe(SPEECH_DIR / "gap.opus").text
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=live, args=(f"live{i}",)) for i in range(4)]
        threads += [threading.Thread(target=file, args=(f"file{i}",)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert errors == []
        assert results == {
            name: f"{SENTENCE} {SENTENCE}" for name in [*(f"live{i}" for i in range(4)), "file0", "file1"]
        }
        model = harness.engine.current
        assert model is not None and model.users == 0


def test_a_ten_minute_session_holds_one_utterance_at_most(checkpoints: dict[str, Path]) -> None:
    """Ten minutes of speech and pauses through a session on the engine: the audio it holds never exceeds one
    utterance plus a chunk, and the finalized text is every utterance's."""
    engine = Engine()
    engine.load(LoadSpec("m", str(checkpoints["asr"]), "", parse_options(ON)))
    try:
        samples = np.tile(speech("gap.opus"), 35)[: 600 * SAMPLE_RATE]
        held = []
        text = ""
        settings = LiveSettings()
        with engine.live(LiveConfig(None, SAMPLE_RATE, settings)) as session:
            for i in range(0, len(samples), SAMPLE_RATE // 2):
                session.feed(samples[i : i + SAMPLE_RATE // 2])
                if session.due:
                    text += "".join(u.delta for u in session.step())
                held.append(session.held_seconds)
            text += "".join(u.delta for u in session.finish())
            result = session.result()
        assert max(held) <= settings.max_utterance_seconds + settings.chunk_seconds
        assert result.text == text
        # Each copy of the fixture ends where the next begins, so its second utterance runs into the next copy's
        # first (a pause under 2 s): one utterance per copy after the first.
        assert len(result.segments) == 35 and {s.text for s in result.segments} == {SENTENCE}
    finally:
        engine.free()
