"""Voice activity detection: real speech fixtures (espeak-ng, committed), the real Silero model, tiny checkpoints.

The fixtures' layout (where the speech lies) is in tests/fixtures/speech/layout.json.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import backend_pb2
from qwen_asr_worker.audio import SAMPLE_RATE, load_audio
from qwen_asr_worker.chunking import Window, plan_speech_windows, plan_windows
from qwen_asr_worker.options import parse_options
from qwen_asr_worker.planning import plan_request
from qwen_asr_worker.vad import (
    FRAME,
    SpeechRegion,
    VadSettings,
    detect_speech,
    frame_probabilities,
    pad_regions,
    regions_from_probabilities,
)
from tests.conftest import SENTENCE, SENTENCE_WORDS, SPEECH_DIR, Harness, serving

LAYOUT: dict[str, dict] = json.loads((SPEECH_DIR / "layout.json").read_text(encoding="utf-8"))
WITH_SPEECH = [name for name, info in LAYOUT.items() if info["speech"]]
WITHOUT_SPEECH = [name for name, info in LAYOUT.items() if not info["speech"]]
ON = ["max_new_tokens:48", "batch_window_ms:5", "vad:on"]
DEFAULTS = VadSettings()


def _path(name: str) -> str:
    return str(SPEECH_DIR / name)


@pytest.fixture(scope="module")
def samples() -> dict[str, np.ndarray]:
    """Every fixture decoded once."""
    return {name: load_audio(_path(name)) for name in LAYOUT}


@pytest.fixture
def vad_served(checkpoints: dict[str, Path]) -> Iterator[Harness]:
    """A server with the English model loaded, voice activity detection on (as by default)."""
    with serving() as served:
        result = served.stub.LoadModel(
            backend_pb2.ModelOptions(
                Model=str(checkpoints["asr"]), Options=[*ON, f"forced_aligner:{checkpoints['aligner']}"]
            ),
            timeout=120,
        )
        assert result.success, result.message
        yield served


def _heard(windows: list[Window]) -> float:
    return sum(w.duration_seconds for w in windows)


# --- pure functions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("speech", "pad", "total", "expected"),
    [
        ([], 10, 100, []),
        ([(20, 30)], 5, 100, [SpeechRegion(15, 35, 20, 30)]),
        ([(2, 30)], 5, 32, [SpeechRegion(0, 32, 2, 30)]),  # clamped to the file
        ([(20, 30), (50, 60)], 5, 100, [SpeechRegion(15, 35, 20, 30), SpeechRegion(45, 65, 50, 60)]),
        ([(20, 30), (34, 60)], 5, 100, [SpeechRegion(15, 32, 20, 30), SpeechRegion(32, 65, 34, 60)]),  # gap split
        ([(20, 30)], 0, 100, [SpeechRegion(20, 30, 20, 30)]),
    ],
)
def test_pad_regions(speech: list[tuple[int, int]], pad: int, total: int, expected: list[SpeechRegion]) -> None:
    assert pad_regions(speech, pad, total) == expected


@st.composite
def _runs(draw: st.DrawFn) -> tuple[list[tuple[int, int]], int, int]:
    cuts = sorted(draw(st.sets(st.integers(0, 10_000), max_size=12)))
    cuts = cuts[: len(cuts) // 2 * 2]
    runs = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts), 2)]
    total = draw(st.integers(max(cuts, default=0), 12_000))
    return runs, draw(st.integers(0, 3_000)), total


@given(_runs())
def test_padded_regions_hold_their_speech_and_never_overlap(case: tuple[list[tuple[int, int]], int, int]) -> None:
    speech, pad, total = case
    regions = pad_regions(speech, pad, total)
    assert [(r.speech_start, r.speech_end) for r in regions] == speech
    for region in regions:
        assert 0 <= region.start <= region.speech_start <= region.speech_end <= region.end <= total
        assert region.speech_start - region.start <= pad and region.end - region.speech_end <= pad
    for before, after in itertools.pairwise(regions):
        assert before.end <= after.start


def _probabilities(seconds: float, speech: list[tuple[float, float]], level: float = 0.9) -> np.ndarray:
    frames = np.full(int(seconds * SAMPLE_RATE / FRAME), 0.02, np.float32)
    for start, end in speech:
        frames[int(start * SAMPLE_RATE / FRAME) : int(end * SAMPLE_RATE / FRAME)] = level
    return frames


def _seconds(regions: list[SpeechRegion]) -> list[tuple[float, float]]:
    return [(round(r.speech_start / SAMPLE_RATE, 1), round(r.speech_end / SAMPLE_RATE, 1)) for r in regions]


@pytest.mark.parametrize(
    ("speech", "settings", "expected"),
    [
        ([(1, 3), (6, 8)], DEFAULTS, [(1, 3), (6, 8)]),  # 3 s apart: two regions
        ([(1, 3), (4, 8)], DEFAULTS, [(1, 8)]),  # 1 s apart: one region, the pause stays in
        ([(1, 3), (4, 8)], VadSettings(min_silence_seconds=0.5), [(1, 3), (4, 8)]),
        ([(1, 1.2)], DEFAULTS, []),  # 200 ms: a click, not speech
        ([], DEFAULTS, []),
    ],
)
def test_regions_from_probabilities(
    speech: list[tuple[float, float]], settings: VadSettings, expected: list[tuple[float, float]]
) -> None:
    probabilities = _probabilities(20.0, speech)
    regions = regions_from_probabilities(probabilities, len(probabilities) * FRAME, settings)
    assert _seconds(regions) == expected


def test_threshold_decides() -> None:
    probabilities = _probabilities(10.0, [(2, 5)], level=0.4)
    total = len(probabilities) * FRAME
    assert regions_from_probabilities(probabilities, total, DEFAULTS) == []
    assert _seconds(regions_from_probabilities(probabilities, total, VadSettings(threshold=0.3))) == [(2, 5)]


def test_speech_windows_cover_only_regions_and_tile_long_ones() -> None:
    samples = np.zeros(400 * SAMPLE_RATE, np.float32)
    regions = [
        SpeechRegion(16_000, 48_000, 20_000, 40_000),
        SpeechRegion(100 * 16_000, 350 * 16_000, 101 * 16_000, 349 * 16_000),
    ]
    windows = plan_speech_windows(samples, regions, max_seconds=120.0)
    assert windows[0] == Window(16_000, 48_000, 20_000, 40_000)
    long = windows[1:]
    assert len(long) == 3 and all(w.duration_seconds <= 120.0 for w in long)
    assert long[0].start == 100 * 16_000 and long[-1].end == 350 * 16_000
    assert all(a.end == b.start for a, b in itertools.pairwise(long))
    assert long[0].speech_seconds[0] == 101.0 and long[-1].speech_seconds[1] == 349.0
    assert plan_speech_windows(samples, [], max_seconds=120.0) == []


# --- the real Silero model on the speech fixtures ------------------------------------------------------------


@pytest.mark.parametrize("name", WITH_SPEECH)
def test_no_speech_is_dropped(name: str, samples: dict[str, np.ndarray]) -> None:
    windows = plan_request(samples[name], parse_options([]))
    assert windows, name
    for start, end in LAYOUT[name]["speech"]:
        first, last = int(start * SAMPLE_RATE), int(end * SAMPLE_RATE)
        assert any(w.start <= first and last <= w.end for w in windows), (name, start, end, windows)


@pytest.mark.parametrize("name", WITH_SPEECH)
def test_skipped_time_is_the_long_silences_less_padding(name: str, samples: dict[str, np.ndarray]) -> None:
    info = LAYOUT[name]
    edges = [0.0, *(t for run in info["speech"] for t in run), info["duration"]]
    silences = [edges[i + 1] - edges[i] for i in range(0, len(edges), 2)]
    pad, least = DEFAULTS.pad_seconds, DEFAULTS.min_silence_seconds
    # Silence before the first speech is skipped but for one pad, whatever its length; between speech and after
    # the last, only silence of at least `least` is, less a pad on each side that touches speech.
    lead, *between, trail = silences
    expected = max(0.0, lead - pad) + sum(gap - 2 * pad for gap in between if gap >= least)
    expected += trail - pad if trail >= least else 0.0
    skipped = info["duration"] - _heard(plan_request(samples[name], parse_options([])))
    assert skipped == pytest.approx(expected, abs=0.3), (name, silences)


@pytest.mark.parametrize("name", WITHOUT_SPEECH)
def test_noise_tone_and_silence_have_no_speech(name: str, samples: dict[str, np.ndarray]) -> None:
    assert detect_speech(samples[name], DEFAULTS) == []


def test_rows_side_by_side_match_one_row(samples: dict[str, np.ndarray]) -> None:
    """A long file runs as rows side by side; region edges stay within a frame of running it as one row."""
    audio = np.concatenate([samples["gap.opus"]] * 5)  # 88 s: 17 rows side by side
    import qwen_asr_worker.vad as vad

    batched = frame_probabilities(audio)
    original = vad._ROW_FRAMES
    vad._ROW_FRAMES = len(audio)  # one row holds the whole file
    try:
        single = frame_probabilities(audio)
    finally:
        vad._ROW_FRAMES = original
    total = len(audio)
    a = regions_from_probabilities(batched, total, DEFAULTS)
    b = regions_from_probabilities(single, total, DEFAULTS)
    assert len(a) == len(b) >= 5  # the copies' 1-s joins are short pauses: some merge
    for x, y in zip(a, b, strict=True):
        assert abs(x.speech_start - y.speech_start) <= FRAME and abs(x.speech_end - y.speech_end) <= FRAME


def test_vad_off_plans_exactly_as_before(samples: dict[str, np.ndarray]) -> None:
    audio = samples["late.opus"]
    opts = parse_options(["vad:off", "chunk_seconds:20"])
    assert plan_request(audio, opts) == plan_windows(audio, max_seconds=20.0)


# --- through the server ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", WITHOUT_SPEECH)
@pytest.mark.parametrize("granularity", [[], ["word"]])
def test_no_speech_no_model_call(vad_served: Harness, name: str, granularity: list[str]) -> None:
    model = vad_served.engine.current
    assert model is not None
    result = vad_served.transcribe(_path(name), timestamp_granularities=granularity, language="de")
    assert (result.text, list(result.segments), result.language) == ("", [], "de")
    assert result.duration == pytest.approx(LAYOUT[name]["duration"], abs=0.03)
    assert model.windows_transcribed == 0
    assert model.aligner_loads == 0  # a timestamp request on silence does not load the aligner
    assert vad_served.transcribe(_path(name)).language == ""  # no language asked, none heard


def test_speech_after_a_minute_is_reported_after_a_minute(vad_served: Harness) -> None:
    result = vad_served.transcribe(_path("late.opus"), timestamp_granularities=["word"])
    words = [w for s in result.segments for w in s.words]
    assert [w.text for w in words] == SENTENCE_WORDS
    speech_start = LAYOUT["late.opus"]["speech"][0][0]
    assert all(w.start >= (speech_start - DEFAULTS.pad_seconds) * 1e9 for w in words)
    assert all(w.end <= result.duration * 1e9 for w in words)


def test_without_padding_words_start_after_the_silence(checkpoints: dict[str, Path]) -> None:
    with serving() as served:
        assert served.load(
            checkpoints["asr"], *ON, "vad_pad_seconds:0", f"forced_aligner:{checkpoints['aligner']}"
        ).success
        result = served.transcribe(_path("late.opus"), timestamp_granularities=["word"])
    starts = [w.start for s in result.segments for w in s.words]
    assert len(starts) == len(SENTENCE_WORDS) and min(starts) >= 60.0e9


def test_untimed_results_have_one_segment_per_window_at_the_speech(vad_served: Harness) -> None:
    result = vad_served.transcribe(_path("gap.opus"))
    assert result.text == f"{SENTENCE} {SENTENCE}"
    assert [s.text for s in result.segments] == [SENTENCE, SENTENCE]
    for segment, (start, end) in zip(result.segments, LAYOUT["gap.opus"]["speech"], strict=True):
        assert segment.start / 1e9 == pytest.approx(start, abs=0.25)
        assert segment.end / 1e9 == pytest.approx(end, abs=0.6)  # the speech run ends after the hysteresis
        assert segment.start < segment.end


def test_windows_are_the_same_with_and_without_timestamps(vad_served: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    model = vad_served.engine.current
    assert model is not None
    sent: list[int] = []
    submit = model.batcher.submit

    def spy(samples: np.ndarray, context: str, language: str | None):
        sent.append(len(samples))
        return submit(samples, context, language)

    monkeypatch.setattr(model.batcher, "submit", spy)
    for granularity in ([], ["word"], ["segment"]):
        vad_served.transcribe(_path("gap.opus"), timestamp_granularities=granularity)
    windows = plan_request(load_audio(_path("gap.opus")), model.spec.options)
    assert len(windows) == 2
    assert sent == [w.end - w.start for w in windows] * 3


def test_stream_sends_a_delta_per_window_and_nothing_for_silence(vad_served: Harness) -> None:
    events = list(vad_served.stub.AudioTranscriptionStream(backend_pb2.TranscriptRequest(dst=_path("gap.opus"))))
    deltas = [e.delta for e in events if e.delta]
    assert len(deltas) == 2 and "".join(deltas) == events[-1].final_result.text == f"{SENTENCE} {SENTENCE}"
    silent = list(vad_served.stub.AudioTranscriptionStream(backend_pb2.TranscriptRequest(dst=_path("silence.flac"))))
    assert len(silent) == 1 and silent[0].final_result.text == "" and silent[0].final_result.duration == 30.0


def test_vad_off_hears_everything(checkpoints: dict[str, Path]) -> None:
    with serving() as served:
        assert served.load(checkpoints["asr"], "vad:off").success
        result = served.transcribe(_path("silence.flac"))
        model = served.engine.current
        assert model is not None and model.windows_transcribed == 1
    assert result.text == SENTENCE  # the tiny model says its sentence whatever it hears: the model was called
    assert [(s.start, s.end) for s in result.segments] == [(0, 30 * 10**9)]  # one segment, 0 to the duration


def test_silero_loads_lazily_and_keeps_the_thread_count() -> None:
    script = """
import sys, torch
torch.set_num_threads(2)
from qwen_asr_worker import engine  # noqa
assert "silero_vad" not in sys.modules, "imported at startup"
import numpy as np
from qwen_asr_worker.vad import VadSettings, detect_speech
detect_speech(np.zeros(16000, np.float32), VadSettings())
assert "silero_vad" in sys.modules
print(torch.get_num_threads())
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent
    )
    assert out.stdout.strip() == "2"  # silero_vad's import sets 1 for the whole process; the worker puts it back


# --- degenerate aligner times stay in their window ------------------------------------------------------------------


def _zero_times_of(monkeypatch: pytest.MonkeyPatch, positions: set[int]) -> None:
    """The real aligner's answer with every time of the windows at `positions` (in one align call's batch) set to
    0: the upstream bug (QwenLM/Qwen3-ASR issue 55) on a chosen window."""
    from qwen_asr import Qwen3ForcedAligner
    from qwen_asr.inference.qwen3_forced_aligner import ForcedAlignItem, ForcedAlignResult

    real = Qwen3ForcedAligner.align

    def align(self: Qwen3ForcedAligner, audio: object, text: object, language: object) -> list[ForcedAlignResult]:
        results = real(self, audio=audio, text=text, language=language)
        return [
            ForcedAlignResult([ForcedAlignItem(it.text, 0, 0) for it in r.items]) if i in positions else r
            for i, r in enumerate(results)
        ]

    monkeypatch.setattr(Qwen3ForcedAligner, "align", align)


def _timed(served: Harness, name: str) -> list[tuple[int, int]]:
    result = served.transcribe(_path(name), timestamp_granularities=["word"])
    return [(w.start, w.end) for s in result.segments for w in s.words]


def _windows(name: str, *options: str) -> list[Window]:
    return plan_request(load_audio(_path(name)), parse_options(list(options)))


@pytest.mark.parametrize(
    ("name", "options", "broken"),
    [
        ("gap.opus", ["vad:on"], 1),  # the second of two speech regions
        ("late.opus", ["vad:on"], 0),  # the only region, after a minute of silence
        ("gap.opus", ["vad:off", "chunk_seconds:10"], 1),  # the second of two windows
        ("late.opus", ["vad:off", "chunk_seconds:10"], -1),  # the window with the speech, after six of silence
    ],
)
def test_degenerate_word_times_stay_in_their_window(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch, name: str, options: list[str], broken: int
) -> None:
    windows = _windows(name, *options)
    broken %= len(windows)
    with serving() as served:
        assert served.load(checkpoints["asr"], *options, f"forced_aligner:{checkpoints['aligner']}").success
        good = _timed(served, name)
        _zero_times_of(monkeypatch, {broken})
        repaired = _timed(served, name)
    per_window = len(SENTENCE_WORDS)  # the tiny model says its sentence in every window
    assert len(good) == len(repaired) == per_window * len(windows)
    for k, window in enumerate(windows):
        mine = slice(k * per_window, (k + 1) * per_window)
        if k != broken:
            assert repaired[mine] == good[mine]  # the other windows keep the aligner's times
            continue
        low, high = (round(t * 1e9) for t in window.speech_seconds)
        assert all(low <= start <= end <= high for start, end in repaired[mine])  # inside the window's speech
        starts = [start for start, _ in repaired[mine]]
        assert starts == sorted(set(starts))  # spread out, not stacked on one time
    if options[0] == "vad:on":  # and inside the speech the layout says is there, never in the skipped silence
        speech_start, speech_end = LAYOUT[name]["speech"][broken]
        mine = repaired[broken * per_window : (broken + 1) * per_window]
        assert speech_start - 0.25 <= mine[0][0] / 1e9 and mine[-1][1] / 1e9 <= speech_end + 0.6
