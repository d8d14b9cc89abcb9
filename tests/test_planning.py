"""Windows planned while the file decodes: the region finder, the tiler and the whole plan give, piece by piece,
exactly what they give over the whole file, and the first windows come before the file is read to its end."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from silero_vad import get_speech_timestamps_from_probs

from qwen_asr_worker import audio, vad
from qwen_asr_worker.audio import SAMPLE_RATE, decode_audio, load_audio
from qwen_asr_worker.chunking import Tiler, Window, plan_windows
from qwen_asr_worker.options import parse_options
from qwen_asr_worker.planning import WindowPlan, plan_request
from qwen_asr_worker.vad import FRAME, MIN_SPEECH_MS, RegionFinder, SpeechRegion, VadSettings, pad_regions
from tests.audio_fixtures import write_audio

SPEECH = Path(__file__).parent / "fixtures" / "speech"


def _silero_regions(probabilities: np.ndarray, total: int, settings: VadSettings) -> list[SpeechRegion]:
    """The regions as silero-vad's own function finds the runs over the whole file, then padded."""
    runs = get_speech_timestamps_from_probs(
        [float(p) for p in probabilities],
        sampling_rate=SAMPLE_RATE,
        threshold=settings.threshold,
        min_speech_duration_ms=MIN_SPEECH_MS,
        min_silence_duration_ms=round(settings.min_silence_seconds * 1000),
        speech_pad_ms=0,
        audio_length_samples=total,
    )
    speech = [(min(int(r["start"]), total), min(int(r["end"]), total)) for r in runs]
    return pad_regions([(s, e) for s, e in speech if e > s], round(settings.pad_seconds * SAMPLE_RATE), total)


@settings(max_examples=300, deadline=None)
@given(
    runs=st.lists(
        st.tuples(st.sampled_from([0.0, 0.02, 0.3, 0.36, 0.4, 0.5, 0.55, 0.9, 1.0]), st.integers(1, 90)), max_size=30
    ),
    noise=st.lists(st.floats(0.0, 1.0, width=32, allow_subnormal=False), max_size=60),
    threshold=st.sampled_from([0.005, 0.1, 0.3, 0.5, 0.7]),
    silence=st.sampled_from([0.001, 0.05, 0.3, 1.0, 2.0]),
    pad=st.sampled_from([0.0, 0.005, 0.1, 0.4, 1.0]),
    cuts=st.lists(st.integers(0, 3000), max_size=6),
    short=st.integers(0, FRAME - 1),
)
# A run starts within two pads of the one before it and is dropped as too short: the region before it takes its
# whole pad, so it was not final when the short run began (found by hypothesis).
@example(runs=[(0.02, 8), (0.0, 2)], noise=[1.0], threshold=0.005, silence=0.001, pad=0.1, cuts=[], short=0)
@example(
    runs=[(0.9, 20), (0.0, 3), (0.9, 5)], noise=[0.0] * 40, threshold=0.5, silence=0.05, pad=0.4, cuts=[25, 27], short=0
)
def test_region_finder_gives_silero_regions_in_pieces(
    runs: list[tuple[float, int]],
    noise: list[float],
    threshold: float,
    silence: float,
    pad: float,
    cuts: list[int],
    short: int,
) -> None:
    """Fed in any pieces, the finder gives silero-vad's regions, in order, each once; what it gives before the
    length is known is already final, and so is what it says of the run still open (its region's start and
    speech start, and a bound its region's and its speech's ends reach)."""
    parts = [np.full(n, p, np.float32) for p, n in runs] + [np.asarray(noise, np.float32)]
    probabilities = np.concatenate(parts)
    total = max(1, len(probabilities) * FRAME - short) if len(probabilities) else 0
    settings_ = VadSettings(threshold, silence, pad)
    expected = _silero_regions(probabilities, total, settings_)
    finder = RegionFinder(settings_)
    bounds = [0, *sorted(min(c, len(probabilities)) for c in cuts), len(probabilities)]
    found: list[SpeechRegion] = []
    for a, b in itertools.pairwise(bounds):
        found.extend(finder.feed(probabilities[a:b]))
        assert found == expected[: len(found)]
        run = finder.open_run()
        if run is not None:
            begin, speech_start, end_at_least = run
            assert len(expected) > len(found)
            region = expected[len(found)]
            assert (region.start, region.speech_start) == (begin, speech_start)
            assert region.speech_end >= end_at_least and region.end >= end_at_least
    assert found + finder.finish(total) == expected


def _recording(rng: np.random.Generator, length: int) -> np.ndarray:
    """Noise whose loudness changes every few dozen samples, with stretches of digital silence."""
    levels = rng.choice([0.0, 0.001, 0.05, 1.0], size=length // 37 + 1)
    return (rng.standard_normal(length) * np.repeat(levels, 37)[:length]).astype(np.float32)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    length=st.integers(0, 6000),
    begin=st.integers(0, 400),
    max_seconds=st.sampled_from([0.3, 0.7, 1.5]),
    search=st.sampled_from([0.1, 0.5, 0.9]),
    frame_ms=st.sampled_from([1.0, 5.0, 25.0, 40.0, 400.0]),
    known=st.lists(st.integers(0, 6500), max_size=10),
)
def test_tiler_cuts_the_same_whatever_it_knew_before(
    seed: int, length: int, begin: int, max_seconds: float, search: float, frame_ms: float, known: list[int]
) -> None:
    """Told along the way that the stretch reaches at least so far, the tiler gives the cuts of the whole stretch
    (at a 1-kHz rate, so that the search ranges and the last-window rule come into play on short arrays)."""
    rng = np.random.default_rng(seed)
    samples = _recording(rng, begin + length)
    args = (max_seconds, max_seconds * search, 1000, frame_ms)
    expected = Tiler(samples, begin, *args).finish(begin + length)
    tiler = Tiler(samples, begin, *args)
    got: list[Window] = []
    for reach in sorted(k for k in known if k <= length):
        got.extend(tiler.advance(begin + reach))
    got.extend(tiler.finish(begin + length))
    assert got == expected
    assert got[0].start == begin and got[-1].end == begin + length
    assert all(a.end == b.start for a, b in itertools.pairwise(got))
    if begin == 0:
        assert got == plan_windows(
            samples, max_seconds=max_seconds, search_seconds=args[1], sample_rate=1000, frame_ms=frame_ms
        )


@pytest.fixture(scope="module")
def long_speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3.8 minutes: 10 s of silence, 150 s of speech with no long pause, 30 s of silence, 20 s of speech, 5 s of
    silence."""
    speech = load_audio(str(SPEECH / "meeting.opus"))
    silence = np.zeros(SAMPLE_RATE * 10, np.float32)
    tail = [silence, silence, silence, speech[: 20 * SAMPLE_RATE], silence[: 5 * SAMPLE_RATE]]
    samples = np.concatenate([silence, speech, speech, speech, *tail])
    return write_audio(tmp_path_factory.mktemp("planning") / "long.flac", samples, SAMPLE_RATE, "flac")


@pytest.mark.parametrize("options", [[], ["vad:off"]], ids=["vad", "no-vad"])
def test_windows_planned_while_decoding_are_the_whole_files(
    long_speech: Path, options: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read 1 s at a time from a spilled file, with VAD groups of 10 s (so speech stays open across groups), the
    plan gives the whole file's windows exactly, the first ones long before the end of the file is read; with
    VAD it keeps the frame probabilities of the whole file."""
    monkeypatch.setattr(vad, "_MAX_ROWS", 2)
    monkeypatch.setattr(audio, "_BLOCK_FRAMES", SAMPLE_RATE)
    opts = parse_options(["chunk_seconds:20", *options])
    whole = load_audio(str(long_speech))
    expected = plan_request(whole, opts)
    given_at: list[tuple[Window, int]] = []
    with decode_audio(str(long_speech), spill_bytes=4096) as decoding:
        plan = WindowPlan(decoding, decoding.available, opts, keep_probabilities=True)
        for window in plan:
            assert not decoding.complete or window.start > 150 * SAMPLE_RATE
            given_at.append((window, len(decoding)))
        assert decoding.on_disk
    assert [w for w, _ in given_at] == expected == plan.windows
    assert len(expected) >= 9
    # Windows of the 150-s speech came while the decoder was still inside it: cut as the stretch went on.
    early = [w for w, read in given_at if read < 150 * SAMPLE_RATE]
    assert len(early) >= 4 and given_at[0][1] < 45 * SAMPLE_RATE
    if opts.vad:
        np.testing.assert_array_equal(plan.probabilities, vad.frame_probabilities(whole))
        assert expected[0].start > 9 * SAMPLE_RATE and expected[-1].end < len(whole) - 4 * SAMPLE_RATE
    else:
        assert plan.probabilities is None and expected == plan_windows(whole, max_seconds=20.0)


def test_a_damaged_tail_fails_the_plan_where_the_decoder_meets_it(tmp_path: Path) -> None:
    """A NaN 100 s into a file stops the plan with the decoder's error once it gets there, after the windows
    before it were given."""
    samples = np.zeros(SAMPLE_RATE * 200, np.float32)
    samples[100 * SAMPLE_RATE] = np.nan
    path = write_audio(tmp_path / "nan.wav", samples, SAMPLE_RATE, "wav", subtype="FLOAT")
    windows: list[Window] = []
    with decode_audio(str(path)) as decoding, pytest.raises(audio.AudioError, match="NaN or infinite"):
        for window in WindowPlan(decoding, decoding.available, parse_options(["vad:off", "chunk_seconds:20"])):
            windows.append(window)
    assert len(windows) >= 1 and windows[-1].end < 100 * SAMPLE_RATE


def test_reading_past_what_decoded_after_an_error_says_so(tmp_path: Path) -> None:
    """After the decoder's error the samples already final can still be counted, but asking for more raises
    instead of passing for the end of the file."""
    samples = np.zeros(SAMPLE_RATE * 200, np.float32)
    samples[100 * SAMPLE_RATE] = np.nan
    path = write_audio(tmp_path / "nan.wav", samples, SAMPLE_RATE, "wav", subtype="FLOAT")
    with decode_audio(str(path)) as decoding:
        with pytest.raises(audio.AudioError, match="NaN or infinite"):
            decoding.available(sys.maxsize)
        final = len(decoding)
        assert decoding.available(final) == final
        with pytest.raises(RuntimeError, match="after its decoding was stopped"):
            decoding.available(final + 1)
