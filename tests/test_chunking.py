"""Window planning for long audio: tiling, the length cap, and cuts at the quietest point."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_asr_worker.chunking import Window, plan_windows
from tests.audio_fixtures import speech_like

RATE = 16000


def _check_tiling(windows: list[Window], total: int, max_len: int, search: int) -> None:
    """Exact tiling, nothing above the cap, every cut inside its search range."""
    assert windows[0].start == 0 and windows[-1].end == total
    for a, b in itertools.pairwise(windows):
        assert a.end == b.start
        assert a.start + max_len - search <= a.end <= a.start + max_len
    assert all(type(w.start) is int and type(w.end) is int for w in windows)
    assert all(0 < w.end - w.start <= max_len for w in windows) or total == 0


def test_short_audio_is_one_window() -> None:
    windows = plan_windows(np.zeros(RATE * 30, np.float32))
    assert windows == [Window(0, RATE * 30)]
    assert windows[0].offset_seconds == 0.0 and windows[0].duration_seconds == 30.0


def test_exactly_max_is_one_window() -> None:
    assert plan_windows(np.zeros(RATE * 180, np.float32)) == [Window(0, RATE * 180)]


def test_empty_audio_is_one_empty_window() -> None:
    assert plan_windows(np.zeros(0, np.float32)) == [Window(0, 0)]


def test_ten_minutes_cut_in_the_middle_of_each_gap() -> None:
    gaps = [(176.5, 178.0), (354.0, 355.5), (531.0, 532.5)]
    samples = speech_like(600.0, RATE, gaps)
    windows = plan_windows(samples, max_seconds=180.0, search_seconds=5.0)
    assert len(windows) == 4
    for window, (start, end) in zip(windows, gaps, strict=False):
        assert window.end / RATE == pytest.approx((start + end) / 2, abs=0.05)
    _check_tiling(windows, len(samples), 180 * RATE, 5 * RATE)
    assert windows[1].offset_seconds == windows[0].duration_seconds
    assert sum(w.duration_seconds for w in windows) == pytest.approx(600.0)


def test_a_pause_beats_a_single_silent_frame() -> None:
    """A 400-ms pause with some room noise wins over a 25-ms hole of digital silence (a stop consonant)."""
    samples = speech_like(200.0, RATE)
    samples[int(176.0 * RATE) : int(176.4 * RATE)] *= 0.03
    samples[int(178.5 * RATE) : int(178.525 * RATE)] = 0.0
    cut = plan_windows(samples)[0].end / RATE
    assert 176.0 < cut < 176.4


def test_the_longest_silent_run_wins_and_is_cut_in_its_middle() -> None:
    samples = speech_like(200.0, RATE, gaps=[(175.5, 175.8), (177.0, 178.0), (179.0, 179.2)])
    assert plan_windows(samples)[0].end / RATE == pytest.approx(177.5, abs=0.03)


def test_the_last_window_is_not_a_sliver() -> None:
    """With 0.3 s left after the limit, a silent spot at 179.8 s would leave 0.5 s: the cut stays >= 1 s back."""
    samples = speech_like(180.3, RATE, gaps=[(179.8, 180.0)])
    windows = plan_windows(samples)
    assert len(windows) == 2
    assert windows[1].duration_seconds >= 1.0
    _check_tiling(windows, len(samples), 180 * RATE, 5 * RATE)


def test_no_gap_still_respects_the_cap() -> None:
    samples = speech_like(500.0, RATE)
    windows = plan_windows(samples, max_seconds=60.0)
    _check_tiling(windows, len(samples), 60 * RATE, 5 * RATE)
    assert len(windows) == 9


def test_any_sample_type() -> None:
    samples = speech_like(30.0, RATE, gaps=[(8.0, 8.5)])
    for cast in (samples.astype(np.float64), (samples * 10000).astype(np.int16)):
        assert plan_windows(cast, max_seconds=10.0)[0].end / RATE == pytest.approx(8.25, abs=0.03)


def test_nan_and_inf_do_not_break_the_search() -> None:
    samples = speech_like(30.0, RATE, gaps=[(8.0, 8.5)])
    samples[RATE * 7 : RATE * 9 : 7] = np.nan
    samples[RATE * 9 : RATE * 10] = np.inf
    windows = plan_windows(samples, max_seconds=10.0, search_seconds=5.0)
    _check_tiling(windows, len(samples), 10 * RATE, 5 * RATE)


def test_one_hour_plans() -> None:
    samples = speech_like(3600.0, RATE)
    windows = plan_windows(samples)
    _check_tiling(windows, len(samples), 180 * RATE, 5 * RATE)
    assert len(windows) == 21


@pytest.mark.parametrize(("max_s", "search_s"), [(10.0, 10.0), (10.0, 0.0), (5.0, 20.0), (10.0, -1.0)])
def test_bad_parameters(max_s: float, search_s: float) -> None:
    with pytest.raises(ValueError, match="search_seconds"):
        plan_windows(np.zeros(10, np.float32), max_seconds=max_s, search_seconds=search_s)


@pytest.mark.parametrize(("rate", "frame_ms"), [(16000, 0.0), (16000, -5.0), (0, 25.0)])
def test_bad_frames(rate: int, frame_ms: float) -> None:
    with pytest.raises(ValueError, match="frame_ms"):
        plan_windows(np.zeros(10, np.float32), sample_rate=rate, frame_ms=frame_ms)


@settings(max_examples=80, deadline=None)
@given(
    tenths=st.integers(min_value=0, max_value=300),
    max_tenths=st.integers(min_value=2, max_value=40),
    search_frac=st.sampled_from([0.01, 0.1, 0.3, 0.5, 0.9]),
    rate=st.sampled_from([8000, 16000]),
    frame_ms=st.sampled_from([1.0, 10.0, 25.0, 50.0]),
    gaps=st.lists(
        st.tuples(st.integers(0, 30_000), st.integers(1, 1000)), max_size=6
    ),  # ms: torch (via conftest) sets flush-to-zero, which hypothesis floats refuse
    seed=st.integers(0, 1000),
)
def test_tiling_property(
    tenths: int,
    max_tenths: int,
    search_frac: float,
    rate: int,
    frame_ms: float,
    gaps: list[tuple[int, int]],
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    samples = (rng.standard_normal(tenths * rate // 10) * rng.uniform(0, 1)).astype(np.float32)
    for start_ms, length_ms in gaps:
        samples[start_ms * rate // 1000 : (start_ms + length_ms) * rate // 1000] = 0.0
    max_s, search_s = max_tenths / 10, max_tenths / 10 * search_frac
    windows = plan_windows(samples, max_seconds=max_s, search_seconds=search_s, sample_rate=rate, frame_ms=frame_ms)
    _check_tiling(windows, len(samples), int(max_s * rate), int(search_s * rate))
